"""pipeline/stream.py: global order, rank/worker invariance, resume, cache, retries, errors, manifest checks.

    .venv/bin/python -m pytest -q tests/test_stream.py

Shard sets here are written directly with the shard contract (pipeline/shards.py), small and synthetic, so the
order properties can be checked sample by sample; tests/test_train.py trains on shards from the real builder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import shards as shards_module
from pipeline.shards import (
    ARRAY_COLUMNS,
    SCHEMA_VERSION,
    SUFFIX,
    Manifest,
    ShardError,
    ShardInfo,
    ShardSamples,
    atomic_write,
    encode,
    pad_row,
    sha256,
)
from pipeline.stream import MixedStream, ShardCache, ShardStream, StreamConfig, StreamLoader, default_cache_dir

SEQ_LEN = 16


def _row(variant: int, shard: int, i: int) -> dict:
    n = 6 + (i % 5)
    ids = np.arange(n, dtype=np.int32) + 10
    return {"input_ids": ids, "targets": ids, "loss_mask": np.r_[np.zeros(3), np.ones(n - 3)].astype(np.uint8),
            "position_ids": np.arange(n, dtype=np.int32), "block_position_ids": np.zeros(n, dtype=np.int32),
            "sep": 3, "objective": "bert", "layout": "bert", "variant": variant, "source": "synthetic",
            "doc_index": i, "chunk_index": i, "sample_key": f"train/{shard}/{variant}/{i}"}


def write_set(url: str, *, rows=(7, 5, 9, 6, 8), variants: int = 2, fmt: str = "parquet",
              storage_options: dict | None = None, vocab_size: int = 100, fingerprint: str = "tok-a",
              split: str = "train") -> Manifest:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    infos = []
    for v in range(variants):
        for s, n in enumerate(rows):
            data = encode(ShardSamples.from_rows([_row(v, s, i) for i in range(n)]), fmt)
            name = f"s{s:03d}-v{v}{SUFFIX[fmt]}"
            atomic_write(fs, f"{root}/{name}", data)
            infos.append(ShardInfo(name=name, rows=n, bytes=len(data), sha256=sha256(data), variant=v, group=s))
    m = Manifest(schema_version=SCHEMA_VERSION, format=fmt, split=split, seq_len=SEQ_LEN, vocab_size=vocab_size,
                 tokenizer={"fingerprint": fingerprint}, specials={}, variants=variants, seed=0,
                 config={"validation_fraction": 0.02},
                 config_hash="", shards=infos)
    atomic_write(fs, f"{root}/manifest.json", m.to_json().encode())
    return m


@pytest.fixture
def shard_set(tmp_path):
    write_set(str(tmp_path / "set"))
    return str(tmp_path / "set")


def test_other_schema_version_is_refused(tmp_path):
    url = str(tmp_path / "set")
    write_set(url)
    path = tmp_path / "set" / "manifest.json"
    path.write_text(path.read_text().replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99'))
    with pytest.raises(ShardError, match=f"schema_version 99 but this code reads version {SCHEMA_VERSION}; "
                                         "rebuild the shard set"):
        ShardStream(url, 2)


def keys_of(loader) -> list[list[str]]:
    return [b["sample_key"] for b in loader]


def global_order(url, *, world: int, batch_size: int, workers: int = 0, epochs: int = 1, **kw) -> list[str]:
    """Concatenate the ranks' batches step by step, in rank order."""
    per_rank = []
    for r in range(world):
        ds = ShardStream(url, batch_size, seed=3, rank=r, world_size=world,
                         config=StreamConfig(shuffle_window=8, num_workers=workers), **kw)
        loader = StreamLoader(ds)
        per_rank.append([k for _ in range(epochs) for k in keys_of(loader)])
    assert len({len(p) for p in per_rank}) == 1, "every rank must get the same number of batches"
    return [k for step in zip(*per_rank) for batch in step for k in batch]


def test_epoch_is_a_permutation_of_one_variant(shard_set):
    ds = ShardStream(shard_set, 4, seed=3, rank=0, world_size=1, config=StreamConfig(shuffle_window=8))
    loader = StreamLoader(ds)
    e0, e1, e2 = (sum(keys_of(loader), []) for _ in range(3))
    total = 35  # rows per variant
    assert len(e0) == total // 4 * 4 and ds.order(0).num_dropped == total % 4
    assert len(set(e0)) == len(e0) and {k.split("/")[2] for k in e0} == {"0"}
    assert {k.split("/")[2] for k in e1} == {"1"} and {k.split("/")[2] for k in e2} == {"0"}
    assert e0 != [k.replace("/1/", "/0/") for k in e1]  # another shuffle each epoch
    assert sorted(e0) != e0  # shuffled at all
    again = StreamLoader(ShardStream(shard_set, 4, seed=3, rank=0, world_size=1, config=StreamConfig(8)))
    assert sum(keys_of(again), []) == e0  # deterministic from (seed, epoch)


def test_global_order_independent_of_world_size_and_workers(shard_set):
    ref = global_order(shard_set, world=1, batch_size=4, epochs=2)
    assert global_order(shard_set, world=2, batch_size=2, epochs=2) == ref
    assert global_order(shard_set, world=4, batch_size=1, workers=2, epochs=2) == ref
    assert global_order(shard_set, world=1, batch_size=4, workers=3, epochs=2) == ref


def test_batches_are_padded_tensors(shard_set):
    ds = ShardStream(shard_set, 3, rank=0, world_size=1)
    b = next(iter(StreamLoader(ds)))
    assert b["input_ids"].shape == (3, SEQ_LEN) and b["input_ids"].dtype == torch.int64
    assert b["sep"].tolist() == [3, 3, 3] and len(b["objective"]) == 3
    n = int((b["input_ids"][0] != 0).sum())
    assert b["loss_mask"][0, n:].sum() == 0 and len(ds) == ds.batches_per_epoch == 35 // 3


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_mid_epoch_resume(shard_set, workers):
    cfg = StreamConfig(shuffle_window=8, num_workers=workers)
    ds = ShardStream(shard_set, 2, seed=5, rank=1, world_size=2, config=cfg)
    loader = StreamLoader(ds)
    full = [keys_of(loader) for _ in range(2)]   # two epochs, uninterrupted
    # stop after 3 steps of epoch 1: Composer passes the GLOBAL sample count (3 steps x 2 ranks x 2)
    ds2 = ShardStream(shard_set, 2, seed=5, rank=1, world_size=2, config=cfg)
    loader2 = StreamLoader(ds2)
    keys_of(loader2)
    it = iter(loader2)
    [next(it) for _ in range(3)]
    state = ds2.state_dict(num_samples=3 * 4, from_beginning=True)
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 12
    ds3 = ShardStream(shard_set, 2, seed=5, rank=1, world_size=2, config=cfg)
    ds3.load_state_dict(state)
    assert keys_of(StreamLoader(ds3)) == full[1][3:]
    # a checkpoint taken right after an epoch ended (sample_in_epoch back to 0) resumes at the next epoch
    end = ds.state_dict(num_samples=0)
    assert end["epoch"] == 2
    ds4 = ShardStream(shard_set, 2, seed=5, rank=1, world_size=2, config=cfg)
    ds4.load_state_dict(end)
    assert sum(keys_of(StreamLoader(ds4)), [])[0].split("/")[2] == "0"  # epoch 2 reads variant 0 again


def test_resume_with_another_world_size(shard_set):
    ref = global_order(shard_set, world=1, batch_size=4)
    ds = ShardStream(shard_set, 4, seed=3, rank=0, world_size=1, config=StreamConfig(shuffle_window=8))
    state = ds.state_dict(num_samples=8)
    out = []
    for r in range(2):
        d = ShardStream(shard_set, 2, seed=3, rank=r, world_size=2, config=StreamConfig(shuffle_window=8))
        d.load_state_dict(state)
        out.append(keys_of(StreamLoader(d)))
    assert [k for step in zip(*out) for b in step for k in b] == ref[8:]
    bad = ShardStream(shard_set, 3, seed=3, rank=0, world_size=1)
    with pytest.raises(ValueError, match="whole number of global batches"):
        bad.load_state_dict(state)


@pytest.fixture(scope="module")
def real_set(tmp_path_factory, tokenizer_path):
    """A shard set of real GLM samples (a real sentencepiece model, every objective, chunks of 20 to 200 tokens, so
    rows of many lengths) written by the real writer in 3 shards of unequal rows; returns (url, {sample_key: the
    sample's row}) — the rows as they went in, the per-row reference for what a batch must hold."""
    from pipeline.infilling import SpanPlacementError, make_sample
    from pipeline.shards import sample_row
    from pipeline.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_path)
    sp = tok.specials
    text = (Path(__file__).resolve().parent / "fixtures" / "washington_1790_state_of_the_union.txt").read_text()
    ids = tok.encode(text)
    rng = np.random.default_rng(7)
    rows = []
    while len(rows) < 60:
        n = int(rng.integers(20, 200))
        a = int(rng.integers(0, len(ids) - n))
        objective = ("bert", "sentence", "gpt")[len(rows) % 3]
        try:
            sample = make_sample(np.array([sp.cls, *ids[a:a + n], sp.eos]), objective, rng, specials=sp)
        except SpanPlacementError:
            continue
        rows.append(sample_row(sample, objective=objective, variant=0, source="fixture", doc_index=0,
                               chunk_index=len(rows), sample_key=f"train/0/0/{len(rows)}"))
    url = str(tmp_path_factory.mktemp("real") / "set")
    fs, root = fsspec.core.url_to_fs(url)
    infos = []
    for k, (a, b) in enumerate(((0, 25), (25, 32), (32, 60))):
        data = encode(ShardSamples.from_rows(rows[a:b]), "parquet")
        atomic_write(fs, f"{root}/s{k}.parquet", data)
        infos.append(ShardInfo(name=f"s{k}.parquet", rows=b - a, bytes=len(data), sha256=sha256(data), variant=0,
                               group=k))
    seq_len = max(len(r["input_ids"]) for r in rows) + 5
    m = Manifest(schema_version=SCHEMA_VERSION, format="parquet", split="train", seq_len=seq_len, vocab_size=1000,
                 tokenizer={"fingerprint": "sotu1k"}, specials={}, variants=1, seed=0, config={}, config_hash="",
                 shards=infos)
    atomic_write(fs, f"{root}/_manifest.json", m.to_json().encode())
    return url, {r["sample_key"]: r for r in rows}


def assert_rows_match(batch: dict, rows: dict, seq_len: int, prefix: str = "") -> None:
    """Every sample of the batch is pad_row of its source row (the per-row assembly), int64, in place."""
    for c in ARRAY_COLUMNS:
        assert batch[c].dtype == torch.int64 and batch[c].shape == (len(batch["sample_key"]), seq_len), c
    for i, key in enumerate(batch["sample_key"]):
        row = rows[key.removeprefix(prefix)]
        want = pad_row(row, seq_len)
        for c in ARRAY_COLUMNS:
            assert batch[c][i].tolist() == want[c].tolist(), (key, c)
        assert (int(batch["sep"][i]), batch["objective"][i]) == (row["sep"], row["objective"]), key


@pytest.mark.parametrize("kernel", ["numba", "numpy"])
def test_batches_equal_per_row_padding_on_real_shards(real_set, monkeypatch, kernel):
    """Batches gathered a block at a time from the shards' flat columns hold, sample by sample, exactly what the
    per-row assembly (pad_row) gives; for shuffle windows inside and across shards, several ranks, workers, and a
    mixture; every sample of the epoch comes exactly once."""
    if kernel == "numpy":
        monkeypatch.setattr(shards_module, "_KERNEL", [None])
    else:
        pytest.importorskip("numba")
    url, rows = real_set
    seq_len = ShardStream(url, 1).seq_len
    for world, b, window, workers in ((1, 5, 7, 0), (2, 3, 64, 0), (1, 4, 16, 2)):
        seen = []
        for rank in range(world):
            ds = ShardStream(url, b, seed=2, rank=rank, world_size=world,
                             config=StreamConfig(shuffle_window=window, num_workers=workers))
            for batch in StreamLoader(ds):
                assert_rows_match(batch, rows, seq_len)
                seen += batch["sample_key"]
        assert len(seen) == len(set(seen)) == len(rows) // (b * world) * b * world
    mix = {"sources": {"a": {"path": url, "weight": 1}, "b": {"path": url, "weight": 2}}}
    ds = MixedStream(mix, 4, seed=1, rank=0, world_size=1, config=StreamConfig(shuffle_window=16))
    for batch in StreamLoader(ds):
        for src in ("a", "b"):
            sub = [i for i, n in enumerate(batch["mixture_source"]) if n == src]
            part = {c: (v[sub] if isinstance(v, torch.Tensor) else [v[i] for i in sub]) for c, v in batch.items()}
            assert_rows_match(part, rows, seq_len, prefix=f"{src}:")


def test_next_blocks_shards_are_read_in_the_background(real_set, monkeypatch):
    """While a block is gathered, the shards of the next blocks are read (fetched, checked, decoded) on background
    threads: after the first batch, shards the first block does not need are already decoded; the stream is the
    same as read one shard at a time."""
    url, rows = real_set
    reads: list[tuple[str, str]] = []
    real_read = ShardStream.read

    def recorded(self, info):
        out = real_read(self, info)
        reads.append((info.name, threading.current_thread().name))
        return out

    monkeypatch.setattr(ShardStream, "read", recorded)
    ds = ShardStream(url, 2, seed=4, rank=0, world_size=1, config=StreamConfig(shuffle_window=4))
    it = iter(StreamLoader(ds))
    first = next(it)
    deadline = time.monotonic() + 10
    while not any(t.startswith("shard-prefetch") for _, t in reads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(t.startswith("shard-prefetch") for _, t in reads), reads
    keys = first["sample_key"] + [k for b in it for k in b["sample_key"]]
    assert len(keys) == len(set(keys)) == len(rows) // 2 * 2
    assert_rows_match(first, rows, ds.seq_len)


def test_sample_longer_than_seq_len_is_named(real_set, tmp_path):
    """A manifest whose seq_len is shorter than its rows (a planted edit) fails on the first batch, naming the
    sample and the fix."""
    url, _ = real_set
    import shutil
    shutil.copytree(url, tmp_path / "set")
    path = tmp_path / "set" / "_manifest.json"
    m = json.loads(path.read_text())
    m["seq_len"] = 24
    path.write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"sample 'train/0/0/\d+' has \d+ tokens > seq_len 24; .*rebuild"):
        next(iter(StreamLoader(ShardStream(str(tmp_path / "set"), 4, rank=0, world_size=1))))


def test_webdataset_shards_give_the_same_stream(tmp_path):
    write_set(str(tmp_path / "pq"), fmt="parquet")
    write_set(str(tmp_path / "wds"), fmt="wds")
    a = global_order(str(tmp_path / "pq"), world=1, batch_size=4)
    b = global_order(str(tmp_path / "wds"), world=1, batch_size=4)
    assert a == b


def test_missing_and_truncated_shards_are_named(shard_set):
    ds = ShardStream(shard_set, 4, seed=3, rank=0, world_size=1, config=StreamConfig(shuffle_window=8))
    loader = iter(StreamLoader(ds))
    next(loader)  # reading has begun
    order = ds.order(0)
    victim = order.shards[-1].name
    os.remove(os.path.join(shard_set, victim))
    with pytest.raises(ShardError, match=victim):
        list(loader)
    ds2 = ShardStream(shard_set, 4, seed=3, rank=0, world_size=1, config=StreamConfig(shuffle_window=8))
    first = ds2.order(0).shards[0].name
    path = os.path.join(shard_set, first)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{first}.*truncated"):
        next(iter(StreamLoader(ds2)))


def test_manifest_checks_name_both_values(shard_set):
    ds = ShardStream(shard_set, 4, rank=0, world_size=1)
    ds.check(vocab_size=128, max_position_embeddings=SEQ_LEN, tokenizer_fingerprint="tok-a")
    with pytest.raises(ValueError, match="vocab_size 100 .* model vocab_size 64"):
        ds.check(vocab_size=64)
    with pytest.raises(ValueError, match="seq_len 16 > model max_position_embeddings 8"):
        ds.check(max_position_embeddings=8)
    with pytest.raises(ValueError, match="tok-a.*tok-b"):
        ds.check(tokenizer_fingerprint="tok-b")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardStream(shard_set, 40, rank=0, world_size=1)


class FlakyFS(MemoryFileSystem):
    """An in-memory object store whose first reads of every file fail like a dropped connection."""

    protocol = "flaky"
    fails: dict[str, int] = {}
    budget = 2

    def cat_file(self, path, start=None, end=None, **kw):
        if path.endswith(".parquet"):
            n = FlakyFS.fails.get(path, 0)
            if n < FlakyFS.budget:
                FlakyFS.fails[path] = n + 1
                raise ConnectionError(f"simulated reset reading {path}")
        return super().cat_file(path, start, end, **kw)


def test_remote_shards_cache_and_retries(tmp_path):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.fails.clear()
    m = write_set("flaky://remote-set")
    cfg = StreamConfig(shuffle_window=8, cache_dir=str(tmp_path / "cache"), cache_bytes=10 ** 9,
                       retries=3, retry_backoff_s=0.001)
    ds = ShardStream("flaky://remote-set", 4, seed=3, rank=0, world_size=1, config=cfg)
    keys = sum(keys_of(StreamLoader(ds)), [])
    assert len(keys) == 32
    assert all(n == 2 for n in FlakyFS.fails.values())  # each shard failed twice, then was read once
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == len(m.shards_of_variant(0))
    # a second pass reads the cache, not the store
    FlakyFS.budget = 10 ** 6
    try:
        ds2 = ShardStream("flaky://remote-set", 4, seed=3, rank=0, world_size=1, config=cfg)
        assert sum(keys_of(StreamLoader(ds2)), []) == keys
        # too many failures: a ShardError naming the shard
        cfg2 = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache2"), retries=1)
        ds3 = ShardStream("flaky://remote-set", 4, seed=3, rank=0, world_size=1, config=cfg2)
        with pytest.raises(ShardError, match=r"s0\d\d-v0.parquet failed \(2 attempts"):
            next(iter(StreamLoader(ds3)))
    finally:
        FlakyFS.budget = 2


def test_cache_is_bounded_lru(tmp_path):
    c = ShardCache(str(tmp_path / "c"), max_bytes=250)
    for i in range(4):
        c.put(f"k{i}", bytes(100))
        os.utime(tmp_path / "c" / f"k{i}", (i, i))  # deterministic LRU clock
    assert sorted(os.listdir(tmp_path / "c")) == ["k2", "k3"]
    assert c.get("k0") is None and c.get("k3") == bytes(100)
    c.put("huge", bytes(1000))  # larger than the bound: not cached
    assert c.get("huge") is None


# ------------------------------------------------------------------------------------------------ faults


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the moto server. stop() closes the port (connections are refused, open
    ones are cut: a real outage for botocore), start() opens the same port again."""

    def __init__(self, target_port: int):
        from conftest import free_port

        self.target, self.port = target_port, free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.open = None, set()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, r, w):
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def _handle(self, cr, cw):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cw.close()
            return
        pair = {cw, uw}
        self.open |= pair
        await asyncio.gather(self._pipe(cr, uw), self._pipe(ur, cw))
        self.open -= pair

    async def _start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self):
        self.server.close()
        for w in list(self.open):
            w.transport.abort()
        await self.server.wait_closed()

    def start(self):
        self._call(self._start())

    def stop(self):
        self._call(self._stop())

    def close(self):
        if self.server is not None and self.server.is_serving():
            self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def proxied_set(s3_bucket):
    """A shard set on the moto server, and storage options that reach it through a Proxy with botocore's own
    retries and timeouts lowered (so an outage reaches our retries in about a second, not ~12 s)."""
    bucket, so = s3_bucket
    url = f"s3://{bucket}/set"
    write_set(url, storage_options=so)
    proxy = Proxy(int(so["endpoint_url"].rsplit(":", 1)[1]))
    proxy.start()
    via = {"endpoint_url": f"http://127.0.0.1:{proxy.port}",
           "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 2}}
    yield url, so, via, proxy
    proxy.close()


def test_store_outage_is_retried_then_named(proxied_set, tmp_path, caplog):
    url, direct, via, proxy = proxied_set
    ref = sum(keys_of(StreamLoader(ShardStream(url, 4, seed=3, rank=0, world_size=1, storage_options=direct,
                                               config=StreamConfig(8, cache_dir=str(tmp_path / "c0"))))), [])
    cfg = StreamConfig(8, cache_dir=str(tmp_path / "c1"), retries=8, retry_backoff_s=0.5, retry_backoff_max_s=1)
    ds = ShardStream(url, 4, seed=3, rank=0, world_size=1, storage_options=via, config=cfg)
    proxy.stop()                                  # the store goes away before the first shard is read ...
    back = threading.Timer(3.0, proxy.start)      # ... and comes back 3 s later
    back.start()
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
            keys = sum(keys_of(StreamLoader(ds)), [])
    finally:
        back.join()
    assert keys == ref and time.monotonic() - t0 >= 3.0
    retries = [r.getMessage() for r in caplog.records if "store error reading" in r.getMessage()]
    assert retries and all(f"{url}/s0" in m and "EndpointConnectionError" in m for m in retries)
    # an outage longer than the retries allow: one error naming the shard, the endpoint and the settings to raise
    cfg2 = dataclasses.replace(cfg, cache_dir=str(tmp_path / "c2"), retries=1, retry_backoff_s=0.1)
    ds2 = ShardStream(url, 4, seed=3, rank=0, world_size=1, storage_options=via, config=cfg2)
    proxy.stop()
    with pytest.raises(ShardError, match=rf"reading {url}/s0\d\d-v0.parquet failed \(2 attempts in \d+ s; last: "
                                         rf"EndpointConnectionError.*{via['endpoint_url']} up.*--stream.retries "
                                         r"\(now 1\).*--stream.retry_backoff_max_s"):
        next(iter(StreamLoader(ds2)))
    # an endpoint that does not answer at start-up: the manifest URL and the endpoint_url fix, no raw traceback
    with pytest.raises(ShardError, match=rf"reading {url}/_manifest.json failed \(1 attempts.*endpoint_url: https"):
        ShardStream(url, 4, storage_options=via, config=dataclasses.replace(cfg2, retries=0))


def test_missing_credentials_are_named(s3_bucket, monkeypatch, tmp_path):
    bucket, so = s3_bucket
    write_set(f"s3://{bucket}/set", storage_options=so)
    for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ShardError, match=rf"s3://{bucket}/set/_manifest.json: no credentials.*AWS_ACCESS_KEY_ID"):
        ShardStream(f"s3://{bucket}/set", 4, storage_options={**so, "skip_instance_cache": True})


def test_planted_cache_file_of_the_same_length_is_refetched(tmp_path, caplog):
    url = "memory://planted-set"     # a remote store for the stream: reads go through the cache
    write_set(url, fmt="wds")
    cfg = StreamConfig(8, cache_dir=str(tmp_path / "cache"))
    try:
        first = list(StreamLoader(ShardStream(url, 4, seed=3, rank=0, world_size=1, config=cfg)))
        victim = sorted((tmp_path / "cache").iterdir())[0]
        good = victim.read_bytes()
        real, evil = np.array([10, 11, 12], np.int32).tobytes(), np.array([99, 98, 97], np.int32).tobytes()
        planted = good.replace(real, evil)
        assert planted != good and len(planted) == len(good)
        victim.write_bytes(planted)   # a valid tar of the same length with other tokens
        with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
            again = list(StreamLoader(ShardStream(url, 4, seed=3, rank=0, world_size=1, config=cfg)))
        assert [b["sample_key"] for b in again] == [b["sample_key"] for b in first]
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
        assert not any((b["input_ids"] == 99).any() for b in again)
        assert any(f"cached copy {victim} does not match" in r.getMessage() for r in caplog.records)
        assert victim.read_bytes() == good   # refetched and cached again
    finally:
        fsspec.filesystem("memory").rm("/planted-set", recursive=True)


@pytest.mark.parametrize("field,value", [("name", "../escape.parquet"), ("name", "sub/s000-v0.parquet"),
                                         ("name", ".."), ("name", "/etc/passwd"), ("sha256", "../../x"),
                                         ("sha256", "AB" * 32)])
def test_hostile_manifest_entries_are_refused(shard_set, field, value):
    path = os.path.join(shard_set, "manifest.json")
    d = json.load(open(path))
    d["shards"][1][field] = value
    open(path, "w").write(json.dumps(d))
    what = "shard name" if field == "name" else "sha256"
    with pytest.raises(ShardError, match=re.escape(f"{path}: ") + ".*" + re.escape(f"{what} {value!r}")):
        ShardStream(shard_set, 4)


def test_default_cache_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    url = "memory://private-set"
    write_set(url)
    try:
        ds = ShardStream(url, 4, seed=3, rank=0, world_size=1)
        next(iter(StreamLoader(ds)))
    finally:
        fsspec.filesystem("memory").rm("/private-set", recursive=True)
    folder = tmp_path / "xdg" / "glm-stack" / "shards"
    assert default_cache_dir() == str(folder) and any(folder.iterdir())
    assert (folder.stat().st_mode & 0o777) == 0o700 and (folder.parent.stat().st_mode & 0o777) == 0o700


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), so that writes fail with a real ENOSPC. Needs root (mount)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs for a real full disk needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(path) -> int:
    """Write to `path` until the disk is full (a real ENOSPC); returns the bytes written."""
    n = 0
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                n += f.write(bytes(4096))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return n


def test_full_cache_disk_evicts_then_serves_from_memory(tiny_disk, caplog):
    url = "memory://full-disk-set"
    m = write_set(url)
    cache = tiny_disk / "cache"
    cfg = StreamConfig(8, cache_dir=str(cache), cache_bytes=10 ** 9)
    ShardCache(str(cache), 10 ** 9)
    old = cache / ("0" * 64 + ".parquet")        # a shard of another set, used long ago
    old.write_bytes(bytes(300 << 10))
    os.utime(old, (0, 0))
    fill(tiny_disk / "ballast")                   # the disk is now full
    try:
        ref = sum(keys_of(StreamLoader(ShardStream(url, 4, seed=3, rank=0, world_size=1, config=cfg))), [])
        assert len(ref) == 32 and not old.exists()   # ENOSPC: the oldest cached shard made room ...
        assert sorted(p.name for p in cache.iterdir()) == sorted(s.sha256 + ".parquet"
                                                                 for s in m.shards_of_variant(0))  # ... all cached
        for p in cache.iterdir():
            p.unlink()
        fill(tiny_disk / "ballast")               # full again, and nothing of ours left to evict
        ds = ShardStream(url, 4, seed=3, rank=0, world_size=1, config=cfg)
        with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
            assert sum(keys_of(StreamLoader(ds)), []) == ref      # training goes on, from memory
        assert not any(cache.iterdir()) and ds._cache.num_uncached == len(m.shards_of_variant(0))
        warned = [r.getMessage() for r in caplog.records if "cannot store" in r.getMessage()]
        assert len(warned) == 1 and "No space left on device" in warned[0] and "--stream.cache_dir" in warned[0]
    finally:
        fsspec.filesystem("memory").rm("/full-disk-set", recursive=True)


_FSIZE_CHILD = """
import logging, resource, signal, sys
import fsspec
sys.path.insert(0, sys.argv[2])
from test_stream import write_set, keys_of
from pipeline.stream import ShardStream, StreamConfig, StreamLoader
logging.basicConfig(level=logging.WARNING)
write_set("memory://fsize-set")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
ds = ShardStream("memory://fsize-set", 4, seed=3, rank=0, world_size=1, config=StreamConfig(8, cache_dir=sys.argv[1]))
print(len(sum(keys_of(StreamLoader(ds)), [])), ds._cache.num_uncached)
"""


def test_cache_write_failure_serves_from_memory(tmp_path):
    """Without root (no tmpfs): a real file-size limit (RLIMIT_FSIZE, EFBIG) in a child process stands in for the
    full disk; the shards are served from memory, with one warning."""
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(cache), os.path.dirname(__file__)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["32", "5"]     # the whole epoch; none of the 5 shards could be cached
    assert r.stderr.count("cannot store") == 1 and "File too large" in r.stderr
    assert not [p for p in cache.iterdir()]    # no partial temp files left behind


def test_missing_manifest_names_the_build_output(tmp_path):
    out = tmp_path / "data" / "shards"
    with pytest.raises(ShardError, match=rf"run jobs/build_shards.py --output {out} \(it writes {out}/train"):
        ShardStream(str(out / "train"), 4)
    write_set(str(out / "train"))
    with pytest.raises(ShardError, match=rf"{out} is the output folder of a build; point to .*{out}/train"):
        ShardStream(str(out), 4)


def test_empty_or_tiny_validation_set_names_eval_data_none(tmp_path):
    write_set(str(tmp_path / "empty"), rows=(), split="validation")
    with pytest.raises(ValueError, match=r"validation set has no samples.*validation_fraction=0.02.*"
                                         r"--eval-data=none"):
        ShardStream(str(tmp_path / "empty"), 4)
    write_set(str(tmp_path / "tiny"), rows=(3,), variants=1, split="validation")
    with pytest.raises(ValueError, match=r"validation set's 3 samples .* lower --eval-batch-size.*--eval-data=none"):
        ShardStream(str(tmp_path / "tiny"), 4)
    write_set(str(tmp_path / "train"), rows=())
    with pytest.raises(ValueError, match=r"lists no shards.*rebuild from more") as e:
        ShardStream(str(tmp_path / "train"), 4)
    assert "eval-data" not in str(e.value)
