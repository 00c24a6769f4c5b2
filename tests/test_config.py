"""pipeline/config.py: the one loader of BuildConfig and train.py's TrainConfig, validation, and --help text."""

from __future__ import annotations

import ast
import dataclasses
import math
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline.config import BuildConfig, describe_fields, field_comments, load_config


def test_scientific_notation_on_the_command_line_and_in_yaml(tmp_path):
    """`3e-4` has no dot, so YAML 1.1 (PyYAML) reads it as a string; it must still be a number everywhere."""
    import train

    assert train.parse_args(["--optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)
    assert train.parse_args(["--optim.lr", "1E-5", "--optim.betas=[9e-1, 95e-2]"]).optim.betas == (0.9, 0.95)
    (tmp_path / "t.yaml").write_text("optim:\n  lr: 3e-4\n  eps: 1e-8\nseed: 1e3\n")
    cfg = train.parse_args([str(tmp_path / "t.yaml")])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.seed) == (pytest.approx(3e-4), pytest.approx(1e-8), 1000)
    assert isinstance(cfg.seed, int)
    (tmp_path / "b.yaml").write_text("gpt_min_ratio: 25e-2\ngroup_bytes: 1e6\nobjectives: {bert: 5e-1, gpt: 5e-1}\n")
    b = load_config(BuildConfig, [str(tmp_path / "b.yaml"), "--gpt-infill-prob=1e-1"])
    assert (b.gpt_min_ratio, b.group_bytes, b.objectives, b.gpt_infill_prob) == (
        0.25, 1_000_000, {"bert": 0.5, "gpt": 0.5}, 0.1)
    b.validate()


@pytest.mark.parametrize("flag, message", [
    ("--seed=1.5", "seed=1.5: expected an integer"),
    ("--seed=nan", "seed=nan: expected an integer"),
    ("--seq-len=abc", "seq_len='abc': expected an integer"),
    ("--gpt-min-ratio=.nan", "gpt_min_ratio=nan: expected a number"),
    ("--task-mask=1", "task_mask=1: expected true or false"),
    ("--objectives={bert: .nan}", "objectives.bert=nan: expected a number"),
])
def test_wrong_kind_of_value_is_refused_naming_the_key(flag, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(BuildConfig, [flag])


def test_optional_fields_take_null_and_typed_values():
    cfg = load_config(BuildConfig, ["--tokenizer=tok.model", "--num-cpus=2"])
    assert (cfg.tokenizer, cfg.num_cpus) == ("tok.model", 2)
    cfg = load_config(BuildConfig, ["--tokenizer=tok.model", "--tokenizer=null", "--num-cpus=2", "--num-cpus=null"])
    assert (cfg.tokenizer, cfg.num_cpus) == (None, None)
    with pytest.raises(ValueError, match="num_cpus='many': expected an integer"):
        load_config(BuildConfig, ["--num-cpus=many"])


@pytest.mark.parametrize("field, value, rule", [
    ("seed", -1, r"in \[0, 4294967295\]"),
    ("num_cpus", 0, ">= 1"),
    ("samples_per_shard", 0, ">= 1"),
    ("group_bytes", -1, ">= 1"),
    ("seq_len", 0, ">= 32"),
    ("seq_len", -512, ">= 32"),
    ("variants", 0, ">= 1"),
    ("min_doc_tokens", 0, ">= 1"),
    ("vocab_size", 10, ">= 27"),
    ("vocab_size", 26, ">= 27"),          # the 10 command tokens plus 17 pieces: tokenizer.train's own floor
    ("tokenizer_max_sentences", 0, ">= 1"),
    ("validation_fraction", 1.0, r"in \[0.0, 1.0\)"),
    ("validation_fraction", -0.1, r"in \[0.0, 1.0\)"),
    ("validation_fraction", math.nan, r"in \[0.0, 1.0\)"),
    ("gpt_min_ratio", 1.0, r"in \[0.0, 1.0\)"),
    ("gpt_min_ratio", -0.5, r"in \[0.0, 1.0\)"),
    ("gpt_infill_prob", 1.5, r"in \[0.0, 1.0\]"),
    ("format", "csv", "parquet or wds"),
    ("tokenizer_model_type", "wordpiece", "unigram or bpe"),
    ("text_field", "", "JSONL key"),
    ("output", " ", "folder or URL"),
    ("seq_len", True, ">= 32"),
])
def test_validate_refuses_nonsense_naming_field_value_and_range(field, value, rule):
    cfg = dataclasses.replace(BuildConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"^{field}=.*: .*{rule}"):
        cfg.validate()


@pytest.mark.parametrize("objectives", [
    {"bert": math.nan, "gpt": 1.0}, {"bert": math.inf}, {"bert": 2.0, "gpt": -1.0}, {"bert": "0.5", "gpt": 0.5},
    {"mlm": 1.0}, {},
])
def test_validate_refuses_bad_objective_weights(objectives):
    with pytest.raises(ValueError, match="objectives="):
        BuildConfig(objectives=objectives).validate()


def test_defaults_and_shipped_presets_validate():
    BuildConfig().validate()
    for path in sorted((ROOT / "configs" / "pipeline").glob("*.yaml")):
        load_config(BuildConfig, [str(path)]).validate()


def test_every_setting_is_described_with_its_own_comment():
    comments = field_comments(BuildConfig)
    src = (ROOT / "pipeline" / "config.py").read_text()
    for f in dataclasses.fields(BuildConfig):
        assert comments.get(f.name), f"BuildConfig.{f.name} has no comment (house style: every field carries one)"
        assert comments[f.name].split(" ")[0] in src
    # a comment continued on the next line is joined, not cut
    assert comments["text_split"].endswith("blank_lines = one per blank-line-separated block")
    lines = describe_fields(BuildConfig).splitlines()
    for f in dataclasses.fields(BuildConfig):
        at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"--{f.name.replace('_', '-')}="))
        assert lines[at].endswith(comments[f.name]) or lines[at + 1].strip() == comments[f.name], f.name
    text = "\n".join(lines)
    assert "  --seq-len=512 " in text and "--objectives={" in text and "--tokenizer=null" in text


def test_train_config_sections_are_described_dotted():
    import train

    text = describe_fields(train.TrainConfig)
    assert "--optim.lr=" in text and "peak learning rate" in text
    assert "--model.preset=" in text and "--max-duration=" in text


def test_build_shards_help_lists_every_setting():
    r = subprocess.run([sys.executable, "jobs/build_shards.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert describe_fields(BuildConfig) in r.stdout
    # the docstring's shell line continuation survives (it printed as one mangled line before)
    assert "--tokenizer s3://b/tok/glm.model" in r.stdout and "glm-10b-mix.yaml --input 's3://b/raw/*.txt' \\\n" \
        in r.stdout


@pytest.mark.parametrize("path", sorted([*(ROOT / "jobs").glob("*.py"), ROOT / "train.py"]), ids=lambda p: p.name)
def test_help_docstrings_keep_their_line_continuations(path):
    """A backslash at the end of a line in a plain docstring joins the lines in the printed --help."""
    node = ast.parse(path.read_text()).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), f"{path.name} has no docstring"
    printed = node.value.value
    assert printed.count("\n") == node.end_lineno - node.lineno, f"{path.name}: use r\"\"\" or \\\\ in the docstring"
