"""Memory estimate: (model shape + tensor layout, run settings, placement) -> bytes per device, broken into the
terms llama.cpp really allocates. A pure function; see docs/estimation.md for the formulas and measured accuracy.

Public API
    (RunSettings, how llama.cpp is asked to run a model, is in runner.core.run_settings; the weights' layout,
    WeightsLayout from a header or a quant recipe, in runner.model.layout)
    DeviceMemory, MemoryEstimate     the result
    estimate(shape, layout, settings, *, gpus, gpu_free, cpu_flags, unified) -> MemoryEstimate
    layer_devices(n_layer, settings, gpus, gpu_free)  where each layer and the output layer go
    (the KV cache per layer is runner.plan.kv; the compute and output buffers per architecture runner.plan.graph)

Devices are named as llama.cpp names its buffers: "CPU" (host RAM), "GPU0", "GPU1", ... (CUDA0...), and
"RPC0", ... for RPC workers, which llama.cpp puts first in its device list (and in tensor_split).

Model of llama.cpp (ggml-org/llama.cpp as vendored by llama-cpp-python 0.3.36), all checked against its logs:
- placement: i_gpu_start = max(n_layer + 1 - ngl, 0); layers i >= i_gpu_start go to the GPUs, split in
  proportion to tensor_split (default: free memory); the output layer counts as layer n_layer, so it is offloaded
  first (as soon as ngl >= 1); token_embd always stays in host memory.
- KV cache (runner.plan.kv): n_ctx is padded to a multiple of 256; per layer n_head_kv * head_dim * cells * type
  size for K and for V, with the real block sizes (f16 2, q8_0 34/32, q4_0 18/32); sliding-window layers, MLA
  and encoders as the architecture says; n_seq_max splits n_ctx into streams, it does not multiply it. Each
  layer's K/V live on that layer's device.
- compute buffer (per device, runner.plan.graph): inputs + the largest of three graph phases, fitted per
  architecture to the logged sizes (see docs/estimation.md for the fits and their residuals).
- output buffer: n_vocab * 4 * n_seq_max on the host (plus the pooled embedding for embedding models).
- an architecture runner.model.archs does not cover gets exact weights from its header and llama's KV and
  compute terms, marked approximate (`MemoryEstimate.approximate`, and a note).
- CPU_REPACK: on x86 with AVX2, Q4_0 / Q4_K / IQ4_NL / MXFP4 2-D weights with ne1 % 8 == 0 that feed a matmul
  (not token_embd) are repacked into a second copy (Q2_K too with AVX-512; Q4_0/Q4_K/Q5_K/Q6_K/Q8_0/IQ4_NL on
  ARM NEON with dotprod/i8mm). The mmap'd pages of those tensors are read to repack them and stay resident, so
  peak RSS holds both.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from runner.core.errors import UsageError
from runner.core.run_settings import RunSettings, embedding_settings
from runner.core.shapes import ModelShape, TensorInfo
from runner.model.archs import arch_spec, is_covered
from runner.model.layout import WeightsLayout
from runner.plan.graph import NO_FLASH_ATTN_ARCHS, SMALL_INPUTS, compute_buffer_bytes, compute_committed_bytes, \
    flash_attn_effective, output_buffer_bytes
from runner.plan.kv import has_kv_cache, kv_cells, kv_layers

MiB = 1024**2


# ------------------------------------------------------------------------------------------------------------
# constants (documented in docs/estimation.md)

CUDA_CONTEXT_BYTES = 400 * MiB         # CUDA context + cuBLAS workspace per GPU (unverified here: no GPU)
GPU_MARGIN_BYTES = 512 * MiB           # kept free per GPU for fragmentation and other processes
RPC_OVERHEAD_BYTES = 64 * MiB          # rpc-server process on the worker, beyond its buffers
HOST_OVERHEAD_BYTES = 42 * MiB         # the Python interpreter with llama_cpp imported, before a model (measured RSS)
HOST_BYTES_PER_TOKEN = 384             # llama.cpp's vocabulary tables per token (measured: 7B 6.6 MiB, demo 18 MiB)
CUDA_HOST_BYTES = 256 * MiB            # host RAM the CUDA runtime and cuBLAS take once GPUs are used (unverified)

# Which weight types the CPU repacks, by instruction set (ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type)
_REPACK_RULES: tuple[tuple[frozenset[str], frozenset[str]], ...] = (
    (frozenset({"avx2"}), frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})),
    (frozenset({"avx512f"}), frozenset({"Q2_K"})),
    (frozenset({"neon", "dotprod"}), frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "MXFP4"})),
    (frozenset({"neon", "i8mm"}), frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"})),
    (frozenset({"neon"}), frozenset({"IQ4_NL"})),
)


def repacked_types(cpu_flags: frozenset[str]) -> frozenset[str]:
    """ggml types llama.cpp's CPU backend repacks on a CPU with these flags."""
    flags = {f.lower() for f in cpu_flags}
    out: set[str] = set()
    for need, types in _REPACK_RULES:
        if need <= flags:
            out |= types
    return frozenset(out)


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device needs. `weights` for the host are the mmap'd file pages that become resident."""

    device: str
    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    output: int = 0
    repack: int = 0
    overhead: int = 0
    margin: int = 0
    n_layers: int = 0                 # repeating layers placed here (the output layer not counted)
    compute_committed: int | None = None  # host only: compute-buffer pages that become resident (None = all)
    reclaimable: int = 0              # host only, part of `weights`: file pages read once at load (repacked or
                                      # offloaded tensors inside the mapped span); clean page cache the kernel
                                      # can drop under memory pressure without slowing inference

    @property
    def needed(self) -> int:
        """What must fit: `total` less the reclaimable file pages (peak RSS shows them while RAM is free)."""
        return self.total - self.reclaimable

    @property
    def total(self) -> int:
        """Bytes this device needs at worst: for the host its peak RSS, for a GPU its VRAM use."""
        compute = self.compute if self.compute_committed is None else self.compute_committed
        return self.weights + self.kv_cache + compute + self.output + self.repack + self.overhead + self.margin

    def sizes(self) -> dict[str, int | None]:
        """Every figure by name (bytes, and n_layers), the derived total and needed too."""
        return {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                "output": self.output, "repack": self.repack, "overhead": self.overhead, "margin": self.margin,
                "n_layers": self.n_layers, "compute_committed": self.compute_committed,
                "reclaimable": self.reclaimable, "total": self.total, "needed": self.needed}

    def as_dict(self) -> dict[str, str | int | None]:
        return {"device": self.device, **self.sizes()}


@dataclass(frozen=True)
class MemoryEstimate:
    devices: tuple[DeviceMemory, ...]
    n_gpu_layers_effective: int       # llama.cpp ngl after clamping to n_layer + 1 (0 without GPUs)
    notes: tuple[str, ...] = field(default=(), compare=False)
    approximate: tuple[str, ...] = ()  # terms not measured for this architecture ("kv_cache", "compute")

    @property
    def host(self) -> DeviceMemory:
        return next(d for d in self.devices if d.device == "CPU")

    def gpu(self, i: int) -> DeviceMemory:
        name = f"GPU{i}"
        for d in self.devices:
            if d.device == name:
                return d
        raise UsageError(f"no {name} in this estimate", hint=f"devices: {', '.join(d.device for d in self.devices)}")

    @property
    def gpus(self) -> tuple[DeviceMemory, ...]:
        return tuple(d for d in self.devices if d.device != "CPU")

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    def as_dict(self) -> dict[str, object]:
        return {"devices": [d.as_dict() for d in self.devices], "n_gpu_layers": self.n_gpu_layers_effective,
                "total": self.total, "notes": list(self.notes), "approximate": list(self.approximate)}


# ------------------------------------------------------------------------------------------------------------
# placement


def _offload_devices(gpus: int, rpc: int) -> list[str]:
    """llama.cpp's device order: RPC servers first ("to minimize network transfers"), then the local GPUs."""
    return [f"RPC{i}" for i in range(rpc)] + [f"GPU{i}" for i in range(gpus)]


def layer_devices(n_layer: int, settings: RunSettings, gpus: int = 0,
                  gpu_free: tuple[int, ...] = ()) -> tuple[list[str], str, int]:
    """(device of each repeating layer, device of the output layer, effective ngl), as llama.cpp places them.
    RPC workers come first in llama.cpp's device list (and in tensor_split), then the local GPUs; without a
    tensor_split the layers follow each GPU's free memory (an RPC worker, whose memory we do not know here,
    counts as the average GPU, or 1:1 when no free memory is given)."""
    devices = _offload_devices(gpus, len(settings.rpc_servers))
    if not devices:
        return ["CPU"] * n_layer, "CPU", 0
    ngl = settings.n_gpu_layers
    if ngl < 0 or ngl > n_layer + 1:
        ngl = n_layer + 1
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = max(min(ngl, n_layer + 1), 1)
    shares = list(settings.tensor_split) if settings.tensor_split else []
    if shares and len(shares) < len(devices):
        shares += [0.0] * (len(devices) - len(shares))
    if not shares or sum(shares[: len(devices)]) <= 0:
        n_rpc = len(devices) - gpus
        if gpu_free and len(gpu_free) >= gpus and gpus and sum(gpu_free[:gpus]) > 0:
            free = [float(f) for f in gpu_free[:gpus]]
            shares = [sum(free) / len(free)] * n_rpc + free
        else:
            shares = [1.0] * len(devices)
    shares = shares[: len(devices)]
    total = sum(shares)
    cum, acc = [], 0.0
    for s in shares:
        cum.append(acc / total)
        acc += s
    # llama.cpp: dev = upper_bound(splits, (il - i_gpu_start) / act_gpu_layers) - 1

    def dev_of(il: int) -> str:
        if il < i_gpu_start:
            return "CPU"
        idx = bisect_right(cum, float(il - i_gpu_start) / act) - 1
        return devices[min(max(idx, 0), len(devices) - 1)]

    return [dev_of(i) for i in range(n_layer)], dev_of(n_layer), ngl


def _tensor_layer(name: str) -> int | None:
    """blk.N.* -> N; token_embd -> -1 (input); everything else (output, output_norm) -> None (output layer)."""
    if name.startswith("blk."):
        return int(name.split(".", 2)[1])
    if name.startswith("token_embd") or name.startswith("token_types") or name.startswith("position_embd"):
        return -1
    return None


def _is_expert(name: str) -> bool:
    return "_exps." in name or name.endswith("_exps")


# ------------------------------------------------------------------------------------------------------------
# terms


# ------------------------------------------------------------------------------------------------------------


def estimate(shape: ModelShape, layout: WeightsLayout, settings: RunSettings, *, gpus: int = 0,
             gpu_free: tuple[int, ...] = (), cpu_flags: frozenset[str] = frozenset(),
             unified: bool = False) -> MemoryEstimate:
    """Bytes per device llama.cpp will use to run `layout` with `settings` on a host with `gpus` GPUs (and the RPC
    workers in settings.rpc_servers). `cpu_flags` decide the CPU repack buffer; `unified` (Apple) puts GPU
    buffers in host RAM too (reported on the GPU device; the caller adds them up)."""
    if shape.n_layer < 1:
        raise UsageError("the model shape has no layers")
    if not layout.tensors:
        raise UsageError("the weights layout has no tensors", hint="read it from a GGUF header or a quant recipe")
    layers, out_dev, ngl = layer_devices(shape.n_layer, settings, gpus, gpu_free)
    names = ["CPU"] + _offload_devices(gpus, len(settings.rpc_servers))
    weights = dict.fromkeys(names, 0)
    repack = dict.fromkeys(names, 0)
    n_layers = dict.fromkeys(names, 0)
    for dev in layers:
        n_layers[dev] += 1
    repackable = repacked_types(cpu_flags) if settings.repack else frozenset()
    notes: list[str] = []

    mapped: list[TensorInfo] = []     # host tensors llama.cpp serves straight from the mmap'd file
    for t in layout.tensors:
        il = _tensor_layer(t.name)
        if il == -1:
            dev = "CPU"
        elif il is None:
            dev = out_dev
        else:
            dev = layers[il] if il < len(layers) else out_dev
        if settings.experts_on_cpu and _is_expert(t.name):
            dev = "CPU"
        if dev == "CPU" and _is_repacked(t, repackable):
            repack["CPU"] += t.n_bytes        # only in CPU_REPACK (with mmap, its file pages are in the span below)
            continue
        weights[dev] += t.n_bytes
        if dev == "CPU":
            mapped.append(t)
    reclaimable = 0
    if settings.use_mmap and mapped:
        # llama.cpp maps one span of the file, from the first to the last host tensor it serves from the mapping
        # (its CPU_Mapped buffer), reads every page in it during the load (repacked and offloaded tensors in the
        # span too) and unmaps the rest: the span is what stays resident. Only the mapped tensors are read again.
        span = max(t.offset + t.n_bytes for t in mapped) - min(t.offset for t in mapped)
        reclaimable = max(0, span - sum(t.n_bytes for t in mapped))
        weights["CPU"] = span
    spec = arch_spec(shape.arch)
    tied = None
    if not (spec is not None and spec.embedding) and not any(
            _tensor_layer(t.name) is None and t.name.startswith("output.") for t in layout.tensors):
        tied = next((t for t in layout.tensors if t.name.startswith("token_embd.")), None)
    if tied is not None and out_dev != "CPU":
        # tied embeddings: llama.cpp duplicates token_embd as the output matrix on the output layer's device
        weights[out_dev] += tied.n_bytes
        notes.append("tied embeddings: token_embd is copied to " + out_dev + " for the output layer")
    elif tied is not None and tied.type_name in repackable and len(tied.shape) == 2 and tied.shape[1] % 8 == 0:
        # ... and on the CPU that duplicate feeds a matmul, so it is repacked (measured on gemma2, whose output
        # is always token_embd)
        repack["CPU"] += tied.n_bytes

    kv = dict.fromkeys(names, 0)
    for dev, layer_bytes in zip(layers, kv_layers(shape, settings)):
        kv[dev] += layer_bytes

    devices: list[DeviceMemory] = []
    offloaded = [d for d in names if d != "CPU" and (n_layers[d] or weights[d])]
    for name in names:
        is_host = name == "CPU"
        if is_host:
            runs_output = out_dev == "CPU"
            if n_layers["CPU"] or runs_output or not offloaded:
                compute = compute_buffer_bytes(shape, settings, with_output=runs_output)
            else:
                compute = 0
            if offloaded:
                # with every layer offloaded the host still holds the graph inputs (the attention mask among
                # them) and stages activations for the devices: mask + 4*U*(2E + 2KV), measured with an RPC
                # device (SmolLM2 U=512: 5.01 MiB at n_ctx 1024, 11.01 at 4096; an 8-layer 1024-wide llama 12.01)
                u = max(1, min(settings.n_ubatch, settings.n_batch, settings.n_ctx))
                cells = kv_cells(settings)[0] if has_kv_cache(shape) else u
                mask = u * cells * (2 if flash_attn_effective(settings, shape) else 4)
                staging = (mask + 4 * u * (2 * shape.n_embd + 2 * shape.n_embd_k_gqa)
                           + 4 * u * (shape.n_vocab if runs_output else 0))
                compute = max(compute, staging + SMALL_INPUTS)
            committed = compute
            if n_layers["CPU"] and not offloaded:
                committed = compute_committed_bytes(shape, settings, with_output=runs_output)
            devices.append(DeviceMemory(
                device="CPU", weights=weights["CPU"], kv_cache=kv["CPU"], compute=compute,
                output=output_buffer_bytes(shape, settings), repack=repack["CPU"],
                overhead=HOST_OVERHEAD_BYTES + HOST_BYTES_PER_TOKEN * shape.n_vocab
                + (CUDA_HOST_BYTES if gpus else 0), margin=0, n_layers=n_layers["CPU"], compute_committed=committed,
                reclaimable=reclaimable))
            continue
        if name not in offloaded:
            continue
        compute = compute_buffer_bytes(shape, settings, with_output=(name == out_dev), host=False)
        is_rpc = name.startswith("RPC")
        devices.append(DeviceMemory(
            device=name, weights=weights[name], kv_cache=kv[name], compute=compute, output=0, repack=0,
            overhead=RPC_OVERHEAD_BYTES if is_rpc else CUDA_CONTEXT_BYTES,
            margin=0 if is_rpc else GPU_MARGIN_BYTES, n_layers=n_layers[name]))

    if ngl and not offloaded:
        notes.append("n_gpu_layers > 0 but no GPU: everything runs on the CPU")
    quantized_v = settings.type_v.lower() not in ("f16", "f32", "bf16")
    if shape.arch in NO_FLASH_ATTN_ARCHS and (settings.flash_attn or quantized_v):
        notes.append(f"llama.cpp runs {shape.arch} without flash attention"
                     + ("; a quantized V cache needs it, so use an f16 V cache" if quantized_v else ""))
    elif quantized_v and not settings.flash_attn:
        notes.append("a quantized V cache makes llama.cpp turn flash attention on")
    if unified:
        notes.append("unified memory: GPU buffers are in host RAM as well")
    approximate: tuple[str, ...] = ()
    if not is_covered(shape.arch) or (shape.arch == "deepseek2" and not shape.head_dim_mla):
        approximate = ("kv_cache", "compute")
        notes.append(f"architecture {shape.arch!r} is not covered: the weights are exact, the KV cache and compute "
                     "buffer are estimated as for llama (approximate)")
    if repack["CPU"]:
        notes.append(f"CPU_REPACK: {repack['CPU'] / MiB:.0f} MiB of weights are repacked for this CPU "
                     "(a second copy, beside the mmap'd file pages)")
    return MemoryEstimate(devices=tuple(devices), n_gpu_layers_effective=ngl, notes=tuple(notes),
                          approximate=approximate)


def _is_repacked(t: TensorInfo, repackable: frozenset[str]) -> bool:
    """llama.cpp puts a weight in CPU_REPACK when a matmul uses it, its type has a repacked kernel for this CPU
    and its row count is a multiple of 8 (4 on ARM, where 8 also holds for the shapes we meet)."""
    if t.type_name not in repackable:
        return False
    if _tensor_layer(t.name) == -1:            # token_embd: GET_ROWS, not a matmul
        return False
    if len(t.shape) < 2 or t.shape[1] % 8:
        return False
    if len(t.shape) == 3 and "_exps" not in t.name:
        return False
    return True


def embedding_context(shape: ModelShape, layout: WeightsLayout, settings: RunSettings, *, gpus: int = 0,
                      gpu_free: tuple[int, ...] = (), cpu_flags: frozenset[str] = frozenset(),
                      unified: bool = False) -> dict[str, int]:
    """Bytes per device of the second context a served model creates on its first embedding request
    (runner.engine.embedding, with runner.core.run_settings.embedding_settings): its KV cache, its compute buffer
    (one ubatch of n_tokens, every token an output), and its output buffer, which llama.cpp sizes for one row of
    logits + embedding per sequence and grows to one row per token on the first decode (every token of a pooled
    input is an output). The demo model: 11.25 MiB KV, 100.5 MiB compute, 97 MiB output, twice its weights."""
    es = embedding_settings(settings, shape.n_ctx_train)
    est = estimate(shape, layout, es, gpus=gpus, gpu_free=gpu_free, cpu_flags=cpu_flags, unified=unified)
    rows = es.n_ctx                  # one per token: every token of a pooled decode is an output
    return {d.device: d.kv_cache + d.compute + ((shape.n_vocab + shape.n_embd) * 4 * rows if d.device == "CPU" else 0)
            for d in est.devices}
