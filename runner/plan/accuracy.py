"""The estimator's accuracy matrix: load real and shape-true synthetic models through llama.cpp, read back the
buffers it logs and the process RSS, and set them beside `runner.estimate.estimate`. Used by
tests/test_estimate_accuracy.py (asserts the targets) and scripts/measure_memory.py (writes the table into
docs/estimation.md).

Each (model, quant) is loaded once, in a child process, and one context per n_ctx is created from the same
loaded model; after each context one token is decoded (it reads every weight), the RSS is recorded, and the
context is freed. Loads are slow (a 13B Q8_0 takes minutes on 2 cores), so run one case at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TypedDict

from runner.core.run_settings import RunSettings
from runner.core.shapes import ModelShape
from runner.model.layout import layout_from_header, layout_from_recipe
from runner.plan.estimate import MemoryEstimate, estimate

LLAMA2_7B = ModelShape("llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008, n_vocab=32000,
                       n_ctx_train=4096)
LLAMA2_13B = ModelShape("llama", n_layer=40, n_embd=5120, n_head=40, n_head_kv=40, n_ff=13824, n_vocab=32000,
                        n_ctx_train=4096)
SMOLLM2_135M = ModelShape("llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152,
                          n_ctx_train=8192)
# One tiny shape-true file per architecture beyond llama (2-6 layers: the KV per layer and the compute buffer do
# not depend on the layer count), at widths where each one's own graph terms (Q wider than E, fused QKV, sliding
# window, MLA, experts) are what sizes the buffers. Name -> (shape, the quant its published files use).
ARCH_CASES: dict[str, tuple[ModelShape, str]] = {
    "tiny-llama3": (ModelShape("llama", 2, 1024, 16, 4, 3584, 8000, 8192), "Q4_K_M"),
    "tiny-mixtral": (ModelShape("llama", 2, 1024, 16, 4, 1792, 8000, 4096, n_expert=8, n_expert_used=2),
                     "Q4_K_M"),
    "tiny-qwen2": (ModelShape("qwen2", 2, 1024, 16, 2, 2816, 8000, 4096), "Q4_K_M"),
    "tiny-qwen3": (ModelShape("qwen3", 2, 1024, 16, 8, 3072, 8000, 4096, head_dim=128), "Q4_K_M"),
    "tiny-qwen3moe": (ModelShape("qwen3moe", 2, 1024, 16, 4, 3072, 8000, 4096, head_dim=128, n_expert=8,
                                 n_expert_used=2, n_ff_exp=768), "Q4_K_M"),
    "tiny-gemma2": (ModelShape("gemma2", 2, 1024, 8, 4, 4096, 8000, 8192, head_dim=256, sliding_window=256,
                               swa_pattern=2), "Q4_K_M"),
    "tiny-gemma3": (ModelShape("gemma3", 6, 1024, 8, 4, 4096, 8000, 8192, head_dim=256, sliding_window=256,
                               swa_pattern=6), "Q4_K_M"),
    "tiny-phi3": (ModelShape("phi3", 2, 1024, 16, 16, 2816, 8000, 4096), "Q4_K_M"),
    "tiny-deepseek2": (ModelShape("deepseek2", 2, 1024, 16, 1, 2816, 8000, 4096, head_dim=576, head_dim_v=512,
                                  head_dim_mla=192, head_dim_v_mla=128, q_lora_rank=512, n_expert=8,
                                  n_expert_used=2, n_ff_exp=512, n_expert_shared=1, n_layer_dense_lead=1), "Q4_K_M"),
    "tiny-gpt-oss": (ModelShape("gpt-oss", 2, 1024, 16, 4, 1024, 8000, 4096, head_dim=64, sliding_window=128,
                                swa_pattern=2, n_expert=8, n_expert_used=2), "MXFP4_MOE"),
    "tiny-bert": (ModelShape("bert", 2, 1024, 16, 16, 4096, 30522, 512), "F16"),
    "tiny-nomic-bert": (ModelShape("nomic-bert", 2, 768, 12, 12, 3072, 30522, 2048), "F16"),
}
SHAPES = {"llama-2-7b": LLAMA2_7B, "llama-2-13b": LLAMA2_13B, "smollm2-135m": SMOLLM2_135M,
          **{name: shape for name, (shape, _quant) in ARCH_CASES.items()}}
N_CTX = (512, 2048, 4096)
N_CTX_ARCH = (1024, 4096)        # tiny files: n_ctx 512 is below what the planner ever picks (docs list its misses)
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")
# python + llama_cpp imported, before the model: subtracted from nothing; the estimate's HOST_OVERHEAD covers it



class ContextSpec(TypedDict):
    """One context to create and measure (runner.engine.buffers.measure_contexts reads these keys)."""

    n_ctx: int
    n_ubatch: int
    n_batch: int
    flash_attn: bool
    decode_tokens: int
    embeddings: bool


class ContextMeasurement(TypedDict):
    """What was measured for one context: llama.cpp's logged buffers (bytes), RSS and peak RSS, timings."""

    buffers: dict[str, int]
    rss: int
    hwm: int
    model_file_rss: int               # the model file's resident mapped pages at the same moment as `rss`
    ctx_s: float
    decode_s: float
    decoded: int


class Measurement(TypedDict):
    """A model loaded once: its load buffers and time, and each context's measurement."""

    load_buffers: dict[str, int]
    load_s: float
    contexts: list[ContextMeasurement]


# what measures: (model path, context specs) -> llama.cpp's logged buffers and RSS (runner.engine.buffers)
Measure = Callable[[str, list[ContextSpec]], Measurement]
# (component name in the estimate, buffer key in llama.cpp's log)
COMPONENTS = (("weights", "CPU_Mapped model"), ("repack", "CPU_REPACK model"), ("kv_cache", "CPU KV"),
              ("compute", "CPU compute"), ("output", "CPU output"))


@dataclass(frozen=True)
class Case:
    label: str                 # "llama-2-7b Q4_0" or "demo Q4_1"
    path: Path
    shape: ModelShape
    quant: str


@dataclass
class Row:
    label: str
    n_ctx: int
    measured: dict[str, int]          # component -> bytes logged; "rss" -> peak RSS; "evicted" -> see measure_case
    estimated: dict[str, int]         # component -> bytes; "total" -> host total
    timings: dict[str, float] = field(default_factory=dict)

    def error(self, component: str) -> float | None:
        """Relative error of the estimate against the measurement (0.01 = 1 %); None when neither has it."""
        m = self.measured.get(component, 0)
        e = self.estimated.get(component, 0)
        if component == "rss":
            m += self.measured.get("evicted", 0)
        if m == 0 and e == 0:
            return None
        if m == 0:
            return float("inf")
        return (e - m) / m


def synthetic_case(name: str, quant: str) -> Case:
    from runner.model.synth import ensure_synth

    shape = SHAPES[name]
    return Case(f"{name} {quant}", ensure_synth(shape, quant, name=name), shape, quant)


def arch_case(name: str) -> Case:
    """The tiny shape-true file of one architecture (ARCH_CASES), written to the synthetic cache if missing."""
    _shape, quant = ARCH_CASES[name]
    return synthetic_case(name, quant)


def demo_case(path: Path) -> Case:
    from runner.model.gguf import derive_shape, read_header

    header = read_header(path)
    shape = derive_shape(header.metadata, header.tensors, require=True, where=str(path))
    return Case("demo SmolLM2-135M Q4_1", Path(path), shape, "")


def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags as the estimate wants them (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def estimate_case(case: Case, n_ctx: int, flags: frozenset[str]) -> MemoryEstimate:
    if case.quant:
        layout = layout_from_recipe(case.shape, case.quant)
    else:
        from runner.model.gguf import read_header

        layout = layout_from_header(read_header(case.path))
    return estimate(case.shape, layout, RunSettings(n_ctx=n_ctx), cpu_flags=flags)


def measure_case(case: Case, n_ctxs: tuple[int, ...] = N_CTX, *, measure: Measure,
                 flags: frozenset[str] | None = None, fill: bool = False) -> list[Row]:
    """Load the case's model once with `measure` (runner.engine.buffers.measure_in_subprocess: a child process),
    one context per n_ctx (RunSettings defaults otherwise: flash attention off, n_ubatch 512), and pair each
    measurement with the estimate. `fill` decodes a whole context of tokens (the worst case the estimate's total
    stands for: the last ubatch attends to every cell); otherwise one token is decoded (reads every weight,
    touches little of the compute buffer)."""
    from runner.model.archs import arch_spec

    flags = cpu_flags() if flags is None else flags
    defaults = RunSettings()
    spec = arch_spec(case.shape.arch)
    embeddings = spec is not None and spec.embedding      # an embedding model is only run with embeddings on
    specs = [ContextSpec(n_ctx=n, n_ubatch=defaults.n_ubatch, n_batch=defaults.n_batch,
                         flash_attn=defaults.flash_attn, decode_tokens=n if fill else 1, embeddings=embeddings)
             for n in n_ctxs]
    result = measure(str(case.path), specs)
    rows: list[Row] = []
    for n_ctx, ctx in zip(n_ctxs, result["contexts"]):
        logged = dict(result["load_buffers"])
        logged.update(ctx["buffers"])
        measured = {comp: logged.get(key, 0) for comp, key in COMPONENTS}
        measured["rss"] = max(ctx["hwm"], ctx["rss"])
        # Clean pages of the mapped file that the kernel dropped under memory pressure (a 13B-shaped model on a
        # 24 GiB machine): counted back in, so the row compares what the process would hold with RAM to spare.
        # _check allows only what the estimate itself calls reclaimable to go missing.
        file_rss = ctx["model_file_rss"]      # 0: the file is not mapped at all (nothing to count back)
        measured["evicted"] = max(0, measured["weights"] - file_rss) if file_rss else 0
        timings: dict[str, float] = {"load_s": result["load_s"], "ctx_s": ctx["ctx_s"],
                                     "decode_s": ctx["decode_s"], "decoded": ctx["decoded"]}
        rows.append(row_from_measurement(case, n_ctx, measured, flags, timings))
    return rows


def row_from_measurement(case: Case, n_ctx: int, measured: dict[str, int], flags: frozenset[str],
                         timings: Mapping[str, float] | None = None) -> Row:
    """Pair a measurement with the current estimate. When only one token was decoded, the compute buffer is
    barely touched, so the RSS is compared with the estimate's total less its committed compute pages (the
    compute term itself is checked against llama.cpp's log, and its residency on filled contexts)."""
    host = estimate_case(case, n_ctx, flags).host
    terms = {"weights": host.weights, "repack": host.repack, "kv_cache": host.kv_cache, "compute": host.compute,
             "output": host.output}
    estimated = {comp: terms[comp] for comp, _ in COMPONENTS}
    filled = timings is not None and len(timings) > 0 and timings.get("decoded", 1) >= n_ctx
    committed = host.compute if host.compute_committed is None else host.compute_committed
    estimated["rss"] = host.total if filled else host.total - committed
    estimated["evicted"] = host.reclaimable           # the most of the file the kernel may drop unharmed
    return Row(case.label, n_ctx, measured, estimated, dict(timings or {}))


def markdown_table(rows: list[Row]) -> str:
    """Measured and estimated side by side (MiB), error in %."""
    mib = 1024**2
    head = ["model", "n_ctx"]
    for comp, _ in COMPONENTS:
        head.append(f"{comp} meas / est (err)")
    head.append("RSS meas / est total (err)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, str(r.n_ctx)]
        for comp in [c for c, _ in COMPONENTS] + ["rss"]:
            m, e = r.measured.get(comp, 0), r.estimated.get(comp, 0)
            evicted = r.measured.get("evicted", 0) if comp == "rss" else 0
            err = r.error(comp)
            if err is None:
                cells.append("—")
            elif evicted > 0.005 * m:        # the kernel dropped clean file pages: shown, and counted back in
                cells.append(f"{m / mib:.1f} + {evicted / mib:.1f} evicted / {e / mib:.1f} ({err * 100:+.1f}%)")
            else:
                cells.append(f"{(m + evicted) / mib:.1f} / {e / mib:.1f} ({err * 100:+.1f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
