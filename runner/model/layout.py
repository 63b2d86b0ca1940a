"""Which tensors a model file holds, their shapes, ggml types and bytes: read from a GGUF header, or predicted from a
model shape and a quantization name by reproducing llama.cpp's quantization mixes (src/llama-quant.cpp,
`llama_tensor_get_type_impl`).

The mixes are data: `RECIPES` maps a quant name to its default type and, per tensor role, an ordered list of
(condition, type) rules; the first rule whose condition holds wins. Conditions are named in `_CONDITIONS`.
Architectures are data too (`runner.model.archs.ARCHS`): each one's tensors with their shapes as expressions of
the model shape, in the order llama.cpp's converter writes them.

Leaf of the estimator: imports only runner.core and runner.model.archs (no numpy, no gguf), so `llmrun plan`
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from runner.core.errors import UsageError
from runner.core.shapes import GGUFHeader, ModelShape, TensorInfo
from runner.model.archs import ARCHS, global_specs, layer_specs, tensor_name

# ggml type name -> (elements per block, bytes per block); from ggml/src/ggml.c type_traits
TYPE_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8), "I8": (1, 1), "I16": (1, 2), "I32": (1, 4),
    "I64": (1, 8),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 36),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110),
    "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
    "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17),
}
GGUF_ALIGNMENT = 32


def tensor_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes of one tensor: rows of ne0 elements packed in blocks (ggml_row_size * rows)."""
    try:
        block, size = TYPE_SIZES[type_name]
    except KeyError:
        raise UsageError(f"unknown ggml type {type_name!r}", hint="known: " + ", ".join(TYPE_SIZES)) from None
    ne0 = shape[0]
    if ne0 % block:
        raise UsageError(f"a {type_name} row must hold a multiple of {block} elements, not {ne0}")
    rows = 1
    for d in shape[1:]:
        rows *= d
    return ne0 // block * size * rows


@dataclass(frozen=True)
class WeightsLayout:
    """Every tensor of a model file with its type and bytes, plus the bytes before the tensor data (header)."""

    tensors: tuple[TensorInfo, ...]
    header_bytes: int = 0          # file offset of the tensor data (GGUF header + tensor infos + padding)
    quant: str = ""                # the quant name it was made from ("" when read from a header)

    @property
    def weights_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        """Size of the GGUF file: header plus the aligned tensor data."""
        if not self.tensors:
            return self.header_bytes
        last = max(self.tensors, key=lambda t: t.offset)
        return self.header_bytes + last.offset + last.n_bytes

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def layout_from_header(header: GGUFHeader) -> WeightsLayout:
    return WeightsLayout(tensors=tuple(header.tensors), header_bytes=header.data_offset)


def layout_from_headers(headers: list[GGUFHeader] | tuple[GGUFHeader, ...]) -> WeightsLayout:
    """One layout for a model split in llama.cpp shards (grok-1-...-0000N-of-00009.gguf), in shard order. Offsets
    are made to run on across the shards, as if they were one file: the host's mapped span (llama.cpp maps each
    shard on its own) is then at most the gaps between shards too large."""
    if not headers:
        raise UsageError("no GGUF header given")
    tensors: list[TensorInfo] = []
    base = 0
    for h in headers:
        end = 0
        for t in h.tensors:
            tensors.append(TensorInfo(name=t.name, shape=t.shape, type_name=t.type_name, offset=base + t.offset,
                                      n_bytes=t.n_bytes))
            end = max(end, t.offset + t.n_bytes)
        base += -(-end // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    return WeightsLayout(tensors=tuple(tensors), header_bytes=sum(h.data_offset for h in headers))


# ---------------------------------------------------------------------------------------------------------------
# Quantization mixes (llama.cpp src/llama-quant.cpp). Conditions take (layer i, n_layer, shape).


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_CONDITIONS: dict[str, Callable[[int, int, ModelShape], bool]] = {
    "always": lambda i, n, s: True,
    "more_bits": lambda i, n, s: _use_more_bits(i, n),
    "first_eighth": lambda i, n, s: i < n // 8,
    "first_sixteenth": lambda i, n, s: i < n // 16,
    "first_2": lambda i, n, s: i < 2,
    "first_4": lambda i, n, s: i < 4,
    "gqa4": lambda i, n, s: s.n_head // max(s.n_head_kv, 1) >= 4,
    "8_experts": lambda i, n, s: s.n_expert == 8,
    "middle": lambda i, n, s: n // 8 <= i < 7 * n // 8,
}


@dataclass(frozen=True)
class QuantRecipe:
    """One llama.cpp ftype: the default type of quantized tensors and per-role rules [(condition, type), ...]."""

    name: str
    default: str
    rules: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    bump_70b_attn_v: bool = True       # llama.cpp: attn_v Q3_K/Q4_K -> Q5_K on 70B (8 heads share attn_v)
    experts: str = ""                  # the type of 3-D expert tensors, when the mix fixes it (MXFP4_MOE)

    def rules_for(self, role: str) -> tuple[tuple[str, str], ...]:
        for r, rules in self.rules:
            if r == role:
                return rules
        return ()


_MOE8 = (("8_experts", "Q8_0"),)   # attn_v and attn_k of 8-expert models -> Q8_0 (checked before the others)
RECIPES: dict[str, QuantRecipe] = {r.name: r for r in (
    QuantRecipe("F16", "F16"),
    QuantRecipe("BF16", "BF16"),
    QuantRecipe("MXFP4_MOE", "Q8_0", experts="MXFP4"),   # gpt-oss: experts as trained (MXFP4), the rest Q8_0
    QuantRecipe("Q8_0", "Q8_0", (("attn_v", _MOE8), ("attn_k", _MOE8))),
    QuantRecipe("Q6_K", "Q6_K", (("attn_v", _MOE8), ("attn_k", _MOE8))),
    QuantRecipe("Q5_0", "Q5_0", (("attn_v", _MOE8), ("attn_k", _MOE8))),
    QuantRecipe("Q5_1", "Q5_1", (("attn_v", _MOE8), ("attn_k", _MOE8))),
    QuantRecipe("Q4_0", "Q4_0", (("attn_v", _MOE8), ("attn_k", _MOE8))),
    QuantRecipe("Q4_1", "Q4_1", (("attn_v", _MOE8), ("attn_k", _MOE8))),
    QuantRecipe("Q5_K_S", "Q5_K", (("attn_v", _MOE8), ("attn_k", _MOE8))),
    QuantRecipe("Q5_K_M", "Q5_K", (
        ("attn_qkv", (("always", "Q6_K"),)),
        ("attn_v", _MOE8 + (("more_bits", "Q6_K"),)),
        ("attn_k", _MOE8),
        ("ffn_down", (("more_bits", "Q6_K"),)),
    )),
    QuantRecipe("Q4_K_S", "Q4_K", (
        ("attn_v", _MOE8 + (("first_4", "Q5_K"),)),
        ("attn_k", _MOE8),
        ("ffn_down", (("first_4", "Q5_K"),)),      # 2023 files: i < 4 (today: i < n/8)
        ("attn_output", (("8_experts", "Q5_K"),)),
    )),
    QuantRecipe("Q4_K_M", "Q4_K", (
        ("attn_qkv", (("always", "Q5_K"),)),
        ("attn_v", _MOE8 + (("more_bits", "Q6_K"),)),
        ("attn_k", _MOE8),
        ("ffn_down", (("more_bits", "Q6_K"),)),
        ("attn_output", (("8_experts", "Q5_K"),)),
    )),
    QuantRecipe("Q3_K_S", "Q3_K", (
        ("attn_v", _MOE8), ("attn_k", _MOE8),
        ("attn_output", (("8_experts", "Q5_K"),)),
    )),
    QuantRecipe("Q3_K_M", "Q3_K", (
        ("attn_qkv", (("always", "Q4_K"),)),
        ("attn_v", _MOE8 + (("first_2", "Q5_K"), ("always", "Q4_K"))),
        ("attn_k", _MOE8),
        ("ffn_down", (("first_2", "Q5_K"), ("always", "Q4_K"))),  # 2023 files: i < 2 (today: i < n/16)
        ("attn_output", (("8_experts", "Q5_K"), ("always", "Q4_K"))),
    )),
    QuantRecipe("Q3_K_L", "Q3_K", (
        ("attn_qkv", (("always", "Q4_K"),)),
        ("attn_v", _MOE8 + (("always", "Q5_K"),)),
        ("attn_k", _MOE8),
        ("ffn_down", (("always", "Q5_K"),)),
        ("attn_output", (("always", "Q5_K"),)),
    )),
    QuantRecipe("IQ4_XS", "IQ4_XS", (
        ("attn_v", _MOE8 + (("gqa4", "Q5_K"),)),
        ("attn_k", _MOE8),
        ("ffn_down", (("first_eighth", "Q5_K"),)),
        ("attn_output", (("8_experts", "Q5_K"),)),
    )),
    QuantRecipe("IQ3_XS", "IQ3_S", (
        ("attn_v", _MOE8 + (("gqa4", "Q4_K"),)),
        ("attn_k", _MOE8 + (("always", "IQ3_XXS"),)),
        ("attn_q", (("always", "IQ3_XXS"),)),
        ("ffn_gate", (("middle", "IQ3_XXS"),)),
        ("ffn_up", (("middle", "IQ3_XXS"),)),
        ("attn_output", (("8_experts", "Q5_K"),)),
    )),
    # Q2_K as TheBloke's 2023 files have it (llama.cpp of that time): attn_v and ffn_down Q4_K. Today's
    # llama-quant uses Q3_K there (Q4_K for attn_v with GQA); the published files are what users download.
    QuantRecipe("Q2_K", "Q2_K", (
        ("attn_v", _MOE8 + (("always", "Q4_K"),)),
        ("attn_k", _MOE8),
        ("ffn_down", (("8_experts", "Q3_K"), ("always", "Q4_K"))),   # MoE files are 2024+: today's Q3_K
        ("attn_output", (("8_experts", "Q5_K"), ("always", "Q3_K"))),
    )),
)}
# Per-architecture rules replacing a recipe's rules for a role (llama-quant's `arch == LLM_ARCH_FALCON` branches):
# arch -> recipe -> ((role, rules), ...). A role listed with () keeps the recipe's default type.
ARCH_RULES: dict[str, dict[str, tuple[tuple[str, tuple[tuple[str, str], ...]], ...]]] = {
    "falcon": {
        "Q2_K": (("attn_output", ()),),
        "Q3_K_M": (("ffn_down", (("first_2", "Q5_K"), ("more_bits", "Q4_K"))), ("attn_output", ())),
        "Q3_K_L": (("ffn_down", (("always", "Q4_K"),)), ("attn_output", (("always", "Q4_K"),))),
        "Q4_K_S": (("ffn_down", ()), ("attn_output", ())),
        "Q4_K_M": (("ffn_down", (("first_sixteenth", "Q6_K"), ("more_bits", "Q5_K"))), ("attn_output", ())),
        "IQ4_XS": (("attn_output", ()),),
        "IQ3_XS": (("attn_output", ()),),
    },
}


def _rules(recipe: QuantRecipe, role: str, arch: str) -> tuple[tuple[str, str], ...]:
    for r, rules in ARCH_RULES.get(arch, {}).get(recipe.name, ()):
        if r == role:
            return rules
    return recipe.rules_for(role)


# Aliases used by some GGUF publishers (Arki05's Grok-1 "Q4_K" is llama.cpp's Q4_K_M mix).
QUANT_ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}

# GGUF header = 24 bytes (magic, version, counts) + metadata + tensor infos, padded to 32. TheBloke's Llama-2-7B
# files have 741,056 bytes before the tensor data (the same for Q4_K_M and Q8_0); taking away their 291 tensor
# infos leaves the metadata, almost all of it the 32000-token vocabulary, which we scale per token.
def _tensor_info_bytes(name: str, n_dims: int) -> int:
    return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8


def _llama7b_infos() -> int:
    spec = ARCHS["llama"]
    total = sum(_tensor_info_bytes(tensor_name(t), 2 if r != "norm" else 1) for t, r, _ in spec.head + spec.tail)
    for i in range(32):
        total += sum(_tensor_info_bytes(f"blk.{i}.{tensor_name(t)}", 2 if r != "norm" else 1)
                     for t, r, fn in spec.block if r in ("norm", "attn_q", "attn_k", "attn_v", "attn_output")
                     or r in ("ffn_gate", "ffn_down", "ffn_up") and "_exps" not in t)
    return total


_METADATA_BYTES_PER_TOKEN = (741_056 - 24 - _llama7b_infos()) / 32_000


def _is_70b(shape: ModelShape) -> bool:
    return shape.arch == "llama" and shape.n_layer == 80


def _pick(recipe: QuantRecipe, role: str, i: int, n: int, shape: ModelShape, tshape: tuple[int, ...] = ()) -> str:
    if role in ("norm", "router", "bias"):
        return "F32"
    if role == "keep":             # llama-quant never quantizes BERT's position embeddings and token types
        return "F16" if recipe.default != "F32" else "F32"
    if recipe.default in ("F16", "F32", "BF16"):
        return recipe.default
    if recipe.experts and len(tshape) == 3 and role in ("ffn_gate", "ffn_down", "ffn_up"):
        return recipe.experts
    if role == "output":
        # llama-quant: Q8_0 if falcon or ne0 not a multiple of the block; Q6_K unless the mix is Q8_0
        block = TYPE_SIZES[recipe.default][0]
        if shape.arch == "falcon" or shape.n_embd % block:
            return "Q8_0"
        return "Q8_0" if recipe.default == "Q8_0" else "Q6_K"
    if role == "token_embd":
        return recipe.default
    chosen = recipe.default
    for cond, type_name in _rules(recipe, role, shape.arch):
        if _CONDITIONS[cond](i, n, shape):
            chosen = type_name
            break
    if role == "attn_v" and recipe.bump_70b_attn_v and _is_70b(shape) and chosen in ("Q3_K", "Q4_K"):
        chosen = "Q5_K"
    return chosen


# llama-quant `tensor_type_fallback`: a type whose block does not divide the row length falls back to this one
_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
             "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL",
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}


def _fit(type_name: str, ne0: int) -> str:
    if ne0 % TYPE_SIZES[type_name][0] == 0:
        return type_name
    fallback = _FALLBACK.get(type_name, "F16")
    return fallback if ne0 % TYPE_SIZES[fallback][0] == 0 else "F16"


def known_quants() -> tuple[str, ...]:
    return tuple(RECIPES) + tuple(QUANT_ALIASES)


def layout_from_recipe(shape: ModelShape, quant: str, *, n_layer: int | None = None) -> WeightsLayout:
    """The tensors llama.cpp's `llama-quantize` writes for `shape` and `quant` (e.g. "Q4_K_M"), in converter order,
    with offsets aligned to 32 bytes. `n_layer` keeps only the first n layers (small shape-true test files),
    each with the type it has in the full model."""
    name = QUANT_ALIASES.get(quant.upper(), quant.upper())
    recipe = RECIPES.get(name)
    if recipe is None:
        raise UsageError(f"unknown quantization {quant!r}", hint="known: " + ", ".join(known_quants()))
    spec = ARCHS.get(shape.arch)
    if spec is None:
        raise UsageError(f"no tensor table for architecture {shape.arch!r}", hint="supported: " + ", ".join(ARCHS))
    n = shape.n_layer if n_layer is None else n_layer
    full = shape.n_layer           # a truncated file keeps the real model's per-layer types
    specs: list[tuple[str, tuple[int, ...], str]] = []
    for tname, role, tshape in global_specs(spec.head, shape):
        specs.append((tname, tshape, _pick(recipe, role, -1, full, shape, tshape)))
    for i in range(n):
        for tname, role, tshape in layer_specs(spec, shape, i):
            specs.append((tname, tshape, _pick(recipe, role, i, full, shape, tshape)))
    for tname, role, tshape in global_specs(spec.tail, shape):
        specs.append((tname, tshape, _pick(recipe, role, full, full, shape, tshape)))
    tensors = []
    offset = 0
    for tname, tshape, type_name in specs:
        type_name = _fit(type_name, tshape[0])
        nbytes = tensor_bytes(tshape, type_name)
        tensors.append(TensorInfo(name=tname, shape=tshape, type_name=type_name, offset=offset, n_bytes=nbytes))
        offset += -(-nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    header = 24 + int(round(_METADATA_BYTES_PER_TOKEN * shape.n_vocab))
    header += sum(_tensor_info_bytes(t.name, len(t.shape)) for t in tensors)
    header = -(-header // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    return WeightsLayout(tensors=tuple(tensors), header_bytes=header, quant=name)


# ---------------------------------------------------------------------------------------------------------------
# Another quant of a file whose header was read (a hub repo's other quants, before their headers are)

_ROLE_BY_SUFFIX = (("attn_qkv", "attn_qkv"), ("attn_q", "attn_q"), ("attn_k", "attn_k"), ("attn_v", "attn_v"),
                   ("attn_output", "attn_output"), ("ffn_gate_inp", "router"), ("ffn_gate", "ffn_gate"),
                   ("ffn_down", "ffn_down"), ("ffn_up", "ffn_up"))
# publishers' mixes without a recipe here, and the recipe whose per-tensor types come closest
_NEAREST_RECIPE = {"IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "TQ1_0": "Q2_K", "TQ2_0": "Q2_K", "IQ2_XXS": "Q2_K",
                   "IQ2_XS": "Q2_K", "IQ2_S": "Q2_K", "IQ2_M": "Q2_K", "Q2_K_S": "Q2_K", "Q2_K_L": "Q2_K",
                   "Q2_K_XL": "Q2_K", "IQ3_XXS": "IQ3_XS", "IQ3_S": "IQ3_XS", "IQ3_M": "Q3_K_M", "Q3_K_XL": "Q3_K_L",
                   "IQ4_NL": "IQ4_XS", "MXFP4": "MXFP4_MOE", "Q4_K_L": "Q4_K_M", "Q4_K_XL": "Q4_K_M",
                   "Q5_K_L": "Q5_K_M", "Q5_K_XL": "Q5_K_M", "Q6_K_L": "Q6_K", "Q6_K_XL": "Q6_K", "Q8_K_XL": "Q8_0",
                   "Q4_0_4_4": "Q4_0", "Q4_0_4_8": "Q4_0", "Q4_0_8_8": "Q4_0", "F32": "F16"}


def _role(name: str, n_dims: int, roles: dict[str, str]) -> str:
    if name in roles:
        return roles[name]
    if n_dims < 2 or name.endswith(".bias"):
        return "norm"
    if name.startswith("token_embd."):
        return "token_embd"
    if name.startswith("output."):
        return "output"
    base = name.split(".")[-2] if name.count(".") >= 1 else name
    for prefix, role in _ROLE_BY_SUFFIX:
        if base.startswith(prefix):
            return role
    return "other"


def layout_for_quant(template: WeightsLayout, shape: ModelShape, quant: str, weights_bytes: int | None = None
                     ) -> WeightsLayout:
    """The tensors of `template` (a header's layout) with the types llama.cpp's `quant` mix gives them: what
    another quant of the same model holds, before its own header is read. A mix without a recipe here uses the
    nearest one (UD-Q4_K_XL as Q4_K_M, IQ2_M as Q2_K...); when the file's weights are known (`weights_bytes`,
    the download less its header) every tensor is scaled to them, so the total is right even where the types
    are not. The offsets run on in the template's order."""
    name = quant.upper().removeprefix("UD-")
    name = QUANT_ALIASES.get(name, name)
    recipe = RECIPES.get(name) or RECIPES.get(_NEAREST_RECIPE.get(name, ""))
    if recipe is None:
        raise UsageError(f"no quantization recipe near {quant!r}", hint="known: " + ", ".join(known_quants()))
    spec = ARCHS.get(shape.arch)
    roles: dict[str, str] = {}
    if spec is not None:
        for tname, role, _s in global_specs(spec.head, shape) + global_specs(spec.tail, shape):
            roles[tname] = role
        for i in range(shape.n_layer):
            for tname, role, _s in layer_specs(spec, shape, i):
                roles[tname] = role
    n = shape.n_layer
    picked: list[tuple[TensorInfo, str]] = []
    for t in template.tensors:
        if t.type_name in ("F32", "I32", "I16", "I8", "F64", "I64") and len(t.shape) < 2:
            picked.append((t, t.type_name))
            continue
        role = _role(t.name, len(t.shape), roles)
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else (-1 if role == "token_embd" else n)
        picked.append((t, _fit(_pick(recipe, role, layer, n, shape, t.shape), t.shape[0])))
    sizes = [tensor_bytes(t.shape, type_name) for t, type_name in picked]
    total = sum(sizes)
    if weights_bytes and total:
        sizes = [round(sz * weights_bytes / total) for sz in sizes]
    tensors = []
    offset = 0
    for (t, type_name), nbytes in zip(picked, sizes):
        tensors.append(TensorInfo(name=t.name, shape=t.shape, type_name=type_name, offset=offset, n_bytes=nbytes))
        offset += -(-nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    return WeightsLayout(tensors=tuple(tensors), header_bytes=template.header_bytes, quant=recipe.name)
