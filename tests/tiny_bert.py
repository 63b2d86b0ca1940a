"""A tiny BERT GGUF written with the `gguf` package: llama.cpp's `bert` architecture (non-causal attention,
learned positions, LayerNorm, GELU), a WordPiece vocabulary in llama.cpp's phantom-space form, mean pooling
declared, random weights from a fixed seed. No PyPI package ships a BERT-family GGUF (docs/engine.md), so this is
how the tests exercise llama.cpp's encoder path (every sequence of a decode in ONE ubatch, pooled by llama.cpp)
offline. Its vectors mean nothing; the tests check the mechanics: sequences kept apart, pooling, refusal to
generate."""

from __future__ import annotations

from pathlib import Path

N_EMBD, N_FF, N_LAYER, N_HEAD, N_CTX = 32, 64, 2, 4, 128
WORDS = ("the", "cat", "sat", "on", "mat", "dog", "ran", "in", "park", "hello", "world")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocabulary() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    # llama.cpp's WPM form: a word start is "\u2581word", a continuation ("##x" in BERT) is the bare piece
    return list(SPECIAL) + ["\u2581" + w for w in WORDS] + ["\u2581" + c for c in letters] + letters + ["\u2581."]


def write_tiny_bert(path: Path, *, pooling: int = 1, seed: int = 0) -> Path:
    """Write the model to `path` (pooling: llama.cpp's enum, 1 = mean, 2 = cls)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("tiny test bert")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_block_count(N_LAYER)
    w.add_head_count(N_HEAD)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(pooling))
    w.add_file_type(0)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * (len(vocab) - len(SPECIAL)))
    w.add_token_type_count(2)
    w.add_pad_token_id(0)
    w.add_unk_token_id(1)
    w.add_bos_token_id(2)          # [CLS]
    w.add_sep_token_id(3)          # [SEP]
    w.add_mask_token_id(4)

    def t(name: str, *shape: int, scale: float = 0.2, value: float | None = None) -> None:
        data = np.full(shape, value, np.float32) if value is not None else \
            (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, data)

    # numpy shapes are (rows, cols) = llama.cpp's {cols, rows}
    t("token_embd.weight", len(vocab), N_EMBD, scale=1.0)
    t("token_types.weight", 2, N_EMBD)
    t("position_embd.weight", N_CTX, N_EMBD, scale=0.5)
    t("token_embd_norm.weight", N_EMBD, value=1.0)
    t("token_embd_norm.bias", N_EMBD, value=0.0)
    for i in range(N_LAYER):
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{proj}.weight", N_EMBD, N_EMBD)
            t(f"blk.{i}.{proj}.bias", N_EMBD, scale=0.05)
        t(f"blk.{i}.attn_output_norm.weight", N_EMBD, value=1.0)
        t(f"blk.{i}.attn_output_norm.bias", N_EMBD, value=0.0)
        t(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        t(f"blk.{i}.ffn_up.bias", N_FF, scale=0.05)
        t(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
        t(f"blk.{i}.ffn_down.bias", N_EMBD, scale=0.05)
        t(f"blk.{i}.layer_output_norm.weight", N_EMBD, value=1.0)
        t(f"blk.{i}.layer_output_norm.bias", N_EMBD, value=0.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_embedding(path: Path, tokens: list[int], pooling: str) -> list[float]:
    """The same model's pooled embedding computed independently in numpy (the BERT forward pass as Hugging Face
    defines it, GELU in its tanh form as ggml computes it), to check llama.cpp's pooling against."""
    import gguf
    import numpy as np

    weights = {t.name: np.asarray(t.data, dtype=np.float64) for t in gguf.GGUFReader(path).tensors}

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * weights[f"{name}.weight"] + weights[f"{name}.bias"]

    def linear(x, name):
        return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    n = len(tokens)
    x = weights["token_embd.weight"][tokens] + weights["token_types.weight"][0] + weights["position_embd.weight"][:n]
    x = ln(x, "token_embd_norm")
    d = N_EMBD // N_HEAD
    for i in range(N_LAYER):
        q, k, v = (linear(x, f"blk.{i}.attn_{p}").reshape(n, N_HEAD, d).transpose(1, 0, 2) for p in "qkv")
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        x = ln(x + linear(attn.transpose(1, 0, 2).reshape(n, N_EMBD), f"blk.{i}.attn_output"),
               f"blk.{i}.attn_output_norm")
        h = linear(x, f"blk.{i}.ffn_up")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        x = ln(x + linear(h, f"blk.{i}.ffn_down"), f"blk.{i}.layer_output_norm")
    return (x.mean(0) if pooling == "mean" else x[0]).tolist()
