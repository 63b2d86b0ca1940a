"""The engine on the real demo model (SmolLM2-135M, ChatML): batching equals decoding alone, sampling, stops,
limits, cancellation, prefix reuse, context limits."""

from __future__ import annotations

import asyncio
import time

import pytest

from runner.engine.types import ChatMessage, SamplingParams
from runner.engine.batching import start_engine
from runner.core.errors import ContextOverflowError, EngineError, UsageError
from runner.core.run_settings import RunSettings

GREEDY = SamplingParams(temperature=0, max_tokens=40)
SYSTEM = ChatMessage("system", "You are a helpful assistant.")


def ask(q: str) -> list[ChatMessage]:
    return [SYSTEM, ChatMessage("user", q)]


@pytest.fixture(scope="module")
def engine(demo_gguf):
    e = start_engine(demo_gguf, RunSettings(n_ctx=4096, n_parallel=4), model_name="demo")
    yield e
    e.close()


def test_batched_greedy_equals_alone(engine):
    questions = ["What is the capital of France?", "Write a short poem about the sea.", "List three fruits.",
                 "Explain what a computer is.", "How do birds fly?", "Why is the sky blue?"]
    alone = []
    for q in questions:
        alone.append(engine.chat(ask(q), GREEDY).result().text)
    gens = [engine.chat(ask(q), GREEDY) for q in questions]   # 6 requests on 4 slots: some join mid-way
    together = [g.result().text for g in gens]
    assert len(set(alone)) == len(alone)                      # the prompts really differ
    assert together == alone


def test_answers_paris_and_reports_usage(engine):
    r = engine.chat(ask("What is the capital of France?"), GREEDY).result()
    assert "Paris" in r.text
    assert r.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(engine.render_chat(ask("What is the capital of France?")))
    assert r.usage.completion_tokens > 0


def test_streamed_deltas_join_to_the_result(engine):
    g = engine.chat(ask("List three fruits."), GREEDY)
    deltas = list(g)
    assert len(deltas) > 3
    assert "".join(deltas) == g.result().text


def test_async_iteration(engine):
    async def collect():
        g = engine.chat(ask("List three fruits."), GREEDY)
        return [d async for d in g], g

    deltas, g = asyncio.run(collect())
    assert "".join(deltas) == g.result().text and deltas


def test_stop_string_cuts_before_it(engine):
    r = engine.chat(ask("What is the capital of France?"), SamplingParams(temperature=0, stop=("Paris",))).result()
    assert r.finish_reason == "stop"
    assert r.text == "The capital of France is "


def test_max_tokens_gives_length(engine):
    r = engine.chat(ask("Write a long story about a dragon."), SamplingParams(temperature=0, max_tokens=7)).result()
    assert r.finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_seed_reproducible(engine):
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234, max_tokens=24)
    a = engine.chat(ask("Tell me a story."), p).result().text
    b = engine.chat(ask("Tell me a story."), p).result().text
    c = engine.chat(ask("Tell me a story."), SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                           seed=99, max_tokens=24)).result().text
    assert a == b
    assert a != c


def test_grammar_constrains_output(engine):
    p = SamplingParams(temperature=0, max_tokens=8, grammar='root ::= "yes" | "no"')
    r = engine.chat(ask("Is the sky blue? Answer yes or no."), p).result()
    assert r.text in ("yes", "no")


def test_bad_grammar_and_params_are_usage_errors(engine):
    with pytest.raises(UsageError, match="GBNF"):
        engine.chat(ask("hi"), SamplingParams(grammar="root ::= ("))
    with pytest.raises(UsageError, match="temperature"):
        engine.chat(ask("hi"), SamplingParams(temperature=-1))
    with pytest.raises(UsageError, match="max_tokens"):
        engine.chat(ask("hi"), SamplingParams(max_tokens=0))


def test_cancel_frees_the_slot_and_its_kv(engine):
    import llama_cpp as lc

    g = engine.chat(ask("Write a very long story about a dragon and a knight."),
                    SamplingParams(temperature=0, max_tokens=500))
    it = iter(g)
    for _ in range(3):
        next(it)
    g.cancel()
    r = g.result(timeout=10)
    assert r.finish_reason == "cancelled"
    assert 0 < r.usage.completion_tokens < 500
    deadline = time.time() + 5
    while engine.stats().busy_slots and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats().busy_slots == 0
    for slot in engine._slots:  # no sequence keeps the cancelled request's cells
        if not slot.tokens:
            assert lc.llama_memory_seq_pos_max(engine._mem, slot.seq) == -1
    # the engine still works afterwards
    assert "Paris" in engine.chat(ask("What is the capital of France?"), GREEDY).result().text


def test_follow_up_turn_reuses_the_kv_prefix(engine):
    first = ask("Name a famous painter.")
    r1 = engine.chat(first, GREEDY).result()
    history = first + [ChatMessage("assistant", r1.text), ChatMessage("user", "When was he born?")]
    r2 = engine.chat(history, GREEDY).result()
    assert r2.usage.cached_tokens >= r1.usage.prompt_tokens - 1
    assert r2.usage.cached_tokens < r2.usage.prompt_tokens


def test_a_cached_prompt_reevaluates_two_tokens_when_reproducible_and_one_otherwise(engine, demo_gguf):
    """Greedy and seeded requests re-read the last 2 tokens of a cached prompt (bit-identical to a fresh
    evaluation); unseeded sampling re-reads 1, as llama-server does, which keeps its step one ubatch."""
    msgs = ask("Say one word about lighthouses.")
    n = engine.chat(msgs, GREEDY).result().usage.prompt_tokens            # the prompt is now in a slot
    cases = ((GREEDY, 2), (SamplingParams(temperature=0.8, seed=7, max_tokens=4), 2),
             (SamplingParams(temperature=0.8, max_tokens=4), 1))
    for params, tail in cases:
        r = engine.chat(msgs, params).result()
        assert r.usage.prompt_tokens == n and r.usage.cached_tokens == n - tail, (params, r.usage)
    # with flash attention a 2-token tail is no more exact than 1 (prompts of 64+ tokens differ either way): 1
    fa = start_engine(demo_gguf, RunSettings(n_ctx=1024, flash_attn=True), model_name="fa", threads=1)
    try:
        n = fa.chat(msgs, GREEDY).result().usage.prompt_tokens
        for params, _ in cases:
            r = fa.chat(msgs, params).result()
            assert r.usage.cached_tokens == n - 1, (params, r.usage)
    finally:
        fa.close()


def test_prompt_longer_than_context_names_both_numbers(engine):
    prompt = "hello " * 3000
    n = len(engine.prompt_tokens(prompt))
    with pytest.raises(ContextOverflowError) as e:
        engine.complete(prompt, GREEDY)
    assert str(n) in e.value.message and str(engine.n_ctx) in e.value.message


@pytest.fixture(scope="module")
def small(demo_gguf):
    e = start_engine(demo_gguf, RunSettings(n_ctx=512, n_parallel=1), model_name="small")
    yield e
    e.close()


def test_full_context_drops_oldest_turns_keeps_system(small):
    engine = small
    long = "Tell me about the history of bread. " * 8            # ~70 tokens per turn
    msgs = [ChatMessage("system", "You are a baker.")]
    for i in range(6):
        msgs += [ChatMessage("user", f"{i}: {long}"), ChatMessage("assistant", "Bread is old. " * 5)]
    msgs.append(ChatMessage("user", "Summarise."))
    tokens, dropped = engine.fit_chat(msgs, GREEDY)
    assert dropped > 0
    assert len(tokens) < engine.n_ctx
    g = engine.chat(msgs, SamplingParams(temperature=0, max_tokens=5))
    assert g.notice and "context full" in g.notice
    r = g.result()
    assert r.dropped_messages == dropped and r.notice == g.notice
    text = engine.chat_format.render(msgs[:1] + msgs[1 + dropped:])
    assert text.startswith("<|im_start|>system\nYou are a baker.")
    assert len(engine.prompt_tokens(text)) == len(tokens)


def test_stats_count_tokens(engine):
    before = engine.stats()
    r = engine.chat(ask("What is 2+2?"), GREEDY).result()
    after = engine.stats()
    assert after.tokens_out - before.tokens_out == r.usage.completion_tokens
    assert after.tokens_in - before.tokens_in == r.usage.prompt_tokens - r.usage.cached_tokens
    assert after.n_parallel == 4 and after.n_ctx == 1024 and after.model == "demo"


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        start_engine(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    with pytest.raises(EngineError, match="GGUF"):
        start_engine(bad)


def test_real_buffer_sizes_are_reported(engine):
    b = engine.stats().buffers
    # 30 layers x 3 KV heads x 64 dims x (K+V) x 4096 cells x f16 = 94371840 bytes, as llama.cpp logs it
    assert b["CPU KV"] == 2 * 30 * 3 * 64 * 4096 * 2
    assert any(k.endswith(" model") for k in b) and b.get("CPU compute", 0) > 0


def test_buffers_compared_with_the_estimate():
    from runner.engine import report
    from runner.plan.estimate import DeviceMemory, MemoryEstimate

    est = MemoryEstimate(devices=(DeviceMemory("CPU", weights=100 << 20, kv_cache=64 << 20, compute=10 << 20,
                                               repack=50 << 20),), n_gpu_layers_effective=0)
    buffers = {"CPU_Mapped model": 100 << 20, "CPU_REPACK model": 50 << 20, "CPU KV": 80 << 20,
               "CPU compute": (10 << 20) + 4096, "CPU output": 200_000}
    rows = {(r.device, r.term): r for r in report.compare(buffers, est)}
    assert rows[("CPU", "repack")].actual == 50 << 20 and not rows[("CPU", "repack")].warn
    assert rows[("CPU", "kv_cache")].warn and abs(rows[("CPU", "kv_cache")].off - 0.25) < 1e-9
    assert not rows[("CPU", "compute")].warn and not rows[("CPU", "output")].warn   # under 1 MiB apart
    (w,) = report.warnings(list(rows.values()))
    assert w.startswith("CPU kv_cache: llama.cpp allocated 80") and "+25%" in w


def test_ignore_eos_generates_exactly_max_tokens(engine):
    r = engine.chat(ask("What is 2+2?"), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)).result()
    assert r.finish_reason == "length" and r.usage.completion_tokens == 60


def test_long_prompt_is_chunked_and_interleaved_with_decoding(demo_gguf, monkeypatch):
    import llama_cpp as lc

    steps = []
    real = lc.llama_decode

    def recording(ctx, batch):
        seqs = [batch.seq_id[i][0] for i in range(batch.n_tokens)]
        steps.append({s: seqs.count(s) for s in set(seqs)})
        return real(ctx, batch)

    e = start_engine(demo_gguf, RunSettings(n_ctx=4096, n_parallel=2, n_batch=64, n_ubatch=64), model_name="chunks")
    try:
        short = e.chat(ask("Count from one to fifty."), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        next(iter(short))                                   # the short one is decoding
        monkeypatch.setattr(lc, "llama_decode", recording)
        long_prompt = "Here is a list of words: " + " ".join(f"word{i}" for i in range(120)) + ". Summarise."
        long = e.chat(ask(long_prompt), SamplingParams(temperature=0, max_tokens=4))
        r_long, r_short = long.result(), short.result()
    finally:
        e.close()
    assert r_long.usage.prompt_tokens > 5 * 64
    assert all(sum(s.values()) <= 64 for s in steps)                 # never more than one ubatch per step
    mixed = [s for s in steps if len(s) == 2]
    assert len(mixed) >= 5                                            # prompt chunks rode along with decoding
    assert all(min(s.values()) == 1 for s in mixed)                   # ... one decode token for the short one
    assert r_short.usage.completion_tokens == 40


def test_experts_on_cpu_override_loads(demo_gguf):
    e = start_engine(demo_gguf, RunSettings(n_ctx=512, experts_on_cpu=True), model_name="x")
    try:
        assert e.stats().buffers["CPU KV"] > 0
        assert e.complete("The capital of France is", SamplingParams(temperature=0, max_tokens=3)).result().text
    finally:
        e.close()


def test_unreachable_rpc_worker_is_a_cluster_error_not_an_abort(demo_gguf):
    import socket

    from runner.core.errors import ClusterError

    with socket.socket() as s:              # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from runner.app.launch import Launch
    from runner.app.load import load

    def launch(servers: tuple[str, ...]) -> Launch:
        return Launch(demo_gguf, "demo", RunSettings(n_ctx=512, rpc_servers=servers), summary="")

    with pytest.raises(ClusterError, match="unreachable"):
        load(launch((f"127.0.0.1:{port}",)))
    with pytest.raises(ClusterError, match="bad worker address"):
        load(launch(("nowhere",)))
    with pytest.raises(EngineError, match="not registered"):   # the engine alone never loads unprobed workers
        start_engine(demo_gguf, RunSettings(n_ctx=512, rpc_servers=(f"127.0.0.1:{port}",)))


def test_unified_kv_gives_every_slot_the_whole_context(demo_gguf):
    e = start_engine(demo_gguf, RunSettings(n_ctx=2048, n_parallel=2, kv_unified=True), model_name="unified")
    try:
        assert e.n_ctx == 2048 and e.n_parallel == 2
        gens = [e.chat(ask(q), GREEDY) for q in ("What is the capital of France?", "List three fruits.")]
        assert "Paris" in gens[0].result().text and gens[1].result().finish_reason in ("stop", "length")
    finally:
        e.close()


def test_cancel_aborts_a_prompt_step_and_the_others_go_on_unchanged(demo_gguf):
    """A step evaluating a long prompt can take seconds (a 7B model on a laptop CPU): cancelling its request aborts
    the step inside llama.cpp (abort callback) instead of waiting for it. The step is undone and run again without
    the cancelled request: a request that shared the aborted step answers exactly what it answers alone."""
    e = start_engine(demo_gguf, RunSettings(n_ctx=8192, n_parallel=2), model_name="abort", threads=1)
    try:
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        alone = e.chat(ask("Count from one to fifty."), params).result().text
        short = e.chat(ask("Count from one to fifty."), params)
        next(iter(short))                                   # decoding: its tokens ride in the long prompt's steps
        long_prompt = " ".join(f"Item {i}: the keeper counted ships." for i in range(300))    # ~3,000 tokens
        long = e.chat(ask(long_prompt), SamplingParams(temperature=0, max_tokens=4))
        deadline = time.monotonic() + 60
        while long not in e._step_handles:                  # a step with its prompt tokens is running
            assert time.monotonic() < deadline and not long.done
            time.sleep(0.0005)
        waiting = e.chat(ask("hi"), params)                 # both slots are busy: it waits in the inbox
        waiting.cancel()
        assert e.stats().queued <= 1, "a cancellation's wake-up counted as a queued request"
        long.cancel()
        t0 = time.monotonic()
        r_long = long.result(timeout=30)
        assert r_long.finish_reason == "cancelled" and r_long.usage.completion_tokens == 0
        assert e.aborted_steps == 1
        assert short.result(timeout=60).text == alone
        assert time.monotonic() - t0 < 30
        assert waiting.result(timeout=10).finish_reason == "cancelled"
        assert e.stats().busy_slots == 0 and e.stats().queued == 0
    finally:
        e.close()



def test_text_that_is_not_valid_unicode_is_a_usage_error(engine):
    """A lone surrogate (from a JSON escape, or a terminal's surrogateescape decoding) cannot be encoded for
    llama.cpp: a UsageError saying so, not a UnicodeEncodeError."""
    with pytest.raises(UsageError, match=r"not valid Unicode: a lone surrogate \(\\ud800\) at character 2"):
        engine.complete("ab\ud800", GREEDY)
    with pytest.raises(UsageError, match="not valid Unicode"):
        engine.chat([ChatMessage("system", "\udfff"), ChatMessage("user", "hi")], GREEDY)
    with pytest.raises(UsageError, match="the grammar is not valid Unicode"):
        engine.chat(ask("hi"), SamplingParams(grammar='root ::= "\ud800"'))


def test_a_rejected_grammar_says_why_and_prints_nothing(engine, capfd):
    """llama.cpp's grammar parser prints its reason to stderr (not to its log callback): it belongs in the error,
    not on the terminal between a server's log lines."""
    from runner.core.errors import GrammarError

    capfd.readouterr()
    with pytest.raises(GrammarError, match=r"llama.cpp says Undefined rule identifier 'undefined'"):
        engine.chat(ask("hi"), SamplingParams(grammar="root ::= undefined"))
    with pytest.raises(GrammarError, match=r"llama.cpp says expecting newline or end at _rule"):
        engine.chat(ask("hi"), SamplingParams(grammar="root ::= undefined_rule"))
    with pytest.raises(GrammarError, match=r"llama.cpp says unknown escape at \\w"):
        engine.chat(ask("hi"), SamplingParams(grammar='root ::= "\\"" "\\w"+ "@\\w"+ "\\""\nspace ::= " "?'))
    out, err = capfd.readouterr()
    assert "grammar" not in err and "undefined" not in err and out == ""


def test_grammar_error_keeps_what_others_printed_meanwhile():
    from runner.engine.native import grammar_error

    grammar = 'root ::= "a" bad\nspace ::= " "?'
    printed = ("INFO: someone else\nparse: error parsing grammar: Undefined rule identifier 'bad'\n\n"
               f"{grammar}\nWARNING: and again\n")
    assert grammar_error(printed, grammar) == ("Undefined rule identifier 'bad'",
                                               "INFO: someone else\nWARNING: and again\n")
    long = "unknown escape at " + "x" * 500 + "\nrest of the grammar"
    reason, rest = grammar_error(f"parse: error parsing grammar: {long}\n\n{grammar}\n", grammar)
    assert reason.startswith("unknown escape at xxx") and len(reason) <= 160 and rest == ""
    assert grammar_error("nothing about grammars\n", grammar) == (None, "nothing about grammars\n")


def test_a_file_name_that_is_not_utf8_loads(demo_gguf, tmp_path):
    """A file name is bytes: one that is not UTF-8 comes to Python with surrogates (surrogateescape), which
    str.encode() refuses; os.fsencode gives llama.cpp the real name."""
    import os

    odd = tmp_path / os.fsdecode(b"demo-\xff.gguf")
    odd.symlink_to(demo_gguf)
    e = start_engine(odd, RunSettings(n_ctx=512), model_name="odd", threads=1)
    try:
        assert e.complete("The capital of France is", SamplingParams(temperature=0, max_tokens=3)).result().text
    finally:
        e.close()
