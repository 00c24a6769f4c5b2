"""train.py end to end on shards made by the real builder from real text (State of the Union speeches).

    .venv/bin/python -m pytest -q tests/test_train.py              # everything (~2-3 min on 2 cores)
    .venv/bin/python -m pytest -q tests/test_train.py -m "not slow"

The session fixture builds one tiny shard set (seq_len 128, vocab 1000) with pipeline.build in a subprocess
(its in-process Ray stays out of the test process). Multi-process runs use the real launchers
(`python train.py`, `composer -n 2 train.py`) with OMP_NUM_THREADS=1, CPU, fp32, gloo + FSDP2.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import re
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
    return {r["step"]: r["keys"] for r in records(folder, f"samples-rank{rank}.jsonl") if "step" in r}


def records(folder: str, name: str) -> list[dict]:
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


def metrics(folder: str) -> list[dict]:
    return records(folder, "metrics.jsonl")


def model_weights(path: str) -> dict[str, torch.Tensor]:
    from model.checkpoint import read_state_dict

    return read_state_dict(path)[0]


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
    demo = train.parse_args([])
    assert demo.model.preset == "demo" and demo.data == "configs/mix/demo.yaml"
    from pipeline import mixture as X

    mix = X.load_mixture(os.path.join(REPO, demo.data))     # what jobs/demo.py builds: two sources, 1:3
    assert {s.name: s.path for s in mix.sources} == {n: f"data/mix/{n}/train" for n in ("before1900", "after1900")}
    assert list(mix.shares) == [0.75, 0.25]
    from jobs.demo import demo_sources

    split = {n: sorted(f for g in s["input"] for f in glob.glob(g)) for n, s in demo_sources().items()}
    assert {n: len(f) for n, f in split.items()} == {"before1900": 111, "after1900": 138}
    assert max(split["before1900"]) < min(split["after1900"])


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
    resumed = records(run, "samples-rank0.jsonl")
    marker = resumed[done_before]            # the resumed run marks where its records start
    assert marker["event"] == "resume" and marker["from_step"] > 1 and marker["from_step"] % 4 == 0, marker
    assert resumed[done_before + 1]["step"] == marker["from_step"] + 1
    assert samples_by_step(run) == samples_by_step(ref)  # exactly the same samples at every step
    a, b = model_weights(os.path.join(ref, "ep0-ba24-rank0.pt")), model_weights(os.path.join(run, "ep0-ba24-rank0.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # identical weights (CPU, fp32, same dropout masks)


@pytest.mark.slow
def test_world_size_two_fsdp2_same_global_order(shards, tmp_path, tokenizer_path):
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

    import train

    # the sharded checkpoint of 2 processes cannot resume in 1: refused with the fix, before Composer tries
    with pytest.raises(ValueError, match=r"saved by 2 processes; this run has 1.*composer -n 2.*"
                                         r"--fsdp-state-dict-type=full"):
        train.main(train.parse_args(tiny_args(shards, two, "--batch-size=4", *common[1:], "--max-duration=10ba")))
    # the full checkpoint of 1 process resumes in 2 (FSDP2 loads and saves it full)
    p = run_train(tiny_args(shards, one, "--batch-size=2", *common[1:], "--max-duration=10ba"), world=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from step 8" in p.stdout and "fsdp_state_dict_type=full" in p.stderr
    assert [r.get("step", r.get("from_step")) for r in records(one, "samples-rank1.jsonl")] == [8, 9, 10]

    # fill_blanks reads the sharded checkpoint in one process, and refuses a tokenizer it was not trained with
    from jobs.fill_blanks import main as fill

    text = "The Congress shall [MASK] the public debt."
    filled = fill(["--checkpoint", os.path.join(two, "latest-rank0.pt"), "--config", "tiny", "--tokenizer",
                   f"{shards}/tokenizer.model", "--max-new-tokens", "4", text])
    assert filled.startswith("The Congress shall ") and filled.endswith(" the public debt.") and "[MASK]" not in filled
    with pytest.raises(ValueError, match=r"tokenizer .*sotu1k.model.* is not the one .* was trained with"):
        fill(["--checkpoint", os.path.join(two, "ep0-ba8"), "--config", "tiny", "--tokenizer", tokenizer_path, text])


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
    """Shards streamed from the moto S3 server of tests/conftest.py; checkpoints saved there, resumed from there.
    The endpoint is given only as --storage-options: Composer's object store gets it from there too."""
    endpoint = s3_server["endpoint_url"]
    env = _env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for var in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(var, None)
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
    steps = [r.get("step", r.get("from_step")) for r in records(logs, "samples-rank0.jsonl")]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # 1-4 in the first run, 5-8 after resuming from S3 at step 4
    assert fs.exists("glm/ckpt/ep0-ba8-rank0.pt")


# ------------------------------------------------------------------------------------------------ checkpoint faults

@pytest.fixture(scope="module")
def run4(shards, tmp_path_factory) -> str:
    """A finished real run: tiny, 4 steps, checkpoints ep0-ba2 and ep0-ba4 (latest) kept, samples recorded."""
    import train

    folder = str(tmp_path_factory.mktemp("run4") / "run")
    train.main(train.parse_args(tiny_args(shards, folder, *FAULT_ARGS, "--max-duration=4ba"))).close()
    assert os.readlink(os.path.join(folder, "latest-rank0.pt")) == "ep0-ba4-rank0.pt"
    return folder


FAULT_ARGS = ("--save-interval=2ba", "--eval-data=none", "--keep-checkpoints=-1")


def copy_run(run4: str, tmp_path) -> str:
    folder = str(tmp_path / "run")
    shutil.copytree(run4, folder, symlinks=True)
    return folder


class Planted:
    """A pickle that writes a marker file when it is unpickled: what a hostile checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_planted_checkpoint_never_runs(shards, run4, tmp_path):
    import train
    from model.checkpoint import UnsafeCheckpointError

    marker = str(tmp_path / "marker")
    # 1. as latest-rank0.pt in a save folder (the link replaced by a file): autoresume refuses it
    folder = copy_run(run4, tmp_path)
    os.remove(os.path.join(folder, "latest-rank0.pt"))
    torch.save({"state": Planted(marker)}, os.path.join(folder, "latest-rank0.pt"))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load checkpoint .*latest-rank0.pt.*GLOBAL exec "):
        train.main(train.parse_args(tiny_args(shards, folder, *FAULT_ARGS, "--max-duration=6ba")))
    # 2. as load_path, given to a fresh folder (a plain pickle, not torch's zip format)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state": Planted(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        train.main(train.parse_args(tiny_args(shards, str(tmp_path / "fresh"), *FAULT_ARGS,
                                              f"--load-path={tmp_path / 'evil.pt'}")))
    # 3. as the .metadata of a sharded checkpoint folder
    sharded = tmp_path / "sharded" / "ep0-ba6"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*builtins.exec"):
        train.main(train.parse_args(tiny_args(shards, str(tmp_path / "sharded"), *FAULT_ARGS)))
    assert not os.path.exists(marker)


def test_composer_loads_are_guarded(tmp_path):
    """Composer's own loaders (monolithic torch.load with weights_only=False, DCP's .metadata pickle and byte
    entries) cannot run code inside safe_checkpoint_loading: the guard does not depend on our pre-scan."""
    from composer.utils.checkpoint import safe_torch_load
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from model.checkpoint import UnsafeCheckpointError, safe_checkpoint_loading

    marker = str(tmp_path / "marker")
    torch.save({"state": Planted(marker)}, tmp_path / "evil.pt")
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    import torch.distributed.checkpoint.filesystem as dcp_fs

    real_load, real_pickle = torch.load, dcp_fs.pickle
    with safe_checkpoint_loading():
        with pytest.raises(UnsafeCheckpointError):
            safe_torch_load(str(tmp_path / "evil.pt"))
        with pytest.raises(UnsafeCheckpointError):
            FileSystemReader(str(tmp_path / "dcp")).read_metadata()
        planner = DefaultLoadPlanner()
        planner.state_dict, planner.flatten_state_dict = {}, False
        with pytest.raises(UnsafeCheckpointError):   # a non-tensor entry inside a .distcp file
            planner.load_bytes(type("Item", (), {"dest_index": type("I", (), {"fqn": "x"})()})(),
                               io.BytesIO((tmp_path / "evil.pt").read_bytes()))
    assert not os.path.exists(marker)
    assert torch.load is real_load and dcp_fs.pickle is real_pickle   # the real ones are back afterwards


def test_truncated_or_deleted_latest_falls_back(shards, run4, tmp_path, capsys):
    import train

    folder = copy_run(run4, tmp_path)
    with open(os.path.join(folder, "ep0-ba4-rank0.pt"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(folder, "ep0-ba4-rank0.pt")) // 2)   # a crash mid-write
    trainer = train.main(train.parse_args(tiny_args(shards, folder, *FAULT_ARGS, "--max-duration=6ba")))
    trainer.close()
    err = capsys.readouterr()
    assert "resuming from step 2" in err.out
    assert "skipped ep0-ba4-rank0.pt" in err.err and "newest readable checkpoint ep0-ba2-rank0.pt" in err.err
    rows = records(folder, "samples-rank0.jsonl")
    assert rows[4] == {"event": "resume", "from_step": 2} and [r["step"] for r in rows[5:]] == [3, 4, 5, 6]
    assert samples_by_step(folder) == samples_by_step(run4) | {5: samples_by_step(folder)[5],
                                                               6: samples_by_step(folder)[6]}
    assert {"event", "from_step", "time"} <= set(next(r for r in metrics(folder) if "event" in r))

    folder = copy_run(run4, tmp_path / "b")
    os.remove(os.path.join(folder, "latest-rank0.pt"))                    # the link deleted
    train.main(train.parse_args(tiny_args(shards, folder, *FAULT_ARGS, "--max-duration=6ba"))).close()
    assert "resuming from step 4" in capsys.readouterr().out


def test_unusable_checkpoints_stop_a_fresh_start(shards, run4, tmp_path, capsys):
    import train

    folder = copy_run(run4, tmp_path)
    for name in ("ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt"):
        with open(os.path.join(folder, name), "r+b") as f:
            f.truncate(1000)
    args = tiny_args(shards, folder, *FAULT_ARGS, "--max-duration=2ba")
    with pytest.raises(ValueError, match=r"none of which can be used \(ep0-ba4-rank0.pt: .*; ep0-ba2-rank0.pt: .*"
                                         r"--allow-fresh-start=true"):
        train.main(train.parse_args(args))
    train.main(train.parse_args([*args, "--allow-fresh-start=true"])).close()
    out = capsys.readouterr()
    assert "starting from step 0" in out.out and "unusable checkpoints" in out.err


def test_finished_run_is_named_and_logs_survive(shards, run4, tmp_path):
    """The README's commands in a row: a second, shorter run in the same folder finds a finished run."""
    import train

    folder = copy_run(run4, tmp_path)
    log = open(os.path.join(folder, "log-rank0.txt")).read()
    with pytest.raises(ValueError, match=r"finished run \(4ba of max_duration 2ba\).*--save-folder.*--max-duration"):
        train.main(train.parse_args(tiny_args(shards, folder, *FAULT_ARGS, "--max-duration=2ba")))
    train.main(train.parse_args(tiny_args(shards, folder, *FAULT_ARGS, "--max-duration=5ba"))).close()
    assert open(os.path.join(folder, "log-rank0.txt")).read().startswith(log)   # appended, not truncated


def test_resume_on_shards_with_another_seq_len_names_the_fingerprint(shards, run4, tmp_path, sotu_files):
    import train

    other = str(tmp_path / "seq64")
    build = BUILD.replace("seq_len=128", "seq_len=64").replace("vocab_size=1000,",
                                                               f"tokenizer={shards + '/tokenizer.model'!r},")
    subprocess.run([PY, "-c", build, other, *sotu_files[-3:]], check=True, env=_env(), cwd=REPO, timeout=300,
                   stdout=subprocess.DEVNULL)
    folder = copy_run(run4, tmp_path)
    with pytest.raises(ValueError, match="trained on data with seq_len=128 but --data has seq_len=64"):
        train.main(train.parse_args(tiny_args(other, folder, *FAULT_ARGS, "--max-duration=6ba")))


@pytest.mark.slow
def test_wall_clock_limit_saves_then_exits_3(shards, tmp_path):
    run = str(tmp_path / "wc")
    args = tiny_args(shards, run, "--eval-data=none", "--save-interval=1000ba", "--max-duration=5000ba")
    p = run_train([*args, "--wall-clock-limit-s=4"])
    assert p.returncode == 3, p.stderr[-3000:]
    stopped = int(re.search(r"stopped by wall_clock_limit_s=4 at step (\d+)", p.stderr).group(1))
    assert 0 < stopped < 5000
    assert os.readlink(os.path.join(run, "latest-rank0.pt")) == f"ep0-ba{stopped}-rank0.pt"
    p = run_train([*args, f"--max-duration={stopped + 2}ba"])     # the requeued job resumes there
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from step {stopped}" in p.stdout


def test_wall_clock_limit_belongs_to_the_demo_only():
    import train

    limits = {os.path.basename(p): train.parse_args([p]).wall_clock_limit_s
              for p in glob.glob(os.path.join(REPO, "configs", "train", "*.yaml"))}
    assert limits.pop("demo.yaml") == 480 and set(limits.values()) == {0.0}, limits
    assert train.TrainConfig().wall_clock_limit_s == 0 and train.parse_args([]).wall_clock_limit_s == 480


FSDP2_GRADS = """
import dataclasses, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from model.composer import GLMComposer
from model.config import PRESETS
from model.glm import Block
dist.init_process_group("gloo")
cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=1024, max_position_embeddings=128, embedding_dropout=0.0,
                          attention_dropout=0.0, hidden_dropout=0.0)
model = GLMComposer(cfg)
model.model.load_state_dict(torch.load(sys.argv[1] + "/init.pt"))
batch = torch.load(sys.argv[1] + "/batch.pt")
for m in model.model.modules():           # Composer's FSDP2 units: every Block, then the root GLM
    if isinstance(m, Block):
        fully_shard(m)
fully_shard(model.model)
model.loss(model(batch), batch).backward()  # the same batch on both ranks: the averaged gradient is its own
grads = {n: p.grad.full_tensor() for n, p in model.model.named_parameters()}
if dist.get_rank() == 0:
    torch.save(grads, sys.argv[1] + "/fsdp2.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_view_warning_leaves_gradients_right(shards, tmp_path):
    """FSDP2 warns that a Block returns a view: it is the (k, v) cache pair, a view of the qkv projection, which
    GLM.forward drops when no cache is asked for; no in-place op touches it. A 2-rank FSDP2 backward on one real
    batch gives the gradients of a single process."""
    import dataclasses

    from model.composer import GLMComposer
    from model.config import PRESETS
    from pipeline.stream import ShardStream

    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=1024, max_position_embeddings=128, embedding_dropout=0.0,
                              attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    model = GLMComposer(cfg)
    batch = next(iter(ShardStream(f"{shards}/train", 4, seed=1, shuffle=False)))
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)} | {"objective": batch["objective"]}
    torch.save(model.model.state_dict(), tmp_path / "init.pt")
    torch.save(batch, tmp_path / "batch.pt")
    model.loss(model(batch), batch).backward()
    script = tmp_path / "fsdp2_grads.py"
    script.write_text(FSDP2_GRADS)
    p = subprocess.run([COMPOSER, "-n", "2", "--master_port", str(free_port()), str(script), str(tmp_path)],
                       env=_env(), cwd=REPO, timeout=240, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "returned a view tensor" in p.stderr          # the warning in question did fire
    fsdp2 = torch.load(tmp_path / "fsdp2.pt", weights_only=True)
    assert all(param.grad.abs().sum() > 0 for param in model.model.parameters())
    for name, param in model.model.named_parameters():
        torch.testing.assert_close(fsdp2[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_glm_module_runs_the_forward_it_promises():
    for preset, device in (("tiny", "cpu"), ("glm-10b", "meta")):
        p = subprocess.run([PY, "-m", "model.glm", "--preset", preset], env=_env(), cwd=REPO, timeout=120,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        assert f"forward on {device}: logits (2, 16, " in p.stdout, p.stdout


def test_help_lists_every_setting_with_its_comment():
    import train
    from pipeline.config import valid_keys

    p = subprocess.run([PY, os.path.join(REPO, "train.py"), "--help"], env=_env(), cwd=REPO, timeout=120,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(train.__doc__.strip().splitlines()[0])
    missing = [k for k in valid_keys(train.TrainConfig) if k not in p.stdout and k.replace("_", "-") not in p.stdout]
    assert not missing, missing
    for comment in ("peak learning rate", "start at step 0 although save_folder holds", "exit code 3"):
        assert comment in p.stdout


def test_load_weights_only_starts_a_new_schedule_from_the_weights(shards, run4, tmp_path):
    """Stage 2 of a recipe: the weights of a finished run, a new optimizer and schedule from step 0 (the finished
    run's own max_duration is no reason to refuse)."""
    import train

    cfg = train.parse_args(tiny_args(shards, str(tmp_path / "stage2"), *FAULT_ARGS, "--max-duration=2ba",
                                     f"--load-path={run4}/latest-rank0.pt", "--load-weights-only=true"))
    run = train.resolve_run(cfg)
    data = train.build_data(cfg)
    model, evaluators = train.build_model(cfg, run, data)
    optimizer, scheduler = train.build_optimizer(model, cfg.optim)
    loggers, callbacks = train.build_logging(cfg, run, data)
    start = train.plan_start(cfg, run, data)
    assert start.weights_only and any("weights only" in n for n in start.notes)
    trainer = train.build_trainer(cfg, run, data, start, model, evaluators, optimizer, scheduler, loggers, callbacks)
    assert int(trainer.state.timestamp.batch) == 0
    loaded = {k.removeprefix("model."): v for k, v in trainer.state.model.state_dict().items()}
    for k, v in model_weights(f"{run4}/latest-rank0.pt").items():
        assert torch.equal(loaded[k], v), k
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()


def test_zero_shot_tasks_in_training_are_logged(shards, tmp_path):
    """eval_tasks: GLM's zero-shot tasks every eval_interval and at the end, in metrics.jsonl; the tokenizer is
    found beside the shard set from the manifest; a mistyped task is refused before training."""
    import train

    folder = tmp_path / "zs"
    args = tiny_args(shards, str(folder), "--max-duration=4ba", "--eval-interval=2ba", "--eval-data=none",
                     "--eval-tasks-limit=4")
    train.main(train.parse_args([*args, "--eval-tasks=copa,bpb"])).close()
    rows = metrics(str(folder))
    got = [(r["step"], r["metrics/zeroshot/copa/acc"]) for r in rows if "metrics/zeroshot/copa/acc" in r]
    assert [s for s, _ in got] == [2, 4] and all(0 <= a <= 1 for _, a in got)
    assert any("metrics/zeroshot/bpb/bpb" in r for r in rows)
    with pytest.raises(ValueError, match="unknown task 'lambda'"):
        train.main(train.parse_args([*tiny_args(shards, str(tmp_path / "zs2"), "--eval-data=none"),
                                     "--eval-tasks=lambda"]))


def test_jobs_refuse_a_tokenizer_the_checkpoint_was_not_trained_with(run4, tokenizer_path):
    """fill_blanks.py and evaluate.py read the checkpoint's DataFingerprint: another vocabulary would decode the
    model's ids into the wrong words, so it is refused, naming both fingerprints."""
    from jobs import evaluate, fill_blanks

    ckpt = os.path.join(run4, "latest-rank0.pt")
    with pytest.raises(ValueError, match=r"is not the one .* was trained with"):
        fill_blanks.main(["--checkpoint", ckpt, "--config", "tiny", "--tokenizer", tokenizer_path, "A [MASK] day."])
    with pytest.raises(ValueError, match=r"is not the one .* was trained with"):
        evaluate.main(["--checkpoint", ckpt, "--config", "tiny", "--tokenizer", tokenizer_path, "--tasks", "copa",
                       "--limit", "2"])


# ------------------------------------------------------------------------------------------------ mixtures

@pytest.fixture(scope="session")
def mix_build(tmp_path_factory, sotu_files) -> str:
    """A real two-source build by jobs/build_shards.py with `sources:` (one tokenizer): the earliest speeches as
    source `old`, the latest as `new` -> <out>/{old,new}/{train,validation}."""
    out = str(tmp_path_factory.mktemp("mix") / "set")
    sources = {"old": {"input": sotu_files[:8]}, "new": {"input": sotu_files[-8:]}}
    subprocess.run([PY, os.path.join(REPO, "jobs", "build_shards.py"), f"--output={out}", "--vocab-size=1000",
                    "--seq-len=128", "--variants=2", "--samples-per-shard=64", "--num-cpus=1",
                    "--validation-fraction=0.25", "--group-bytes=200000", f"--sources={json.dumps(sources)}"],
                   check=True, env=_env(), cwd=REPO, timeout=300, stdout=subprocess.DEVNULL)
    for name in sources:
        assert os.path.exists(f"{out}/{name}/train/_manifest.json"), name
    return out


def mixture(out: str, old: float, new: float, **extra) -> str:
    """An inline mixture, as --data takes it."""
    return "--data=" + json.dumps({"sources": {"old": {"path": f"{out}/old/train", "weight": old, **extra},
                                               "new": {"path": f"{out}/new/train", "weight": new}}})


def keys_by_source(folder: str) -> dict[str, list[str]]:
    """Every source's sample keys in the order the run trained them (a step trained twice counts once)."""
    out: dict[str, list[str]] = {}
    for _, keys in sorted(samples_by_step(folder).items()):
        for k in keys:
            out.setdefault(k.split(":", 1)[0], []).append(k)
    return out


def test_mixture_run_logs_per_source_metrics_and_stops_at_a_token_budget(mix_build, tmp_path):
    """--data a mixture (1:3): per-source train loss every step, one evaluator per source's validation set,
    realised vs target shares; --max-duration in tokens stops at ceil(tokens / (global batch x seq_len)) steps;
    the zero-shot tasks find the shared tokenizer from the first source; a budget beyond max_repeats is refused."""
    import train

    folder = str(tmp_path / "mix")
    tokens = 5 * 4 * 128 + 1                      # one token past 5 steps of 4 x 128: Composer stops after step 6
    cfg = train.parse_args([TINY, mixture(mix_build, 1, 3), f"--save-folder={folder}", "--record-samples=true",
                            f"--max-duration={tokens}tok", "--eval-interval=3ba", "--log-interval=2ba",
                            "--eval-tasks=bpb", "--eval-tasks-limit=2"])
    trainer = train.main(cfg)
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 6 and int(trainer.state.timestamp.token) == 6 * 4 * 128
    rows = metrics(folder)
    for name in ("old", "new"):
        assert len([r for r in rows if f"train/loss/{name}" in r]) >= 5, name    # a step may draw no `old` sample
        assert [r["step"] for r in rows if f"metrics/eval/{name}/loss" in r] == [3, 6], name
        assert any(f"metrics/eval/{name}/accuracy_bert" in r for r in rows), name
    shares = [(r["step"], r["data/share/new"], r["data/target/new"]) for r in rows if "data/share/new" in r]
    assert [s for s, _, _ in shares] == [2, 4, 6]
    for step, share, target in shares:            # within one sample of the target share
        assert target == 0.75 and abs(share - 0.75) <= 1 / (4 * step), (step, share)
    keys = keys_by_source(folder)
    assert len(keys["new"]) + len(keys["old"]) == 24 and abs(len(keys["new"]) - 18) <= 1   # 3:1 of 24 samples
    assert any("metrics/zeroshot/bpb/bpb" in r for r in rows)
    from jobs import demo  # the demo's plot and summary of these metrics

    demo.plot(os.path.join(folder, "metrics.jsonl"), str(tmp_path / "loss.png"), 5.0, ["new", "old"],
              natural={"new": 0.8, "old": 0.2})
    assert os.path.getsize(tmp_path / "loss.png") > 10_000
    assert demo.shares(os.path.join(folder, "metrics.jsonl"), ["new", "old"])["old"] == (1 - shares[-1][1], 0.25)
    # a budget beyond a source's max_repeats is refused before training, naming the source and the numbers
    with pytest.raises(ValueError, match=r"exhausts sources: source old \(share 0\.2500\) would be read .* times"):
        train.main(train.parse_args([TINY, mixture(mix_build, 1, 3, max_repeats=1), "--eval-data=none",
                                     f"--save-folder={tmp_path / 'long'}", "--max-duration=4000ba"]))
    assert not os.path.exists(tmp_path / "long" / "metrics.jsonl") or not any(
        "loss/train/total" in r for r in metrics(str(tmp_path / "long")))


@pytest.mark.slow
def test_mixture_kill_resume_and_changed_weights(mix_build, tmp_path):
    """A mixture through train.py: SIGKILL mid-run + autoresume trains the uninterrupted run's sample keys; resuming
    with other weights is refused with the diff; with --allow-data-change the new weights apply from the resumed
    step and every source continues where it stopped: no key repeated, none skipped."""
    args = ["--max-duration=16ba", "--save-interval=4ba", "--eval-data=none", "--keep-checkpoints=-1"]
    ref = str(tmp_path / "ref")
    p = run_train([TINY, mixture(mix_build, 1, 3), f"--save-folder={ref}", "--record-samples=true", *args])
    assert p.returncode == 0, p.stderr[-3000:]

    run = str(tmp_path / "killed")
    proc = subprocess.Popen([PY, os.path.join(REPO, "train.py"), TINY, mixture(mix_build, 1, 3),
                             f"--save-folder={run}", "--record-samples=true", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not os.path.exists(os.path.join(run, "ep0-ba8-rank0.pt")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(samples_by_step(run)) < 16, "killed too late to prove anything"
    p = run_train([TINY, mixture(mix_build, 1, 3), f"--save-folder={run}", "--record-samples=true", *args])
    assert p.returncode == 0, p.stderr[-3000:]
    assert any(r.get("event") == "resume" for r in records(run, "samples-rank0.jsonl"))
    assert samples_by_step(run) == samples_by_step(ref)

    # continue the finished reference run to 24 steps with the weights turned around (3:1 -> 1:3)
    longer = [a if a != "--max-duration=16ba" else "--max-duration=24ba" for a in args]
    changed = [TINY, mixture(mix_build, 3, 1), f"--save-folder={ref}", "--record-samples=true", *longer]
    p = run_train(changed)
    assert p.returncode != 0 and "another mixture: source new: share 0.7500 -> 0.2500" in p.stderr, p.stderr[-3000:]
    assert "pass --allow-data-change" in p.stderr
    p = run_train([*changed, "--allow-data-change=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    steps = samples_by_step(ref)
    assert sorted(steps) == list(range(1, 25))
    late = [k.split(":", 1)[0] for s in range(17, 25) for k in steps[s]]
    assert abs(late.count("old") - 24) <= 1 and len(late) == 32     # the new 3:1 from step 17 on
    # every source's keys are the first N of that source's own sequence: no repeat, no gap
    import train
    from pipeline.stream import MixedStream

    cfg = train.parse_args([TINY])
    for name, got in keys_by_source(ref).items():
        assert len(set(got)) == len(got), name
        alone = MixedStream({"sources": {name: {"path": f"{mix_build}/{name}/train"}}}, len(got), seed=cfg.seed,
                            config=cfg.stream, rank=0, world_size=1)
        alone.begin_epoch()
        assert list(next(iter(alone))["sample_key"]) == got, name
