"""Shape-true synthetic GGUFs: exact tensors, sparse data, loadable by llama.cpp, cached."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.core.errors import UsageError
from runner.model.gguf import read_header
from runner.model.layout import layout_from_recipe
from runner.core.shapes import ModelShape
from runner.model.synth import ensure_synth, synth_path, write_synth

TINY = ModelShape("llama", n_layer=3, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1000, n_ctx_train=512)
TINY_GROK = ModelShape("grok", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1000,
                       n_ctx_train=512, n_expert=8, n_expert_used=2)
TINY_FALCON = ModelShape("falcon", n_layer=2, n_embd=256, n_head=4, n_head_kv=1, n_ff=1024, n_vocab=1000,
                         n_ctx_train=512)
LLAMA2_7B = ModelShape("llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, n_vocab=32000,
                       n_ctx_train=4096)


@pytest.fixture
def synth_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_SYNTH_CACHE", str(tmp_path / "synth"))
    return tmp_path / "synth"


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_K_M", "Q8_0"])
def test_the_file_has_the_recipe_tensors_and_takes_no_disk(tmp_path, quant):
    path = tmp_path / "m.gguf"
    layout = write_synth(LLAMA2_7B, quant, path, n_layer=2)
    header = read_header(path)
    expected = layout_from_recipe(LLAMA2_7B, quant, n_layer=2)
    assert [(t.name, t.shape, t.type_name, t.offset, t.n_bytes) for t in header.tensors] == \
        [(t.name, t.shape, t.type_name, t.offset, t.n_bytes) for t in expected.tensors]
    assert header.shape.n_layer == 2 and header.shape.n_embd == 4096 and header.shape.n_vocab == 32000
    size = os.path.getsize(path)
    assert size == layout.file_bytes
    assert os.stat(path).st_blocks * 512 < 4 * 1024 * 1024 < size   # the tensor data is a hole
    assert not list(tmp_path.glob("*.incomplete"))


def test_a_full_size_7b_header_matches_the_published_file_size(tmp_path):
    # TheBloke's llama-2-7b Q4_0 is 3.83 GB; our tensor data is byte-identical in size (header differs slightly)
    path = tmp_path / "7b.gguf"
    layout = write_synth(LLAMA2_7B, "Q4_0", path)
    assert abs(os.path.getsize(path) - 3.83e9) / 3.83e9 < 0.002
    assert layout.weights_bytes == layout_from_recipe(LLAMA2_7B, "Q4_0").weights_bytes


def test_files_are_cached_by_shape_quant_and_layers(synth_cache):
    first = ensure_synth(TINY, "Q8_0")
    mtime = first.stat().st_mtime_ns
    assert ensure_synth(TINY, "Q8_0") == first and first.stat().st_mtime_ns == mtime
    assert ensure_synth(TINY, "Q8_0", n_layer=1) != first
    assert synth_path(TINY, "Q4_0") != first
    assert first.parent == synth_cache


def test_bad_requests_are_refused_with_a_hint(tmp_path):
    with pytest.raises(UsageError, match="unknown quantization"):
        write_synth(TINY, "Q9_9", tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="at least 1"):
        write_synth(TINY, "Q8_0", tmp_path / "x.gguf", n_layer=0)
    small_vocab = ModelShape("llama", 1, 256, 4, 4, 512, 100, 512)
    with pytest.raises(UsageError, match="too small"):
        write_synth(small_vocab, "Q8_0", tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="too small for a BPE"):
        write_synth(ModelShape("falcon", 1, 256, 4, 1, 512, 500, 512), "Q8_0", tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.llama
@pytest.mark.parametrize("shape", [TINY, TINY_GROK, TINY_FALCON], ids=["llama", "grok", "falcon"])
def test_llama_cpp_loads_and_decodes_a_synthetic_model(synth_cache, shape):
    import llama_cpp
    path = ensure_synth(shape, "Q8_0")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    try:
        assert llm.n_vocab() == shape.n_vocab
        assert llm.tokenize(b"hello world\n")  # the SPM vocabulary tokenizes (byte fallback for the newline)
        out = llm.create_completion("hi", max_tokens=3, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


def test_falcon_files_carry_layer_norm_and_a_bpe_vocabulary(synth_cache):
    header = read_header(ensure_synth(TINY_FALCON, "Q4_0"))
    meta = header.metadata
    assert meta["general.architecture"] == "falcon" and "falcon.attention.layer_norm_epsilon" in meta
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "falcon"
    assert meta["tokenizer.ggml.tokens"]["len"] == 1000
    import gguf

    fields = gguf.GGUFReader(str(ensure_synth(TINY_FALCON, "Q4_0"))).fields
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    merges = [bytes(fields["tokenizer.ggml.merges"].parts[i]).decode() for i in fields["tokenizer.ggml.merges"].data]
    known = set(tokens)
    assert len(known) == 1000 and merges
    assert all(m.split(" ")[0] in known and m.replace(" ", "") in known for m in merges)  # merges join tokens


@pytest.mark.llama
def test_llama_cpp_round_trips_text_through_the_falcon_vocabulary(synth_cache):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(ensure_synth(TINY_FALCON, "Q8_0")), n_ctx=128, n_threads=1, verbose=False)
    try:
        text = b"hello world, abc\nzz!"
        tokens = llm.tokenize(text, add_bos=False)
        assert len(tokens) < len(text)                # merges are used, not only bytes
        assert llm.detokenize(tokens) == text
        assert llm.token_eos() == TINY_FALCON.n_vocab - 1
    finally:
        llm.close()


def test_cli_writes_a_catalog_model(tmp_path):
    out = tmp_path / "llama7b.gguf"
    result = CliRunner().invoke(cli, ["synth", "llama-2-7b-chat:Q4_K_M", "-o", str(out), "--layers", "2", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["path"] == str(out) and info["layers"] == 2 and info["quant"] == "Q4_K_M"
    assert info["bytes_on_disk"] < info["bytes"]
    header = read_header(out)
    types = {t.name: t.type_name for t in header.tensors}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"


def test_cli_refuses_unknown_models_and_quants(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["synth", "llama-2-7b-chat:Q9_X", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code != 0 and "Q9_X" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["synth", "no-such-model", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code != 0 and "no-such-model" in result.output
    result = runner.invoke(cli, ["synth", "llama-2-7b-chat", "--layers", "99", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code != 0 and "--layers" in result.output


def test_layout_from_sharded_headers_runs_the_offsets_on(tmp_path):
    from runner.model.layout import layout_from_header, layout_from_headers

    a = read_header(write_synth_path(tmp_path / "a.gguf", "Q8_0"))
    b = read_header(write_synth_path(tmp_path / "b.gguf", "Q4_0"))
    joined = layout_from_headers([a, b])
    assert len(joined.tensors) == len(a.tensors) + len(b.tensors)
    assert joined.weights_bytes == layout_from_header(a).weights_bytes + layout_from_header(b).weights_bytes
    offsets = [t.offset for t in joined.tensors]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    with pytest.raises(UsageError):
        layout_from_headers([])


def write_synth_path(path, quant):
    write_synth(TINY, quant, path)
    return path
