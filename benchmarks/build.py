"""End-to-end shard build throughput against raw sentencepiece encoding of the same text on the same cores,
and peak RSS per Ray worker for a small and a 10x larger corpus (goal: flat).

    python -m benchmarks.build            # ~10 MB and ~100 MB corpora (a few minutes on 2 cores)
    python -m benchmarks.build --quick    # ~2 MB and ~20 MB

The corpus is the bundled State of the Union speeches, repeated under new file names to reach the size. The
baseline encodes exactly the documents the build reads (cleaned, in memory) with sentencepiece's threaded
batch API using as many threads as the build has CPUs. The build is timed with Ray already running (start-up
is a one-off cost), from listing the inputs to the last manifest.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline import documents as D
from pipeline import tokenizer as T
from pipeline.build import build, demo_corpus
from pipeline.config import BuildConfig

CPUS = 2


def make_corpus(folder: str, megabytes: float) -> list[str]:
    src = demo_corpus()
    total, i, out = 0, 0, []
    while total < megabytes * 1e6:
        f = src[i % len(src)]
        dst = os.path.join(folder, f"{i // len(src):03d}-{os.path.basename(f)}")
        shutil.copyfile(f, dst)
        total += os.path.getsize(dst)
        out.append(dst)
        i += 1
    return out


def raw_encode_seconds(files: list[str], tok: T.Tokenizer) -> tuple[float, int]:
    docs = [seg for f in D.list_inputs(files) for d in D.read_documents(f, "text", "file", None, [])
            for seg in D.segments(d.text)]
    best, n = float("inf"), 0
    for _ in range(2):
        t0 = time.perf_counter()
        ids = tok.encode_batch(docs, num_threads=CPUS)
        best = min(best, time.perf_counter() - t0)
        n = sum(len(x) for x in ids)
    return best, n


def run(quick: bool) -> list[dict]:
    import ray

    if not ray.is_initialized():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}})
    sizes = (2, 20) if quick else (10, 100)
    rows, rss = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = T.train_from_files(demo_corpus()[::5], 8000)
        tok_path = os.path.join(tmp, "tok.model")
        T.save(tok, tok_path)
        for mb in sizes:
            folder = os.path.join(tmp, f"c{mb}")
            os.makedirs(folder)
            files = make_corpus(folder, mb)
            base_s, base_tokens = raw_encode_seconds(files, tok)
            stats: dict = {}
            build(BuildConfig(input=files, output=os.path.join(tmp, f"out{mb}"), tokenizer=tok_path, seq_len=512,
                              variants=1, group_bytes=4 << 20), stats=stats)
            rate, base_rate = stats["tokens"] / stats["seconds"], base_tokens / base_s
            rows.append({"benchmark": "build", "metric": f"build tokens/s vs raw sentencepiece, {mb} MB, "
                         f"{CPUS} CPUs", "value": rate, "baseline": base_rate, "ratio": rate / base_rate,
                         "goal": ">= 0.85"})
            rss[mb] = max(stats["worker_peak_rss_mb"].values())
    small, large = sizes
    rows.append({"benchmark": "build", "metric": f"peak worker RSS MB, {large} MB vs {small} MB corpus",
                 "value": rss[large], "baseline": rss[small], "ratio": rss[large] / rss[small],
                 "goal": "~1.0 (flat)"})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'benchmark':10s} {'metric':62s} {'value':>12s} {'baseline':>12s} {'ratio':>7s}  goal")
    for r in rows:
        print(f"{r['benchmark']:10s} {r['metric']:62s} {r['value']:12,.1f} {r['baseline']:12,.1f} "
              f"{r['ratio']:7.2f}  {r['goal']}")


if __name__ == "__main__":
    print_table(run("--quick" in sys.argv))
