"""The chat page at `/`, driven in real headless Chromium (Debian's package, installed by scripts/setup.sh) through
Playwright for Python, against a live `llmrun serve` of the demo model, and a fake-engine server where the reply
must be scripted (model output that looks like HTML) or slow. Skipped, saying why, only where the machine cannot
have Chromium (not root, no apt-get, or LLMRUN_NO_CHROMIUM=1); where `make setup` could have installed it, its
absence fails.

Set LLMRUN_WRITE_SCREENSHOTS=1 to refresh docs/webui-desktop.png and docs/webui-mobile.png (otherwise the
screenshots are taken into a temporary folder and only checked)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from playwright.sync_api import expect, sync_playwright   # a test dependency (pyproject [test])

from fake_engine import FakeEngine
from fake_pool import FakeLoader, fake_pool
from live_server import running, wait_ready
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig
from test_server_real import cli_server

CHROMIUM = os.environ.get("LLMRUN_CHROMIUM", "/usr/bin/chromium")
# Playwright's launch() gives every browser a fresh --user-data-dir of its own (and refuses one in `args`)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
REPLY_TIMEOUT = 90_000          # ms: the demo model on a loaded 2-core machine

def _cannot_have_chromium() -> str | None:
    """Why this machine has no Chromium for a reason of its own (the tests are then skipped, saying it), or None:
    Chromium is here, or `make setup` could have installed it (root with apt-get), so its absence is a failure
    the `browser` fixture reports, never a skip."""
    if Path(CHROMIUM).exists():
        return None
    if os.environ.get("LLMRUN_NO_CHROMIUM") == "1":
        return f"no Chromium at {CHROMIUM}: LLMRUN_NO_CHROMIUM=1 told `make setup` not to install it"
    if "LLMRUN_CHROMIUM" not in os.environ and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return (f"no Chromium at {CHROMIUM}, and `make setup` installs Debian's chromium only as root with apt-get "
                "(install the chromium package, or point LLMRUN_CHROMIUM at a Chromium)")
    return None


_NO_CHROMIUM = _cannot_have_chromium()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(_NO_CHROMIUM is not None, reason=_NO_CHROMIUM or "")]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}, though this machine can install it (root with apt-get): "
                    "`make setup` failed to install Debian's chromium (see its output), or LLMRUN_CHROMIUM points "
                    "at a missing file")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A Playwright page with what went wrong on it: uncaught errors, console errors, dialogs (alert...)."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

        def dialog(d):
            self.dialogs.append(f"{d.type}: {d.message}")
            d.dismiss()
        page.on("dialog", dialog)

    def __getattr__(self, name):
        return getattr(self.page, name)

    def serious_errors(self) -> list[str]:
        """Errors other than the browser's own line for a 401/404/503 answer the page then handles."""
        return [e for e in self.errors if not re.search(r"Failed to load resource: the server responded with a "
                                                        r"status of (401|404|503)", e)]


@pytest.fixture
def open_page(browser):
    contexts = []

    def make(base: str, *, width: int = 1280, height: int = 800, scheme: str = "light",
             storage: dict | None = None) -> Page:
        ctx = browser.new_context(base_url=base, viewport={"width": width, "height": height}, color_scheme=scheme,
                                  storage_state=storage)
        ctx.set_default_timeout(30_000)
        contexts.append(ctx)
        page = Page(ctx.new_page())
        page.goto("/")
        return page

    yield make
    for ctx in contexts:
        ctx.close()


@pytest.fixture(scope="module")
def demo(demo_gguf):
    """`llmrun serve` of the demo model; the page is opened at the URL it prints for browsers."""
    with cli_server(demo_gguf, "--parallel", "2", "--ctx", "1024") as (base, proc, lines):
        printed = [m.group(1) for m in map(re.compile(r"chat in a browser: (http://\S+)/$").search, lines) if m]
        assert printed == [base], lines
        yield printed[0]


def _metrics(base: str, headers: dict | None = None) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", headers=headers or {}).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(llmrun_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}


def _ready(page: Page) -> None:
    expect(page.locator("#server-state")).to_have_class(re.compile(r"\bok\b"))


def _settings(page: Page, *, temperature: str | None = "0", max_tokens: str | None = None) -> None:
    """Through the panel, as a person would (on narrow screens it is a drawer)."""
    if not page.locator("#panel").is_visible():
        page.click("#open-panel")
    if temperature is not None:
        page.locator("#temperature").fill(temperature)
    if max_tokens is not None:
        page.locator("#max-tokens").fill(max_tokens)
    if page.locator("#scrim").is_visible():
        page.click("#close-panel")


def _ask(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def _wait_done(page: Page) -> None:
    expect(page.locator("#send")).to_be_visible(timeout=REPLY_TIMEOUT)


def _last_reply(page: Page):
    return page.locator(".msg.assistant").last


def test_question_streams_the_answer_with_the_launchers_numbers(demo, open_page):
    page = open_page(demo)
    _ready(page)
    expect(page.locator("#model")).to_have_value("demo")
    _settings(page, temperature="0")
    # record what the reply shows each time the page changes it
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const r = [...document.querySelectorAll('.msg.assistant .content')].pop();
            if (r && window.seen[window.seen.length - 1] !== r.textContent) window.seen.push(r.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    _ask(page, "What is the capital of France?")
    expect(_last_reply(page).locator(".content")).to_contain_text("Paris", timeout=REPLY_TIMEOUT)
    _wait_done(page)
    seen = [s for s in page.evaluate("window.seen") if s]
    final = _last_reply(page).locator(".content").text_content()
    assert seen[0].startswith("loading"), seen[:3]        # until the first token
    growing = [s for s in seen if not s.startswith("loading")]
    assert len(growing) >= 3, f"the reply arrived in {len(growing)} piece(s), not streamed: {growing}"
    assert len(growing[0]) < len(final) and growing[-1] == final and "Paris" in final
    # the launcher's numbers: context used of the context per request, speed, time to first token
    expect(page.locator("#ctx-text")).to_have_text(re.compile(r"context \d+ / 1024"))
    used = int(re.search(r"context (\d+)", page.locator("#ctx-text").inner_text()).group(1))
    assert 20 < used < 200
    expect(page.locator("#speed")).to_have_text(re.compile(r"\d+\.\d tok/s"))
    expect(page.locator("#ttft")).to_have_text(re.compile(r"first token \d+\.\d\d s"))
    expect(_last_reply(page).locator(".meta")).to_contain_text("tok/s")
    # the panel: what is loaded, and llama.cpp's buffers as a bar against this machine's RAM
    expect(page.locator("#model-facts")).to_contain_text("1024 tokens per request")
    expect(page.locator("#model-facts")).to_contain_text("Q4_1")
    expect(page.locator(".mem-label")).to_contain_text("RAM")
    expect(page.locator(".mem-legend")).to_contain_text("weights")
    expect(page.locator(".mem-legend")).to_contain_text("KV cache")
    expect(page.locator("#machine-facts")).to_contain_text("RAM")
    assert page.serious_errors() == []


def test_stop_and_esc_cancel_the_reply_and_free_the_slot(demo, open_page):
    page = open_page(demo)
    _ready(page)
    _settings(page, temperature="0", max_tokens="")
    before = _metrics(demo)["llmrun_cancelled_total"]
    for how in ("click", "esc"):
        _ask(page, "Write a very long story about a dragon.")
        reply = _last_reply(page).locator(".content")
        expect(reply).to_have_text(re.compile(r"\w+(\W+\w+){15}"), timeout=REPLY_TIMEOUT)   # mid-reply
        if how == "click":
            page.click("#stop")
        else:
            page.keyboard.press("Escape")
        _wait_done(page)
        expect(_last_reply(page).locator(".meta")).to_contain_text("stopped")
        deadline = time.monotonic() + 15
        while True:
            m = _metrics(demo)
            if m["llmrun_busy_slots"] == 0 and m["llmrun_requests_in_flight"] == 0:
                break
            assert time.monotonic() < deadline, f"the slot was not freed after Stop ({how}): {m}"
            time.sleep(0.1)
        stopped_at = reply.inner_text()
        time.sleep(0.5)
        assert reply.inner_text() == stopped_at, "the reply kept growing after Stop"
    assert _metrics(demo)["llmrun_cancelled_total"] == before + 2, "both generations were cancelled mid-way"
    assert page.serious_errors() == []


def test_conversations_survive_a_reload_and_can_be_switched_and_deleted(demo, open_page):
    page = open_page(demo)
    _ready(page)
    _settings(page, temperature="0", max_tokens="12")
    _ask(page, "What is the capital of France?")
    _wait_done(page)
    first_reply = _last_reply(page).locator(".content").inner_text()
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    _ask(page, "Say hello.")
    _wait_done(page)
    expect(page.locator(".conv-open")).to_have_count(2)

    page.reload()
    _ready(page)
    expect(page.locator(".conv-open")).to_have_count(2)
    expect(page.locator(".msg.user .content")).to_have_text(["Say hello."])     # the latest is shown
    page.locator(".conv-open", has_text="capital of France").click()
    expect(page.locator(".msg.user .content")).to_have_text(["What is the capital of France?"])
    assert _last_reply(page).locator(".content").inner_text() == first_reply
    expect(page.locator("#max-tokens")).to_have_value("12")                     # the settings are kept too

    # delete asks for a second click
    item = page.locator(".conv-list li", has_text="Say hello")
    item.locator(".conv-delete").click()
    expect(page.locator(".conv-open")).to_have_count(2)
    item.locator(".conv-delete.confirm").click()
    expect(page.locator(".conv-open")).to_have_count(1)
    page.reload()
    _ready(page)
    expect(page.locator(".conv-open")).to_have_text(["What is the capital of France?"])
    assert page.serious_errors() == []


def test_edit_resend_and_regenerate(demo, open_page):
    page = open_page(demo)
    _ready(page)
    _settings(page, temperature="0", max_tokens="24")
    _ask(page, "What is the capital of Italy?")
    _wait_done(page)
    user = page.locator(".msg.user").first
    user.hover()
    user.get_by_role("button", name="Edit").click()
    page.locator(".edit-area").fill("What is the capital of France?")
    page.locator(".edit-area").press("Enter")
    expect(page.locator(".msg.user .content")).to_have_text(["What is the capital of France?"])
    expect(_last_reply(page).locator(".content")).to_contain_text("Paris", timeout=REPLY_TIMEOUT)
    _wait_done(page)
    expect(page.locator(".msg")).to_have_count(2)
    answer = _last_reply(page).locator(".content").inner_text()

    _last_reply(page).get_by_role("button", name="Regenerate").click()
    _wait_done(page)
    expect(page.locator(".msg")).to_have_count(2)                              # the reply replaced, not added
    assert "Paris" in _last_reply(page).locator(".content").inner_text() and "Paris" in answer

    page.locator(".msg.user").first.get_by_role("button", name="Resend").click()
    _wait_done(page)
    expect(page.locator(".msg")).to_have_count(2)
    assert "Paris" in _last_reply(page).locator(".content").inner_text()
    assert page.serious_errors() == []


HOSTILE = ("Here: <img src=x onerror=alert(1)> and <script>alert(2)</script> **bold** "
           "[click](javascript:alert(3)) [docs](https://example.org/)\n\n"
           "```html\n<b onclick=alert(4)>code</b>\n```\n")


def test_model_output_that_looks_like_html_is_shown_as_text(open_page):
    engine = FakeEngine(model_name="fake-model", n_ctx=4096, token_delay=0.01, reply=HOSTILE,
                        notice="context full: dropped the 2 oldest messages")
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))
    with running(app) as base:
        page = open_page(base)
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        _ready(page)
        _ask(page, "Show me some HTML.")
        _wait_done(page)
        reply = _last_reply(page)
        text = reply.locator(".content").inner_text()
        assert "<img src=x onerror=alert(1)>" in text and "<script>alert(2)</script>" in text
        assert "<b onclick=alert(4)>code</b>" in reply.locator("pre code").inner_text()
        assert reply.locator("img, script, b, [onerror], [onclick]").count() == 0
        expect(reply.locator("strong")).to_have_text("bold")                   # Markdown still works
        assert reply.locator("a").evaluate_all("as => as.map(a => a.href)") == ["https://example.org/"]
        assert "[click](javascript:alert(3))" in text
        expect(reply.locator(".notice")).to_have_text("context full: dropped the 2 oldest messages")
        time.sleep(0.3)
        assert page.dialogs == [], "a script in the reply ran"
        # the code block's copy button copies the code, as text
        reply.locator(".code-copy").click()
        expect(reply.locator(".code-copy")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == "<b onclick=alert(4)>code</b>"
        assert page.serious_errors() == [], "no CSP or Trusted Types violation, no script error"
        # it really came through the streaming route, one word at a time
        assert engine.submitted and engine.submitted[-1][0] == "chat"


def test_a_slow_first_token_shows_loading_and_a_missing_model_is_explained(open_page, tmp_path):
    release = threading.Event()
    loader = FakeLoader({"fake-model": 100 << 20}, hold={"fake-model": release}, token_delay=1.0,
                        n_ctx=4096)
    app = create_app(ServerConfig(retry_after_s=1), pool=fake_pool(tmp_path, loader, budget=None),
                     preload="fake-model")
    with running(app) as base:
        page = open_page(base)
        expect(page.locator("#server-state")).to_have_text("loading model…")
        _ask(page, "Hello?")
        expect(page.locator("#banner")).to_contain_text("No model to talk to yet: the server is still loading it")
        expect(page.locator("#input")).to_have_value("Hello?")                 # kept, to send once it is there
        expect(page.locator(".msg")).to_have_count(0)
        release.set()
        wait_ready(base)
        _ready(page)
        expect(page.locator("#banner")).to_be_hidden()
        expect(page.locator("#model")).to_have_value("fake-model")
        page.locator("#input").press("Enter")
        content = _last_reply(page).locator(".content")
        expect(content).to_have_text(re.compile(r"^loading…"))              # until the first token (1 s)
        expect(content).to_contain_text("Hello from", timeout=REPLY_TIMEOUT)
        page.keyboard.press("Escape")
        _wait_done(page)

        # a conversation kept from another server, whose model this one does not serve: a 404, said plainly
        page.evaluate("""() => {
            const list = JSON.parse(localStorage.getItem('llmrun.conversations'));
            list[0].model = 'gone-model';
            localStorage.setItem('llmrun.conversations', JSON.stringify(list));
        }""")
        page.reload()
        _ready(page)
        expect(page.locator("#model")).to_have_value("gone-model")
        expect(page.locator("#model option:checked")).to_have_text("gone-model (not served)")
        _ask(page, "Anyone?")
        error = _last_reply(page).locator(".error")
        expect(error).to_contain_text("unknown model 'gone-model'")
        expect(error).to_contain_text("Pick another model")
        page.select_option("#model", "fake-model")
        page.locator(".msg.user").last.get_by_role("button", name="Resend").click()
        expect(_last_reply(page).locator(".content")).to_contain_text("Hello", timeout=REPLY_TIMEOUT)
        page.keyboard.press("Escape")
        _wait_done(page)
        assert page.serious_errors() == []


def test_with_an_api_key_the_page_asks_once_and_then_works(demo_gguf, open_page):
    with cli_server(demo_gguf, "--parallel", "1", "--ctx", "512", "--api-key", "s3cret") as (base, proc, lines):
        assert httpx.get(f"{base}/llmrun/status").status_code == 401
        page = open_page(base)                     # the page and its files load without the key
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#key-error")).to_be_hidden()
        page.keyboard.press("Escape")                                           # not now
        expect(dialog).to_be_hidden()
        expect(page.locator("#banner")).to_contain_text("needs an API key")
        expect(page.locator("#server-state")).to_have_text("API key needed")
        _ask(page, "What is the capital of France?")                            # acting again asks again
        expect(dialog).to_be_visible()
        page.locator("#key-input").fill("wrong")
        page.locator("#key-input").press("Enter")
        expect(page.locator("#key-error")).to_be_visible()                     # asked again, saying why
        page.locator("#key-input").fill("s3cret")
        page.click("#key-ok")
        expect(dialog).to_be_hidden()
        _ready(page)
        _settings(page, temperature="0", max_tokens="16")
        _ask(page, "What is the capital of France?")
        expect(_last_reply(page).locator(".content")).to_contain_text("Paris", timeout=REPLY_TIMEOUT)
        _wait_done(page)
        assert page.evaluate("sessionStorage.getItem('llmrun.apiKey')") == "s3cret"
        assert page.evaluate("localStorage.getItem('llmrun.settings')").find("s3cret") == -1
        page.reload()                                                           # kept for the tab: not asked again
        _ready(page)
        expect(dialog).to_be_hidden()
        assert page.serious_errors() == []


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_screenshots_and_small_screens(demo, open_page, tmp_path):
    out = DOCS if os.environ.get("LLMRUN_WRITE_SCREENSHOTS") == "1" else tmp_path
    page = open_page(demo, width=1280, height=800, scheme="light")
    _ready(page)
    _settings(page, temperature="0", max_tokens="160")
    for question in ("What is the capital of France?", "Write a Python function that reverses a string."):
        _ask(page, question)
        _wait_done(page)
    expect(page.locator("figure.code")).not_to_have_count(0)
    page.mouse.move(0, 0)
    page.screenshot(path=str(out / "webui-desktop.png"))
    assert _png_size(out / "webui-desktop.png") == (1280, 800)

    for width, height in ((390, 844), (360, 740)):
        small = open_page(demo, width=width, height=height, scheme="dark", storage=page.context.storage_state())
        _ready(small)
        small.locator(".conv-open").first.wait_for(state="attached")
        expect(small.locator("#sidebar")).to_be_hidden()                        # a drawer on phones
        small.click("#open-sidebar")
        expect(small.locator(".conv-open").first).to_be_visible()
        small.locator(".conv-open").first.click()
        expect(small.locator("#sidebar")).to_be_hidden()
        expect(small.locator("figure.code").first).to_be_visible()
        overflow = small.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is wider than a {width} px screen by {overflow} px"
        expect(small.locator("#send")).to_be_in_viewport()
        if width == 390:
            small.screenshot(path=str(out / "webui-mobile.png"))
            assert _png_size(out / "webui-mobile.png") == (390, 844)
        small.click("#open-panel")
        expect(small.locator("#machine-facts")).to_be_visible()
        small.keyboard.press("Escape")
        expect(small.locator("#panel")).to_be_hidden()
        assert small.serious_errors() == []
    assert page.serious_errors() == []


MARKDOWN_CASES = {
    # source -> the rendered HTML, as the browser serialises the DOM the renderer built
    "# Title\n\nSome *em* and **strong** and `a<b`.":
        '<h3 class="md-h">Title</h3><p>Some <em>em</em> and <strong>strong</strong> and <code>a&lt;b</code>.</p>',
    "- one\n- two\n  - two.a\n  - two.b\n- three":
        "<ul><li>one</li><li>two<ul><li>two.a</li><li>two.b</li></ul></li><li>three</li></ul>",
    "3. c\n4. d": '<ol start="3"><li>c</li><li>d</li></ol>',
    "| a | b |\n|---|--:|\n| 1 | 2 |":
        '<div class="md-table"><table><thead><tr><th>a</th><th class="a-right">b</th></tr></thead>'
        '<tbody><tr><td>1</td><td class="a-right">2</td></tr></tbody></table></div>',
    "> quoted\n> more": "<blockquote><p>quoted\nmore</p></blockquote>",
    "```py\nx = '<i>'\n": '<figure class="code"><figcaption class="code-bar"><span class="code-lang">py</span>'
                          '<button class="code-copy" type="button">Copy</button></figcaption>'
                          '<pre><code class="lang-py">x = \'&lt;i&gt;\'</code></pre></figure>',   # still streaming
    "see https://example.org/a_b. and [x](http://e.org)":
        '<p>see <a href="https://example.org/a_b" target="_blank" rel="noopener noreferrer nofollow">'
        'https://example.org/a_b</a>. and <a href="http://e.org/" target="_blank" '
        'rel="noopener noreferrer nofollow">x</a></p>',
    "![cat](https://e.org/cat.png) ![x](data:image/png;base64,AAAA) [y](/v1/models)":
        '<p><a href="https://e.org/cat.png" target="_blank" rel="noopener noreferrer nofollow">image: cat</a> '
        '![x](data:image/png;base64,AAAA) [y](/v1/models)</p>',
    "a_b_c and 2*3*4 and ~~gone~~": "<p>a_b_c and 2*3*4 and <del>gone</del></p>",
    "---": "<hr>",
}


def test_markdown_renders_blocks_and_spans_as_dom(open_page):
    app = create_app(ServerConfig(), engine=FakeEngine(), card=ModelCard(name="fake-model"))
    with running(app) as base:
        page = open_page(base)
        _ready(page)
        got = page.evaluate("""async (cases) => {
            const { renderMarkdown } = await import('/ui/markdown.js');
            return cases.map((text) => {
                const box = document.createElement('div');
                box.appendChild(renderMarkdown(text));
                return box.innerHTML;      // reading the DOM back is fine; nothing is ever written this way
            });
        }""", list(MARKDOWN_CASES))
        for (source, want), html in zip(MARKDOWN_CASES.items(), got):
            assert html == want, f"{source!r}"
        assert page.serious_errors() == []
