"""pipeline/tokenizer.py on a committed public-domain excerpt (tests/fixtures/SOURCES.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import tokenizer as T

FIXTURE = Path(__file__).parent / "fixtures" / "washington_1790_state_of_the_union.txt"


@pytest.fixture(scope="module")
def tok() -> T.Tokenizer:
    return T.train_from_files([str(FIXTURE)], 600)


def test_command_tokens_are_single_fixed_ids(tok):
    for i, piece in enumerate(T.COMMAND_TOKENS):
        assert tok.sp.id_to_piece(i) == piece
        assert tok.sp.is_control(i) or i in (0, 1)
    sp = tok.specials
    assert (sp.eos, sp.pad, sp.unk, sp.cls, sp.mask, sp.smask, sp.gmask, sp.sop, sp.eop, sp.sep) == \
        (0, 0, 1, 2, 3, 4, 5, 6, 7, 8)
    assert sp == T.Specials.ours(sp.sentence_end_ids)


def test_text_never_produces_command_tokens(tok):
    text = "[CLS] [MASK] [sMASK] [gMASK] <|startofpiece|> <|endofpiece|> [SEP] [UNK] <|endoftext|>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(T.COMMAND_TOKENS)))
    # ... but the blank markers of fill_blanks text become exactly one command token each
    ids = tok.encode_with_blanks("The [MASK] of the Union, [sMASK] and then [gMASK]")
    assert [i for i in ids if i < len(T.COMMAND_TOKENS)] == [3, 4, 5]


def test_round_trip_and_sentence_ends(tok):
    text = FIXTURE.read_text().split("\n\n")[1].strip()
    assert tok.decode(tok.encode(text)) == " ".join(text.split())
    ends = tok.specials.sentence_end_ids
    assert ends and all(any(c in tok.sp.id_to_piece(i) for c in T.SENTENCE_END_CHARS) for i in ends)
    assert tok.encode("the Union.")[-1] in ends


def test_batch_encode_matches_single(tok):
    docs = FIXTURE.read_text().split("\n\n")[:6]
    assert tok.encode_batch(docs, num_threads=2) == [tok.encode(d) for d in docs]


def test_fingerprint_stable_across_processes(tok, tmp_path):
    again = T.train_from_files([str(FIXTURE)], 600)
    assert again.fingerprint == tok.fingerprint        # deterministic training
    path = tmp_path / "t.model"
    T.save(tok, str(path))
    code = f"from pipeline.tokenizer import Tokenizer; print(Tokenizer.load({str(path)!r}).fingerprint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tok.fingerprint
    assert (tmp_path / "t.json").exists()


def test_rejects_foreign_model_and_missing_path(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(FIXTURE.read_text().splitlines()), model_writer=buf,
                                   vocab_size=300, minloglevel=2)
    with pytest.raises(ValueError, match="not trained by pipeline/tokenizer.py"):
        T.Tokenizer(buf.getvalue())
    with pytest.raises(ValueError, match="does not exist"):
        T.Tokenizer.load(str(tmp_path / "nope.model"))


def test_train_tokenizer_job(tmp_path):
    out = tmp_path / "job.model"
    r = subprocess.run([sys.executable, "jobs/train_tokenizer.py", "--input", str(FIXTURE), "--output", str(out),
                        "--vocab-size", "500", "--model-type", "bpe"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert T.Tokenizer.load(str(out)).vocab_size <= 500
    assert (tmp_path / "job.json").exists()


def test_long_single_line_documents_train(tmp_path):
    """Documents without line breaks (scraped pages, one-line JSONL texts) longer than sentencepiece's 64 KB
    sentence limit: before segmenting, sentencepiece dropped every one and failed with '!sentences_.empty()'."""
    one_line = " ".join(FIXTURE.read_text().split())
    docs = [(one_line + " ") * 12, (one_line + " ") * 15]          # ~80 KB and ~100 KB, one line each
    assert all(len(d.encode()) > 1 << 16 and "\n" not in d for d in docs)
    tok = T.train(docs, 600)
    assert tok.vocab_size == 600
    assert tok.decode(tok.encode(one_line[:300])) == one_line[:300]


def test_short_vocabulary_warns_with_both_numbers(tmp_path):
    with pytest.warns(UserWarning, match=r"asked for vocab_size=5000, got (\d+) pieces.*too few distinct pieces"):
        tok = T.train([FIXTURE.read_text()], 5000)
    assert tok.vocab_size < 5000
    r = subprocess.run([sys.executable, "jobs/train_tokenizer.py", "--input", str(FIXTURE), "--output",
                        str(tmp_path / "t.model"), "--vocab-size", "5000"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert f"vocab {tok.vocab_size} (asked for 5000" in r.stdout and "asked for vocab_size=5000" in r.stderr


def test_missing_model_message_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ValueError) as e:
        T.Tokenizer.load(missing)
    assert f"--output {missing}`" in str(e.value) and "{path}" not in str(e.value)


def test_train_from_compressed_files_matches_plain(tmp_path, tok):
    import gzip

    import zstandard

    (tmp_path / "w.txt.gz").write_bytes(gzip.compress(FIXTURE.read_bytes()))
    (tmp_path / "w.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(FIXTURE.read_bytes()))
    for name in ("w.txt.gz", "w.txt.zst"):
        assert T.train_from_files([str(tmp_path / name)], 600).fingerprint == tok.fingerprint, name


@pytest.mark.ray
def test_inspect_shards_finds_the_build_tokenizer_from_another_folder(tmp_path, small_corpus):
    """A build run as `--output shards` records its tokenizer relative to the shard set; inspecting
    from another folder, or after moving the shard set, must still find (and verify) that tokenizer."""
    import os
    import shutil

    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    (tmp_path / "proj").mkdir()
    build = subprocess.run([sys.executable, str(root / "jobs/build_shards.py"), "--input", *small_corpus[:2],
                            "--output", "shards", "--vocab-size=600", "--seq-len=128", "--variants=1",
                            "--num-cpus=1", "--validation-fraction=0"], cwd=tmp_path / "proj", env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert '"path": "../tokenizer.model"' in (tmp_path / "proj/shards/train/_manifest.json").read_text()
    shutil.move(tmp_path / "proj/shards", tmp_path / "moved")
    for cwd, shards in ((tmp_path, "moved/train"), (tmp_path / "moved/train", "."), (root, tmp_path / "moved/train"),
                        (tmp_path / "moved", "train/_manifest.json")):
        r = subprocess.run([sys.executable, str(root / "jobs/inspect_shards.py"), str(shards), "-n", "1"],
                           cwd=cwd, capture_output=True, text=True)
        assert r.returncode == 0 and "Part A:" in r.stdout, (cwd, shards, r.stderr)
    (tmp_path / "moved/tokenizer.model").write_bytes((tmp_path / "moved/tokenizer.model").read_bytes()[:-50])
    r = subprocess.run([sys.executable, str(root / "jobs/inspect_shards.py"), str(tmp_path / "moved/train")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "pass it with --tokenizer" in r.stderr, r.stderr


def test_damaged_model_file_is_a_clear_error(tmp_path, tok):
    path = tmp_path / "cut.model"
    path.write_bytes(tok.model_bytes[: len(tok.model_bytes) // 2])      # an interrupted copy
    with pytest.raises(ValueError, match=r"cut.model: not a readable sentencepiece model .*restore it or retrain"):
        T.Tokenizer.load(str(path))
