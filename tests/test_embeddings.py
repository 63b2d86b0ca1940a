"""Embeddings and the token utilities with the real engine and the demo model (SmolLM2-135M, a causal LM: its last
hidden states, mean-pooled): the engine contract (one decode for many inputs, batched == alone, limits), then the
HTTP routes through the official `openai` and `ollama` clients and LangChain's OpenAIEmbeddings and
OllamaEmbeddings, unchanged. No PyPI package ships an embedding GGUF (docs/engine.md), so the demo model is the
real model here."""

from __future__ import annotations

import base64
import threading

import httpx
import numpy as np
import pytest

from live_server import running
from runner.core.errors import ContextOverflowError, UsageError
from runner.core.run_settings import RunSettings
from runner.engine.types import ChatMessage, SamplingParams
from runner.server.app import create_app
from runner.server.config import ModelCard, ServerConfig

pytestmark = pytest.mark.llama
N_EMBD = 576        # SmolLM2-135M's hidden size


@pytest.fixture(scope="module")
def engine(demo_gguf):
    from runner.engine.batching import start_engine

    e = start_engine(demo_gguf, RunSettings(n_ctx=1024, n_parallel=2), model_name="demo")
    yield e
    e.close()


@pytest.fixture(scope="module")
def base(engine):
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="demo"), close_engine=False)
    with running(app) as url:
        yield url


def test_the_embedding_context_costs_what_the_estimate_says(demo_gguf):
    """The second context (runner.plan.estimate.embedding_context): llama.cpp's logged KV and compute buffers, the
    output buffer's row size, and the RSS it adds once the first decode has grown the output buffer."""
    import psutil

    from runner.engine.batching import start_engine
    from runner.engine.buffers import parse_buffers
    from runner.core.run_settings import embedding_settings
    from runner.model.gguf import read_header
    from runner.model.layout import layout_from_header
    from runner.plan.estimate import embedding_context, estimate

    settings = RunSettings(n_ctx=1024, n_parallel=2)
    header = read_header(demo_gguf, require_shape=True)
    assert header.shape is not None
    shape, layout = header.shape, layout_from_header(header)
    es = embedding_settings(settings, shape.n_ctx_train)
    assert (es.n_ctx, es.n_batch, es.n_ubatch, es.n_parallel, es.kv_unified) == (512, 512, 512, 256, True)
    parts = estimate(shape, layout, es).host
    need = embedding_context(shape, layout, settings)["CPU"]
    e = start_engine(demo_gguf, settings, model_name="demo", threads=1)
    try:
        rss = psutil.Process().memory_info().rss
        e.embed(["a sentence to embed, long enough to matter " * 8] * 8)
        grown = psutil.Process().memory_info().rss - rss
        logged = parse_buffers(e._embedder._ctx.log_lines)          # type: ignore[attr-defined]
    finally:
        e.close()
    assert logged["CPU KV"] == parts.kv_cache
    assert logged["CPU compute"] == pytest.approx(parts.compute, rel=0.03)
    assert logged["CPU output"] == pytest.approx((shape.n_vocab + shape.n_embd) * 4 * es.n_parallel, abs=10 * 1024)
    assert grown == pytest.approx(need, rel=0.10), f"RSS grew {grown / 2**20:.1f} MiB, estimate {need / 2**20:.1f}"


def post(url: str, json) -> httpx.Response:
    return httpx.post(url, json=json, timeout=300)      # the real model on a shared 2-core machine can be slow


def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------ the engine

def test_64_inputs_take_one_decode(engine, monkeypatch):
    import llama_cpp

    calls = []
    real = llama_cpp.llama_decode
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda ctx, batch: calls.append(batch.n_tokens) or real(ctx, batch))
    texts = [f"note {i}" for i in range(64)]
    before = engine.embed_decodes
    result = engine.embed(texts)
    assert len(result.vectors) == 64 and result.dimensions == N_EMBD
    assert len(calls) == 1 and calls[0] == result.prompt_tokens       # ONE llama_decode held all 64 inputs
    assert result.decodes == 1 and engine.embed_decodes == before + 1
    assert len({tuple(v) for v in result.vectors}) == 64


def test_batched_equals_alone_and_same_text_same_vector(engine):
    texts = ["The cat sleeps on the sofa.", "Stock markets fell sharply today.", "The cat sleeps on the sofa."]
    together = engine.embed(texts)
    assert together.pooling == "mean"
    assert cos(together.vectors[0], together.vectors[2]) == pytest.approx(1.0, abs=1e-9)
    for i, text in enumerate(texts):
        alone = engine.embed([text]).vectors[0]
        assert cos(alone, together.vectors[i]) > 0.99999          # other sequences in the decode do not leak in
    assert cos(together.vectors[0], together.vectors[1]) < 0.99


def test_paraphrases_are_closer_than_unrelated_texts(engine):
    v = engine.embed(["A man is playing a guitar.", "Someone plays the guitar.", "The train departs at noon."]).vectors
    assert cos(v[0], v[1]) > cos(v[0], v[2])


def test_token_arrays_are_the_same_as_text(engine):
    text = "Embeddings from token ids"
    tokens = engine.tokenize_with(text, add_special=True, parse_special=False)
    by_text, by_tokens = engine.embed([text, tokens]).vectors
    assert cos(by_text, by_tokens) == pytest.approx(1.0, abs=1e-9)


def test_limits(engine):
    long = "word " * 2000
    with pytest.raises(ContextOverflowError, match=f"at most {engine.embedding_tokens} tokens"):
        engine.embed(["short", long])
    r = engine.embed(["short", long], truncate=True)
    assert r.truncated == (1,) and len(r.vectors) == 2
    with pytest.raises(UsageError, match="input\\[1\\] is empty"):
        engine.embed(["x", ""])
    with pytest.raises(UsageError, match="not a token id"):
        engine.embed([[1, 2, 10 ** 6]])
    with pytest.raises(UsageError, match="at least one input"):
        engine.embed([])


def test_more_inputs_than_one_decode_holds(engine):
    n = engine.embedding_tokens // 4 + 3          # ~4+ tokens each: more than one decode's worth
    texts = [f"item number {i} here" for i in range(n)]
    r = engine.embed(texts)
    assert len(r.vectors) == n and r.decodes >= 2
    assert cos(r.vectors[-1], engine.embed([texts[-1]]).vectors[0]) > 0.99999


def test_generation_is_unchanged_by_embeddings_running_beside_it(engine):
    params = SamplingParams(temperature=0, max_tokens=12, repeat_penalty=1.0)
    alone = engine.complete("The capital of France is", params).result(120).text
    stop = threading.Event()
    passes = []

    def embed_loop():        # embedding decodes between the generation's steps (one per engine loop)
        while not stop.is_set():
            passes.append(engine.embed([f"background {i}" for i in range(4)]).decodes)

    t = threading.Thread(target=embed_loop)
    t.start()
    try:
        gen = engine.complete("The capital of France is", params)
        assert gen.result(300).text == alone
        assert passes
    finally:
        stop.set()
        t.join()


def test_tokenizer_and_template(engine):
    text = "Hello, world! <|im_end|>"
    parsed = engine.tokenize_with(text, add_special=False, parse_special=True)
    literal = engine.tokenize_with(text, add_special=False, parse_special=False)
    assert len(literal) > len(parsed)                          # the control token's text is split when not parsed
    assert engine.detokenize(parsed) == text
    assert b"".join(engine.token_pieces(parsed)).decode() == text
    with pytest.raises(UsageError, match="not a token id"):
        engine.detokenize([-1])
    prompt = engine.apply_template([ChatMessage("user", "hi")])
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------ the clients

def test_openai_client_one_input_and_a_batch(base):
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    one = client.embeddings.create(model="demo", input="The quick brown fox")     # the client asks for base64
    assert len(one.data) == 1 and len(one.data[0].embedding) == N_EMBD
    assert np.linalg.norm(one.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens
    batch = client.embeddings.create(model="demo", input=["The quick brown fox", "A slow red turtle",
                                                          "The quick brown fox"], encoding_format="float")
    vecs = [d.embedding for d in sorted(batch.data, key=lambda d: d.index)]
    assert [d.index for d in batch.data] == [0, 1, 2] and all(len(v) == N_EMBD for v in vecs)
    assert cos(vecs[0], vecs[2]) == pytest.approx(1.0, abs=1e-6)
    assert cos(vecs[0], one.data[0].embedding) > 0.99999
    assert cos(vecs[0], vecs[1]) < 0.99
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="demo", input="x", dimensions=64)
    assert len(client.embeddings.create(model="demo", input="x", dimensions=N_EMBD).data[0].embedding) == N_EMBD


def test_base64_decodes_to_the_same_floats(base):
    body = {"model": "demo", "input": ["one text", "another text"]}
    floats = post(f"{base}/v1/embeddings", {**body, "encoding_format": "float"}).json()
    b64 = post(f"{base}/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.tolist() == pytest.approx(f["embedding"], abs=0) and len(decoded) == N_EMBD


def test_ollama_client_embed_and_legacy_embeddings(base):
    import ollama

    client = ollama.Client(host=base)
    r = client.embed(model="demo", input=["first text", "second text"])
    assert len(r.embeddings) == 2 and all(len(v) == N_EMBD for v in r.embeddings)
    assert np.linalg.norm(r.embeddings[0]) == pytest.approx(1.0, abs=1e-5)
    assert r.prompt_eval_count > 0
    one = client.embed(model="demo:latest", input="first text")
    assert cos(one.embeddings[0], r.embeddings[0]) > 0.99999
    legacy = client.embeddings(model="demo", prompt="first text")
    assert len(legacy.embedding) == N_EMBD and np.linalg.norm(legacy.embedding) > 2   # raw, not normalised
    assert cos(legacy.embedding, r.embeddings[0]) > 0.99999
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="demo", input="x " * 3000, truncate=False)
    assert e.value.status_code == 400 and "at most" in str(e.value.error)
    assert len(client.embed(model="demo", input="x " * 3000).embeddings[0]) == N_EMBD     # truncate: Ollama's default
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="other", input="x")
    assert e.value.status_code == 404


def test_langchain_openai_and_ollama_embeddings(base):
    from langchain_ollama import OllamaEmbeddings
    from langchain_openai import OpenAIEmbeddings

    docs = ["Paris is the capital of France.", "Bananas are yellow."]
    oai = OpenAIEmbeddings(model="demo", base_url=f"{base}/v1", api_key="unused", check_embedding_ctx_length=False)
    vecs = oai.embed_documents(docs)
    query = oai.embed_query(docs[0])
    assert len(vecs) == 2 and len(vecs[0]) == N_EMBD and cos(query, vecs[0]) == pytest.approx(1.0, abs=1e-6)
    oll = OllamaEmbeddings(model="demo", base_url=base)
    ovecs = oll.embed_documents(docs)
    assert len(ovecs) == 2 and len(ovecs[1]) == N_EMBD
    assert cos(ovecs[1], vecs[1]) > 0.99999 and cos(oll.embed_query(docs[0]), query) > 0.99999


def test_token_routes_as_llama_server_has_them(base, engine):
    text = "Hello <|im_start|> world"
    r = post(f"{base}/tokenize", json={"content": text}).json()
    assert r["tokens"] == engine.tokenize_with(text, add_special=False, parse_special=True)
    literal = post(f"{base}/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert len(literal) > len(r["tokens"])
    pieces = post(f"{base}/tokenize", json={"content": "héllo", "with_pieces": True}).json()["tokens"]
    assert all(set(p) == {"id", "piece"} for p in pieces)
    # a piece is its text, or its byte values when it is not valid UTF-8 alone (half of "é")
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined == "héllo".encode()
    back = post(f"{base}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"content": text}
    prompt = post(f"{base}/apply-template", json={"messages": [{"role": "system", "content": "Be brief."},
                                                                     {"role": "user", "content": "hi"}]}).json()
    assert prompt["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert prompt["prompt"].endswith("<|im_start|>assistant\n")
    count = post(f"{base}/tokenize", json={"content": prompt["prompt"]}).json()["tokens"]
    assert len(count) > 5


# ------------------------------------------------------------------------------------------------ BERT family

@pytest.fixture(scope="module", params=[("mean", 1), ("cls", 2)], ids=["mean", "cls"])
def bert(request, tmp_path_factory):
    from runner.engine.batching import start_engine
    from tiny_bert import write_tiny_bert

    pooling, code = request.param
    path = write_tiny_bert(tmp_path_factory.mktemp("bert") / f"tiny-bert-{pooling}.gguf", pooling=code)
    e = start_engine(path, RunSettings(n_ctx=512, n_parallel=1), model_name="tiny-bert", threads=1)
    yield e, path, pooling
    e.close()


def test_bert_pools_as_the_gguf_declares_checked_against_numpy(bert):
    """A non-causal model: all sequences of a decode in one ubatch, llama.cpp's pooling (the GGUF's mean or CLS)
    equal to an independent numpy forward pass, and inputs kept apart within the decode."""
    from tiny_bert import N_CTX, N_EMBD, reference_embedding

    engine, path, pooling = bert
    assert engine.declared_pooling == pooling and engine.embedding_tokens == N_CTX
    texts = ["the cat sat on the mat", "hello world", "a dog ran in the park", "the cat sat on the mat"]
    r = engine.embed(texts)
    assert r.pooling == pooling and r.dimensions == N_EMBD and r.decodes == 1
    for text, vec in zip(texts, r.vectors):
        tokens = engine.tokenize_with(text, add_special=True, parse_special=False)
        assert tokens[0] == 2 and tokens[-1] == 3                     # [CLS] ... [SEP]
        assert cos(vec, reference_embedding(path, tokens, pooling)) > 0.99999
        assert cos(vec, engine.embed([text]).vectors[0]) > 0.999999
    assert cos(r.vectors[0], r.vectors[1]) < 0.99


def test_an_embedding_model_refuses_to_generate(bert):
    engine, _, _ = bert
    with pytest.raises(UsageError, match="embedding model"):
        engine.complete("the cat", SamplingParams(max_tokens=2))
    with pytest.raises(UsageError, match="embedding model"):
        engine.chat([ChatMessage("user", "hi")], SamplingParams(max_tokens=2))
    app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="tiny-bert"), close_engine=False)
    with running(app) as url:
        r = post(f"{url}/v1/chat/completions", json={"model": "tiny-bert",
                                                           "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "cannot generate text" in r.json()["error"]["message"]
        r = post(f"{url}/api/generate", json={"model": "tiny-bert", "prompt": "hi", "stream": False})
        assert r.status_code == 400 and "embedding model" in r.json()["error"]
        e = post(f"{url}/v1/embeddings", json={"model": "tiny-bert", "input": ["the cat", "a dog"]}).json()
        assert len(e["data"]) == 2 and np.linalg.norm(e["data"][0]["embedding"]) == pytest.approx(1.0, abs=1e-5)
