"""House-style import directions (house-style.md) and every shipped config loads."""

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
