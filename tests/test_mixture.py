"""pipeline/mixture.py + MixedStream (pipeline/stream.py): weighted source mixtures.

    .venv/bin/python -m pytest -q tests/test_mixture.py

Order tests read small shard sets written with the real shard writer (pipeline/shards.py encode + manifest), one
per source, so that every sample's source, variant and position can be checked; the build and travel tests use
the real builder (pipeline/build.py on a local Ray) and moto's S3 server.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline import mixture as X
from pipeline import shards as S
from pipeline.build import build
from pipeline.config import BuildConfig
from pipeline.shards import SCHEMA_VERSION, SUFFIX, Manifest, ShardInfo, ShardSamples, atomic_write, encode, sha256
from pipeline.stream import MixedStream, ShardStream, StreamConfig, StreamLoader
from pipeline.tokenizer import Tokenizer

SEQ_LEN = 16


def _row(variant: int, shard: int, i: int) -> dict:
    n = 6 + (i % 5)
    ids = np.arange(n, dtype=np.int32) + 10 + variant
    return {"input_ids": ids, "targets": ids, "loss_mask": np.r_[np.zeros(3), np.ones(n - 3)].astype(np.uint8),
            "position_ids": np.arange(n, dtype=np.int32), "block_position_ids": np.zeros(n, dtype=np.int32),
            "sep": 3, "objective": "bert", "layout": "bert", "variant": variant, "source": "synthetic",
            "doc_index": i, "chunk_index": i, "sample_key": f"train/{shard}/{variant}/{i}"}


def write_source(url: str, rows: tuple[int, ...], variants: int = 2, tag: str = "") -> str:
    """A shard set of len(rows) shards per variant, written by the real writer; returns its folder."""
    fs, root = fsspec.core.url_to_fs(url)
    infos = []
    for v in range(variants):
        for s, n in enumerate(rows):
            data = encode(ShardSamples.from_rows([_row(v, s, i) for i in range(n)]), "parquet")
            name = f"s{s:03d}-v{v}{tag}{SUFFIX['parquet']}"
            atomic_write(fs, f"{root}/{name}", data)
            infos.append(ShardInfo(name=name, rows=n, bytes=len(data), sha256=sha256(data), variant=v, group=s))
    m = Manifest(schema_version=SCHEMA_VERSION, format="parquet", split="train", seq_len=SEQ_LEN, vocab_size=100,
                 tokenizer={"fingerprint": "tok-a"}, specials={}, variants=variants, seed=0, config={},
                 config_hash="", shards=infos)
    atomic_write(fs, f"{root}/_manifest.json", m.to_json().encode())
    return url


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Three sources of different sizes: big (60 samples per pass), mid (30), small (12)."""
    d = tmp_path_factory.mktemp("sources")
    return {"big": write_source(str(d / "big"), (20, 25, 15)),
            "mid": write_source(str(d / "mid"), (10, 12, 8)),
            "small": write_source(str(d / "small"), (5, 7))}


def spec(sources: dict, weights: dict, **extra) -> dict:
    return {"sources": {n: {"path": sources[n], "weight": w, **extra.pop(n, {})} for n, w in weights.items()},
            **extra}


def stream(mix, batch_size=4, rank=0, world=1, workers=0, **kw) -> MixedStream:
    return MixedStream(mix, batch_size, seed=7, rank=rank, world_size=world,
                       config=StreamConfig(shuffle_window=8, num_workers=workers), **kw)


def keys(loader) -> list[list[str]]:
    return [b["sample_key"] for b in loader]


def global_order(mix, *, world, batch_size, workers=0, epochs=1) -> list[str]:
    per_rank = []
    for r in range(world):
        loader = StreamLoader(stream(mix, batch_size, r, world, workers))
        per_rank.append([k for _ in range(epochs) for k in keys(loader)])
    assert len({len(p) for p in per_rank}) == 1, "every rank must get the same number of batches"
    return [k for step in zip(*per_rank) for batch in step for k in batch]


# ------------------------------------------------------------------------------------------------ the spec

def test_weights_are_normalised_and_mistakes_named(sources, tmp_path):
    a = X.load_mixture(spec(sources, {"big": 3, "mid": 1}))
    b = X.load_mixture(spec(sources, {"big": 0.75, "mid": 0.25}))
    assert a.quanta.tolist() == b.quanta.tolist() and a.quanta.sum() == X.QUANTUM
    assert np.allclose(a.shares, [0.75, 0.25])
    assert stream(a).fingerprint == stream(b).fingerprint
    path = tmp_path / "mix.yaml"
    path.write_text(f"sources:\n  big: {{path: {sources['big']}, weight: 3}}\n  mid: {{path: {sources['mid']}}}\n")
    assert X.is_mixture(str(path)) and not X.is_mixture(sources["big"])
    assert X.load_mixture(str(path)).shares.tolist() == [0.75, 0.25]
    inline = f"{{sources: {{big: {{path: {sources['big']}, weight: 3}}, mid: {{path: {sources['mid']}}}}}}}"
    assert X.is_mixture(inline) and X.load_mixture(inline).quanta.tolist() == a.quanta.tolist()
    assert X.validation_of(a) == {n: f"{os.path.dirname(sources[n])}/validation" for n in ("big", "mid")}
    for bad, match in [({"sources": {}}, "needs `sources:`"),
                       (spec(sources, {"big": -1}), "weight=-1"),
                       (spec(sources, {"big": 0}), "every weight is 0"),
                       ({"sources": {"big": {"weight": 1}}}, "needs `path:`"),
                       ({"sources": {"big": {"path": "x", "wieght": 1}}}, r"unknown keys \['wieght'\]"),
                       ({"sources": {"a/b": {"path": "x"}}}, "source name 'a/b'"),
                       (spec(sources, {"big": 1}, big={"max_repeats": 0}), "max_repeats=0"),
                       ("{sources: {big: [}", "not valid YAML")]:
        with pytest.raises(ValueError, match=match):
            X.load_mixture(bad)
    with pytest.raises(ValueError, match="does not exist"):
        X.load_mixture(str(tmp_path / "nope.yaml"))


def test_schedule_within_one_percent_in_every_window_of_1000():
    rng = np.random.default_rng(0)
    for weights in ([3, 1], [0.5, 0.3, 0.2], rng.random(7), [1000, 1, 1]):
        shares = np.asarray(weights, float) / np.sum(weights)
        sched = X.Schedule(X.quantise(shares), start=123, base=[5] * len(shares))
        g = np.arange(123, 123 + 3 * X.QUANTUM // 2)   # across a period boundary
        src, j = sched.locate(g)
        for i, w in enumerate(X.quantise(shares) / X.QUANTUM):
            hits = np.concatenate([[0], np.cumsum(src == i)])
            window = hits[1000:] - hits[:-1000]           # every window of 1,000 consecutive samples
            assert np.abs(window / 1000 - w).max() <= 0.01, (weights, i)
            # each source's samples are numbered 5, 6, 7, ... in order: none repeated, none skipped
            assert (j[src == i] == 5 + np.arange(int((src == i).sum()))).all()
        assert (sched.counts(g[-1] + 1) == 5 + np.bincount(src, minlength=len(shares))).all()


def test_stream_proportions_within_one_percent(sources):
    mix = spec(sources, {"big": 5, "mid": 3, "small": 2}, samples_per_epoch=3000)
    ds = stream(mix, batch_size=50)
    names = [n for b in StreamLoader(ds) for n in b["mixture_source"]]
    assert len(names) == 3000
    for n, w in {"big": 0.5, "mid": 0.3, "small": 0.2}.items():
        hits = np.concatenate([[0], np.cumsum([x == n for x in names])])
        assert np.abs((hits[1000:] - hits[:-1000]) / 1000 - w).max() <= 0.01, n
    p = ds.progress()
    assert abs(p["small"]["share"] - 0.2) < 1e-3 and p["small"]["samples"] == names.count("small")
    assert p["small"]["passes"] == pytest.approx(names.count("small") / 12)


# ------------------------------------------------------------------------------------------------ order

def test_global_order_independent_of_world_size_and_workers(sources):
    mix = spec(sources, {"big": 2, "mid": 1, "small": 1})
    ref = global_order(mix, world=1, batch_size=4, epochs=2)
    assert len(ref) == 2 * (102 // 4 * 4) and len(set(ref[:60])) == 60
    assert {k.split(":")[0] for k in ref} == {"big", "mid", "small"}
    assert global_order(mix, world=2, batch_size=2, epochs=2) == ref
    assert global_order(mix, world=2, batch_size=2, workers=2, epochs=2) == ref
    # the sequence itself does not depend on the batch: with another global batch it is a prefix of the same one
    other = global_order(mix, world=1, batch_size=5, epochs=2)
    assert other == ref[:len(other)] or ref == other[:len(ref)]


def test_exact_mid_epoch_resume(sources):
    mix = spec(sources, {"big": 2, "mid": 1, "small": 1})
    ds = stream(mix, 2, rank=1, world=2, workers=2)
    loader = StreamLoader(ds)
    full = [keys(loader) for _ in range(2)]
    ds2 = stream(mix, 2, rank=1, world=2)
    loader2 = StreamLoader(ds2)
    keys(loader2)
    it = iter(loader2)
    [next(it) for _ in range(3)]
    state = ds2.state_dict(num_samples=3 * 4)   # Composer passes the GLOBAL count: 3 steps x 2 ranks x 2
    consumed = ds2.schedule.counts(ds2.samples_per_epoch + 12)
    assert state["epoch"] == 1 and state["consumed"] == {n: int(c) for n, c in zip(ds2.names, consumed)}
    ds3 = stream(mix, 2, rank=1, world=2, workers=2)
    ds3.load_state_dict(state)
    assert keys(StreamLoader(ds3)) == full[1][3:]
    # ... and with another world size (same global batch) the global order continues exactly
    ref = global_order(mix, world=2, batch_size=2, epochs=2)
    out = []
    for r in range(4):
        d = stream(mix, 1, rank=r, world=4)
        d.load_state_dict(state)
        out.append(keys(StreamLoader(d)))
    assert [k for step in zip(*out) for b in step for k in b] == ref[len(ref) // 2 + 12:]


# ------------------------------------------------------------------------------------------------ changes

def test_changed_mixture_is_refused_with_a_diff(sources, tmp_path):
    ds = stream(spec(sources, {"big": 3, "mid": 1}))
    state = ds.state_dict(num_samples=8)
    with pytest.raises(ValueError, match=r"another mixture: source big: share 0.7500 -> 0.5000; source mid: share "
                                         r"0.2500 -> 0.5000.*allow_change"):
        stream(spec(sources, {"big": 1, "mid": 1})).load_state_dict(state)
    with pytest.raises(ValueError, match="source small added"):
        stream(spec(sources, {"big": 3, "mid": 1, "small": 0.001})).load_state_dict(state)
    # the same mixture written otherwise (0.75:0.25) is the same mixture
    stream(spec(sources, {"big": 0.75, "mid": 0.25})).load_state_dict(state)
    # a mixture's state does not resume a single shard set, nor the other way round
    with pytest.raises(ValueError, match="trained on a mixture of sources \\(big, mid\\), not on the one shard set"):
        ShardStream(sources["big"], 4, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="state is of a single shard set, not a mixture"):
        ds.load_state_dict(ShardStream(sources["big"], 4, rank=0, world_size=1).state_dict(8))
    # a rebuilt shard set under the same name is a change too
    moved = dict(sources, mid=write_source(str(tmp_path / "mid2"), (10, 12, 8), tag="x"))
    with pytest.raises(ValueError, match=r"source mid: shard set changed"):
        stream(spec(moved, {"big": 3, "mid": 1})).load_state_dict(state)


def source_sequence(sources, name: str, n: int) -> list[str]:
    """The first n samples of one source on its own (a one-source mixture under the same seed)."""
    ds = stream(spec(sources, {name: 1}, samples_per_epoch=n), batch_size=n)
    return [k for b in StreamLoader(ds) for k in b["sample_key"]]


def test_allow_change_neither_repeats_nor_skips(sources, caplog):
    before = stream(spec(sources, {"big": 3, "mid": 1}))
    it = iter(StreamLoader(before))
    seen = [k for _ in range(6) for k in next(it)["sample_key"]]      # 24 samples under 3:1
    state = before.state_dict(num_samples=24)
    after = stream(spec(sources, {"big": 1, "mid": 2, "small": 1}), allow_change=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
        after.load_state_dict(state)
    assert "changed mixture (allow_change)" in caplog.text and "source small added" in caplog.text
    rest = [k for b in StreamLoader(after) for k in b["sample_key"]]
    tail = rest[:40]
    names = [k.split(":")[0] for k in tail]
    assert abs(names.count("mid") / 40 - 0.5) <= 0.05   # the new shares apply from the resumed step
    for n in ("big", "mid", "small"):
        mine = [k for k in seen + rest if k.startswith(n + ":")]
        assert mine == source_sequence(sources, n, len(mine)), n   # each source: its own sequence, no gap, no repeat
    # the new state carries the new segment: resuming it again (no further change) continues identically
    again = stream(spec(sources, {"big": 1, "mid": 2, "small": 1}))
    mid_state = after.state_dict(num_samples=24 + 8)
    again.load_state_dict(mid_state)
    assert [k for b in StreamLoader(again) for k in b["sample_key"]] == rest[8:]


# ------------------------------------------------------------------------------------------------ budget, repeats

def test_exhaustion_is_refused_up_front(sources):
    mix = spec(sources, {"big": 1, "small": 1}, small={"max_repeats": 2})
    ds = stream(mix, batch_size=4)
    ok = ds.check_budget("6ba")     # 24 samples: 12 of small = one pass
    assert ok["small"] == {"samples": 12, "passes": 1.0, "pass_samples": 12, "masks_reused": False}
    with pytest.raises(ValueError, match=r"source small \(share 0.5000\) would be read 4.00 times \(48 of the 96 "
                                         r"training samples; its shard set holds 12 per pass\) > max_repeats=2; "
                                         r"lower its weight to a share <= 0.2500"):
        ds.check_budget("24ba")
    with pytest.raises(ValueError, match="would be read"):
        ds.check_budget(f"{96 * SEQ_LEN}tok")   # tokens: samples x seq_len, as Composer counts them
    with pytest.raises(ValueError, match="max_duration='soon'"):
        ds.check_budget("soon")


def test_repeats_read_the_next_variant_in_a_new_order_then_say_so(sources, caplog):
    mix = spec(sources, {"big": 1, "small": 1}, samples_per_epoch=24)
    ds = stream(mix, batch_size=4)
    loader = StreamLoader(ds)
    small = []
    with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
        for _ in range(3):
            small += [k.split(":")[1] for b in loader for k in b["sample_key"] if k.startswith("small:")]
    passes = [small[i:i + 12] for i in range(0, 36, 12)]
    assert [{k.split("/")[2] for k in p} for p in passes] == [{"0"}, {"1"}, {"0"}]   # variant = pass mod K
    assert len(set(passes[0])) == 12 and sorted(passes[0]) == sorted(passes[2])
    strip = [[k.split("/", 3)[1] + "/" + k.split("/", 3)[3] for k in p] for p in passes]   # (shard, row)
    assert strip[0] != strip[1] and strip[0] != strip[2]   # a new order on every pass
    said = [r for r in caplog.records if "reuse masks" in r.getMessage() and "small" in r.getMessage()]
    assert len(said) == 1 and ds.progress()["small"]["masks_reused"] and not ds.progress()["big"]["masks_reused"]
    with caplog.at_level(logging.WARNING, logger="pipeline.stream"):
        budget = stream(mix, batch_size=4).check_budget("15ba")   # 30 samples of small: 2.5 passes
    assert "K=2 stored mask variants" in caplog.text and budget["small"]["masks_reused"]


def test_sources_must_share_tokenizer_and_seq_len(sources, tmp_path):
    other = write_source(str(tmp_path / "other"), (5,))
    p = tmp_path / "other" / "_manifest.json"
    p.write_text(p.read_text().replace('"tok-a"', '"tok-b"'))
    with pytest.raises(ValueError, match=r"source other .* tokenizer fingerprint tok-b but source big has tok-a"):
        stream({"sources": {"big": {"path": sources["big"]}, "other": {"path": other}}})


# ------------------------------------------------------------------------------------------------ many sources

def _older(files):
    return [f for f in files if int(os.path.basename(f)[:4]) < 1900]


def _newer(files):
    return [f for f in files if int(os.path.basename(f)[:4]) >= 1900]


def build_cfg(out, sources: dict, **kw) -> BuildConfig:
    base = dict(output=str(out), sources=sources, vocab_size=600, seq_len=64, variants=2, seed=7,
                group_bytes=60_000, samples_per_shard=200, validation_fraction=0.1, tokenizer_max_sentences=20_000)
    base.update(kw)
    return BuildConfig(**base)


@pytest.fixture(scope="module")
def two_source_build(tmp_path_factory, small_corpus, ray_local) -> tuple[str, dict]:
    """The speeches before and after 1900 as two sources of one build, with a tokenizer trained across both."""
    out = tmp_path_factory.mktemp("multi") / "mix"
    sources = {"old": {"input": _older(small_corpus)[:3]},
               "new": {"input": _newer(small_corpus)[:3], "text_split": "blank_lines", "variants": 3}}
    stats: dict = {}
    ms = build(build_cfg(out, sources), stats)
    assert set(ms) == set(stats["sources"]) == {"old", "new"}
    return str(out), sources


@pytest.mark.ray
def test_multi_source_build_shares_one_tokenizer(two_source_build, small_corpus, capsys):
    out, sources = two_source_build
    tok = Tokenizer.load(f"{out}/tokenizer.model")
    for name, variants in (("old", 2), ("new", 3)):
        for split in ("train", "validation"):
            m = S.read_manifest(f"{out}/{name}/{split}")
            assert m.tokenizer["fingerprint"] == tok.fingerprint and m.seq_len == 64
            assert m.tokenizer["path"] == "../../tokenizer.model"
            assert S.tokenizer_url(f"{out}/{name}/{split}/{S.MANIFEST_NAME}", m) == f"{out}/tokenizer.model"
        assert S.read_manifest(f"{out}/{name}/train").variants == variants
    assert S.read_manifest(f"{out}/new/train").config["text_split"] == "blank_lines"
    # a rerun skips both; adding a source builds only that one
    stats: dict = {}
    more = dict(sources, late={"input": _newer(small_corpus)[3:5]})
    ms = build(build_cfg(out, more), stats)
    assert set(stats["sources"]) == {"late"} and set(ms) == {"old", "new", "late"}
    said = capsys.readouterr().out
    assert "source old: already built" in said and "source new: already built" in said
    assert json.loads(Path(out, "_sources.json").read_text())["sources"] == ["late", "new", "old"]
    # the built sources mix at load time
    ds = MixedStream({"sources": {n: {"path": f"{out}/{n}/train", "weight": w} for n, w in
                                  (("old", 1), ("new", 2), ("late", 1))}}, 4, rank=0, world_size=1)
    b = next(iter(StreamLoader(ds)))
    assert b["input_ids"].shape == (4, 64) and set(b["mixture_source"]) <= {"old", "new", "late"}


def test_multi_source_mistakes_are_named(tmp_path, small_corpus):
    with pytest.raises(ValueError, match=r"source books: give its input"):
        build(build_cfg(tmp_path / "o", {"books": {}}))
    with pytest.raises(ValueError, match=r"source books: settings \['seq_len'\] cannot be set per source"):
        build(build_cfg(tmp_path / "o", {"books": {"input": small_corpus[:1], "seq_len": 128}}))
    with pytest.raises(ValueError, match="input=.* and sources= are both given"):
        build(build_cfg(tmp_path / "o", {"books": {"input": small_corpus[:1]}}, input=small_corpus[:1]))
    with pytest.raises(ValueError, match="source name 'train'"):
        build(build_cfg(tmp_path / "o", {"train": {"input": small_corpus[:1]}}))


# ------------------------------------------------------------------------------------------------ travel

@pytest.mark.ray
@pytest.mark.s3
def test_shard_sets_travel_and_open_as_parquet_datasets(two_source_build, small_corpus, s3_bucket, tmp_path):
    import pandas as pd
    import pyarrow.dataset as pads
    import s3fs

    out, _ = two_source_build
    machine = (str(Path(out).parent), os.path.dirname(small_corpus[0]), "file://")   # output and input folders
    for p in Path(out).rglob("*.json"):   # manifests, receipts, build records, the sources record
        assert not [m for m in machine if m in p.read_text()], f"{p} names a path of the building machine"
    # a shard folder is a plain Parquet dataset (the manifest's leading underscore keeps readers off it)
    folder = f"{out}/old/train"
    m = S.read_manifest(folder)
    assert pads.dataset(folder, format="parquet").count_rows() == m.num_samples
    table = pd.read_parquet(folder, columns=["sample_key", "source"])
    assert len(table) == m.num_samples
    assert set(table["source"]) <= {os.path.basename(f) for f in small_corpus}   # provenance without the folder
    # copied to a bucket, the mixture reads there exactly as here
    bucket, so = s3_bucket
    fs = s3fs.S3FileSystem(**so)
    fs.put(out, f"{bucket}/copied", recursive=True)
    mix = {n: 1 for n in ("old", "new")}
    local = MixedStream({"sources": {n: {"path": f"{out}/{n}/train", "weight": w} for n, w in mix.items()}}, 4,
                        rank=0, world_size=1)
    remote = MixedStream({"sources": {n: {"path": f"s3://{bucket}/copied/{n}/train", "weight": w}
                                      for n, w in mix.items()}}, 4, rank=0, world_size=1, storage_options=so,
                         config=StreamConfig(cache_dir=str(tmp_path / "cache")))
    assert remote.fingerprint == local.fingerprint    # the same mixture wherever it lies
    a, b = (list(StreamLoader(d)) for d in (local, remote))
    assert [x["sample_key"] for x in a] == [x["sample_key"] for x in b] and len(a) > 2
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    m2 = S.read_manifest(f"s3://{bucket}/copied/new/train", so)
    tok = Tokenizer.load(S.tokenizer_url(f"s3://{bucket}/copied/new/train/{S.MANIFEST_NAME}", m2), so)
    assert tok.fingerprint == m2.tokenizer["fingerprint"]


def test_old_manifest_name_is_still_read(sources, tmp_path):
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(sources["mid"], old)
    text = (old / S.MANIFEST_NAME).read_text().replace(f'"schema_version": {S.SCHEMA_VERSION}', '"schema_version": 1')
    (old / S.MANIFEST_NAME).unlink()
    (old / S.LEGACY_MANIFEST_NAME).write_text(text)
    assert S.read_manifest(str(old)).schema_version == 1
    ds = stream(spec({"mid": str(old)}, {"mid": 1}))
    assert len(sum(keys(StreamLoader(ds)), [])) == 28


@pytest.mark.ray
def test_schema_1_output_is_migrated_by_overwrite(tmp_path, small_corpus, tokenizer_path, ray_local):
    """An output of the previous builder (manifest.json, build format 2) is refused by a plain rerun with the fix,
    and rebuilt by --overwrite into _manifest.json with no manifest.json left among the shards."""
    out = tmp_path / "old"
    cfg = dict(input=small_corpus[:2], output=str(out), tokenizer=tokenizer_path, seq_len=64, variants=1,
               validation_fraction=0.0)
    build(BuildConfig(**cfg))
    for split in ("train", "validation"):   # what the previous version left
        (out / split / S.MANIFEST_NAME).rename(out / split / S.LEGACY_MANIFEST_NAME)
    record = json.loads((out / "_build.json").read_text())
    (out / "_build.json").write_text(json.dumps({**record, "build_format": 2}))
    assert S.read_manifest(str(out / "train")).num_samples > 0      # still read under the old name
    with pytest.raises(ValueError, match=r"older version of this builder.*--overwrite"):
        build(BuildConfig(**cfg))
    build(BuildConfig(**cfg, overwrite=True))
    assert (out / "train" / S.MANIFEST_NAME).exists() and not (out / "train" / S.LEGACY_MANIFEST_NAME).exists()


# ------------------------------------------------------------------------------------------------ with Composer

def _composer_run(folder, mixture, stop: int | None = None, allow_change: bool = False,
                  keys_file: str | None = None, pause_s: float = 0.0) -> list[list[str]]:
    """A tiny GLM trained by the real Composer Trainer on a MixedStream for 16 batches with a checkpoint every 3
    (autoresume from `folder`), stopped after batch `stop`; returns the sample keys of every batch it trained
    (also appended to `keys_file`, one JSON line per batch, when given; `pause_s` after each batch)."""
    import dataclasses
    import time

    import torch
    from composer import Callback, Trainer

    from model.composer import GLMComposer
    from model.config import PRESETS

    class Run(Callback):
        def __init__(self):
            self.keys = []

        def batch_end(self, state, logger):
            self.keys.append(list(state.batch["sample_key"]))
            if keys_file:
                with open(keys_file, "a") as f:
                    f.write(json.dumps(self.keys[-1]) + "\n")
            time.sleep(pause_s)
            if stop is not None and int(state.timestamp.batch) == stop:
                state.stop_training()

    torch.manual_seed(0)
    model = GLMComposer(dataclasses.replace(PRESETS["tiny"], vocab_size=128, max_position_embeddings=SEQ_LEN,
                                            n_layer=1))
    ds = stream(mixture, 4, allow_change=allow_change)
    run = Run()
    trainer = Trainer(model=model, train_dataloader=StreamLoader(ds), max_duration="16ba", save_folder=str(folder),
                      save_interval="3ba", save_overwrite=True, autoresume=True, run_name="mix", callbacks=[run],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.01), progress_bar=False, device="cpu",
                      seed=3, loggers=[], device_train_microbatch_size=4)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return run.keys


def test_composer_checkpoints_resume_a_mixture_exactly_and_guard_changes(sources, tmp_path):
    mix = spec(sources, {"big": 2, "mid": 1, "small": 1}, samples_per_epoch=24)   # 6 batches per epoch
    full = _composer_run(tmp_path / "full", mix)
    assert len(full) == 16
    first = _composer_run(tmp_path / "cut", mix, stop=8)          # stops in epoch 1, after checkpoint 6
    assert first == full[:8]
    resumed = _composer_run(tmp_path / "cut", mix)                # autoresume from the latest checkpoint
    done = 16 - len(resumed)
    assert 6 <= done <= 8 and resumed == full[done:]              # across the epoch boundary at 12, too
    # another mixture: refused at resume, before any step; with allow_change no sample is repeated or skipped
    other = spec(sources, {"big": 1, "mid": 1, "small": 2}, samples_per_epoch=24)
    _composer_run(tmp_path / "change", mix, stop=8)
    with pytest.raises(ValueError, match=r"another mixture: source big: share 0.5000 -> 0.2500.*allow_change"):
        _composer_run(tmp_path / "change", other)
    after = _composer_run(tmp_path / "change", other, allow_change=True)
    done = 16 - len(after)
    seen = sum(full[:done] + after, [])
    assert [k.split(":")[0] for k in sum(after, [])].count("small") > [
        k.split(":")[0] for k in sum(full[done:], [])].count("small")   # the new weights apply
    for n in ("big", "mid", "small"):
        mine = [k for k in seen if k.startswith(n + ":")]
        assert mine == source_sequence(sources, n, len(mine)), n


KILLED_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_mixture import _composer_run
_composer_run(sys.argv[2], json.loads(sys.argv[3]), keys_file=sys.argv[4], pause_s=0.3)
"""


def test_sigkill_then_autoresume_gives_the_same_sample_keys(sources, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    mix = spec(sources, {"big": 2, "mid": 1, "small": 1}, samples_per_epoch=24)
    full = _composer_run(tmp_path / "full", mix)
    folder, keys = tmp_path / "killed", tmp_path / "keys.jsonl"
    p = subprocess.Popen([sys.executable, "-c", KILLED_RUN, os.path.dirname(__file__), str(folder), json.dumps(mix),
                          str(keys)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(folder.glob("ep*-ba6-*")) and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert list(folder.glob("ep*-ba6-*")), "the run wrote its checkpoint at batch 6"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    trained = [json.loads(x) for x in keys.read_text().splitlines()]
    assert 6 <= len(trained) < 16 and trained == full[:len(trained)]
    resumed = _composer_run(folder, mix)
    done = 16 - len(resumed)
    assert done >= 6 and resumed == full[done:]
