"""The Ray shard builder with real parts: real text, a real sentencepiece model, a local Ray, moto's S3 server,
`ray start --head` + `ray job submit`, and real kills of workers and drivers."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, free_port

from pipeline import documents as D
from pipeline import infilling
from pipeline import shards as S
from pipeline.build import build, demo_corpus
from pipeline.config import BuildConfig, load_config
from pipeline.tokenizer import Tokenizer

pytestmark = pytest.mark.ray


def cfg_for(files, out, tokenizer_path, **kw) -> BuildConfig:
    base = dict(input=list(files), output=str(out), tokenizer=tokenizer_path, seq_len=128, variants=2, seed=7,
                group_bytes=60_000, samples_per_shard=300, validation_fraction=0.1)
    base.update(kw)
    return BuildConfig(**base)


def read_all(root: str, split: str = "train", storage_options=None) -> tuple[S.Manifest, list[dict]]:
    m = S.read_manifest(f"{root}/{split}", storage_options)
    fs, base = fsspec.core.url_to_fs(f"{root}/{split}", **(storage_options or {}))
    rows = []
    for info in m.shards:
        samples = S.read_shard(fs, f"{base}/{info.name}", info, m.format)
        rows += [samples.row(i) for i in range(len(samples))]
    return m, rows


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus, tokenizer_path, ray_local) -> Path:
    out = tmp_path_factory.mktemp("ref") / "shards"
    build(cfg_for(small_corpus, out, tokenizer_path))
    return out


def test_demo_defaults():
    cfg = load_config(BuildConfig, [], default_yaml=str(ROOT / "configs/pipeline/demo.yaml"))
    assert cfg.output == "data/shards" and cfg.input == [] and cfg.tokenizer is None
    assert len(demo_corpus()) == 249
    with pytest.raises(ValueError, match="valid settings"):
        load_config(BuildConfig, ["--seq-lenn=5"])
    cfg = load_config(BuildConfig, ["--input", "a.txt", "b.txt", "--seq-len=64", "--overwrite",
                                    "--objectives={bert: 1.0}"])
    assert cfg.input == ["a.txt", "b.txt"] and cfg.seq_len == 64 and cfg.overwrite and cfg.objectives == {"bert": 1}


def test_manifest_and_samples(reference, small_corpus, tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    m, rows = read_all(str(reference))
    assert m.schema_version == S.SCHEMA_VERSION and m.format == "parquet" and m.split == "train"
    assert m.tokenizer["fingerprint"] == tok.fingerprint and m.vocab_size == tok.vocab_size
    assert m.specials == tok.specials.to_json() and m.variants == 2 and m.seq_len == 128
    assert m.num_samples == len(rows) == m.accounting["samples"]
    acc = m.accounting
    assert acc["pad_fraction"] <= 0.02, "goal: >= 98% real tokens"
    assert set(acc["objectives"]) == {"bert", "sentence", "gpt"}
    assert acc["objectives"]["bert"] > acc["objectives"]["gpt"]
    assert sum(sum(h.values()) for h in acc["span_length_hist"].values()) > 0
    assert len({r["sample_key"] for r in rows}) == len(rows)
    for r in rows:
        assert len(r["input_ids"]) <= 128
        assert not r["loss_mask"][: r["sep"]].any() and r["loss_mask"][r["sep"]:].any()
        assert r["objective"] in ("bert", "sentence", "gpt") and r["variant"] in (0, 1)
    # every shard's checksum matches the manifest (read_shard verified it); names are deterministic
    assert [s.name for s in m.shards][:1] == ["g00000-v00-0000.parquet"]
    mv, vrows = read_all(str(reference), "validation")
    assert mv.variants == 1 and mv.accounting["documents"] >= 1 and vrows


def test_every_document_token_lands_in_exactly_one_chunk(reference, small_corpus, tokenizer_path):
    """Reconstruct each chunk from its sample and re-assemble the token stream of variant 0 and 1: it must be
    exactly the framed documents (train split, in order), nothing lost, nothing repeated."""
    tok = Tokenizer.load(tokenizer_path)
    sp = tok.specials
    expected = []
    for f in D.list_inputs(small_corpus):
        for doc in D.read_documents(f, "text", "file", None, []):
            if not D.is_validation(doc, 0.1):
                # long documents are encoded in whitespace-aligned segments (documents.segments)
                expected += [sp.cls, *(t for seg in D.segments(doc.text) for t in tok.encode(seg)), sp.eos]
    m, rows = read_all(str(reference))
    for variant in (0, 1):
        chunks = sorted((r for r in rows if r["variant"] == variant),
                        key=lambda r: tuple(int(x) for x in r["sample_key"].split("/")[1:]))
        stream = []
        for r in chunks:
            chunk = infilling.reconstruct(r, sp).tolist()
            if stream and stream[-1] != sp.eos:     # a continuation chunk starts with a fresh [CLS]
                assert chunk[0] == sp.cls
                chunk = chunk[1:]
            stream += chunk
        assert stream == expected, f"variant {variant}: the chunks do not re-assemble the documents"
    assert m.accounting["tail_tokens_dropped"] == 0


def test_rerun_is_identical_and_other_config_refused(reference, small_corpus, tokenizer_path, tmp_path):
    before = tree_bytes(reference)
    build(cfg_for(small_corpus, reference, tokenizer_path))
    assert tree_bytes(reference) == before
    with pytest.raises(ValueError, match=r"seq_len: 128 -> 96.*--overwrite"):
        build(cfg_for(small_corpus, reference, tokenizer_path, seq_len=96))
    # a second, separate build of the same config gives the same manifests and shards, byte for byte
    other = tmp_path / "again"
    stats: dict = {}
    manifests = build(cfg_for(small_corpus, other, tokenizer_path), stats=stats)
    again = tree_bytes(other)
    for k, v in before.items():
        assert again[k] == v, k
    # the run's figures benchmarks/build.py divides by (not part of any file): tokens, CPU time, worker RSS
    assert stats["tokens"] == sum(m.accounting["tokens_in"] for m in manifests.values())
    assert 0 < stats["cpu_seconds"] and all(rss > 50 for rss in stats["worker_peak_rss_mb"].values())
    assert 0 <= stats["compile_seconds"] < stats["seconds"]   # worker processes already warm pay (nearly) nothing


def test_kernel_compile_seconds_are_in_the_group_stats(small_corpus, tokenizer_path, tmp_path):
    """A worker with a cold numba cache compiles the infilling kernels once, up front, and says how long in the
    group task's stats (compile_seconds, in the build's stats and its log as well); its next group pays 0, and a
    new process with the cache now on disk loads them faster than it compiled them."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pipeline import documents as D\n"
        "from pipeline.build import process_group\n"
        "from pipeline.config import BuildConfig\n"
        "files = D.list_inputs(sys.argv[1:2])\n"
        "model = Path(sys.argv[2]).read_bytes()\n"
        "cfg = BuildConfig(input=['x'], output=sys.argv[3], tokenizer=sys.argv[2], seq_len=128)\n"
        "print(json.dumps([process_group(cfg, g, files, model)['compile_seconds'] for g in (0, 1)]))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    figures = []
    for run in ("cold", "warm"):
        p = subprocess.run([sys.executable, "-c", script, small_corpus[0], tokenizer_path, str(tmp_path / run)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        figures.append(json.loads(p.stdout.strip().splitlines()[-1]))
    (cold, again), (warm, _) = figures
    assert cold > 0.2 and again == 0.0 and 0 < warm < cold, figures


def test_overwrite_and_wds(small_corpus, tokenizer_path, tmp_path, ray_local):
    import webdataset as wds

    out = tmp_path / "s"
    build(cfg_for(small_corpus[:4], out, tokenizer_path))
    build(cfg_for(small_corpus[:4], out, tokenizer_path, format="wds", variants=1, overwrite=True))
    m, rows = read_all(str(out))
    assert m.format == "wds" and all(s.name.endswith(".tar") for s in m.shards) and m.variants == 1
    assert not list(out.glob("train/*.parquet")), "--overwrite clears the old build"
    first = next(iter(wds.WebDataset(str(out / "train" / m.shards[0].name), shardshuffle=False).decode()))
    assert first["input_ids.npy"].tolist() == rows[0]["input_ids"].tolist()
    assert first["json"]["sep"] == rows[0]["sep"]


def test_inspect_shards(reference, tmp_path):
    png = tmp_path / "h.png"
    r = subprocess.run([sys.executable, "jobs/inspect_shards.py", str(reference / "train"), "-n", "2", "--plot",
                        str(png)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "Part A:" in r.stdout and "blank at A[" in r.stdout and "pad fraction" in r.stdout
    assert png.stat().st_size > 1000


def test_jsonl_and_parquet_inputs(tmp_path, small_corpus, tokenizer_path, ray_local):
    texts = [Path(f).read_text() for f in small_corpus[:3]]
    src = tmp_path / "in"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        for t in texts[:2]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"body": "no text field"}) + "\n")
    pq.write_table(pa.table({"text": [texts[2]]}), src / "b.parquet")
    out = tmp_path / "out"
    m = build(cfg_for([str(src / "*")], out, tokenizer_path, validation_fraction=0.0))["train"]
    assert m.accounting["documents"] == 3
    reasons = [s["reason"] for s in m.accounting["skipped"]]
    assert m.accounting["skipped_count"] == 2 and all("bad JSONL record" in r for r in reasons)


def test_text_split_blank_lines(tmp_path, small_corpus, tokenizer_path, ray_local):
    paragraphs = [p for p in Path(small_corpus[0]).read_text().split("\n\n") if len(p.split()) > 20][:3]
    (tmp_path / "paras.txt").write_text("\n\n".join(paragraphs))
    one = build(cfg_for([str(tmp_path / "paras.txt")], tmp_path / "one", tokenizer_path, validation_fraction=0.0))
    many = build(cfg_for([str(tmp_path / "paras.txt")], tmp_path / "many", tokenizer_path, validation_fraction=0.0,
                         text_split="blank_lines"))
    assert one["train"].accounting["documents"] == 1 and many["train"].accounting["documents"] == 3
    with pytest.raises(ValueError, match="text_split='lines'"):
        build(cfg_for([str(tmp_path / "paras.txt")], tmp_path / "x", tokenizer_path, text_split="lines"))


def test_bad_inputs_are_counted_or_refused(tmp_path, small_corpus, tokenizer_path, ray_local):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "good.txt").write_text(Path(small_corpus[0]).read_text())
    (src / "empty.txt").write_text("")
    (src / "latin1.txt").write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9. ".encode("latin-1") * 20)
    (src / "binary.txt").write_bytes(bytes(range(256)) * 64)
    m = build(cfg_for([str(src)], tmp_path / "o", tokenizer_path, validation_fraction=0.0))["train"]
    skipped = {Path(s["source"]).name: s["reason"] for s in m.accounting["skipped"]}
    assert set(skipped) == {"empty.txt", "latin1.txt", "binary.txt"}
    assert "empty" in skipped["empty.txt"] and "UTF-8" in skipped["latin1.txt"] and "binary" in skipped["binary.txt"]
    assert m.accounting["documents"] == 1
    with pytest.raises(ValueError, match="missing.txt"):
        build(cfg_for([str(src / "missing.txt")], tmp_path / "o2", tokenizer_path))
    with pytest.raises(ValueError, match="matched no files"):
        build(cfg_for([str(src / "*.jsonl")], tmp_path / "o3", tokenizer_path))


@pytest.mark.slow
def test_50mb_single_line_document(tmp_path, small_corpus, tokenizer_path, ray_local):
    words = " ".join(Path(f).read_text().replace("\n", " ") for f in small_corpus)
    big = (words + " ") * (50_000_000 // len(words) + 1)
    (tmp_path / "big.txt").write_text(big[:50_000_000])
    m = build(cfg_for([str(tmp_path / "big.txt")], tmp_path / "o", tokenizer_path, variants=1, seq_len=512,
                      validation_fraction=0.0, samples_per_shard=4096, objectives={"bert": 1.0}))["train"]
    assert m.accounting["documents"] == 1 and m.accounting["tokens_in"] > 5_000_000
    assert m.accounting["pad_fraction"] < 0.02 and m.num_samples > 10_000


@pytest.mark.s3
def test_s3_input_and_output(s3_bucket, small_corpus, tokenizer_path, reference, ray_local):
    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    for f in small_corpus:
        fs.put_file(f, f"{bucket}/raw/{Path(f).name}")
    fs.put_file(tokenizer_path, f"{bucket}/tok/t.model")
    out = f"s3://{bucket}/shards"
    cfg = cfg_for([f"s3://{bucket}/raw/*.txt"], out, f"s3://{bucket}/tok/t.model", storage_options=so)
    ms = build(cfg)
    m, rows = read_all(out, storage_options=so)
    ref, ref_rows = read_all(str(reference))
    assert len(rows) == len(ref_rows)
    assert [r["input_ids"].tolist() for r in rows] == [r["input_ids"].tolist() for r in ref_rows], \
        "same corpus and settings give the same samples from S3 as from local disk"
    assert fs.exists(f"{bucket}/shards/validation/_manifest.json") and ms["train"].accounting["pad_fraction"] < 0.02
    assert not [p for p in fs.find(f"{bucket}/shards") if ".tmp-" in p]
    with pytest.raises(ValueError, match="no-such-bucket"):
        build(cfg_for(["s3://no-such-bucket/raw/*.txt"], f"s3://{bucket}/x", tokenizer_path, storage_options=so))


def _subprocess_build(out: Path, files, tokenizer_path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "jobs/build_shards.py", "--input", *files, "--output", str(out), "--tokenizer",
            tokenizer_path, "--seq-len=128", "--variants=2", "--seed=7", "--group-bytes=60000",
            "--samples-per-shard=300", "--validation-fraction=0.1", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_one_cpu_equals_two_cpus(reference, small_corpus, tokenizer_path, tmp_path):
    out = tmp_path / "one"
    p = _subprocess_build(out, small_corpus, tokenizer_path, "--num-cpus=1")
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert tree_bytes(out) == tree_bytes(reference)


@pytest.mark.slow
def test_driver_killed_midway_then_rerun_is_identical(reference, small_corpus, tokenizer_path, tmp_path):
    out = tmp_path / "killed"
    p = _subprocess_build(out, small_corpus, tokenizer_path, "--group-bytes=20000")
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "_lock.json").exists():
        time.sleep(0.05)
    # A second build into the same output, concurrently: refused, naming the running one.
    second = _subprocess_build(out, small_corpus, tokenizer_path, "--group-bytes=20000")
    log2, _ = second.communicate(timeout=120)
    assert second.returncode == 2 and "is being built by build" in log2 and f"(pid {p.pid} on host" in log2, log2
    assert p.poll() is None, "the first build was still running when the second one was refused"
    receipts = out / "_receipts"
    while time.time() < deadline and not (receipts.exists() and len(list(receipts.glob("*.json"))) >= 2):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)     # the driver, its in-process Ray and every worker
    p.wait()
    done = len(list(receipts.glob("*.json")))
    assert not (out / "train" / "_manifest.json").exists(), "killed before the end: no manifest yet"
    killed_pid = p.pid
    p = _subprocess_build(out, small_corpus, tokenizer_path, "--group-bytes=20000")
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert "taking over the stale lock" in log and f"its process {killed_pid} on this host is gone" in log, log
    # workers of the killed run may still commit a group or two while they notice their raylet is gone
    import re

    resumed = int(re.search(r"(\d+) already done", log).group(1))
    assert done <= resumed < int(re.search(r"in (\d+) packing groups", log).group(1)), log
    full = tmp_path / "full"
    p = _subprocess_build(full, small_corpus, tokenizer_path, "--group-bytes=20000")
    assert p.wait(timeout=300) == 0
    a, b = tree_bytes(out), tree_bytes(full)
    assert a.keys() == b.keys() and a == b


@pytest.mark.slow
def test_worker_killed_midway_is_retried(reference, small_corpus, tokenizer_path, tmp_path):
    import psutil

    out = tmp_path / "wk"
    p = _subprocess_build(out, small_corpus, tokenizer_path, "--group-bytes=20000")
    killed = 0
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline and not killed:
        for proc in psutil.process_iter(["cmdline"]):
            if any("ray::process_group" in c for c in (proc.info["cmdline"] or [])):
                proc.kill()
                killed += 1
                break
        time.sleep(0.02)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert killed, "no worker was caught running a group"
    ref = tmp_path / "ref20k"
    q = _subprocess_build(ref, small_corpus, tokenizer_path, "--group-bytes=20000")
    assert q.wait(timeout=300) == 0
    assert tree_bytes(out) == tree_bytes(ref)


@pytest.mark.slow
def test_ray_job_submit_against_a_started_cluster(small_corpus, tokenizer_path, tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray's token authentication, as the README says to use it: the cluster and every client (ray job submit,
    # a driver that joins) share RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token
    # / RAY_AUTH_TOKEN_PATH). A fixed variable here, so the test never touches ~/.ray.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the job's `python` is this venv's
    temp = f"/tmp/ray-test-{os.getpid()}"
    start = subprocess.run([ray_bin, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                            "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                            f"--temp-dir={temp}", "--disable-usage-stats",
                            # explicit free ports: another Ray on this machine may hold the defaults
                            f"--dashboard-agent-listen-port={free_port()}",
                            f"--dashboard-agent-grpc-port={free_port()}",
                            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                            f"--ray-client-server-port={free_port()}"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        out = tmp_path / "job"
        submit = (
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"excludes": [".venv", "data", ".git", "runs"]}), "--",
             "python", "jobs/build_shards.py", "--input", *small_corpus[:5], "--output", str(out), "--tokenizer",
             tokenizer_path, "--seq-len=128", "--variants=1"])
        for _ in range(30):   # the dashboard's job agent registers a few seconds after `ray start` returns
            r = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=300)
            if "No available agent" not in r.stderr + r.stdout:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout.lower()
        m = S.read_manifest(str(out / "train"))
        assert m.num_samples > 0
        # A relative --output would land in Ray's temporary copy of the working dir: refused, saying why.
        rel = [a if a != str(out) else "data/ray-out" for a in submit]
        r = subprocess.run(rel, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode != 0 and "--output data/ray-out" in r.stdout + r.stderr, r.stdout[-3000:]
        assert "absolute paths" in r.stdout + r.stderr
        # A plain build while this cluster runs joins it: --num-cpus cannot apply there, and the build says so.
        p = subprocess.run(
            [sys.executable, "jobs/build_shards.py", "--input", *small_corpus[:3], "--output", str(tmp_path / "joined"),
             "--tokenizer", tokenizer_path, "--seq-len=128", "--variants=1", "--num-cpus=1"],
            cwd=ROOT, capture_output=True, text=True, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "num_cpus=1 is ignored: joining the running Ray cluster" in p.stdout, p.stdout[-3000:]
    finally:
        # Not `ray stop`: it would also stop every other Ray on this machine. Kill this cluster's processes only.
        import psutil

        for proc in psutil.process_iter(["cmdline"]):
            if any(temp in c for c in (proc.info["cmdline"] or [])):
                proc.kill()


@pytest.mark.parametrize("seed,group,variant", [(7, 0, 1), (2**40 + 5, 2**33 + 2, 0), (0, 12, 3)])
def test_chunk_seeds_are_numpy_seed_sequences_of_the_list(tokenizer_path, tmp_path, seed, group, variant):
    """Packer._seed builds the chunk's SeedSequence from uint32 words (3x cheaper) and the objective draw reads
    its pool directly; the samples' bytes depend on both drawing exactly what SeedSequence([seed, split, group,
    variant, chunk]).generate_state draws, for multi-word ints too."""
    import numpy as np

    from pipeline import build as B

    tok = Tokenizer.load(tokenizer_path)
    writer = B.ShardWriter(fsspec.filesystem("file"), str(tmp_path), "parquet", group, variant, 10)
    for split in ("train", "validation"):
        packer = B.Packer(BuildConfig(seed=seed), tok.specials, split, group, variant, writer, B.new_accounting())
        for chunk in (0, 1, 4095, 2**32 - 1, 2**32 + 9):
            packer.chunk_index = chunk
            got = packer._seed()
            want = np.random.SeedSequence([seed, B.SPLIT_ID[split], group, variant, chunk])
            assert got.generate_state(4, np.uint64).tolist() == want.generate_state(4, np.uint64).tolist()
            assert B.first_uint64(got) == int(want.generate_state(1, np.uint64)[0])   # the objective draw
            assert (np.random.default_rng(got).integers(0, 2**62, 3).tolist()
                    == np.random.default_rng(want).integers(0, 2**62, 3).tolist())
            child = np.random.SeedSequence(got.entropy, spawn_key=(1,))   # as _split_short derives its stream
            assert child.generate_state(2).tolist() == np.random.SeedSequence(
                want.entropy, spawn_key=(1,)).generate_state(2).tolist()
            # the compiled seeding (one Generator per packer, reseeded in place) draws the same
            assert packer._draws() == tuple(want.generate_state(2, np.uint64).tolist())
            assert packer._fresh_rng().bit_generator.state == np.random.default_rng(want).bit_generator.state
            assert np.random.SeedSequence(packer._entropy(), spawn_key=(1,)).generate_state(2).tolist() == \
                np.random.SeedSequence(want.entropy, spawn_key=(1,)).generate_state(2).tolist()
            assert (packer.seed is None) == (packer.fast_seeding and chunk >> 32 == 0)


def test_compiled_seeding_is_numpys_default_rng_of_the_seed_sequence():
    """_infill_kernels.seed_into: SeedSequence pool mixing, generate_state and PCG64 seeding in one compiled call,
    written into a live PCG64, equals np.random.default_rng(np.random.SeedSequence(words)) for 1 to 9 words of
    any value (the draws after it too), and its two returned words are generate_state(2, np.uint64)."""
    import numpy as np

    from pipeline import _infill_kernels as K

    if not K.AVAILABLE:
        pytest.skip("numba not installed: the packer seeds with numpy's own objects")
    assert K.direct_seed()
    gen = np.random.default_rng(5)
    rng = np.random.Generator(np.random.PCG64(0))
    rng.random()   # a live Generator with a half-used 64-bit draw buffered: seeding must reset that too
    rng.integers(0, 10)
    record = np.zeros(6, np.uint64)
    for i in range(400):
        words = gen.integers(0, 2**32, int(gen.integers(1, 10)), dtype=np.uint64).astype(np.uint32)
        if i % 7 == 0:
            words[:] = gen.choice([0, 1, 2**32 - 1], len(words))
        want = np.random.SeedSequence(words)
        got = K.seed_into(rng.bit_generator.ctypes.state_address, words, record)
        assert list(got) == want.generate_state(2, np.uint64).tolist(), words
        ref = np.random.default_rng(want)
        assert rng.bit_generator.state == ref.bit_generator.state, words
        assert rng.integers(0, 2**62, 3).tolist() == ref.integers(0, 2**62, 3).tolist()
        assert rng.random() == ref.random() and rng.integers(0, 7) == ref.integers(0, 7)


@pytest.mark.parametrize("kw", [{}, {"short_seq_prob": 0.3, "variants": 3},
                                {"single_span_prob": 0.3, "block_mask_prob": 0.2, "context_mask_ratio": 0.3},
                                {"seq_len": 512, "objectives": {"sentence": 0.5, "gpt": 0.5}, "seed": 2**40 + 3},
                                {"objectives": {"gpt": 1.0}, "short_seq_prob": 0.1, "format": "wds",
                                 "task_mask": True, "shuffle_spans": False}],
                         ids=["default", "short-seq", "single-span-block-context", "seq512-sentence-gpt", "gpt-wds"])
def test_packer_fast_paths_make_the_reference_bytes(kw, small_corpus, tokenizer_path, tmp_path, monkeypatch):
    """The packer's fast paths (compiled seeding into one reused Generator, infilling.ChunkSampler and its
    compiled fit) write the same shard and receipt bytes as the reference path (a SeedSequence and a new
    Generator per chunk, make_sample and sample_length per call, the fit loop in Python) for one packing group, over
    configs that reach every branch: short samples, single-span + block + context masks, objective mixes,
    several variants, a seed of several words, WebDataset."""
    from pipeline import _infill_kernels as K
    from pipeline import build as B

    files = D.list_inputs(small_corpus[:4])
    model = Path(tokenizer_path).read_bytes()
    seeded, real, fits, real_fit = [], K.seed_into, [], infilling.ChunkSampler.fit
    monkeypatch.setattr(K, "seed_into", lambda *a: seeded.append(1) or real(*a))

    def fit(*a):
        fits.append(real_fit(*a))
        return fits[-1]

    monkeypatch.setattr(infilling.ChunkSampler, "fit", fit)
    trees = []
    for fast in (False, True):
        monkeypatch.setattr(B, "FAST_PACKING", fast)
        out = tmp_path / f"fast{fast}"
        res = B.process_group(cfg_for(small_corpus, out, tokenizer_path, **kw), 2, files, model)
        assert res["tokens"] > 20_000
        trees.append(tree_bytes(out))
    assert len(trees[0]) >= 3 and trees[0] == trees[1]
    assert len(seeded) > 100 or not K.AVAILABLE   # the fast run took the compiled seeding
    # and the compiled fit (only the fast run uses it) answered most chunks; the official knobs take make_sample
    knobs = any(kw.get(k) for k in ("single_span_prob", "block_mask_prob", "context_mask_ratio"))
    served = sum(f is not None for f in fits)
    assert served > 100 if K.AVAILABLE and not knobs else served == 0


def test_shard_buffer_add_sample_is_add():
    """ShardBuffer.add_sample (positional provenance, the packer's path) buffers what add buffers, through a
    regrow of the column buffers, and refuses a sample whose token columns differ in length, naming the row."""
    import numpy as np

    rng = np.random.default_rng(3)
    a, b = S.ShardBuffer(capacity=100), S.ShardBuffer(capacity=100)
    for i in range(40):
        n = int(rng.integers(1, 30))
        sample = {c: rng.integers(0, 2 if t == np.uint8 else 9000, n).astype(t) for c, t in S.ARRAY_COLUMNS.items()}
        sample.update(sep=int(rng.integers(0, n)), layout="bert")
        prov = ("bert", 1, f"doc{i % 3}.txt", i, 7 * i, f"train/0/1/{7 * i}")
        a.add(sample, **dict(zip(("objective", "variant", "source", "doc_index", "chunk_index", "sample_key"), prov)))
        b.add_sample(sample, *prov)
    x, y = a.samples(), b.samples()
    assert len(a) == len(b) == 40 and np.array_equal(x.offsets, y.offsets)
    for c in S.ARRAY_COLUMNS:
        assert np.array_equal(x.arrays[c], y.arrays[c]) and x.arrays[c].dtype == y.arrays[c].dtype
    for c in S.SCALAR_COLUMNS:
        assert x.scalars[c].tolist() == y.scalars[c].tolist()
    bad = dict(sample, targets=sample["targets"][:-1])
    with pytest.raises(ValueError, match=r"column 'targets' has .* in row 'k9'"):
        b.add_sample(bad, "bert", 1, "d", 0, 9, "k9")
