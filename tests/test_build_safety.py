"""What a rerun, --overwrite and a second build may and may not do to an output, with real faults: inputs and
unrelated files inside the output, truncated / altered / deleted shards, in-place edits of inputs, changed
tokenizer settings, locks left by other builds, missing credentials, inputs that yield nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from conftest import ROOT, free_port
from test_build import cfg_for, read_all, tree_bytes

from pipeline import build as B
from pipeline import documents as D
from pipeline import output as O
from pipeline import tokenizer as T
from pipeline.build import build
from pipeline.config import BuildConfig
from pipeline.tokenizer import Tokenizer

pytestmark = pytest.mark.ray


def _copy_inputs(files, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    return [shutil.copy(f, folder / Path(f).name) for f in files]


def test_overwrite_removes_only_what_a_build_wrote(tmp_path, small_corpus, tokenizer_path, ray_local):
    out = tmp_path / "data"
    raw = _copy_inputs(small_corpus[:4], out / "raw")            # the corpus lives inside the output folder
    (out / "notes.txt").write_text("my notes")
    build(cfg_for([str(out / "raw")], out, tokenizer_path, group_bytes=20_000))
    before = tree_bytes(out)
    with pytest.raises(ValueError, match=r"--overwrite refused.*notes\.txt.*raw/1790.*Nothing was deleted"):
        build(cfg_for([str(out / "raw")], out, tokenizer_path, group_bytes=20_000, seq_len=96, overwrite=True))
    assert tree_bytes(out) == before, "a refused --overwrite deletes nothing"
    assert all(Path(f).exists() for f in raw)

    # A folder holding only a build's own files (plus a crashed group's uncommitted shard and a temp file) is
    # cleared completely by --overwrite, and the new build leaves only its own files.
    own = tmp_path / "own"
    build(cfg_for(small_corpus[:4], own, tokenizer_path, group_bytes=20_000))
    (own / "train" / "g00099-v00-0000.parquet").write_bytes(b"left by a killed group")
    (own / "train" / f".g00099-v00-0001.parquet.tmp-{'a' * 32}").write_bytes(b"half written")
    build(cfg_for(small_corpus[:4], own, tokenizer_path, format="wds", variants=1, overwrite=True))
    ours, foreign = O.our_files(fsspec.filesystem("file"), str(own), str(own))
    assert not foreign
    listed = {f"{split}/{s.name}" for split in ("train", "validation") for s in read_all(str(own), split)[0].shards}
    left = {str(p.relative_to(own)) for p in own.rglob("*") if p.is_file()}
    receipts = {p for p in left if p.startswith("_receipts/")}
    assert left == listed | receipts | {"_build.json", "train/_manifest.json", "validation/_manifest.json"}


def test_rerun_rebuilds_damaged_shards(tmp_path, small_corpus, tokenizer_path, ray_local, capsys):
    out = tmp_path / "s"
    cfg = cfg_for(small_corpus[:6], out, tokenizer_path, group_bytes=20_000, samples_per_shard=100)
    build(cfg)
    intact = tree_bytes(out)
    firsts = {}
    for p in sorted((out / "train").glob("*.parquet")):
        firsts.setdefault(p.name[:6], p)     # one shard from each of three packing groups
    shards = list(firsts.values())
    assert len(shards) >= 3
    with open(shards[0], "r+b") as f:                                       # truncated
        f.truncate(shards[0].stat().st_size // 2)
    data = bytearray(shards[1].read_bytes())                                # altered, same size
    data[len(data) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    shards[2].unlink()                                                      # deleted
    build(cfg)
    log = capsys.readouterr().out
    assert "will be rebuilt" in log and "truncated" in log and "altered" in log and "missing" in log
    assert tree_bytes(out) == intact, "the rerun restores the undisturbed build byte for byte"


def test_changed_tokenizer_settings_and_inputs_are_refused(tmp_path, small_corpus, ray_local):
    src = _copy_inputs(small_corpus[:3], tmp_path / "in")
    out = tmp_path / "o"
    kw = dict(vocab_size=400, group_bytes=20_000)
    build(cfg_for(src, out, None, **kw))
    with pytest.raises(ValueError, match=r"vocab_size: 400 -> 500.*--overwrite"):
        build(cfg_for(src, out, None, **{**kw, "vocab_size": 500}))
    with pytest.raises(ValueError, match=r"tokenizer_model_type: 'unigram' -> 'bpe'"):
        build(cfg_for(src, out, None, **{**kw, "tokenizer_model_type": "bpe"}))
    # With --tokenizer only its fingerprint counts: the build's own model, whatever vocab_size says, resumes.
    build(cfg_for(src, out, str(out / "tokenizer.model"), **{**kw, "vocab_size": 500}))
    other = tmp_path / "other.model"
    T.save(T.train_from_files(src, 450), str(other))
    with pytest.raises(ValueError, match="fingerprint"):
        build(cfg_for(src, out, str(other), **kw))
    # A same-size edit in place (a word's letters swapped) is noticed by its modification time and named.
    text = Path(src[1]).read_text()
    i = text.index(" the ") + 1
    Path(src[1]).write_text(text[:i] + "teh" + text[i + 3:])
    assert Path(src[1]).stat().st_size == len(text.encode())
    with pytest.raises(ValueError, match=rf"changed in place.*{Path(src[1]).name}"):
        build(cfg_for(src, out, None, **kw))


def test_zero_samples_is_an_error_and_zst_inputs_build(tmp_path, small_corpus, tokenizer_path, ray_local, capsys):
    import zstandard

    src = tmp_path / "zst"
    src.mkdir()
    text = Path(small_corpus[0]).read_text()
    (src / "speech.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    assert not D.is_validation(D.Document(D.clean(text), "", 0), 0.001)  # one document, in the train split
    m = build(cfg_for([str(src)], tmp_path / "o", tokenizer_path, validation_fraction=0.001))
    assert m["train"].accounting["documents"] == 1 and m["train"].num_samples > 0
    assert m["train"].accounting["skipped_count"] == 0
    # ... and its validation split is empty: said at build time and recorded in both manifests
    assert m["validation"].num_samples == 0
    assert "validation split is empty" in capsys.readouterr().out
    assert all("--eval-data=none" in w for s in m.values() for w in s.accounting["warnings"])
    assert m["validation"].accounting["warnings"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (bad / "tiny.txt").write_text("Hi.")
    with pytest.raises(ValueError, match=r"0 training samples.*binary.*empty"):
        build(cfg_for([str(bad)], tmp_path / "o2", tokenizer_path))
    assert not (tmp_path / "o2" / "train" / "_manifest.json").exists()
    with pytest.raises(ValueError, match=r"no text to train a tokenizer on.*binary"):
        build(cfg_for([str(bad / "binary.txt"), str(bad / "empty.txt")], tmp_path / "o3", None))


def test_option_errors_are_not_taken_for_spans_that_do_not_fit(tmp_path, tokenizer_path):
    """_cut used to catch every ValueError as 'spans did not fit': an impossible gpt_min_ratio dropped every
    token silently. Only SpanPlacementError / ChunkTooShortError are expected."""
    tok = Tokenizer.load(tokenizer_path)
    cfg = BuildConfig(seq_len=64, objectives={"gpt": 1.0}, gpt_min_ratio=0.99)
    writer = B.ShardWriter(fsspec.filesystem("file"), str(tmp_path), "parquet", 0, 0, 100)
    packer = B.Packer(cfg, tok.specials, "train", 0, 0, writer, B.new_accounting())
    doc = np.array([tok.specials.cls, *tok.encode("word " * 200), tok.specials.eos], dtype=np.int32)
    with pytest.raises(ValueError, match="gpt_min_ratio"):
        packer.push(doc, "x", 0)


def _lock_text(host: str, pid: int, age_s: float, boot_id: str = "another-machine") -> str:
    now = time.time()
    return json.dumps({"host": host, "boot_id": boot_id, "pid": pid, "build_id": "f" * 32,
                       "started": now - age_s - 60, "heartbeat": now - age_s})


@pytest.mark.s3
def test_s3_overwrite_and_lock(s3_bucket, small_corpus, tokenizer_path, ray_local, capsys):
    """The output is a whole bucket that also holds the corpus: --overwrite must not empty it. A live lock of
    another machine's build is refused by name; a lock whose heartbeat stopped is taken over."""
    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    for f in small_corpus[:3]:
        fs.put_file(f, f"{bucket}/raw/{Path(f).name}")
    out = f"s3://{bucket}"
    inputs = [f"s3://{bucket}/raw/*.txt"]
    build(cfg_for(inputs, out, tokenizer_path, storage_options=so))
    with pytest.raises(ValueError, match=rf"--overwrite refused.*{bucket}/raw/"):
        build(cfg_for(inputs, out, tokenizer_path, storage_options=so, seq_len=96, overwrite=True))
    assert len(fs.ls(f"{bucket}/raw")) == 3 and fs.exists(f"{bucket}/train/_manifest.json")

    fs.pipe_file(f"{bucket}/_lock.json", _lock_text("gpu-node-7", 4242, age_s=5).encode())
    with pytest.raises(ValueError, match=r"being built by build f+ \(pid 4242 on host gpu-node-7.*delete "
                                         rf"s3://{bucket}/_lock\.json"):
        build(cfg_for(inputs, out, tokenizer_path, storage_options=so))
    fs.pipe_file(f"{bucket}/_lock.json", _lock_text("gpu-node-7", 4242, age_s=O.LOCK_TIMEOUT_S + 5).encode())
    build(cfg_for(inputs, out, tokenizer_path, storage_options=so))
    assert "taking over the stale lock" in capsys.readouterr().out
    assert not fs.exists(f"{bucket}/_lock.json"), "the build removes its own lock when it ends"


def test_local_lock_of_a_live_process_is_refused(tmp_path, small_corpus, tokenizer_path, ray_local, capsys):
    """A lock whose owner process on this host is alive (here: this very test process) is respected; one whose
    process is gone is not."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "_lock.json").write_text(_lock_text(socket.gethostname(), os.getpid(), age_s=1, boot_id=O._boot_id()))
    with pytest.raises(ValueError, match=rf"pid {os.getpid()} on host"):
        build(cfg_for(small_corpus[:2], out, tokenizer_path))
    assert (out / "_lock.json").exists() and not (out / "_build.json").exists()
    # The same lock left by a process that has exited (a killed build) is taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "_lock.json").write_text(_lock_text(socket.gethostname(), dead.pid, age_s=1, boot_id=O._boot_id()))
    build(cfg_for(small_corpus[:2], out, tokenizer_path))
    assert f"its process {dead.pid} on this host is gone" in capsys.readouterr().out
    assert not (out / "_lock.json").exists()


def _env_without_credentials(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1")
    return env


@pytest.mark.s3
def test_missing_credentials_and_bad_endpoint_name_the_fix(s3_bucket, tmp_path, small_corpus):
    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    fs.put_file(small_corpus[0], f"{bucket}/raw/a.txt")
    cmd = [sys.executable, "jobs/build_shards.py", "--input", f"s3://{bucket}/raw/a.txt", "--output",
           f"s3://{bucket}/out"]
    r = subprocess.run([*cmd, "--storage-options", json.dumps(so)], cwd=ROOT, capture_output=True, text=True,
                       env=_env_without_credentials(tmp_path), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no credentials were found" in r.stderr and "--runtime-env-json" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    env = {**os.environ, "AWS_MAX_ATTEMPTS": "1"}
    env.pop("RAY_ADDRESS", None)
    bad = json.dumps({"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    r = subprocess.run([*cmd, "--storage-options", bad], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 2 and "endpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_build_that_loses_its_lock_stops(tmp_path, monkeypatch):
    """Another build took the lock over (it judged ours stale): our heartbeat notices and the build stops."""
    monkeypatch.setattr(O, "LOCK_HEARTBEAT_S", 0.05)
    fs = fsspec.filesystem("file")
    lock = O.OutputLock(fs, str(tmp_path), str(tmp_path))
    lock.acquire()
    lock.check()
    (tmp_path / "_lock.json").write_text(_lock_text("gpu-node-7", 4242, age_s=0))
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(ValueError, match=r"lost its lock .* to build f+ \(pid 4242 on host gpu-node-7"):
        lock.check()
    lock.release()
    assert (tmp_path / "_lock.json").exists(), "the other build's lock is left alone"


def test_output_of_an_older_builder_is_refused_then_overwritten(tmp_path, small_corpus, tokenizer_path, ray_local):
    """A build record of format 1 (what the builder wrote before input stamps and tokenizer settings: no
    build_format, `tokenizer_fingerprint`, inputs as [url, size]) cannot be resumed; --overwrite replaces it."""
    out = tmp_path / "o"
    cfg = cfg_for(small_corpus[:2], out, tokenizer_path)
    build(cfg)
    rec = json.loads((out / "_build.json").read_text())
    old = {"config": rec["config"], "tokenizer_fingerprint": rec["tokenizer"]["fingerprint"],
           "inputs": [[u, size] for u, size, _ in rec["inputs"]]}
    (out / "_build.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"older version of this builder \(build record format 1.*--overwrite"):
        build(cfg)
    cfg.overwrite = True
    m = build(cfg)
    assert m["train"].num_samples > 0
    assert json.loads((out / "_build.json").read_text())["build_format"] == O.BUILD_FORMAT
