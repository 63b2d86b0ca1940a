#!/usr/bin/env python3
"""Measure llama.cpp's memory on the accuracy matrix and publish the table in docs/estimation.md.

    python scripts/measure_memory.py                 # measure every case, then write the table
    python scripts/measure_memory.py --case "llama-2-7b Q4_0" --case demo
    python scripts/measure_memory.py --render-only   # re-render docs from docs/estimation-measurements.json
    python scripts/measure_memory.py --archs         # the tiny file of every architecture (seconds each)

Each (model, quant) is loaded once in a child process (runner.engine.buffers), one context per n_ctx. Raw
measurements are kept in docs/estimation-measurements.json (one entry per case, replaced when re-measured), and
estimates are recomputed from the current code whenever the table is rendered. Loads 7B/13B-shaped models:
up to ~17 GB RSS and minutes per case; run nothing else heavy meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner.engine.buffers import measure_in_subprocess
from runner.plan import accuracy

RAW = REPO / "docs" / "estimation-measurements.json"
DOC = REPO / "docs" / "estimation.md"
BEGIN, END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"
ARCH_BEGIN, ARCH_END = "<!-- arch-accuracy-table:begin -->", "<!-- arch-accuracy-table:end -->"
SYNTH = [(name, quant) for name in ("llama-2-7b", "llama-2-13b", "smollm2-135m") for quant in accuracy.QUANTS]
ARCHS = [f"{name} {quant}" for name, (_shape, quant) in accuracy.ARCH_CASES.items()]


def _demo_path() -> Path:
    """The demo GGUF in the tests' download cache (tests/conftest.py fetches it: run the tests once first)."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest

    path = conftest.TEST_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `pytest tests/test_estimate_accuracy.py` once to download it")
    return path


def all_cases() -> list[str]:
    return [f"{n} {q}" for n, q in SYNTH] + ["demo"] + ARCHS


def n_ctxs(label: str) -> tuple[int, ...]:
    return accuracy.N_CTX_ARCH if label in ARCHS else accuracy.N_CTX


def make_case(label: str) -> tuple[accuracy.Case, bool]:
    """(case, fill): the demo model fills its contexts (cheap); 7B/13B decode one token."""
    if label == "demo":
        return accuracy.demo_case(_demo_path()), True
    name, quant = label.split()
    return accuracy.synthetic_case(name, quant), False


def load_raw() -> dict:
    return json.loads(RAW.read_text()) if RAW.exists() else {}


def save_raw(raw: dict) -> None:
    tmp = RAW.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    tmp.replace(RAW)


def render(raw: dict, labels: list[str]) -> str:
    rows = []
    flags = accuracy.cpu_flags()
    for label in labels:
        if label not in raw:
            continue
        case, _fill = make_case(label)
        for entry in raw[label]["rows"]:
            rows.append(accuracy.row_from_measurement(case, entry["n_ctx"], entry["measured"], flags,
                                                      entry.get("timings", {})))
    return accuracy.markdown_table(rows)


def write_doc(table: str, raw: dict, labels: list[str], begin: str = BEGIN, end: str = END) -> None:
    text = DOC.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{DOC} lacks the {begin} / {end} markers")
    meta = ", ".join(f"{k}: {v['measured_at']}" for k, v in raw.items() if k in labels)
    block = f"{begin}\n{table}\n\n<sub>measured {meta}</sub>\n{end}"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(head + block + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="case label, e.g. 'llama-2-7b Q4_0' or 'demo' (repeatable)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--archs", action="store_true", help="measure the tiny file of every architecture")
    args = ap.parse_args()
    raw = load_raw()
    if not args.render_only:
        for label in args.case or (ARCHS if args.archs else all_cases()):
            if label not in all_cases():
                raise SystemExit(f"unknown case {label!r}; known: {', '.join(all_cases())}")
            case, fill = make_case(label)
            t0 = time.monotonic()
            rows = accuracy.measure_case(case, n_ctxs(label), measure=measure_in_subprocess, fill=fill)
            raw[label] = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "fill": fill, "rows": [{"n_ctx": r.n_ctx, "measured": r.measured, "timings": r.timings}
                                                 for r in rows]}
            save_raw(raw)
            print(f"{label}: {time.monotonic() - t0:.0f} s", flush=True)
            print(accuracy.markdown_table(rows), flush=True)
    main_labels = [label for label in all_cases() if label not in ARCHS]
    table = render(raw, main_labels)
    write_doc(table, raw, main_labels)
    arch_table = render(raw, ARCHS)
    write_doc(arch_table, raw, ARCHS, ARCH_BEGIN, ARCH_END)
    print(table)
    print(arch_table)


if __name__ == "__main__":
    main()
