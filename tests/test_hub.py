"""Any GGUF on the hub: references, header-only plans, pull, licences, against a local fake hub driven by the real
huggingface_hub client, serving shape-true synthetic GGUFs for a qwen2, a gemma3 (gated) and a sharded llama3 repo.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.core.errors import ChecksumMismatchError, HubAuthError, HubUnreachableError, RemoteNotFoundError, \
    UsageError
from runner.core.shapes import ModelShape
from runner.model.gguf import read_header
from runner.model.hubref import HubRef, parse_hub_ref, quant_groups, select_group
from runner.store import fetch, hub as hubmod, local as store
from tests.fakehub import FakeHub, use_hub

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# qwen2 wide enough in vocabulary that its weights (~20 MB) dwarf its header (~1 MB): the header-only test
QWEN2 = ModelShape("qwen2", 2, 512, 8, 2, 1408, 32000, 4096)
GEMMA3 = ModelShape("gemma3", 2, 256, 4, 2, 1024, 1024, 8192, head_dim=128, sliding_window=128, swa_pattern=6)
LLAMA3 = ModelShape("llama", 2, 256, 4, 2, 768, 1024, 8192)
QWEN_REPO, GEMMA_REPO, LLAMA_REPO = "Qwen/Qwen2.5-Tiny-Instruct-GGUF", "google/gemma-3-tiny-it-GGUF", \
    "bartowski/Llama-3.1-Tiny-Instruct-GGUF"
TOKEN = "hf_test_token"


def _synth(tmp: Path, shape: ModelShape, quant: str, name: str, *, shards: int = 1, vocab: str | None = None,
           license_: str | None = None) -> dict[str, bytes]:
    from runner.model.synth import synth_shard_paths, write_synth

    path = tmp / name
    meta = {"general.license": license_} if license_ else None
    write_synth(shape, quant, path, chat_template=CHATML, shards=shards, vocab=vocab, metadata=meta)
    paths = synth_shard_paths(path, shards) if shards > 1 else [path]
    return {p.name: p.read_bytes() for p in paths}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("hubfiles")
    qwen = {**_synth(tmp, QWEN2, "Q4_K_M", "qwen2.5-tiny-instruct-q4_k_m.gguf"),
            **_synth(tmp, QWEN2, "Q8_0", "qwen2.5-tiny-instruct-q8_0.gguf")}
    gemma = {**_synth(tmp, GEMMA3, "Q4_K_M", "gemma-3-tiny-it-Q4_K_M.gguf"),
             **_synth(tmp, GEMMA3, "Q8_0", "gemma-3-tiny-it-Q8_0.gguf")}
    llama = {**_synth(tmp, LLAMA3, "Q4_K_M", "Llama-3.1-Tiny-Instruct-Q4_K_M.gguf", vocab="bpe:llama-bpe"),
             **_synth(tmp, LLAMA3, "Q8_0", "Llama-3.1-Tiny-Instruct-Q8_0.gguf", shards=2, vocab="bpe:llama-bpe")}
    return {"qwen": qwen, "gemma": gemma, "llama": llama}


@pytest.fixture
def hub(tmp_path, monkeypatch, files):
    with FakeHub() as h:
        use_hub(h, monkeypatch, tmp_path)
        h.add_repo(QWEN_REPO, {**files["qwen"], "README.md": b"# tiny"}, card={"license": "apache-2.0"})
        h.add_repo(GEMMA_REPO, {**files["gemma"], "mmproj-gemma-3-tiny-F16.gguf": b"GGUF not a model"},
                   token=TOKEN, gated=True, card={"license": "gemma"})
        h.add_repo(LLAMA_REPO, {f"Llama-3.1-Tiny-Instruct-Q8_0/{n}" if "-of-" in n else n: d
                                for n, d in files["llama"].items()}, card={"license": "llama3.1"})
        h.add_repo("someone/no-gguf-here", {"model.safetensors": b"x" * 100, "README.md": b"hi"})
        yield h


def _plan(*args: str) -> dict:
    r = CliRunner().invoke(cli, ["plan", *args, "--hardware", "ci-2core-24gb", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# -------------------------------------------------------------------------------------------- reference forms

@pytest.mark.parametrize("text, want", [
    ("hf.co/Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M", HubRef("Qwen/Qwen2.5-7B-Instruct-GGUF", tag="Q4_K_M")),
    ("huggingface.co/Qwen/Qwen2.5-7B-Instruct-GGUF", HubRef("Qwen/Qwen2.5-7B-Instruct-GGUF")),
    ("Qwen/Qwen2.5-7B-Instruct-GGUF:q5_k_m", HubRef("Qwen/Qwen2.5-7B-Instruct-GGUF", tag="q5_k_m")),
    ("unsloth/gemma-3-4b-it-GGUF:UD-Q4_K_XL", HubRef("unsloth/gemma-3-4b-it-GGUF", tag="UD-Q4_K_XL")),
    ("bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q8_0.gguf",
     HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF", filename="Llama-3.2-1B-Instruct-Q8_0.gguf")),
    ("https://huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF/blob/main/Llama-3.2-1B-Instruct-Q8_0.gguf",
     HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF", filename="Llama-3.2-1B-Instruct-Q8_0.gguf", revision="main")),
    ("https://huggingface.co/org/repo/resolve/0123abc/sub/dir/x-Q4_0.gguf",
     HubRef("org/repo", filename="sub/dir/x-Q4_0.gguf", revision="0123abc")),
    ("https://huggingface.co/org/repo", HubRef("org/repo")),
    ("hf.co/org/repo@v1.0:Q8_0", HubRef("org/repo", tag="Q8_0", revision="v1.0")),
])
def test_every_reference_form_parses(text, want):
    got = parse_hub_ref(text)
    assert got is not None
    assert (got.repo, got.tag, got.filename, got.revision) == (want.repo, want.tag, want.filename, want.revision)


@pytest.mark.parametrize("text", ["llama-2-7b-chat:Q4_K_M", "smollm2-135m", "./models/x.gguf", "/abs/x.gguf",
                                  "~/x.gguf", "models/x.gguf", "https://example.com/org/repo"])
def test_catalog_names_and_paths_are_not_references(text):
    assert parse_hub_ref(text) is None


@pytest.mark.parametrize("text, problem", [("hf.co/only-org", "ORG/REPO"), ("hf.co/org/repo:Q4 K", "quant tag"),
                                           ("hf.co/org/repo/README.md", "not a .gguf"),
                                           ("hf.co/org--x/repo", "not a valid hub repo")])
def test_malformed_references_say_what_is_wrong(text, problem):
    with pytest.raises(UsageError, match=problem):
        parse_hub_ref(text)


def test_quant_groups_keep_shards_together_and_leave_projectors_out():
    names = ["README.md", "m-Q4_K_M.gguf", "mmproj-m-F16.gguf", "m-UD-Q4_K_XL.gguf", "m.Q5_K_S.gguf",
             "Q8_0/m-Q8_0-00002-of-00002.gguf", "Q8_0/m-Q8_0-00001-of-00002.gguf", "m-imatrix.gguf",
             "big/m-F16-00001-of-00003.gguf"]              # an incomplete shard set is no model
    groups = quant_groups(names)
    assert [(g.label, g.files) for g in groups] == [
        ("Q4_K_M", ("m-Q4_K_M.gguf",)), ("UD-Q4_K_XL", ("m-UD-Q4_K_XL.gguf",)), ("Q5_K_S", ("m.Q5_K_S.gguf",)),
        ("Q8_0", ("Q8_0/m-Q8_0-00001-of-00002.gguf", "Q8_0/m-Q8_0-00002-of-00002.gguf"))]


def test_tags_match_case_insensitively_default_is_q4_k_m_or_the_nearest():
    from runner.model.catalog import quant_rank

    groups = quant_groups(["m-Q4_K_M.gguf", "m-UD-Q4_K_M.gguf", "m-Q6_K.gguf", "m-q3_k_m.gguf"])
    ref = HubRef("org/m")
    assert select_group(HubRef("org/m", tag="q6_k"), groups).label == "Q6_K"
    assert select_group(HubRef("org/m", tag="Q3_K_M"), groups).label == "Q3_K_M"
    assert select_group(HubRef("org/m", tag="q4_k_m"), groups).files == ("m-Q4_K_M.gguf",)   # the exact label
    assert select_group(ref, groups).label == "Q4_K_M"
    no_q4km = quant_groups(["m-Q2_K.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf"])
    assert select_group(ref, no_q4km, rank=quant_rank).label == "Q4_K_S"
    with pytest.raises(RemoteNotFoundError, match="no Q5_K_M") as e:
        select_group(HubRef("org/m", tag="Q5_K_M"), groups)
    assert "Q6_K" in (e.value.hint or "")
    ambiguous = quant_groups(["a/m-Q4_0.gguf", "b/m-Q4_0.gguf"])
    with pytest.raises(UsageError, match="ambiguous") as e:
        select_group(HubRef("org/m", tag="q4_0"), ambiguous)
    assert "a/m-Q4_0.gguf" in e.value.message and "b/m-Q4_0.gguf" in e.value.message


# ------------------------------------------------------------------------------------------ resolution on a hub

def test_every_form_resolves_pinned_to_the_commit(hub):
    repo = hub.repos[QWEN_REPO]
    forms = [f"hf.co/{QWEN_REPO}:Q8_0", f"{QWEN_REPO}:q8_0", f"{QWEN_REPO}/qwen2.5-tiny-instruct-q8_0.gguf",
             f"https://huggingface.co/{QWEN_REPO}/blob/main/qwen2.5-tiny-instruct-q8_0.gguf",
             f"https://huggingface.co/{QWEN_REPO}:Q8_0"]
    for text in forms:
        e = hubmod.resolve(text).chosen
        assert (e.name, e.quant, e.revision) == (f"hf.co/{QWEN_REPO}:Q8_0", "Q8_0", repo.commit), text
        assert e.files[0].sha256 == repo.sha256("qwen2.5-tiny-instruct-q8_0.gguf")
    default = hubmod.resolve(f"hf.co/{QWEN_REPO}")
    assert default.chosen.quant == "Q4_K_M"
    assert sorted(e.quant for e in default.entries) == ["Q4_K_M", "Q8_0"]
    assert default.chosen.shape.arch == "qwen2" and default.chosen.shape.n_vocab == 32000
    assert default.chosen.license == "Apache-2.0" and default.chosen.license_open and default.chosen.chat
    # only the listing asked for "main"; every file request named the commit
    assert all(repo.commit in r.path for r in hub.file_gets())


def test_sharded_repo_resolves_to_all_shards(hub):
    hm = hubmod.resolve(f"hf.co/{LLAMA_REPO}:Q8_0")
    e = hm.chosen
    assert e.layout == "shards" and len(e.files) == 2
    assert [f.name for f in e.files] == [f"Llama-3.1-Tiny-Instruct-Q8_0/Llama-3.1-Tiny-Instruct-Q8_0-0000{i}-of-00002.gguf"
                                         for i in (1, 2)]
    assert e.shape.n_params == sum(t.n_elements for t in e.weights.tensors)   # every shard's header was read
    assert e.local_file == e.files[0].name
    assert e.license == "llama3.1" and e.requires_acceptance


def test_errors_no_gguf_missing_quant_unknown_repo(hub):
    with pytest.raises(RemoteNotFoundError, match="no GGUF"):
        hubmod.resolve("hf.co/someone/no-gguf-here")
    with pytest.raises(RemoteNotFoundError, match="no Q2_K") as e:
        hubmod.resolve(f"hf.co/{QWEN_REPO}:Q2_K")
    assert "Q4_K_M" in e.value.hint and "Q8_0" in e.value.hint
    with pytest.raises(RemoteNotFoundError, match="repository not found"):
        hubmod.resolve("hf.co/nobody/nothing-GGUF:Q4_K_M")


def test_gated_repo_needs_hf_token(hub, monkeypatch):
    with pytest.raises(HubAuthError) as e:
        hubmod.resolve(f"hf.co/{GEMMA_REPO}:Q4_K_M")
    assert "HF_TOKEN" in e.value.hint
    r = CliRunner().invoke(cli, ["plan", f"hf.co/{GEMMA_REPO}"])
    assert r.exit_code == 1 and "hint:" in r.output and "HF_TOKEN" in r.output
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    e2 = hubmod.resolve(f"hf.co/{GEMMA_REPO}:Q4_K_M").chosen
    assert e2.shape.arch == "gemma3" and e2.shape.swa_pattern == 6 and e2.shape.sliding_window == 128
    assert e2.license == "gemma" and not e2.license_open
    assert [e.quant for e in hubmod.resolve(f"hf.co/{GEMMA_REPO}").entries] == ["Q4_K_M", "Q8_0"]  # no mmproj


def test_private_repo_needs_hf_token_for_its_listing(hub, monkeypatch, files):
    hub.add_repo("me/private-GGUF", {"x-Q4_K_M.gguf": files["qwen"]["qwen2.5-tiny-instruct-q4_k_m.gguf"]},
                 token=TOKEN, private=True, card={"license": "mit"})
    with pytest.raises(HubAuthError) as e:
        hubmod.resolve("hf.co/me/private-GGUF")
    assert "401" in e.value.message and "HF_TOKEN" in e.value.hint
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hubmod.resolve("hf.co/me/private-GGUF").chosen.license == "MIT"


# -------------------------------------------------------------------------------------------- header-only plan

def test_plan_reads_only_the_header(hub):
    name = "qwen2.5-tiny-instruct-q4_k_m.gguf"
    size = len(hub.repos[QWEN_REPO].files[name])
    data = _plan(f"hf.co/{QWEN_REPO}:Q4_K_M")
    assert data["chosen"]["name"] == f"hf.co/{QWEN_REPO}:Q4_K_M"
    gets = hub.file_gets()
    assert gets and all(g.headers.get("range", "").startswith("bytes=") for g in gets)
    assert {g.path.rsplit("/", 1)[-1] for g in gets} == {name}      # the other quant was never read
    fetched = sum(g.sent for g in gets)
    header = read_header_bytes(hub.repos[QWEN_REPO].files[name])
    assert header <= fetched <= header + 2 * 1024 * 1024 and fetched < size / 4, (fetched, header, size)
    assert any("planned from the GGUF header alone" in n for n in data["notes"])
    # a second plan is instant and works offline: nothing is read again, not even the listing
    hub.requests.clear()
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        again = _plan(f"hf.co/{QWEN_REPO}:Q4_K_M")
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert hub.requests == []
    assert again["chosen"]["memory"] == data["chosen"]["memory"]


def read_header_bytes(data: bytes) -> int:
    from runner.model.gguf import parse_header

    return parse_header(data).data_offset


def test_plan_compares_the_repos_quants_and_reads_the_choice(hub):
    data = _plan(f"hf.co/{QWEN_REPO}")           # no tag: every quant is a candidate
    assert data["chosen"]["quant"] == "Q8_0"     # the best that fits this machine
    read = {g.path.rsplit("/", 1)[-1] for g in hub.file_gets()}
    assert read == {"qwen2.5-tiny-instruct-q4_k_m.gguf", "qwen2.5-tiny-instruct-q8_0.gguf"}  # the choice's too
    tagged = _plan(f"hf.co/{QWEN_REPO}:Q4_K_M")
    assert tagged["chosen"]["quant"] == "Q4_K_M"
    assert any("is Q8_0" in n and f"llmrun plan hf.co/{QWEN_REPO}:Q8_0" in n for n in tagged["notes"])


def test_unreachable_hub_falls_back_to_the_cached_listing(hub, monkeypatch):
    _plan(f"hf.co/{QWEN_REPO}:Q4_K_M")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")       # nothing listens there
    data = _plan(f"hf.co/{QWEN_REPO}:Q4_K_M")
    assert any("file list cached" in n for n in data["notes"])
    with pytest.raises(HubUnreachableError):
        hubmod.resolve(f"hf.co/{LLAMA_REPO}:Q8_0")                 # never listed here


def test_license_open_filters_hub_models(hub, monkeypatch):
    assert _plan(f"hf.co/{QWEN_REPO}", "--license", "open")["chosen"]["license_osi_approved"] is True
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = CliRunner().invoke(cli, ["plan", f"hf.co/{GEMMA_REPO}", "--license", "open", "--hardware", "ci-2core-24gb"])
    assert r.exit_code == 2 and "OSI-approved" in r.output


def test_hub_plan_equals_the_plan_of_the_same_file_read_locally(hub, tmp_path):
    """The same bytes planned from the hub's header and from the file on disk: identical memory, settings and
    speed, byte for byte in --json (only the names and the licence's source differ)."""
    ref = f"hf.co/{LLAMA_REPO}:Q4_K_M"
    name = "Llama-3.1-Tiny-Instruct-Q4_K_M.gguf"
    local = tmp_path / name
    local.write_bytes(hub.repos[LLAMA_REPO].files[name])
    remote, here = _plan(ref)["chosen"], _plan(str(local))["chosen"]
    identity = {"name", "model", "family", "license", "license_osi_approved"}
    assert remote["name"] == ref and here["name"] == str(local)
    strip = lambda c: json.dumps({k: v for k, v in c.items() if k not in identity}, sort_keys=True)  # noqa: E731
    assert strip(remote) == strip(here)


def test_uncovered_architecture_plans_with_exact_weights_and_says_the_rest_is_approximate(hub, tmp_path):
    from runner.model.synth import write_synth

    path = tmp_path / "odd-Q8_0.gguf"
    write_synth(LLAMA3, "Q8_0", path)
    data = bytearray(path.read_bytes())
    i = data.find(b"general.architecture")
    # rename the architecture to one llmrun does not cover (same length keeps the header valid)
    start = data.find(b"llama", i + 20)
    data[start:start + 5] = b"olmoz"
    for key in (b"llama.",):
        data = data.replace(key, b"olmoz.")
    path.write_bytes(bytes(data))
    chosen = _plan(str(path))["chosen"]
    assert chosen["family"] == "olmoz" and chosen["approximate"] == ["kv_cache", "compute"]
    r = CliRunner().invoke(cli, ["plan", str(path), "--hardware", "ci-2core-24gb"])
    assert "not covered" in r.output and "approximate" in r.output


# -------------------------------------------------------------------------------------------------------- pull

def test_pull_resumes_after_a_dropped_connection(hub, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)
    name = "qwen2.5-tiny-instruct-q8_0.gguf"
    hubmod.resolve(f"hf.co/{QWEN_REPO}:Q8_0")      # its header is read (and cached) first, as by `plan`
    hub.requests.clear()
    hub.drop_after[name] = 1024 * 1024
    r = CliRunner().invoke(cli, ["pull", f"hf.co/{QWEN_REPO}:Q8_0", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["verified"] and out["name"] == f"hf.co/{QWEN_REPO}:Q8_0"
    # the download dropped at 1 MiB, the retry asked for the rest
    assert [g.headers.get("range") for g in hub.gets(name)] == [None, f"bytes={1024 * 1024}-"]
    assert Path(out["path"]).read_bytes() == hub.repos[QWEN_REPO].files[name]
    listed = CliRunner().invoke(cli, ["list", "--json"], catch_exceptions=False)
    assert f"hf.co/{QWEN_REPO}:Q8_0" in [m["name"] for m in json.loads(listed.stdout)]
    gone = CliRunner().invoke(cli, ["rm", f"hf.co/{QWEN_REPO}:Q8_0"], catch_exceptions=False)
    assert gone.exit_code == 0 and "freed" in gone.output


def test_a_corrupt_byte_is_rejected(hub):
    name = "qwen2.5-tiny-instruct-q4_k_m.gguf"
    repo = hub.repos[QWEN_REPO]
    entry = hubmod.resolve(f"hf.co/{QWEN_REPO}:Q4_K_M").chosen
    good = repo.sha256(name)
    bad = bytearray(repo.files[name])
    bad[len(bad) - 100] ^= 0x01                     # in the tensor data, past the header
    repo.sha256 = lambda n: good if n == name else hashlib.sha256(repo.files[n]).hexdigest()
    repo.files[name] = bytes(bad)
    with pytest.raises(ChecksumMismatchError, match="deleted"):
        fetch.pull(entry, progress=False)
    assert store.local_model(entry) is None


def test_pull_asks_for_a_licence_that_is_not_open(hub, monkeypatch):
    r = CliRunner().invoke(cli, ["pull", f"hf.co/{LLAMA_REPO}:Q4_K_M"])
    assert r.exit_code == 1 and "Llama 3.1 Community License" in r.output and "--accept-license" in r.output
    r = CliRunner().invoke(cli, ["pull", f"hf.co/{LLAMA_REPO}:Q8_0", "--accept-license", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["paths"]) == 2 and out["path"].endswith("-00001-of-00002.gguf")
    assert read_header(out["paths"][1]).metadata["split.count"] == 2


def test_show_prints_the_card_licence_and_the_header_shape(hub):
    r = CliRunner().invoke(cli, ["show", f"hf.co/{LLAMA_REPO}"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Llama 3.1 Community License" in r.output and "arch llama" in r.output
    assert hub.repos[LLAMA_REPO].commit in r.output and "Q8_0" in r.output
    data = json.loads(CliRunner().invoke(cli, ["show", f"hf.co/{QWEN_REPO}:Q8_0", "--json"]).stdout)
    assert data["model"]["revision"] == hub.repos[QWEN_REPO].commit
    assert data["card"]["license"] == "Apache-2.0" and data["card"]["osi_approved"] is True
    assert [q["quant"] for q in data["quants"]] == ["Q8_0", "Q4_K_M"]


@pytest.mark.llama
def test_run_a_hub_model_with_its_chat_template(hub):
    """`llmrun run -m hf.co/...` plans from the header, pulls, loads with llama.cpp and answers through the
    repo's chat template."""
    r = CliRunner().invoke(cli, ["run", "-m", f"hf.co/{QWEN_REPO}:Q4_K_M", "--max-tokens", "3", "--seed", "1",
                                 "--hardware", "ci-2core-24gb", "hello"])
    assert r.exit_code == 0, r.output
    assert f"plan: hf.co/{QWEN_REPO}:Q4_K_M" in r.output
    lm = store.local_model(hubmod.resolve(f"hf.co/{QWEN_REPO}:Q4_K_M").chosen)
    assert lm is not None and lm.verified


def test_synth_writes_a_shape_true_copy_from_the_hub_header(hub, tmp_path):
    """`llmrun synth hf.co/...` copies the file's own tensors (names, shapes, types) from its header alone."""
    from runner.model.gguf import parse_header

    out = tmp_path / "copy.gguf"
    r = CliRunner().invoke(cli, ["synth", f"hf.co/{QWEN_REPO}:Q8_0", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    original = parse_header(hub.repos[QWEN_REPO].files["qwen2.5-tiny-instruct-q8_0.gguf"])
    copy = read_header(out)
    assert [(t.name, t.shape, t.type_name, t.n_bytes) for t in copy.tensors] == \
        [(t.name, t.shape, t.type_name, t.n_bytes) for t in original.tensors]
    assert copy.shape == original.shape
    assert all(g.headers.get("range") for g in hub.file_gets())            # the header only, never the weights


def test_the_name_resolver_takes_hub_references(hub):
    """runner.app.models.ModelIndex: a hub reference not local is refused with the pull command (or handed to the
    loader to pull, with --pull); once pulled it is served under its name and found by any of its forms."""
    from runner.app.models import ModelIndex
    from runner.core.errors import ModelNotLocalError
    from runner.model.catalog import load_catalog

    with pytest.raises(ModelNotLocalError) as e:
        ModelIndex(catalog=load_catalog()).resolve(f"hf.co/{QWEN_REPO}:q8_0")
    assert f"llmrun pull hf.co/{QWEN_REPO}:Q8_0" in e.value.hint
    ref = ModelIndex(catalog=load_catalog(), pull=True).resolve(f"{QWEN_REPO}:q8_0")
    assert ref.path is None and ref.entry is not None and ref.entry.name == f"hf.co/{QWEN_REPO}:Q8_0"
    fetch.pull(ref.entry, progress=False)
    index = ModelIndex(catalog=load_catalog())
    assert f"hf.co/{QWEN_REPO}:Q8_0" in [r.name for r in index.listing()]
    for form in (f"hf.co/{QWEN_REPO}:Q8_0", f"https://huggingface.co/{QWEN_REPO}:q8_0"):
        assert index.resolve(form).path == store.local_model(ref.entry).path


@pytest.mark.llama
def test_the_server_pulls_a_hub_model_named_in_a_request(hub, tmp_path, demo_gguf, monkeypatch):
    """`llmrun serve --pull`: a request whose `model` is a hub reference resolves it (pinned to a commit, from its
    header), pulls it verified and answers with it; a quant the repo lacks is a 404, a gated repo a 403 naming
    HF_TOKEN."""
    import httpx

    from tests.test_server_models import llmrun_serve

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf"))
    with llmrun_serve(home, "--model", str(demo_gguf), "--pull", "--ctx", "512", "--parallel", "1",
                      "--max-memory", "2GiB") as (base, _proc, _lines):
        r = httpx.post(f"{base}/v1/chat/completions", timeout=180, json={
            "model": f"{QWEN_REPO}:q4_k_m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        from tests.test_server_models import wait_for

        # listed once the store is rescanned (at most every 2 s)
        assert wait_for(lambda: f"hf.co/{QWEN_REPO}:Q4_K_M" in
                        [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]], timeout=10)
        missing = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": f"hf.co/{QWEN_REPO}:Q2_K", "messages": [{"role": "user", "content": "hi"}]})
        assert missing.status_code == 404 and "Q4_K_M" in missing.text
        gated = httpx.post(f"{base}/api/chat", timeout=60, json={
            "model": f"hf.co/{GEMMA_REPO}:Q4_K_M", "messages": [{"role": "user", "content": "hi"}],
            "stream": False})
        assert gated.status_code == 403 and "HF_TOKEN" in gated.text
