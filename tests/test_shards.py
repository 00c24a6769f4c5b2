"""pipeline/shards.py: the column schema is versioned (snapshot), and rows made from real samples keep their
columns and dtypes through both formats.

    .venv/bin/python -m pytest -q tests/test_shards.py
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shards as S
from pipeline.infilling import LAYOUTS, SpanPlacementError, make_sample
from pipeline.tokenizer import Tokenizer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "washington_1790_state_of_the_union.txt"

# (SCHEMA_VERSION, sha256 of shards.canonical_schema()) as of the last deliberate schema change (2: same columns,
# `_manifest.json` and no absolute paths in the manifest).
SNAPSHOT = (2, "66ff96f58afb3c5fc427092dbb7255434222597559c4f7ba51a8f742bb92efd0")


def snapshot_problem(version: int, schema_text: str) -> str | None:
    """What is wrong with (SCHEMA_VERSION, canonical schema) against SNAPSHOT, or None."""
    now = hashlib.sha256(schema_text.encode()).hexdigest()
    if (version, now) == SNAPSHOT:
        return None
    if now != SNAPSHOT[1] and version == SNAPSHOT[0]:
        return (f"the shard column schema changed but SCHEMA_VERSION is still {version}: readers would take old "
                "shard sets for new ones. Bump SCHEMA_VERSION in pipeline/shards.py, then set SNAPSHOT in "
                f"tests/test_shards.py to ({version + 1}, {now!r})")
    return (f"SCHEMA_VERSION {version} with schema hash {now}, the snapshot says {SNAPSHOT}: after a deliberate "
            f"schema change set SNAPSHOT in tests/test_shards.py to ({version}, {now!r})")


def test_schema_changes_only_with_a_version_bump():
    problem = snapshot_problem(S.SCHEMA_VERSION, S.canonical_schema())
    assert problem is None, problem
    assert S.SCHEMA.metadata[b"glm_shard_schema_version"] == str(S.SCHEMA_VERSION).encode()
    # the check itself: a column changed (doc_index int64 -> int32) is refused until the version moves on
    changed = S.SCHEMA.set(S.SCHEMA.get_field_index("doc_index"), pa.field("doc_index", pa.int32()))
    assert "Bump SCHEMA_VERSION" in snapshot_problem(S.SCHEMA_VERSION, S.canonical_schema(changed))
    assert "set SNAPSHOT" in snapshot_problem(S.SCHEMA_VERSION + 1, S.canonical_schema(changed))


@pytest.fixture(scope="module")
def real_samples(tokenizer_path) -> list[dict]:
    """Samples of every objective from one real chunk: the fixture speech through a real sentencepiece model."""
    tok = Tokenizer.load(tokenizer_path)
    sp = tok.specials
    chunk = np.array([sp.cls, *tok.encode(FIXTURE.read_text())[:300], sp.eos])
    out = []
    for seed in range(12):
        for objective in ("bert", "sentence", "gpt"):
            try:
                out.append((objective, make_sample(chunk, objective, np.random.default_rng(seed), specials=sp)))
            except SpanPlacementError:
                pass
    return out


def test_rows_of_real_samples_keep_columns_and_dtypes(real_samples):
    rows = [S.sample_row(s, objective=o, variant=0, source=str(FIXTURE), doc_index=0, chunk_index=i,
                         sample_key=f"train/0/0/{i}") for i, (o, s) in enumerate(real_samples)]
    assert {r["layout"] for r in rows} <= set(LAYOUTS) and len({r["layout"] for r in rows}) >= 3
    for r in rows:
        assert list(r) == list(S.COLUMNS)
        for c, dtype in S.ARRAY_COLUMNS.items():
            assert r[c].dtype == dtype, c   # infilling writes the schema's dtypes: no cast on the way to disk
    samples = S.ShardSamples.from_rows(rows)
    data = S.encode(samples, "parquet")
    written = pq.read_schema(io.BytesIO(data))
    assert S.canonical_schema(written) == S.canonical_schema() and written.metadata == S.SCHEMA.metadata
    for fmt in S.FORMATS:
        back = S.decode(S.encode(samples, fmt), fmt)
        for i, want in enumerate(rows):
            got = back.row(i)
            for c in S.ARRAY_COLUMNS:
                np.testing.assert_array_equal(got[c], want[c], err_msg=f"{fmt} {c}")
                assert got[c].dtype == S.ARRAY_COLUMNS[c], f"{fmt} {c}"
            assert {c: got[c] for c in S.SCALAR_COLUMNS} == {c: want[c] for c in S.SCALAR_COLUMNS}, fmt


def test_sample_row_names_a_wrong_provenance_column(real_samples):
    _, sample = real_samples[0]
    good = dict(objective="bert", variant=0, source="x", doc_index=0, chunk_index=0, sample_key="k")
    with pytest.raises(ValueError, match=r"doc_idx.*pass exactly those"):
        S.sample_row(sample, **{k if k != "doc_index" else "doc_idx": v for k, v in good.items()})
    with pytest.raises(ValueError, match="sample_key"):
        S.sample_row(sample, **{k: v for k, v in good.items() if k != "sample_key"})


def test_shard_buffer_writes_the_rows_sample_row_makes(real_samples):
    """The build's column buffers (ShardBuffer, grown and reused across shards) give the same shard as rows made
    one by one; a wrong provenance column or a token column of another length is refused by name."""
    buf = S.ShardBuffer(capacity=64)   # small: the real samples make it grow several times
    for rnd in range(2):               # the second shard reuses the grown buffers
        rows = []
        for i, (o, s) in enumerate(real_samples[rnd:]):
            prov = dict(objective=o, variant=rnd, source=str(FIXTURE), doc_index=rnd, chunk_index=i,
                        sample_key=f"train/0/{rnd}/{i}")
            rows.append(S.sample_row(s, **prov))
            buf.add(s, **prov)
        got = S.decode(S.encode(buf.samples(), "parquet"), "parquet")
        want = S.ShardSamples.from_rows(rows)
        np.testing.assert_array_equal(got.offsets, want.offsets)
        for c in S.ARRAY_COLUMNS:
            np.testing.assert_array_equal(got.arrays[c], want.arrays[c], err_msg=c)
        for c in S.SCALAR_COLUMNS:
            assert got.scalars[c].tolist() == want.scalars[c].tolist(), c
        buf.clear()
    _, sample = real_samples[0]
    good = dict(objective="bert", variant=0, source="x", doc_index=0, chunk_index=0, sample_key="k")
    with pytest.raises(ValueError, match=r"doc_idx.*pass exactly those"):
        buf.add(sample, **{k if k != "doc_index" else "doc_idx": v for k, v in good.items()})
    with pytest.raises(ValueError, match=r"'targets' has 1 entries.*row 'k'"):
        buf.add({**sample, "targets": sample["targets"][:1]}, **good)
    assert len(buf) == 0


def test_encoding_a_shard_does_not_import_pandas(real_samples):
    """pa.array() imports pandas on first use (~0.3 s of every fresh build worker); the encoder builds its Arrow
    arrays from buffers instead. Checked in a fresh interpreter, on a real sample."""
    import pickle
    import subprocess
    import sys

    _, sample = real_samples[0]
    code = ("import pickle, sys\nfrom pipeline import shards as S\nb = S.ShardBuffer()\n"
            "b.add(pickle.loads(sys.stdin.buffer.read()), objective='bert', variant=0, source='x', doc_index=0, "
            "chunk_index=0, sample_key='k')\nassert S.encode(b.samples(), 'parquet')\nprint('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(sample), capture_output=True, check=True)
    assert out.stdout.decode().strip() == "False"


@pytest.mark.parametrize("kernel", ["numba", "numpy"])
def test_pad_into_equals_pad_row_on_real_samples(real_samples, monkeypatch, kernel):
    """The batch gather (compiled kernel, and the numpy path used without numba) right-pads exactly as the per-row
    reference pad_row, for rows in any order written to any output rows, through both formats."""
    if kernel == "numpy":
        monkeypatch.setattr(S, "_KERNEL", [None])
    else:
        pytest.importorskip("numba")
    rows = [S.sample_row(s, objective=o, variant=0, source="x", doc_index=0, chunk_index=i,
                         sample_key=f"train/0/0/{i}") for i, (o, s) in enumerate(real_samples)]
    seq_len = max(len(r["input_ids"]) for r in rows) + 3
    assert len({len(r["input_ids"]) for r in rows}) > 3   # rows of many lengths, all padded
    rng = np.random.default_rng(0)
    for fmt in S.FORMATS:
        back = S.decode(S.encode(S.ShardSamples.from_rows(rows), fmt), fmt)
        pick = rng.permutation(len(rows))[:11]
        at = rng.permutation(16)[:11]             # scattered output rows, as when a batch spans several shards
        out = {c: np.full((16, seq_len), -1, dtype=np.int64) for c in S.ARRAY_COLUMNS}
        back.pad_into(pick, seq_len, out, at)
        for r, a in zip(pick, at):
            want = S.pad_row(rows[r], seq_len)
            for c in S.ARRAY_COLUMNS:
                np.testing.assert_array_equal(out[c][a], want[c], err_msg=f"{fmt} {kernel} {c} row {r}")
        untouched = np.setdiff1d(np.arange(16), at)
        assert all((out[c][untouched] == -1).all() for c in S.ARRAY_COLUMNS)
        with pytest.raises(S.ShardError, match=r"sample 'train/0/0/\d+' has \d+ tokens > seq_len 8; .*rebuild"):
            back.pad_into(pick, 8, out, at)
