"""End-to-end shard build throughput against raw sentencepiece encoding of the same text on the same cores,
and peak RSS per Ray worker at 100 MB and 1 GB (goal: flat).

    python -m benchmarks.build            # 100 MB and 1 GB (what `make bench` runs; ~4 min on 2 idle cores)
    python -m benchmarks.build --quick    # 2 MB and 20 MB
    python -m benchmarks.build --sizes=100    # any sizes, in MB

The corpus is the bundled State of the Union speeches, repeated under new file names to reach the size. The
baseline encodes exactly the documents the build reads (cleaned, whitespace-aligned segments) with
sentencepiece's threaded batch API using as many threads as the build has CPUs; only the encode calls are timed,
in batches of about 16 MB of text, so 1 GB needs no more memory than 100 MB. It runs right before and right
after the build on the same cores, and the faster of the two is the baseline (CPU is often shared: interleaving
keeps the two sides under the same load, the better baseline keeps the ratio conservative). A second row gives
the ratio in tokens per CPU-second (build: the group tasks' CPU time, all threads; baseline: the encode calls'),
which other processes on the same cores do not move. The build is timed with Ray already running and its worker
processes started by a 1 MB warm-up build (start-up, imports and tokenizer loading are one-off costs of a build,
not throughput), from the first task to the last receipt.
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
BASELINE_BATCH_CHARS = 16 << 20   # text per timed encode call of the baseline


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


def raw_encode_seconds(files: list[str], tok: T.Tokenizer) -> tuple[float, float, int]:
    """Seconds and CPU seconds (all threads) spent in sentencepiece's batch encode (CPUS threads) over the
    corpus's segments, and the tokens."""
    seconds, cpu, tokens, batch, chars = 0.0, 0.0, 0, [], 0

    def encode() -> None:
        nonlocal seconds, cpu, tokens
        t0, c0 = time.perf_counter(), time.process_time()
        ids = tok.encode_batch(batch, num_threads=CPUS)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        tokens += sum(map(len, ids))

    for f in D.list_inputs(files):
        for d in D.read_documents(f, "text", "file", None, []):
            for seg in D.segments(d.text):
                batch.append(seg)
                chars += len(seg)
                if chars >= BASELINE_BATCH_CHARS:
                    encode()
                    batch, chars = [], 0
    if batch:
        encode()
    return seconds, cpu, tokens


def run(quick: bool, sizes: tuple[int, ...] | None = None) -> list[dict]:
    """Rows for `make bench`; sizes (MB) default to 100 and 1000, quick 2 and 20."""
    import ray

    if not ray.is_initialized():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}})
    sizes = sizes or ((2, 20) if quick else (100, 1000))
    rows, rss = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = T.train_from_files(demo_corpus()[::5], 8000)
        tok_path = os.path.join(tmp, "tok.model")
        T.save(tok, tok_path)
        warm = os.path.join(tmp, "warm")
        os.makedirs(warm)
        build(BuildConfig(input=make_corpus(warm, 1), output=os.path.join(tmp, "out-warm"), tokenizer=tok_path,
                          seq_len=512, variants=1, group_bytes=1 << 17))   # a few groups per worker
        for mb in sizes:
            folder = os.path.join(tmp, f"c{mb}")
            os.makedirs(folder)
            files = make_corpus(folder, mb)
            before, cpu_before, base_tokens = raw_encode_seconds(files, tok)
            stats: dict = {}
            out = os.path.join(tmp, f"out{mb}")
            build(BuildConfig(input=files, output=out, tokenizer=tok_path, seq_len=512, variants=1,
                              group_bytes=4 << 20), stats=stats)
            after, cpu_after, _ = raw_encode_seconds(files, tok)
            shutil.rmtree(out)   # 1 GB of text leaves ~0.7 GB of shards
            shutil.rmtree(folder)
            rate, base_rate = stats["tokens"] / stats["seconds"], base_tokens / min(before, after)
            print(f"[bench] build {mb} MB: {stats['tokens']:,} tokens in {stats['seconds']:.1f} s "
                  f"({stats['cpu_seconds']:.1f} CPU s); raw encode {before:.1f} s ({cpu_before:.1f} CPU s) before, "
                  f"{after:.1f} s ({cpu_after:.1f} CPU s) after", flush=True)
            rows.append({"benchmark": "build", "metric": f"build tokens/s vs raw sentencepiece, {mb} MB, "
                         f"{CPUS} CPUs", "value": rate, "baseline": base_rate, "ratio": rate / base_rate,
                         "goal": ">= 0.85"})
            # the same ratio in tokens per CPU-second: not moved by whatever else shares the cores
            cpu_rate, cpu_base = stats["tokens"] / stats["cpu_seconds"], base_tokens / min(cpu_before, cpu_after)
            rows.append({"benchmark": "build", "metric": f"build tokens per CPU-second vs raw sentencepiece, {mb} MB",
                         "value": cpu_rate, "baseline": cpu_base, "ratio": cpu_rate / cpu_base, "goal": ">= 0.85"})
            rss[mb] = max(stats["worker_peak_rss_mb"].values())
            rows.append({"benchmark": "build", "metric": f"peak worker RSS MB, {mb} MB corpus", "value": rss[mb],
                         "baseline": rss[sizes[0]], "ratio": rss[mb] / rss[sizes[0]],
                         "goal": f"~1.0 vs {sizes[0]} MB (flat)"})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'benchmark':10s} {'metric':62s} {'value':>12s} {'baseline':>12s} {'ratio':>7s}  goal")
    for r in rows:
        print(f"{r['benchmark']:10s} {r['metric']:62s} {r['value']:12,.1f} {r['baseline']:12,.1f} "
              f"{r['ratio']:7.2f}  {r['goal']}")


if __name__ == "__main__":
    given = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--sizes=")), None)
    print_table(run("--quick" in sys.argv, tuple(int(x) for x in given.split(",")) if given else None))
