"""Shape-true synthetic GGUFs: a real model's exact tensor names, shapes and per-tensor quant types (llama.cpp's
quantization mix, runner.model.layout), real-looking metadata and a vocabulary of n_vocab tokens of the kind the
architecture uses (SentencePiece "llama", byte-level BPE "gpt2" with merges, or BERT's WordPiece), with the tensor
data left as a sparse hole (zero bytes on disk). llama.cpp loads such a file and decodes (zeros compute as fast as
any weights), so memory use and speed match the real model without downloading it. Every architecture in
`runner.model.archs.ARCHS` can be written; `shards` splits the file as llama.cpp's gguf-split does.

Files are kept in a cache (`synth_cache_dir()`), keyed by shape, quant and layer count, and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from runner.core.errors import UsageError
from runner.core.files import atomic_path
from runner.model.archs import ARCHS, ArchSpec, N_TOKEN_TYPES, Vocab
from runner.model.layout import GGUF_ALIGNMENT, WeightsLayout, layout_from_headers, layout_from_recipe
from runner.core.shapes import ModelShape

if TYPE_CHECKING:
    from gguf import GGUFWriter

# llama.cpp file-type ids (enum llama_ftype) written as general.file_type
FILE_TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "BF16": 32, "MXFP4_MOE": 38,
}
_FORMAT_VERSION = 3   # bump when the written file changes, so cached files are rewritten


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


def _spec(shape: ModelShape) -> ArchSpec:
    spec = ARCHS.get(shape.arch)
    if spec is None:
        raise UsageError(f"no tensor table for architecture {shape.arch!r}", hint="supported: " + ", ".join(ARCHS))
    return spec


def write_synth(shape: ModelShape, quant: str, path: Path, *, n_layer: int | None = None, name: str = "",
                vocab: str | None = None, chat_template: str | None = None, shards: int = 1,
                metadata: dict[str, str] | None = None, tensors: WeightsLayout | None = None) -> WeightsLayout:
    """Write a shape-true GGUF to `path` (atomically: temp file, then rename). Returns its layout.
    `vocab` overrides the architecture's vocabulary ("spm", "bpe:<pre-tokenizer>", "wpm"), e.g. "bpe:llama-bpe"
    for a Llama 3; `chat_template` is stored as tokenizer.chat_template; `metadata` adds general.* strings;
    `shards` > 1 writes llama.cpp split files PATH-0000i-of-0000N.gguf instead of PATH (the layout then spans
    them, in order); `tensors` (a real file's header layout) replaces llama.cpp's `quant` mix with the file's
    own tensors and types."""
    import gguf
    import numpy as np

    n = shape.n_layer if n_layer is None else n_layer
    if n < 1:
        raise UsageError(f"--layers must be at least 1, not {n}")
    if shards < 1:
        raise UsageError(f"shards must be at least 1, not {shards}")
    spec = _spec(shape)
    layout = layout_from_recipe(shape, quant, n_layer=n) if tensors is None else _first_layers(tensors, n, quant)
    vocab_kind, pre = _vocab(spec, vocab)
    if shards > len(layout.tensors):
        raise UsageError(f"cannot split {len(layout.tensors)} tensors into {shards} shards")
    arch = shape.arch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    per_shard = -(-len(layout.tensors) // shards)
    writer = gguf.GGUFWriter(None, arch, split_max_tensors=per_shard if shards > 1 else 0)
    writer.add_name(name or f"synthetic {arch} {shape.n_embd}x{n}")
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    writer.add_file_type(FILE_TYPES.get(layout.quant, 0))
    _add_hparams(writer, spec, shape, n)
    if vocab_kind == "bpe":
        _add_bpe_vocab(writer, shape.n_vocab, pre=pre)
    elif vocab_kind == "wpm":
        _add_wpm_vocab(writer, shape.n_vocab)
    else:
        _add_spm_vocab(writer, shape.n_vocab, specials=spec.special_tokens)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    for t in layout.tensors:
        writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes,
                               raw_dtype=gguf.GGMLQuantizationType[t.type_name])
    if shards == 1:
        with atomic_path(path, suffix=".incomplete") as tmp:
            data_start = _write_sparse(writer, tmp)
        return WeightsLayout(tensors=layout.tensors, header_bytes=data_start, quant=layout.quant)
    import tempfile

    names = synth_shard_paths(path, shards)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as tmp:
        _write_sparse(writer, Path(tmp) / path.name)     # the writer names the shards PATH-0000i-of-0000N.gguf
        for final in names:
            os.replace(Path(tmp) / final.name, final)
    from runner.model.gguf import read_header

    headers = [read_header(p) for p in names]
    return WeightsLayout(tensors=layout_from_headers(headers).tensors,
                         header_bytes=sum(h.data_offset for h in headers), quant=layout.quant)


def _first_layers(tensors: WeightsLayout, n: int, quant: str) -> WeightsLayout:
    """A header's tensors, blk.N for N < n only, laid out afresh."""
    kept = [t for t in tensors.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n]
    out, offset = [], 0
    for t in kept:
        out.append(replace(t, offset=offset))
        offset += -(-t.n_bytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    return WeightsLayout(tensors=tuple(out), header_bytes=tensors.header_bytes, quant=quant.upper())


def synth_shard_paths(path: Path, shards: int) -> list[Path]:
    """The files `write_synth(..., shards=N)` writes for `path`."""
    return [path.with_name(f"{path.stem}-{i:05d}-of-{shards:05d}.gguf") for i in range(1, shards + 1)]


def _write_sparse(writer: GGUFWriter, path: Path) -> int:
    """Write the header(s) and leave every tensor's data as a hole; returns the first file's data offset."""
    first = 0
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (fout, tensors) in enumerate(zip(writer.fout or [], writer.tensors)):
            pos = fout.tell()
            data_start = -(-pos // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
            fout.write(b"\0" * (data_start - pos))
            end = data_start
            for ti in tensors.values():
                end += -(-ti.nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
            fout.truncate(end)          # a sparse hole: tensor data reads as zeros, takes no disk
            if i == 0:
                first = data_start
    finally:
        writer.close()
    return first


def _vocab(spec: ArchSpec, override: str | None) -> tuple[Vocab, str]:
    if override is None:
        return spec.vocab, spec.pre
    kind, _, pre = override.partition(":")
    if kind not in ("spm", "bpe", "wpm"):
        raise UsageError(f"unknown vocabulary {override!r}", hint="spm, bpe:<pre-tokenizer> or wpm")
    if kind == "bpe" and not pre:
        raise UsageError("a BPE vocabulary needs its pre-tokenizer, e.g. bpe:llama-bpe")
    return kind, pre  # type: ignore[return-value]


def _add_hparams(writer: GGUFWriter, spec: ArchSpec, shape: ModelShape, n_layer: int) -> None:
    """The {arch}.* keys llama.cpp's loader reads for this shape."""
    arch = shape.arch
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    if shape.head_dim != shape.n_embd // max(shape.n_head, 1) or shape.head_dim_v != shape.head_dim:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim_v)
    rope = shape.head_dim - shape.head_dim_v if shape.head_dim_mla else shape.head_dim
    writer.add_rope_dimension_count(rope)
    if spec.norm == "layer":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(shape.n_vocab)
    if shape.n_expert:
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
    if shape.n_expert:
        writer.add_expert_feed_forward_length(shape.expert_ff)
    if shape.n_expert_shared:
        writer.add_expert_shared_count(shape.n_expert_shared)
    if shape.n_layer_dense_lead:
        writer.add_leading_dense_block_count(shape.n_layer_dense_lead)
    if shape.head_dim_mla:
        writer.add_kv_lora_rank(shape.head_dim_v)
        if shape.q_lora_rank:
            writer.add_q_lora_rank(shape.q_lora_rank)
        writer.add_key_length_mla(shape.head_dim_mla)
        writer.add_value_length_mla(shape.head_dim_v_mla)
    if shape.sliding_window and spec.swa_pattern:
        writer.add_sliding_window(shape.sliding_window)
        if shape.swa_pattern != spec.swa_pattern:
            writer.add_uint32(f"{arch}.attention.sliding_window_pattern", shape.swa_pattern)
    if spec.embedding:
        writer.add_causal_attention(False)
    for key, value in spec.metadata:
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        else:
            writer.add_float32(full, float(value))


def _add_spm_vocab(writer: GGUFWriter, n_vocab: int, specials: tuple[str, ...] = ()) -> None:
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
    for k, special in enumerate(specials):   # the architecture's own control tokens end the vocabulary
        tokens[n_vocab - len(specials) + k] = special
        types[n_vocab - len(specials) + k] = gguf.TokenType.CONTROL
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


def _add_wpm_vocab(writer: GGUFWriter, n_vocab: int) -> None:
    """A BERT WordPiece ("bert") vocabulary llama.cpp accepts: [PAD] 0, [unusedN], [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, then the letters, words and their "##" continuations."""
    import gguf

    if n_vocab < 104 + 2 * 26:
        raise UsageError(f"n_vocab {n_vocab} is too small for a WordPiece vocabulary (needs at least {104 + 52})")
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    types = [gguf.TokenType.CONTROL] * len(tokens)
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n_vocab:
        word, k = "", i // 2
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        tokens.append(word if i % 2 == 0 else "##" + word)
        types.append(gguf.TokenType.NORMAL)
        i += 1
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(N_TOKEN_TYPES)
    writer.add_unk_token_id(100)
    writer.add_bos_token_id(101)
    writer.add_eos_token_id(102)
    writer.add_sep_token_id(102)
    writer.add_pad_token_id(0)
    writer.add_mask_token_id(103)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
