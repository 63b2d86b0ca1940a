"""Speed prediction: decode and prompt tokens per second for one placement of a model, from memory bandwidth
and compute, calibrated by `llmrun bench` results when there are some.

Decode of one sequence reads every active weight once per token, plus the KV cache written so far. A token
passes through the devices one after the other (llama.cpp splits by layers), so the time per token is the sum
over devices of (bytes read there) / (bandwidth there × efficiency); on the CPU it is at least the time of the
2 FLOPs per active parameter at the CPU's matrix throughput (a two-core machine can be compute bound). Mixture-of-experts models read only
n_expert_used of n_expert expert weights per token. Prompt processing is compute bound: about 2 FLOPs per
active parameter per token.

Figures come from: the host's memory bandwidth (`HardwareProfile.memory_bandwidth_gbps`, from the profile or
the probe's cache, never measured here), the GPU table `configs/gpus.toml` (keyed by NVML name), and the
efficiency factors below. Pure functions; no numpy, no llama_cpp, no disk scan beyond two small files.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from runner.core import dirs
from runner.core.errors import ConfigError
from runner.hardware.types import CPU, HardwareProfile

# Calibrated on this project's CI CPU (2 cores, AVX2): Llama-2-7B-shaped Q4_0 decodes at 7.3 tok/s and reads
# about 3.64 GB of weights per token (CPU_Mapped 3543 MiB less the token embeddings, of which one row is read),
# i.e. 26.6 GB/s against ≈26 GB/s measured copy bandwidth: llama.cpp runs at the limit on CPU (factor 1.0).
CPU_DECODE_EFFICIENCY = 1.0
# llama.cpp's CUDA/Metal decode reaches about 65-75% of specification bandwidth (llama-bench tg128 reports:
# RTX 4090 ≈ 190 tok/s on 7B Q4_0 = 0.7 × 1008 GB/s / 3.7 GB).
GPU_DECODE_EFFICIENCY = {"nvidia": 0.70, "apple": 0.65}
# Prompt processing: share of the table's FP16 tensor throughput llama.cpp reaches on large batches.
GPU_PROMPT_EFFICIENCY = {"nvidia": 0.45, "apple": 0.60}
# Effective GFLOP/s per physical core for llama.cpp's quantized (repacked) matrix products on prompt batches, by
# best instruction set; from published llama-bench pp512 runs of 7B Q4_0 (≈13.4 GFLOP per token), e.g. a 6-core
# AVX2 desktop ≈ 30 tok/s, a 16-core AVX-512 Zen 4 ≈ 150 tok/s.
CPU_GFLOPS_PER_CORE = (("avx512f", 100.0), ("avx2", 60.0), ("neon", 50.0), ("avx", 20.0))
CPU_GFLOPS_FALLBACK = 8.0
# Host RAM bandwidth when neither the profile nor the probe's cache knows it: a conservative dual-channel figure.
DEFAULT_HOST_BANDWIDTH_GBPS = 20.0
# Weights of CPU-resident layers cross PCIe once per micro-batch when llama.cpp runs a prompt batch on the GPU.
PCIE_GBPS = 25.0
BENCH_FILE = "bench.json"


@dataclass(frozen=True)
class DeviceSpec:
    name: str                  # "CPU", "GPU0", ...
    label: str                 # "Intel Xeon ...", "NVIDIA GeForce RTX 4090"
    bandwidth_gbps: float
    tflops: float              # effective, after the efficiency factor
    decode_efficiency: float
    source: str                # "table", "profile", "default"


@dataclass(frozen=True)
class SpeedPrediction:
    decode_tps: float          # one sequence, at `at_tokens` tokens of context
    prompt_tps: float          # prompt processing, one sequence, large batch
    aggregate_decode_tps: float  # n_parallel sequences decoding together
    at_tokens: int             # context length the decode figure assumes (half the per-sequence context)
    bytes_per_token: int       # bytes read per decoded token (active weights + KV)
    bottleneck: str            # the device that takes the most time per token
    basis: str                 # "predicted", "calibrated" (scaled by bench results) or "measured"
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------- GPUs
def _norm(name: str) -> str:
    name = name.lower().replace("nvidia", " ").replace("geforce", " ").replace("tesla", " ")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", name).split())


@lru_cache(maxsize=4)
def load_gpu_table(path: str | None = None) -> dict[str, dict[str, float]]:
    """configs/gpus.toml as {name: {bandwidth_gbps, tflops_fp16}}; raises ConfigError on a malformed table."""
    p = Path(path) if path else dirs.configs_dir() / "gpus.toml"
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"GPU table {p} is missing", hint="reinstall llmrun or set LLMRUN_CONFIGS") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"GPU table {p} is not valid TOML: {e}") from e
    for name, row in data.items():
        if not isinstance(row, dict) or not all(
                isinstance(row.get(k), (int, float)) and row[k] > 0 for k in ("bandwidth_gbps", "tflops_fp16")):
            raise ConfigError(f"GPU table {p}: [{name}] needs positive bandwidth_gbps and tflops_fp16")
    if "default" not in data:
        raise ConfigError(f"GPU table {p} has no [default] row")
    return data


def gpu_spec(name: str, table: Mapping[str, Mapping[str, float]] | None = None) -> tuple[float, float, bool]:
    """(bandwidth GB/s, FP16 TFLOP/s, known) for a GPU name; the longest normalized table name contained in it
    wins; unknown names get the [default] row and known=False."""
    table = table if table is not None else load_gpu_table()
    if name in table and name != "default":
        row = table[name]
        return float(row["bandwidth_gbps"]), float(row["tflops_fp16"]), True
    wanted = _norm(name)
    best = None
    for key in table:
        if key == "default":
            continue
        k = _norm(key)
        if k and re.search(rf"(^| ){re.escape(k)}( |$)", wanted) and (best is None or len(k) > len(_norm(best))):
            best = key
    row = table[best] if best else table["default"]
    return float(row["bandwidth_gbps"]), float(row["tflops_fp16"]), best is not None


# ---------------------------------------------------------------------------------------------------------- CPU
def cpu_gflops(cpu: CPU) -> float:
    """Effective GFLOP/s of llama.cpp's CPU matrix products on this CPU (threads × per-core figure)."""
    per_core = next((g for flag, g in CPU_GFLOPS_PER_CORE if flag in cpu.flags), CPU_GFLOPS_FALLBACK)
    return per_core * cpu.threads


def host_bandwidth(hardware: HardwareProfile) -> tuple[float, str]:
    """Host RAM bandwidth GB/s and where it came from."""
    if hardware.memory_bandwidth_gbps:
        return float(hardware.memory_bandwidth_gbps), "profile"
    return DEFAULT_HOST_BANDWIDTH_GBPS, "default"


def device_specs(hardware: HardwareProfile) -> dict[str, DeviceSpec]:
    """"CPU" and "GPU<i>" → what the prediction uses for them."""
    bw, src = host_bandwidth(hardware)
    specs = {"CPU": DeviceSpec("CPU", hardware.cpu.model, bw, cpu_gflops(hardware.cpu) / 1000.0,
                               CPU_DECODE_EFFICIENCY, src)}
    for g in hardware.gpus:
        gbw, tf, known = gpu_spec(g.name)
        if g.vendor == "rpc":
            # cluster: the RPC protocol tells a worker's memory, not what it is: a GPU named with
            # `--workers host:port@GPU` is looked up in the table, anything else is assumed a CPU like this host
            specs[f"RPC{g.index}"] = (
                DeviceSpec(f"RPC{g.index}", g.name, gbw, tf * GPU_PROMPT_EFFICIENCY["nvidia"],
                           GPU_DECODE_EFFICIENCY["nvidia"], "table") if known else
                DeviceSpec(f"RPC{g.index}", g.name, bw, specs["CPU"].tflops, CPU_DECODE_EFFICIENCY,
                           "assumed like this host"))
            continue
        vendor = g.vendor if g.vendor in GPU_DECODE_EFFICIENCY else "nvidia"
        specs[f"GPU{g.index}"] = DeviceSpec(f"GPU{g.index}", g.name, gbw, tf * GPU_PROMPT_EFFICIENCY[vendor],
                                            GPU_DECODE_EFFICIENCY[vendor], "table" if known else "default")
    return specs


def hardware_fingerprint(hardware: HardwareProfile) -> str:
    """Identifies a machine for bench results: CPU model and cores, GPU names and sizes (not free memory)."""
    gpus = "+".join(f"{g.name}/{round(g.total_bytes / 2**30)}G" for g in hardware.gpus) or "nogpu"
    return f"{hardware.cpu.model}/{hardware.cpu.physical_cores}c/{gpus}"


# ---------------------------------------------------------------------------------------------------------- bench
BenchRecord = Mapping[str, object]    # one JSON object of bench.json: decode_tps, prompt_tps, fingerprint, date...
Bench = Mapping[str, BenchRecord]     # model file or catalog name → its record


def load_bench(path: Path | None = None) -> dict[str, BenchRecord]:
    """Measured speeds: dirs.home()/bench.json, {model file or catalog name: {decode_tps, prompt_tps, fingerprint,
    source, ...}}, from `llmrun bench` and from real `chat`, `run` and `serve` runs (runner.app.bench). Missing
    file → {}; a malformed file is a ConfigError naming it."""
    p = path or dirs.home() / BENCH_FILE
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"bench results {p} cannot be read: {e}", hint=f"delete {p} and run `llmrun bench` again") from e
    if not isinstance(data, dict):
        raise ConfigError(f"bench results {p}: expected an object of model name → results")
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def _bench_fingerprint(rec: BenchRecord) -> str | None:
    for key in ("fingerprint", "hardware_fingerprint", "hardware"):
        value = rec.get(key)
        if isinstance(value, str):
            return value
    return None


def _bench_number(rec: BenchRecord, key: str) -> float:
    """A speed from a record: a number (or a numeric string, as hand-edited files have it); 0 when absent."""
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not value:
        return 0.0
    try:
        return float(value)
    except ValueError:
        return 0.0


def bench_decode_tps(rec: BenchRecord) -> float:
    """The record's measured decode tok/s (0 when it has none)."""
    return _bench_number(rec, "decode_tps")


def is_real_run(rec: BenchRecord) -> bool:
    """Whether a record is a real run's (`source` chat, run or serve), not a `llmrun bench` measurement. A real
    run's figure was taken while the machine did whatever else it was doing, with a small model's per-token
    overheads: it proves the machine at least that fast, and a slower figure says little."""
    return rec.get("source", "bench") != "bench"


def calibration_ratio(rec: BenchRecord, predicted_tps: float) -> float:
    """What a record says about this machine's speed against the prediction (measured / predicted), for the
    calibration of the other models: a `llmrun bench` result both ways, a real run's only upwards."""
    ratio = bench_decode_tps(rec) / predicted_tps
    return max(ratio, 1.0) if is_real_run(rec) else ratio


def bench_record(bench: Bench, names: tuple[str, ...], fingerprint: str) -> BenchRecord | None:
    """The bench result for any of `names` measured on this machine, with a positive decode_tps."""
    for n in names:
        rec = bench.get(n)
        if rec and _bench_fingerprint(rec) == fingerprint and bench_decode_tps(rec) > 0:
            return rec
    return None


# ---------------------------------------------------------------------------------------------------------- predict
@dataclass(frozen=True)
class Traffic:
    """What one decoded token reads on one device."""
    device: str
    weight_bytes: float        # active weights read per token
    kv_bytes: float            # KV cache read per token at `at_tokens`
    params: float              # active parameters computed per token (for prompt FLOPs)


def traffic(*, weights: Mapping[str, int], kv_cache: Mapping[str, int], n_ctx: int, at_tokens: int,
            n_params: float, token_embd_bytes: int, expert_bytes: int, n_expert: int, n_expert_used: int,
            experts_on_cpu: bool) -> list[Traffic]:
    """Bytes read per token on each device. `weights`/`kv_cache` are the estimate's per-device bytes; token
    embeddings live in host memory and only one row is read; expert tensors are read at n_expert_used/n_expert."""
    total_w = sum(weights.values()) or 1
    used_share = n_expert_used / n_expert if n_expert else 1.0
    out = []
    for dev, w_bytes in weights.items():
        w = float(w_bytes)
        if dev == "CPU":
            w = max(0.0, w - token_embd_bytes)
        if n_expert:
            if experts_on_cpu:
                exp = min(w, float(expert_bytes)) if dev == "CPU" else 0.0
            else:
                exp = w * expert_bytes / total_w
            active = (w - exp) + exp * used_share
        else:
            active = w
        kv = float(kv_cache.get(dev, 0)) * min(at_tokens, n_ctx) / max(n_ctx, 1)
        out.append(Traffic(dev, active, kv, n_params * active / total_w))
    return out


def network_seconds(hardware: HardwareProfile, rpc_layers: Mapping[str, int], *, n_embd: int, n_vocab: int = 0,
                    output_device: str = "", n_parallel: int = 1) -> float:
    """cluster: seconds per decode step spent on the network with llama.cpp RPC workers. For each worker device
    that holds layers ("RPC<i>" → layer count), per step: the activations go there and come back (llama.cpp
    copies between two workers through this host), 2 × n_embd × 4 bytes per sequence; the graph commands,
    RPC_BYTES_PER_LAYER per layer; the logits, n_vocab × 4 bytes per sequence, from the device holding the
    output layer; and RPC_ROUND_TRIPS_PER_STEP round trips. Link speed and round trip come from the GPU
    entries (`--network`, default 1 Gb/s and 0.5 ms)."""
    total = 0.0
    for g in hardware.gpus:
        name = f"RPC{g.index}"
        if g.vendor != "rpc" or not rpc_layers.get(name):
            continue
        gbps = g.link_gbps or DEFAULT_LINK_GBPS
        rtt = g.link_rtt_s if g.link_rtt_s is not None else DEFAULT_LINK_RTT_S
        sent = 2 * n_embd * 4 * n_parallel + rpc_layers[name] * RPC_BYTES_PER_LAYER
        if name == output_device:
            sent += n_vocab * 4 * n_parallel
        total += RPC_ROUND_TRIPS_PER_STEP * rtt + sent * 8 / (gbps * 1e9)
    return total


# cluster: network assumptions for RPC workers (llama.cpp ggml-rpc protocol 7). Measured on loopback with
# SmolLM2-135M split over two workers (15 layers each, `ss -ti` byte counters, 200 decoded tokens): each worker
# received 9.2 KB per token (2.3 KB of activations + ~460 B of graph commands per layer) and sent back 2.3 KB of
# activations, or 196 KB (the logits, 49152 × 4 B) from the worker holding the output layer.
DEFAULT_LINK_GBPS = 1.0           # 1 Gb/s Ethernet
DEFAULT_LINK_RTT_S = 0.0005       # 0.5 ms
RPC_BYTES_PER_LAYER = 460
RPC_ROUND_TRIPS_PER_STEP = 2      # inputs + graph sent asynchronously, then the result fetched synchronously


def predict(flows: list[Traffic], hardware: HardwareProfile, *, at_tokens: int, n_parallel: int = 1,
            n_ubatch: int = 512, specs: Mapping[str, DeviceSpec] | None = None,
            network_s: float = 0.0) -> SpeedPrediction:
    """Decode and prompt speed for per-device traffic (from `traffic`); `network_s`: seconds per decode step
    spent on the network with RPC workers (`network_seconds`)."""
    specs = specs or device_specs(hardware)
    has_gpu = any(s != "CPU" for s in specs)
    decode_time: dict[str, float] = {}
    weight_time = kv_time = prompt_time = 0.0
    for f in flows:
        spec = specs.get(f.device) or specs["CPU"]
        bw = spec.bandwidth_gbps * 1e9 * spec.decode_efficiency
        wt, kt = f.weight_bytes / bw, f.kv_bytes / bw
        flops = 2.0 * f.params
        t = flops / (spec.tflops * 1e12)
        if f.device == "CPU":
            # a CPU with few cores can be compute bound even in decode (matrix-vector products)
            wt = max(wt, t)
        decode_time[f.device] = wt + kt
        weight_time += wt
        kv_time += kt
        if f.device == "CPU" and has_gpu and not hardware.unified_memory:
            # llama.cpp runs large prompt batches of CPU-resident layers on the GPU, copying weights over PCIe
            fastest = max((s.tflops for n, s in specs.items() if n != "CPU"), default=spec.tflops)
            t = min(t, f.weight_bytes / (n_ubatch * PCIE_GBPS * 1e9) + flops / (fastest * 1e12))
        prompt_time += t
    per_token = weight_time + kv_time + network_s
    decode = 1.0 / per_token if per_token > 0 else 0.0
    prompt = 1.0 / prompt_time if prompt_time > 0 else 0.0
    # n sequences read the weights once per step, each its own KV; compute caps the batch at prompt speed
    step = weight_time + n_parallel * kv_time + network_s
    aggregate = min(n_parallel / step, max(prompt, decode)) if step > 0 else 0.0
    if network_s:
        decode_time["network"] = network_s
    bottleneck = max(decode_time, key=lambda d: decode_time[d]) if decode_time else "CPU"
    return SpeedPrediction(
        decode_tps=decode, prompt_tps=prompt, aggregate_decode_tps=aggregate,
        at_tokens=at_tokens, bytes_per_token=int(sum(f.weight_bytes + f.kv_bytes for f in flows)),
        bottleneck=bottleneck, basis="predicted")


def apply_bench(pred: SpeedPrediction, record: BenchRecord | None, *,
                calibration: float | None = None) -> SpeedPrediction:
    """A measured record replaces the prediction ("measured"); else a calibration factor from other models'
    measurements on this machine scales it ("calibrated"). A real run's record (`is_real_run`) only replaces a
    lower figure: one slow run on a busy machine must not rule a model out for good."""
    from dataclasses import replace

    calibrated = pred.decode_tps * calibration if calibration and calibration > 0 else pred.decode_tps
    if record and is_real_run(record) and bench_decode_tps(record) < calibrated * (1 - 1e-6):   # (rounding)
        record = None
    if record:
        decode = bench_decode_tps(record)
        prompt = _bench_number(record, "prompt_tps") or pred.prompt_tps
        agg = pred.aggregate_decode_tps * decode / pred.decode_tps if pred.decode_tps else decode
        return replace(pred, decode_tps=decode, prompt_tps=prompt, aggregate_decode_tps=agg, basis="measured")
    if calibration and calibration > 0:
        return replace(pred, decode_tps=pred.decode_tps * calibration,
                       aggregate_decode_tps=pred.aggregate_decode_tps * calibration, basis="calibrated")
    return pred
