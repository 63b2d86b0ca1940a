"""Wall time of `llmrun plan` (a fresh process each time, as a user runs it) and of make_plan alone, for the
issue's examples. Prints a markdown table for docs/planning.md.

    python scripts/bench_plan.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = [
    ("baseline: `llmrun --help` (no plan)", None),
    ("this machine (probe)", []),
    ("ci-2core-24gb", ["--hardware", "ci-2core-24gb"]),
    ("rtx4090-24gb", ["--hardware", "rtx4090-24gb"]),
    ("8x-h100-80gb", ["--hardware", "8x-h100-80gb"]),
    ("laptop-16gb --family grok1 (refusal)", ["--hardware", "laptop-16gb", "--family", "grok1"]),
    ("rtx4090-24gb --prefer speed", ["--hardware", "rtx4090-24gb", "--prefer", "speed"]),
    ("rtx4090-24gb --all", ["--hardware", "rtx4090-24gb", "--all"]),
]


def wall(args: list[str], runs: int) -> tuple[list[float], list[float]]:
    """(wall seconds, user+sys CPU seconds) of each run: on a busy machine the CPU time is the steadier figure."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        cmd = ["--help"] if args is None else ["plan", *args]
        subprocess.run([sys.executable, "-m", "runner", *cmd], env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def in_process(args: list[str], runs: int) -> list[float]:
    sys.path.insert(0, str(REPO))
    from runner.model.catalog import load_catalog
    from runner.cli.plan import plan_hardware
    from runner.plan.select import Preferences, make_plan

    hw_name = args[args.index("--hardware") + 1] if "--hardware" in args else None
    prefs = Preferences(family=args[args.index("--family") + 1] if "--family" in args else None,
                        prefer="speed" if "speed" in args else "quality")
    hw, cat = plan_hardware(hw_name), load_catalog()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        make_plan(hw, prefs, cat, exhaustive="--all" in args)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    n = ap.parse_args().runs
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print(f"| case | `llmrun plan` wall, median of {n} (min) | its CPU time (user+sys), median | "
          "make_plan alone, median (min) |")
    print("|---|---|---|---|")
    for label, args in CASES:
        (w, c), p = wall(args, n), (in_process(args, n) if args is not None else [0.0])
        print(f"| {label} | {statistics.median(w) * 1000:.0f} ms ({min(w) * 1000:.0f}) | "
              f"{statistics.median(c) * 1000:.0f} ms | {statistics.median(p) * 1000:.1f} ms ({min(p) * 1000:.1f}) |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
