"""Run every benchmark and print one table of ratios (what `make bench` runs).

    make bench                          # = python -m benchmarks.run_all (full sizes, ~10 minutes on 2 cores)
    python -m benchmarks.run_all --quick

Each benchmark module exposes run(quick) -> rows {benchmark, metric, value, baseline, ratio, goal}; the
ratio is always measured against a baseline taken in the same run on the same machine.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

MODULES = ("infilling", "model", "loader", "build", "eval")


def main() -> int:
    quick = "--quick" in sys.argv
    rows, failed = [], []
    for name in MODULES:
        t0 = time.time()
        print(f"[bench] {name} ...", flush=True)
        try:
            rows += importlib.import_module(f"benchmarks.{name}").run(quick)
        except Exception as e:  # report and go on: one broken benchmark must not hide the others
            failed.append(f"{name}: {type(e).__name__}: {e}")
        print(f"[bench] {name} done in {time.time() - t0:.0f}s", flush=True)
    import psutil
    import torch

    print(f"\nmachine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"{datetime.date.today().isoformat()}; {'quick' if quick else 'full'} mode\n")
    print("| benchmark | metric | value | baseline | ratio | goal |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['metric']} | {r['value']:,.1f} | {r['baseline']:,.1f} | "
              f"{r['ratio']:.2f} | {r['goal']} |")
    for f in failed:
        print(f"FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
