"""Shape-true synthetic GGUFs: a real model's exact tensor names, shapes and per-tensor quant types (llama.cpp's
quantization mix, runner.layout), real-looking metadata and a vocabulary of n_vocab tokens of the kind the
architecture uses (llama/SPM, or byte-level BPE "gpt2" with merges for falcon), with the tensor data left as a
sparse hole (zero bytes on disk). llama.cpp loads such a file and decodes (zeros compute as
fast as any weights), so memory use and speed match the real model without downloading it.

Files are kept in a cache (`synth_cache_dir()`), keyed by shape, quant and layer count, and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from runner.core.errors import UsageError
from runner.core.files import atomic_path
from runner.model.layout import GGUF_ALIGNMENT, WeightsLayout, layout_from_recipe
from runner.core.shapes import ModelShape

if TYPE_CHECKING:
    from gguf import GGUFWriter

# llama.cpp file-type ids (enum llama_ftype) written as general.file_type
FILE_TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
}
# architectures normalised with LayerNorm (llama.cpp reads {arch}.attention.layer_norm_epsilon, not the RMS key)
LAYER_NORM_ARCHS = frozenset({"falcon"})
# architectures whose vocabulary is byte-level BPE ("gpt2"), with llama.cpp's pre-tokenizer name
BPE_ARCHS = {"falcon": "falcon"}
_FORMAT_VERSION = 1   # bump when the written file changes, so cached files are rewritten


def synth_cache_dir() -> Path:
    """$LLMRUN_SYNTH_CACHE, else ~/.cache/llmrun/synth (shared between test runs: the files cost no disk)."""
    env = os.environ.get("LLMRUN_SYNTH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmrun" / "synth"


def _key(shape: ModelShape, quant: str, n_layer: int) -> str:
    blob = json.dumps([_FORMAT_VERSION, asdict(shape), quant.upper(), n_layer], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def synth_path(shape: ModelShape, quant: str, *, n_layer: int | None = None, name: str = "") -> Path:
    n = shape.n_layer if n_layer is None else n_layer
    label = (name or f"{shape.arch}-{shape.n_embd}x{shape.n_layer}").replace("/", "_")
    return synth_cache_dir() / f"{label}-L{n}-{quant.upper()}-{_key(shape, quant, n)}.gguf"


def ensure_synth(shape: ModelShape, quant: str, *, n_layer: int | None = None, name: str = "") -> Path:
    """The cached synthetic GGUF for (shape, quant, n_layer), written first if missing."""
    path = synth_path(shape, quant, n_layer=n_layer, name=name)
    if not path.exists():
        write_synth(shape, quant, path, n_layer=n_layer, name=name)
    return path


def write_synth(shape: ModelShape, quant: str, path: Path, *, n_layer: int | None = None, name: str = "") -> WeightsLayout:
    """Write a shape-true GGUF to `path` (atomically: temp file, then rename). Returns its layout."""
    import gguf
    import numpy as np

    n = shape.n_layer if n_layer is None else n_layer
    if n < 1:
        raise UsageError(f"--layers must be at least 1, not {n}")
    layout = layout_from_recipe(shape, quant, n_layer=n)
    arch = shape.arch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(None, arch)  # the file is named when written (atomically, below)
    writer.add_name(name or f"synthetic {arch} {shape.n_embd}x{n}")
    writer.add_file_type(FILE_TYPES.get(layout.quant, 0))
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(n)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    if arch in LAYER_NORM_ARCHS:
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(shape.n_vocab)
    if shape.n_expert:
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
    if arch in BPE_ARCHS:
        _add_bpe_vocab(writer, shape.n_vocab, pre=BPE_ARCHS[arch])
    else:
        _add_spm_vocab(writer, shape.n_vocab)

    for t in layout.tensors:
        writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes,
                               raw_dtype=gguf.GGMLQuantizationType[t.type_name])
    with atomic_path(path, suffix=".incomplete") as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            fout = writer.fout[0]
            pos = fout.tell()
            data_start = -(-pos // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
            fout.write(b"\0" * (data_start - pos))
            last = layout.tensors[-1]
            end = data_start + last.offset + -(-last.n_bytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
            fout.truncate(end)          # a sparse hole: tensor data reads as zeros, takes no disk
        finally:
            writer.close()
    return WeightsLayout(tensors=layout.tensors, header_bytes=data_start, quant=layout.quant)


def _add_spm_vocab(writer: GGUFWriter, n_vocab: int) -> None:
    """A llama/SPM vocabulary llama.cpp accepts: <unk> <s> </s>, the 256 byte tokens, then plain pieces."""
    import gguf

    if n_vocab < 259 + 1:
        raise UsageError(f"n_vocab {n_vocab} is too small for a llama vocabulary (needs at least 260)")
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n_vocab:
        # distinct pieces: "▁a", "▁b", ..., then two-letter, three-letter ... words
        word, k = "", i
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        tokens.append("\u2581" + word)
        types.append(gguf.TokenType.NORMAL)
        i += 1
    scores = [0.0] * 3 + [0.0] * 256 + [-float(j) for j in range(n_vocab - 259)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _bpe_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _add_bpe_vocab(writer: GGUFWriter, n_vocab: int, *, pre: str) -> None:
    """A byte-level BPE ("gpt2") vocabulary llama.cpp accepts: the 256 byte characters, then merged lowercase
    words built by merges that only join existing tokens, and <|endoftext|> (bos = eos) as the last token."""
    import gguf

    if n_vocab < 256 + 26 * 26 + 1:
        raise UsageError(f"n_vocab {n_vocab} is too small for a BPE vocabulary (needs at least {256 + 26 * 26 + 1})")
    tokens = _bpe_byte_chars()
    types = [gguf.TokenType.NORMAL] * 256
    merges: list[str] = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(letters)            # every token made so far from letters, shortest first
    k = 0
    while len(tokens) < n_vocab - 1:
        left = words[k // 26]        # extend the k//26-th word by one letter: "a"+"a", "a"+"b", ... "aa"+"a", ...
        right = letters[k % 26]
        merges.append(f"{left} {right}")
        words.append(left + right)
        tokens.append(left + right)
        types.append(gguf.TokenType.NORMAL)
        k += 1
    eos = len(tokens)
    tokens.append("<|endoftext|>")
    types.append(gguf.TokenType.CONTROL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
