"""House-style import directions (house-style.md), every shipped config loads, and the suite's own guards
(no sys.path edits in entry scripts; missing official vectors fail under CI=true)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.config import BuildConfig, load_config


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def py(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


def test_pipeline_never_imports_model_and_only_stream_imports_torch():
    for f in py("pipeline"):
        mods = imports(f)
        assert "model" not in mods, f
        if f.name != "stream.py":
            assert "torch" not in mods, f"{f.name} imports torch; only stream.py may"
        if f.name != "build.py":
            assert "ray" not in mods, f"{f.name} imports ray; only build.py may"


def test_model_is_plain_torch():
    for f in py("model"):
        mods = imports(f)
        assert not mods & {"ray", "pyarrow", "pipeline"}, f
        if f.name != "composer.py":
            assert "composer" not in mods, f"{f.name} imports composer; only model/composer.py may"


def project_imports(path: Path) -> set[str]:
    """The pipeline.* / model.* modules a file imports anywhere, function-level (lazy) imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n.split(".")[0] in ("pipeline", "model")
                and (ROOT / (n.replace(".", "/") + ".py")).is_file()}
    return out


def test_no_import_cycles():
    """No circle between project modules, not even through a lazy import inside a function."""
    graph = {f"{d}.{f.stem}": project_imports(f) for d in ("pipeline", "model") for f in py(d)}

    def visit(module: str, path: tuple[str, ...]) -> None:
        for dep in sorted(graph.get(module, ())):
            assert dep not in path, "import cycle: " + " -> ".join((*path[path.index(dep):], dep))
            visit(dep, (*path, dep))

    for module in graph:
        visit(module, (module,))


def test_entry_scripts_leave_sys_path_alone(tmp_path):
    """The packages come from `make setup`'s editable install (or PYTHONPATH), not from sys.path edits."""
    import subprocess
    import sys

    for f in [ROOT / "train.py", *py("jobs"), *py("benchmarks")]:
        touched = [n.lineno for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Attribute)
                   and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not touched, f"{f.name} uses sys.path (lines {touched}); the packages are installed by make setup"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "inspect_shards.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True)   # from elsewhere, with conftest's PYTHONPATH only
    assert r.returncode == 0 and "manifest" in r.stdout, r.stderr


def test_nothing_imports_jobs_or_train():
    for folder in ("pipeline", "model", "jobs", "benchmarks"):
        for f in py(folder):
            assert not imports(f) & {"jobs", "train"}, f


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pipeline").glob("*.yaml")), ids=lambda p: p.name)
def test_pipeline_configs_load(path):
    import yaml

    cfg = load_config(BuildConfig, [str(path)])
    cfg.validate()
    for key, value in yaml.safe_load(path.read_text()).items():   # every preset field lands in the dataclass
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_official_vectors_fail_under_ci(tmp_path, ci):
    """A clean clone without ../shared: the official-vector tests skip on a laptop but fail under CI=true.
    The real conftest and test files run from a copy whose ../shared does not exist."""
    import os
    import shutil
    import subprocess
    import sys

    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    for name in ("conftest.py", "test_infilling.py", "test_model_glm.py"):
        shutil.copy(ROOT / "tests" / name, tests / name)
    shutil.copy(ROOT / "pyproject.toml", tests.parent / "pyproject.toml")   # markers, strictness
    env = dict(os.environ, CI=ci, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
                        "-k", "official_examples or test_logits_per_sample_sep", str(tests)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "official GLM test vectors not found" in r.stdout, r.stdout + r.stderr
    if ci:
        # the parametrised official examples fail; the `tv` fixture errors in setup: neither is a skip
        assert r.returncode == 1 and "1 failed" in r.stdout and "1 error" in r.stdout, r.stdout
        assert r.stdout.count("CI=true requires them") >= 2 and "skipped" not in r.stdout, r.stdout
    else:
        assert r.returncode == 0 and "2 skipped" in r.stdout, r.stdout
