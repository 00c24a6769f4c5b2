"""Weighted source mixtures: the spec, its normalisation and fingerprint, the deterministic schedule, the budget.

    # a mixture, inline (train.py --data) or as a YAML file:
    #   sources:
    #     wiki:  {path: s3://b/mix/wiki/train,  weight: 3}
    #     books: {path: s3://b/mix/books/train, weight: 1, max_repeats: 4}
    python -m pipeline.mixture configs/mix.yaml --max-duration 50000000tok --global-batch-size 256

No torch, no ray: `pipeline/stream.py` (`MixedStream`) reads the shards in the order decided here.

WEIGHT = SHARE OF TRAINING SAMPLES. Every sample is one row of seq_len positions, and the builder packs each row to
within ~1.6% of seq_len (the manifest's `accounting.pad_fraction`, typically < 1%), so a sample share is a token
share to within the difference of the sources' pad fractions. Samples are what the loader counts, what a step
holds, and what resumes exactly (integers, no rounding across ranks); a token-exact schedule would need every
row's length before a single batch is cut. Weights are normalised: `3:1` and `0.75:0.25` are the same mixture.

THE SCHEDULE (which source feeds global sample g). Normalised weights are quantised to integers q_s summing to
QUANTUM (largest remainders; every positive weight gets at least 1, so shares are exact to 1/QUANTUM). Inside one
period of QUANTUM samples, source s is due at times (k + 1/2) / q_s for k = 0..q_s-1; the period is those due times
merged in order (ties: the source listed first by name). This is "largest sampling error first" in closed form
(Megatron's blending picks argmax_s w_s (i+1) - count_s; merging due times gives the same low discrepancy): every
prefix holds n w_s +- (S+1)/2 samples of each of S sources, so any window of 1,000 samples is within a few samples
(< 1%) of its target. Being periodic, the position of any sample is O(1) to find: a resume never replays the past.

A source is read as an endless sequence of PASSES: pass p reads mask variant p mod K of its shard set (K stored
variants, spec §3) in its own shuffled order, rng(seed, source, p) — so a repeat of an upweighted source sees fresh
masks and a new order while K lasts (beyond K a repeat reuses a variant's masks, in a new order; this is said once
and reported as `masks_reused`). Sample j of source s is the j-th element of that sequence.

A SEGMENT is (first global sample g0, base counts c0_s, quanta q_s): sample g >= g0 is sample c0_s + (count of s
among the segment's first g - g0 samples) of source s. A run starts with one segment (g0 = 0, c0 = 0). Resuming with
a changed mixture (allowed only with allow_change) starts a new segment at the resumed sample with c0 = what each
source has consumed so far: the new weights apply from the resumed step, and every source continues exactly where
it stopped — nothing consumed is repeated, nothing unconsumed is skipped; a new source starts at its first sample,
a removed one stops.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass

import numpy as np

from pipeline.shards import sibling_validation

QUANTUM = 1 << 18            # schedule period in samples; shares are exact to 1/QUANTUM (4e-6)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")   # source names end up in metric keys and folder names
_SOURCE_KEYS = {"path", "weight", "max_repeats"}
_TOP_KEYS = {"sources", "samples_per_epoch"}


# ------------------------------------------------------------------------------------------------ the spec

@dataclass(frozen=True)
class Source:
    name: str
    path: str                       # shard set: folder or URL of its manifest (train or validation)
    weight: float                   # as given; the share is weight / sum of weights (share of training samples)
    max_repeats: float | None       # most passes over this source a run may need; None = no limit


@dataclass(frozen=True)
class Mixture:
    sources: tuple[Source, ...]     # sorted by name
    samples_per_epoch: int | None   # None = the sources' samples of one pass, together
    where: str = "mixture"          # the YAML file it came from, for messages

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def shares(self) -> np.ndarray:
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        return w / w.sum()

    @property
    def quanta(self) -> np.ndarray:
        return quantise(self.shares)


def is_mixture(data) -> bool:
    """A mixture spec — a dict with `sources`, inline YAML text (`{sources: {...}}`, as --data takes it) or a
    .yaml/.yml file — rather than one shard set's folder or URL."""
    return isinstance(data, dict) or (isinstance(data, str) and (data.lstrip().startswith("{")
                                                                 or data.rstrip().endswith((".yaml", ".yml"))))


def load_mixture(spec) -> Mixture:
    """A mixture from a dict, inline YAML text or a YAML file path; every mistake raises ValueError naming it and
    the fix."""
    where = "mixture"
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        import yaml

        try:
            spec = yaml.safe_load(spec)
        except yaml.YAMLError as e:
            raise ValueError(f"mixture {spec!r} is not valid YAML ({e}); write it as "
                             "'{sources: {wiki: {path: data/mix/wiki/train, weight: 3}}}'") from e
    elif isinstance(spec, str):
        import fsspec
        import yaml

        where = spec
        try:
            with fsspec.open(spec, "r") as f:
                spec = yaml.safe_load(f)
        except FileNotFoundError as e:
            raise ValueError(f"mixture file {where} does not exist; give the path of a YAML file with "
                             "`sources: {name: {path: ..., weight: ...}}`") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), dict) or not spec["sources"]:
        raise ValueError(f"{where}: a mixture needs `sources:` mapping names to {{path, weight[, max_repeats]}}, "
                         "e.g. {sources: {wiki: {path: data/mix/wiki/train, weight: 3}, books: {path: "
                         "data/mix/books/train, weight: 1}}}")
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown mixture keys {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    out = []
    for name, s in spec["sources"].items():
        name = str(name)
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}: source name {name!r} must be letters, digits, '_', '.', '-' (up to 64, "
                             "starting with a letter or digit): it becomes a metric key; rename it")
        if not isinstance(s, dict):
            raise ValueError(f"{where}: source {name} must be a mapping {{path: ..., weight: ...}}, got {s!r}")
        bad = set(s) - _SOURCE_KEYS
        if bad:
            raise ValueError(f"{where}: source {name} has unknown keys {sorted(bad)}; valid: {sorted(_SOURCE_KEYS)}")
        path = s.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}: source {name} needs `path:` (its shard set, e.g. <build output>/{name}/train)")
        w = s.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}: source {name} has weight={w!r}; weights are non-negative numbers (relative: "
                             "3 and 1 mean 75% and 25% of the training samples)")
        r = s.get("max_repeats")
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0):
            raise ValueError(f"{where}: source {name} has max_repeats={r!r}; give a number of passes > 0 (e.g. 4) "
                             "or leave it out for no limit")
        out.append(Source(name, path, float(w), None if r is None else float(r)))
    if not sum(s.weight for s in out) > 0:
        raise ValueError(f"{where}: every weight is 0; give at least one source a positive weight")
    spe = spec.get("samples_per_epoch")
    if spe is not None and (isinstance(spe, bool) or not isinstance(spe, int) or spe < 1):
        raise ValueError(f"{where}: samples_per_epoch={spe!r}; give a positive integer or leave it out (default: "
                         "the samples of one pass over every source)")
    return Mixture(tuple(sorted(out, key=lambda s: s.name)), spe, where)


def quantise(shares: np.ndarray, total: int = QUANTUM) -> np.ndarray:
    """Shares -> integers summing to `total` by largest remainders; every positive share gets at least 1."""
    raw = shares * total
    q = np.floor(raw).astype(np.int64)
    q[(shares > 0) & (q == 0)] = 1
    rest = total - int(q.sum())
    order = np.lexsort((np.arange(len(q)), -(raw - np.floor(raw))))   # largest remainder first, then by position
    if rest > 0:
        q[order[:rest]] += 1
    while rest < 0:                                                   # minimums pushed the sum over: take back
        i = int(np.argmax(q))
        q[i] -= 1
        rest += 1
    return q


# ------------------------------------------------------------------------------------------------ fingerprint

def manifest_fingerprint(manifest) -> str:
    """What decides a source's samples: the shard files (names + checksums), format, seq_len, tokenizer and build
    settings — not where the set lies (a copied set keeps its fingerprint)."""
    d = {"format": manifest.format, "seq_len": manifest.seq_len, "split": manifest.split,
         "tokenizer": (manifest.tokenizer or {}).get("fingerprint"), "config_hash": manifest.config_hash,
         "shards": [[s.name, s.sha256, s.rows, s.variant] for s in manifest.shards]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def describe(mixture: Mixture, manifests: dict) -> dict:
    """The mixture as saved in a checkpoint: per source its manifest fingerprint, share and quantum."""
    q = mixture.quanta
    return {"samples_per_epoch": mixture.samples_per_epoch,
            "sources": {s.name: {"manifest": manifest_fingerprint(manifests[s.name]),
                                 "share": round(float(mixture.shares[i]), 6), "quantum": int(q[i])}
                        for i, s in enumerate(mixture.sources)}}


def fingerprint(desc: dict) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def diff(old: dict, new: dict) -> list[str]:
    """Readable differences between two describe() results."""
    out = []
    o, n = old.get("sources", {}), new.get("sources", {})
    for name in sorted(set(o) | set(n)):
        if name not in n:
            out.append(f"source {name} removed (was share {o[name]['share']:.4f})")
        elif name not in o:
            out.append(f"source {name} added (share {n[name]['share']:.4f})")
        else:
            if o[name]["quantum"] != n[name]["quantum"]:
                out.append(f"source {name}: share {o[name]['share']:.4f} -> {n[name]['share']:.4f}")
            if o[name]["manifest"] != n[name]["manifest"]:
                out.append(f"source {name}: shard set changed (manifest fingerprint {o[name]['manifest'][:12]}… -> "
                           f"{n[name]['manifest'][:12]}…)")
    if old.get("samples_per_epoch") != new.get("samples_per_epoch"):
        out.append(f"samples_per_epoch {old.get('samples_per_epoch')} -> {new.get('samples_per_epoch')}")
    return out


def check_change(saved: dict, current: dict, allow_change: bool) -> bool:
    """Compare a checkpoint's describe() with the current one: True when they differ and allow_change permits it;
    raises ValueError with a readable diff when they differ without it."""
    if fingerprint(saved) == fingerprint(current):
        return False
    changes = diff(saved, current)
    if not allow_change:
        raise ValueError("the checkpoint was trained on another mixture: " + "; ".join(changes or ["(details)"])
                         + ". Resume with the same mixture, or pass --allow-data-change (train.py; MixedStream: "
                         "allow_change=True) to apply the new one from the resumed step (every source continues "
                         "where it stopped: nothing consumed is repeated, nothing is skipped)")
    return True


# ------------------------------------------------------------------------------------------------ the schedule

class Schedule:
    """Global sample index -> (source index, sample index within the source), for one segment (docstring)."""

    def __init__(self, quanta: np.ndarray, start: int = 0, base: np.ndarray | None = None):
        self.quanta = np.asarray(quanta, dtype=np.int64)
        assert self.quanta.sum() == QUANTUM and (self.quanta >= 0).all()
        self.start = int(start)
        self.base = np.zeros(len(self.quanta), np.int64) if base is None else np.asarray(base, np.int64)
        src = np.repeat(np.arange(len(self.quanta)), self.quanta)              # [QUANTUM]
        k = np.concatenate([np.arange(q) for q in self.quanta])              # k-th due time of its source
        due = (2 * k + 1) / (2.0 * self.quanta[src])   # exact order: distinct rationals differ by >> one ulp
        order = np.lexsort((src, due))
        self.period = src[order].astype(np.int32)       # source of each position in the period
        self.rank = k[order].astype(np.int32)           # its occurrence index among its source's in the period

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices (>= start) -> (source index, sample index within that source)."""
        local = np.asarray(g, dtype=np.int64) - self.start
        assert (local >= 0).all(), "sample before the segment's start"
        p, off = np.divmod(local, QUANTUM)
        s = self.period[off]
        return s, self.base[s] + p * self.quanta[s] + self.rank[off]

    def counts(self, g: int) -> np.ndarray:
        """Samples of each source consumed before global sample g (base included)."""
        p, off = divmod(int(g) - self.start, QUANTUM)
        return self.base + p * self.quanta + np.bincount(self.period[:off], minlength=len(self.quanta))


# ------------------------------------------------------------------------------------------------ budget

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*(ba|ep|sp|tok|dur)\s*", re.IGNORECASE)


def samples_for_duration(max_duration: str, *, seq_len: int, global_batch_size: int, samples_per_epoch: int) -> int:
    """Training samples a Composer time string asks for: 600ba, 2ep, 100000sp, 50000000tok (a sample counts
    seq_len tokens: the loader's batches are [B, seq_len])."""
    m = _DURATION.fullmatch(str(max_duration))
    if not m or m.group(2).lower() == "dur":
        raise ValueError(f"max_duration={max_duration!r}: give a Composer time string such as 600ba, 2ep, "
                         "100000sp or 50000000tok")
    n, unit = float(m.group(1)), m.group(2).lower()
    if unit == "ba":
        return int(n) * global_batch_size
    if unit == "ep":
        return int(n * samples_per_epoch)
    if unit == "sp":
        return int(n)
    steps = math.ceil(n / (seq_len * global_batch_size))   # Composer stops at the first step that reaches it
    return steps * global_batch_size


def check_budget(mixture: Mixture, schedule: Schedule, pass_samples: dict[str, int], variants: dict[str, int],
                 end_sample: int) -> dict[str, dict]:
    """Per source, what training up to global sample `end_sample` reads: samples, passes, masks reused. Raises
    ValueError naming every source that would exceed its max_repeats, with the numbers and the ways out."""
    need = schedule.counts(end_sample)
    out, bad = {}, []
    total = int(end_sample)
    for i, s in enumerate(mixture.sources):
        n, per = int(need[i]), pass_samples[s.name]
        passes = n / per
        out[s.name] = {"samples": n, "passes": round(passes, 4), "pass_samples": per,
                       "masks_reused": passes > variants[s.name]}
        if s.max_repeats is not None and passes > s.max_repeats + 1e-9:
            fit = s.max_repeats * per / max(total, 1)
            bad.append(f"source {s.name} (share {mixture.shares[i]:.4f}) would be read {passes:.2f} times "
                       f"({n:,} of the {total:,} training samples; its shard set holds {per:,} per pass) > "
                       f"max_repeats={s.max_repeats:g}; lower its weight to a share <= {fit:.4f}, shorten "
                       "max_duration, raise its max_repeats, or add data to it")
    if bad:
        raise ValueError(f"{mixture.where}: the requested training exhausts sources: " + "; ".join(bad))
    return out


def validation_of(mixture: Mixture) -> dict[str, str]:
    """Each source's validation shard set: the sibling `validation` of its train set (<output>/<source>/validation
    of a multi-source build), for one evaluator per source."""
    return {s.name: sibling_validation(s.path) for s in mixture.sources}


def pass_samples(manifest) -> int:
    """Samples of one pass over a shard set: the mean over its mask variants (each holds every chunk once; their
    counts differ by a few samples, as each variant's objective draws fit chunks differently)."""
    variants = {s.variant for s in manifest.shards}
    return int(sum(s.rows for s in manifest.shards) / max(1, len(variants)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mixture", help="YAML file of the mixture")
    p.add_argument("--max-duration", default="1ep", help="Composer time string: 600ba, 2ep, 100000sp, 5000000tok")
    p.add_argument("--global-batch-size", type=int, default=1)
    a = p.parse_args(argv)
    try:
        return _report(a.mixture, a.max_duration, a.global_batch_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _report(spec: str, max_duration: str, global_batch_size: int) -> int:
    from pipeline.shards import read_manifest

    mix = load_mixture(spec)
    manifests = {s.name: read_manifest(s.path) for s in mix.sources}
    per = {n: pass_samples(m) for n, m in manifests.items()}
    spe = mix.samples_per_epoch or sum(per.values())
    seq_len = next(iter(manifests.values())).seq_len
    end = samples_for_duration(max_duration, seq_len=seq_len, global_batch_size=global_batch_size,
                               samples_per_epoch=spe)
    budget = check_budget(mix, Schedule(mix.quanta), per, {n: m.variants for n, m in manifests.items()}, end)
    print(f"{mix.where}: {end:,} training samples for max_duration={max_duration}")
    for i, s in enumerate(mix.sources):
        b = budget[s.name]
        print(f"{s.name:>16}: share {mix.shares[i]:.4f}  samples {b['samples']:,}  passes {b['passes']:.2f} of "
              f"{b['pass_samples']:,}  masks reused: {b['masks_reused']}  ({s.path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
