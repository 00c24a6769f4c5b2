"""pipeline/documents.py on real files: compressed inputs, damaged files and bad records become counted skips."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import documents as D

CODECS = {
    ".gz": gzip.compress,
    ".bz2": lambda b: bz2.compress(b, compresslevel=1),    # 100 KB blocks, so a cut file still holds whole ones
    ".xz": lzma.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


def read(path: Path, text_field: str = "text", text_split: str = "file") -> tuple[list[D.Document], list[D.Skip]]:
    skips: list[D.Skip] = []
    [f] = D.list_inputs([str(path)])
    return list(D.read_documents(f, text_field, text_split, None, skips)), skips


def jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


@pytest.fixture(scope="module")
def paragraphs(small_corpus) -> list[str]:
    """Real paragraphs of the State of the Union corpus, cleaned (about 3,000, ~400 KB)."""
    return [t for f in small_corpus for p in Path(f).read_text().split("\n\n") if (t := D.clean(p))]


def test_bad_utf8_line_skips_that_line_only(tmp_path, paragraphs):
    good = paragraphs[:5]
    raw = jsonl(good[:2]) + b'{"text": "caf\xe9 au lait"}\n' + jsonl(good[2:])
    (tmp_path / "a.jsonl").write_bytes(raw)
    docs, skips = read(tmp_path / "a.jsonl")
    assert [d.text for d in docs] == good
    [skip] = skips
    assert skip.source.endswith("a.jsonl#2") and "line 3" in skip.reason and "UTF-8" in skip.reason


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_parquet_is_a_counted_skip(tmp_path, paragraphs, damage):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": paragraphs[:200]}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PAR1" + b"\x17" * 500)
    docs, skips = read(path)
    assert docs == []
    [skip] = skips
    assert skip.source.endswith("c.parquet") and "unreadable" in skip.reason


def test_null_and_empty_parquet_texts_are_counted(tmp_path):
    pq.write_table(pa.table({"text": ["first document", None, "", "[Applause]", "last document"]}),
                   tmp_path / "n.parquet")
    docs, skips = read(tmp_path / "n.parquet")
    assert [(d.text, d.index) for d in docs] == [("first document", 0), ("last document", 4)]
    assert [s.source.rsplit("#", 1)[1] for s in skips] == ["1", "2", "3"]
    assert "null" in skips[0].reason and all("empty" in s.reason for s in skips[1:])


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_compressed_inputs_read_like_plain_ones(tmp_path, paragraphs, small_corpus, suffix):
    texts = paragraphs[:50]
    (tmp_path / f"a.jsonl{suffix}").write_bytes(CODECS[suffix](jsonl(texts)))
    plain = Path(small_corpus[0]).read_bytes()
    (tmp_path / f"b.txt{suffix}").write_bytes(CODECS[suffix](plain))
    docs, skips = read(tmp_path / f"a.jsonl{suffix}")
    assert [d.text for d in docs] == texts and not skips
    docs, skips = read(tmp_path / f"b.txt{suffix}")
    assert [d.text for d in docs] == [D.clean(plain.decode())] and not skips


def test_zst_with_several_frames_is_read_whole(tmp_path, paragraphs):
    (tmp_path / "m.jsonl.zst").write_bytes(CODECS[".zst"](jsonl(paragraphs[:10])) + CODECS[".zst"](
        jsonl(paragraphs[10:20])))
    docs, skips = read(tmp_path / "m.jsonl.zst")
    assert [d.text for d in docs] == paragraphs[:20] and not skips


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_truncated_compressed_jsonl_keeps_what_was_read_and_says_so(tmp_path, paragraphs, suffix):
    data = CODECS[suffix](jsonl(paragraphs))
    path = tmp_path / f"t.jsonl{suffix}"
    path.write_bytes(data[: int(len(data) * 0.7)])        # an interrupted download
    docs, skips = read(path)
    assert 0 < len(docs) < len(paragraphs)
    assert [d.text for d in docs] == paragraphs[: len(docs)]   # exactly the first records, nothing invented
    [skip] = skips
    assert skip.source.endswith(f"t.jsonl{suffix}")
    assert f"truncated or corrupt after {len(docs)} documents, which are kept" in skip.reason


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_garbage_with_a_codec_suffix_is_a_counted_skip(tmp_path, suffix):
    (tmp_path / f"g.txt{suffix}").write_bytes(b"this was never compressed " * 40)
    docs, skips = read(tmp_path / f"g.txt{suffix}")
    assert docs == [] and len(skips) == 1 and "unreadable" in skips[0].reason


def test_text_empty_after_cleaning_is_counted(tmp_path):
    (tmp_path / "a.txt").write_text("[Applause]\n\n[Laughter]\n")
    docs, skips = read(tmp_path / "a.txt")
    assert docs == [] and len(skips) == 1 and "empty after cleaning" in skips[0].reason


@pytest.mark.ray
def test_build_survives_bad_inputs_and_counts_them(tmp_path, paragraphs, tokenizer_path, ray_local):
    from pipeline.build import build
    from pipeline.config import BuildConfig

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(jsonl(paragraphs[:40]) + b'{"text": "\xff\xfe"}\n' + jsonl(paragraphs[40:80]))
    (src / "b.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    data = CODECS[".gz"](jsonl(paragraphs[80:]))
    (src / "c.jsonl.gz").write_bytes(data[: len(data) // 2])
    (src / "d.txt.zst").write_bytes(CODECS[".zst"]("\n\n".join(paragraphs[:30]).encode()))
    m = build(BuildConfig(input=[str(src)], output=str(tmp_path / "out"), tokenizer=tokenizer_path, seq_len=128,
                          variants=1, validation_fraction=0.0, min_doc_tokens=1))["train"]
    reasons = {Path(s["source"]).name: s["reason"] for s in m.accounting["skipped"]}
    assert set(reasons) == {"a.jsonl#40", "b.parquet", "c.jsonl.gz"}
    used_from_c = int(reasons["c.jsonl.gz"].split("after ")[1].split()[0])
    assert 0 < used_from_c < len(paragraphs) - 80
    assert m.accounting["documents"] == 80 + used_from_c + 1
    assert m.num_samples > 0


def clean_by_regex(text: str) -> str:
    """clean() as first written, one regex substitution per rule: the reference its faster form must equal."""
    text = text.replace("\ufeff", "").replace("\x00", "")
    text = D._ANNOTATION.sub("", text)
    text = re.sub(r"[ \t\f\v\r]+", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def hostile_texts(n: int, seed: int = 0) -> list[str]:
    """Random texts built from what clean() treats specially and what it must leave alone: every kind of space
    and line break (Unicode ones str.strip() removes, \\r\\n, long runs), NUL and BOM, annotations in any case,
    unclosed and editorial brackets, non-Latin words."""
    atoms = [" ", "  ", " " * 9, "\t", "\r", "\r\n", "\n", "\n\n", "\n" * 5, "\f", "\v", "\x0b", "\x1c", "\x1f",
             "\x85", "\xa0", "\u2002", "\u2028", "\u2029", "\u3000", "\ufeff", "\x00", "[", "]", "[Applause]",
             "[ LAUGHTER and cheers ]", "[see APP Note", "[inaudible\n]", "[the States]", "[booing" + "x" * 45 + "]",
             "word", "Ünïcödé", "词语", "😀", ".", "!", "\\", "\u200b"]
    rng = np.random.default_rng(seed)
    return ["".join(atoms[i] for i in rng.integers(0, len(atoms), int(rng.integers(0, 60)))) for _ in range(n)]


def test_clean_equals_the_regex_rules_on_real_and_hostile_text(small_corpus):
    real = [Path(f).read_text() for f in small_corpus]
    windows = [t.replace("\n", "\r\n").replace(". ", ".  \t") for t in real[:3]]   # CRLF files, ragged spacing
    texts = real + windows + hostile_texts(3000) + ["", " ", "\n" * 100_000 + "a" + " " * 100_000 + "b"]
    for t in texts:
        assert D.clean(t) == clean_by_regex(t), repr(t[:200])
