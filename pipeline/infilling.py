"""The GLM blank-infilling objective: one packed chunk + one seeded Generator -> one training sample (spec §3).

    PYTHONPATH=. .venv/bin/python -c "import numpy as np; from pipeline.infilling import make_sample; \
from pipeline.tokenizer import Specials; print(make_sample(np.r_[2, 9:60, 0], 'bert', np.random.default_rng(0), \
specials=Specials.ours())['input_ids'])"
    PYTHONPATH=. .venv/bin/python -m pytest tests/test_infilling.py -q      # tests
    .venv/bin/python -m benchmarks.infilling --quick                          # speed vs sentencepiece

Pure numpy, no torch, no global RNG: a sample is a pure function of (chunk tokens, objective, the state of the
`numpy.random.Generator` passed in, options). With `rng = np.random.default_rng(seed)` (PCG64, defined
bit-for-bit on every platform) the same (chunk, objective, seed, options) gives the same bytes everywhere.
The random *choices* differ from the official code (which uses python's `random.Random`), the distributions
and the layout do not: given the same spans and Part B order, `make_block_data` / `make_gpt_suffix_data`
reproduce the official `ConstructBlockStrategy` output exactly (tests/test_infilling.py checks every row of
the official examples).

Input: `tokens`, one chunk as the packer builds it, `[CLS] doc eos [CLS] doc eos ...`; it always starts with
[CLS] and may end without eos when its last document continues in the next chunk (spec §2).

Objectives (`make_sample(tokens, objective, rng, specials=..., **options)`):

* "bert" (§3.3): span lengths ~ Poisson(3) truncated to 1..39, drawn until >= int(0.15 n) tokens are masked,
  placed by the official `sample_span_in_document` (shorter documents get int(0.15 len) each, the rest goes to
  the longest; >= 1 unmasked token between spans; the leading [CLS] of each document, every eos and the last
  token of the chunk are never masked). Where the official code silently drops a sample whose spans cannot
  all be placed, we raise `SpanPlacementError` (a ValueError) so the caller can count it and move on.
* "sentence" (§3.4): whole sentences (ending at a token in `specials.sentence_end_ids`, or at the end of the
  chunk) in random order until >= int(0.15 n) tokens are masked. Official quirk kept: after an eos the next
  sentence starts AT the following document's [CLS], so that [CLS] can be masked with its first sentence
  (pass `sentence_mask_cls=False` to start such sentences after the [CLS]). Adjacent sentences each get their
  own mask token. A chunk with no sentence at all raises `SpanPlacementError`.
* "gpt" (§3.5): G ~ U{int(gpt_min_ratio n) .. n-2} per sample. With probability `gpt_infill_prob` (the
  official flag name; it is the probability of the SUFFIX variant), or always when the chunk holds more than
  one document (an eos before the last position), the suffix / prefix-LM layout without eop
  (`layout="gpt_suffix"`; its span may contain eos and [CLS], as in the official code); otherwise one span of
  length G placed uniformly in the longest document with the standard layout incl. eop
  (`layout="gpt_single_span"`). The official code crashes when G does not fit there (G = n-2); we shorten
  that span to the longest that fits (region length - 1).
* masked_lm=True (§3.8, the BERT baseline): bert spans, every masked token replaced in place by [MASK], no
  Part B, sep = n, loss = source loss mask x masked, block positions all 0 (`layout="masked_lm"`).

Layout (§3.6): Part A = the chunk with each span replaced by ONE mask token; Part B = for each span in Part B
order `sop + span`, targets `span + eop`; targets are already aligned (targets[i] is the label at input i, no
shift); loss mask 0 on A, 1 on B; position_ids = index in A (B tokens: their span's mask index);
block_position_ids = 0 on A, 1..len+1 on each B segment; sep = len(A). Mask token: [MASK] unless
`task_mask=True`, then bert [MASK], sentence [sMASK], gpt [gMASK] (the official --task-mask).

Output length: n + 2 * len(spans) for bert, sentence and gpt_single_span; n + 1 for gpt_suffix; n for
masked_lm. `sep` = n - sum(span lengths) + len(spans) for the block layouts, n - G + 1 for gpt_suffix.

Ablations (paper Table 6): `shuffle_spans=False` keeps Part B in text order (--no-shuffle-block);
`block_position_encoding=False` (--no-block-position) sets every Part B block position to 1 and Part A to 0,
in both gpt layouts too (spec §14.11: the official suffix path builds that row one element too long — a bug
we do not copy; our row always has the sample's length); `masked_lm=True` as above.

Official recipe knobs (spec §3.2, §3.6; all 0 = off by default, and then not a single extra draw is made, so
the samples are the same bytes as without them). Each is drawn from the sample's own Generator, where the
official code uses python's global `random` (block mask) or the batch RNG (the others):

* `single_span_prob` (--single-span-prob): with this probability, drawn first, the sample becomes a "bert"
  sample with ONE span of Poisson length (whatever `objective` was asked for: the official code forces the
  whole batch into bert mode). The returned `objective` and `single_span` say what was made.
* `block_mask_prob` (--block-mask-prob), bert layout only: every Part B *input* span token (never sop) becomes
  [dBLOCK] with this probability, independently; targets unchanged.
* `context_mask_ratio` (--context-mask-ratio), bert layout only: int(ratio * n) distinct Part A inputs within
  `context_mask_range` (3) tokens of a span's mask (the official candidate set, `_context_mask`) become [dBLOCK];
  targets unchanged, so `reconstruct` (which reads Part A from the targets) still recovers the chunk.
  The sentence, gpt and masked-LM layouts apply neither mask (task != 'bert' in the official code).
Both masks need `specials.dblock`; without it make_sample raises a ValueError naming the fix.
`short_seq_prob` (§3.7) splits chunks, so it lives in the packer (`pipeline/build.py`, `Packer._split_short`).

Dtypes: those of the shard columns (`pipeline.shards.ARRAY_COLUMNS`); sep a python int.

Speed: the default configuration (a PCG64 Generator, no masked_lm / single-span / block or context mask /
explicit loss_mask) runs in ONE compiled call per sample (`pipeline/_infill_kernels.py`, numba): the same draws
from the same stream as the numpy code below, so the same bytes and the Generator left in the same state
(tests/test_infilling.py::test_kernel_equals_numpy_path_sample_for_sample). Everything else, and every chunk the
kernel cannot place, takes the numpy path, which stays the reference; GLM_INFILL_KERNEL=0 forces it.
`sample_length(...)` gives the length a sample would have (n + 2 * #spans, ...) from its drawn spans alone,
without building it or advancing the Generator: the packer fits chunk lengths with it and makes one sample.
`benchmarks/infilling.py` times make_sample against the official ConstructBlockStrategy (`--official DIR`) and
against sentencepiece encoding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from pipeline import _infill_kernels as _K
from pipeline.shards import ARRAY_COLUMNS
from pipeline.tokenizer import Specials

OBJECTIVES = ("bert", "sentence", "gpt")
LAYOUTS = ("bert", "sentence", "gpt_suffix", "gpt_single_span", "masked_lm")  # a sample's "layout" (shard column)
# Shortest chunk each objective accepts: bert needs int(0.15 n) >= 1 masked token (n >= 7, at the default
# ratio); the others need [CLS] + a few tokens so that G in [int(n/2), n-2] and a sentence exist.
MIN_CHUNK_LEN = {"bert": 7, "sentence": 4, "gpt": 4}
ID_DTYPE = ARRAY_COLUMNS["input_ids"]      # the token columns' dtype (the shard schema's)
LOSS_DTYPE = ARRAY_COLUMNS["loss_mask"]
_I32 = np.dtype(np.int32)


class SpanPlacementError(ValueError):
    """The drawn spans cannot all be placed in this chunk's documents (the official code drops the sample).

    Raised by bert / masked_lm sampling (and by sentence sampling when the chunk holds no sentence). The caller
    should count it and skip the chunk or draw again with the next seed; `spans_drawn` and `spans_placed`
    say how far placement got."""

    def __init__(self, message: str, spans_drawn: int = 0, spans_placed: int = 0):
        super().__init__(message)
        self.spans_drawn = spans_drawn
        self.spans_placed = spans_placed


class ChunkTooShortError(ValueError):
    """The chunk has fewer tokens than the objective needs (`MIN_CHUNK_LEN`)."""


# --------------------------------------------------------------------------------------------------------------
# span-length distribution (§3.3): Poisson(lam) restricted to 1..max_block_length-1 and renormalised


def span_length_pmf(avg_block_length: float = 3.0, max_block_length: int = 40) -> np.ndarray:
    """pmf[k-1] = P(length = k), k = 1..max_block_length-1: Poisson(avg_block_length) truncated and renormalised
    (the official `block_length_distribution`, which `random.choices` renormalises)."""
    return _pmf_and_cdf(avg_block_length, max_block_length)[0]


@functools.cache
def _cdf_and_table(lam: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The length cdf and the compiled length draw's lookup table (pipeline/_infill_kernels.length_table)."""
    cdf = _pmf_and_cdf(lam, max_len)[1]
    return cdf, _K.length_table(cdf)


@functools.cache
def _pmf_and_cdf(lam: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if lam <= 0 or max_len < 2:
        raise ValueError(f"avg_block_length={lam}, max_block_length={max_len}: need lam > 0 and max >= 2")
    k = np.arange(1, max_len)
    logp = k * math.log(lam) - lam - np.array([math.lgamma(x + 1) for x in k])
    pmf = np.exp(logp - logp.max())
    pmf /= pmf.sum()
    cdf = np.cumsum(pmf)
    cdf[-1] = 1.0
    return pmf, cdf


def draw_span_lengths(rng: np.random.Generator, target: int, avg_block_length: float = 3.0,
                      max_block_length: int = 40) -> np.ndarray:
    """Draw lengths until their sum reaches `target` (the official `while masked_count < int(0.15 n)` loop)."""
    if target <= 0:
        return np.zeros(0, dtype=np.int64)
    _, cdf = _pmf_and_cdf(avg_block_length, max_block_length)
    out: list[np.ndarray] = []
    total = 0
    while True:
        # draw a batch sized for the expected need (mean ≈ lam) plus slack; extend in the rare short case
        m = int(target / max(avg_block_length, 1.0) * 1.25) + 8
        lengths = cdf.searchsorted(rng.random(m), side="right")
        lengths += 1
        csum = lengths.cumsum()
        if total:
            csum += total
        hit = int(csum.searchsorted(target, side="left"))
        if hit < m:
            out.append(lengths[: hit + 1])
            break
        out.append(lengths)
        total = int(csum[-1])
    return out[0] if len(out) == 1 else np.concatenate(out)


# --------------------------------------------------------------------------------------------------------------
# span placement (§3.3 sample_spans / sample_span_in_document)


def sample_spans(lengths: np.ndarray, total: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
    """Place spans of `lengths` (in this order, left to right) inside [offset, offset+total) with >= 1 free token
    between consecutive spans, uniformly as the official code does: k sorted draws from 0..m with replacement,
    m = total - sum - k + 1. Returns starts (int64 array)."""
    k = len(lengths)
    c1 = (lengths + 1).cumsum()                    # c1[i] = sum(lengths[:i+1]) + i + 1
    places = rng.integers(0, total - int(c1[-1]) + 2 if k else total + 2, size=k)
    places.sort()
    # start_i = offset + place_i + sum(lengths[:i]) + i = offset + place_i + c1[i] - lengths[i] - 1
    return places + (c1 - lengths + (offset - 1))


def document_regions(tokens: np.ndarray, specials: Specials) -> list[tuple[int, int]]:
    """(offset, length) of every document's maskable region, in the official order (last document first):
    a region starts after the document's [CLS] and ends before its eos; the chunk's last region also excludes
    the chunk's final token. Regions may have length 0 (e.g. the empty tail after a final eos)."""
    n = len(tokens)
    eos_idx = (np.asarray(tokens) == specials.eos).nonzero()[0].tolist()
    indices = [-1] + eos_idx
    last = n
    regions = []
    for index in reversed(indices):
        start = index
        if start + 1 < n and tokens[start + 1] == specials.cls:
            start += 1
        length = last - start - 1
        if last == n and length > 0:
            length -= 1
        regions.append((start + 1, length))
        last = index
    return regions


_EMPTY = np.zeros(0, dtype=np.int64)


def _place_in_documents(t: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, specials: Specials,
                        bert_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The official placement (`sample_span_in_document`): shuffle the lengths; sort documents by region length
    (stable, as python's sort); every document but the longest takes lengths in order while their sum <=
    int(len * bert_ratio); the longest takes the rest while sum + count <= len. Returns (starts, lengths) of the
    placed spans sorted by start; fewer spans than lengths means the sample could not be placed (the caller
    raises)."""
    k_all = len(lengths)
    if k_all > 1:
        lengths = lengths[rng.permutation(k_all)]
    n = len(t)
    eos_at = (t == specials.eos).nonzero()[0]
    if len(eos_at) == 0 or (len(eos_at) == 1 and eos_at[0] == n - 1):
        # one document (the common case at n=512): its region is [1, n-1); same rule as the loop below
        c1 = (lengths + 1).cumsum()                # sum + count of the first i+1 lengths
        k = int(c1.searchsorted(n - 2, side="right"))
        if k == 0:
            return _EMPTY, _EMPTY
        ln = lengths[:k]
        places = rng.integers(0, n - int(c1[k - 1]), size=k)   # sample_spans(ln, n-2, rng, offset=1), inlined
        places.sort()
        return places + (c1[:k] - ln), ln
    regions = sorted(document_regions(t, specials), key=lambda r: r[1])
    starts: list[np.ndarray] = []
    used: list[np.ndarray] = []
    i = 0
    csum = np.concatenate(([0], lengths.cumsum()))  # csum[j] = sum(lengths[:j])
    for r, (offset, length) in enumerate(regions):
        if i >= k_all:
            break
        if r == len(regions) - 1:
            # take lengths[i:j] while sum + count <= length
            fits = (csum[i + 1:] - csum[i]) + np.arange(1, k_all - i + 1) <= length
        else:
            fits = (csum[i + 1:] - csum[i]) <= int(length * bert_ratio)
        # the official loop stops at the first length that does not fit (no skipping)
        c = int(np.argmin(fits)) if not fits.all() else len(fits)
        if c > 0:
            chunk = lengths[i:i + c]
            starts.append(sample_spans(chunk, length, rng, offset=offset))
            used.append(chunk)
            i += c
    if not starts:
        return _EMPTY, _EMPTY
    s = np.concatenate(starts)
    order = s.argsort(kind="stable")
    return s[order], np.concatenate(used)[order]


@functools.cache
def _boundary_lut(eos: int, sentence_end_ids: frozenset) -> np.ndarray:
    """Token id -> boundary class: 1 ends a sentence, 2 eos (that is not a sentence end), 0 anything else."""
    lut = np.zeros(max([eos, *sentence_end_ids]) + 2, dtype=np.int8)  # last entry: "other"
    lut[eos] = 2
    lut[list(sentence_end_ids)] = 1
    return lut


def sentence_spans(tokens: np.ndarray, specials: Specials, mask_cls: bool = True) -> list[tuple[int, int]]:
    """Sentences of the chunk in text order (§3.4): a token in `specials.sentence_end_ids` ends one (inclusive);
    an eos closes the current region without forming a sentence; the trailing remainder is a sentence. Scanning
    starts after the leading [CLS]; after an eos the official code restarts at the next token, which is the
    next document's [CLS] (`mask_cls=True`, official) — `mask_cls=False` restarts after that [CLS]."""
    s, e = _sentence_bounds(np.asarray(tokens), specials, mask_cls)
    return list(zip(s.tolist(), e.tolist()))


def _sentence_bounds(t: np.ndarray, specials: Specials, mask_cls: bool) -> tuple[np.ndarray, np.ndarray]:
    """sentence_spans as (starts, ends) arrays, vectorised over the boundary tokens (ids are >= 0)."""
    n = len(t)
    lut = _boundary_lut(specials.eos, specials.sentence_end_ids)
    kind = lut.take(t, mode="clip")                       # ids above the table map to its last entry, 0
    b = kind.nonzero()[0]
    starts = np.empty(len(b) + 1, dtype=np.int64)         # sentence j would run [starts[j], b[j] + 1)
    starts[0] = 1 if n and t[0] == specials.cls else 0
    starts[1:] = b + 1
    kb = kind[b]
    if not mask_cls:                                      # after an eos, skip the next document's [CLS]
        after = starts[1:]
        w = ((kb == 2) & (after < n)).nonzero()[0]
        after[w[t[after[w]] == specials.cls]] += 1
    ends = np.empty(len(b) + 1, dtype=np.int64)
    ends[:-1] = b + 1
    ends[-1] = n
    take = np.empty(len(b) + 1, dtype=bool)               # a sentence end emits a non-empty sentence; the
    take[:-1] = kb == 1                                   # trailing remainder is one if non-empty
    take[-1] = True
    take &= starts < ends
    return starts[take], ends[take]


# --------------------------------------------------------------------------------------------------------------
# deterministic layouts (§3.6, §3.5 suffix, §3.8)


def mask_token_id(objective: str, specials: Specials, task_mask: bool) -> int:
    """The official task_mask rule: False -> always [MASK]; True -> bert [MASK], sentence [sMASK], gpt [gMASK]."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: choose one of {OBJECTIVES}")
    if not task_mask or objective == "bert":
        return specials.mask
    return specials.smask if objective == "sentence" else specials.gmask


def _as_tokens(tokens, specials: Specials) -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim != 1 or t.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a 1-D integer array (one chunk), got shape {t.shape} dtype {t.dtype}")
    if len(t) == 0 or int(t[0]) != specials.cls:
        first = int(t[0]) if len(t) else None
        raise ValueError(f"a chunk must start with [CLS] (id {specials.cls}), got first token {first}; build "
                         "chunks with the packer ([CLS] doc eos [CLS] doc ...)")
    return t


def _checked_chunk(tokens, objective: str, specials: Specials, bert_ratio: float, loss_mask) -> np.ndarray:
    """The chunk as an array, refused when it is not one, is too short for the objective or its loss_mask does
    not match it."""
    t = _as_tokens(tokens, specials)
    n = len(t)
    if n < 64 or objective == "bert" and int(bert_ratio * n) < 1:   # (no chunk of 64+ tokens is too short)
        need = MIN_CHUNK_LEN[objective] if objective != "bert" else max(4, math.ceil(1.0 / bert_ratio - 1e-9))
        if objective == "bert" and int(bert_ratio * n) < 1 or n < need:
            raise ChunkTooShortError(f"chunk of {n} tokens is too short for objective {objective!r} (needs >= "
                                     f"{need}); pack longer chunks or skip this one")
    if loss_mask is not None and len(loss_mask) != n:
        raise ValueError(f"loss_mask has {len(loss_mask)} entries for {n} tokens; pass one value per token")
    return t


def source_loss_mask(tokens: np.ndarray, specials: Specials) -> np.ndarray:
    """The dataset loss mask of a packed chunk (§2): 0 at every [CLS], 1 elsewhere (eos included)."""
    return (np.asarray(tokens) != specials.cls).astype(LOSS_DTYPE)


def make_block_data(tokens, spans: Sequence[tuple[int, int]], specials: Specials, task: str = "bert", *,
                    task_mask: bool = False, block_position_encoding: bool = True) -> dict:
    """The §3.6 layout from spans given in Part B order (source coordinates [start, end)).

    Returns input_ids, targets, loss_mask, position_ids, block_position_ids, sep, spans (as given, Part B
    order). Spans may touch (sentence mode) but not overlap, must lie inside the chunk and contain no eos."""
    t = np.asarray(tokens)
    n = len(t)
    sp = np.asarray(spans, dtype=np.int64).reshape(len(spans), 2)
    sb, eb = sp[:, 0], sp[:, 1]
    k = len(sp)
    idx = sb.argsort(kind="stable")
    s, e = sb[idx], eb[idx]
    if k and ((e - s).min() < 1 or s[0] < 0 or e[-1] > n or (s[1:] < e[:-1]).any()):
        raise ValueError(f"spans {list(zip(sb.tolist(), eb.tolist()))} must be non-empty, non-overlapping and "
                         f"inside [0, {n})")
    if k:
        d = np.zeros(n + 1, dtype=np.int32)
        d[s] = 1
        d[e] -= 1
        if (t[d[:n].cumsum() > 0] == specials.eos).any():
            raise ValueError(f"a span in {list(zip(sb.tolist(), eb.tolist()))} contains eos (id {specials.eos}); "
                             "spans never cross documents")
    order = np.empty(k, dtype=np.int64)                   # Part B order as indices into the sorted spans
    order[idx] = np.arange(k)
    mask_id = mask_token_id(task, specials, task_mask)
    return _layout(t, s, e - s, order, specials, mask_id, block_position_encoding)


def _layout(t: np.ndarray, s: np.ndarray, ln: np.ndarray, order: np.ndarray | None, specials: Specials,
            mask_id: int, block_position_encoding: bool) -> dict:
    """The §3.6 layout, the hot path: spans as starts `s` (sorted) and lengths `ln`, Part B order `order`
    (indices into s; None = text order). ~25 numpy calls on preallocated outputs, no per-token python; spans
    are trusted (make_sample builds them inside document regions or sentences; make_block_data validates)."""
    n = len(t)
    k = len(s)
    if k == 0:
        return _sample_dict(t, t, np.zeros(n, LOSS_DTYPE), np.arange(n), np.zeros(n, ID_DTYPE), n, [])
    lm1 = ln - 1
    removed = lm1.cumsum()                                # tokens removed from Part A up to each span's end
    sep = n - int(removed[-1])
    mpos = s - removed + lm1                              # §3.6 pos[s]: each span's mask index in Part A
    nb = n + 2 * k - sep
    total = sep + nb
    # Part A: a_src[j] = j + (tokens removed before Part A index j); each span removes lm1 after its mask
    shift = np.zeros(sep + 1, dtype=np.int64)
    shift[mpos + 1] = lm1
    a_src = shift[:sep].cumsum()
    a_src += np.arange(sep)
    inp = np.empty(total, dtype=ID_DTYPE)
    inp[:sep] = t[a_src]
    inp[mpos] = mask_id
    tgt = np.empty(total, dtype=ID_DTYPE)
    tgt[:sep] = inp[:sep]
    # Part B: segment j = [sop] + t[sb[j]:sb[j]+lb[j]], targets t[sb[j]:...] + [eop]
    if order is not None:
        sb, lb, mb = s[order], ln[order], mpos[order]
    else:
        sb, lb, mb = s, ln, mpos
    seg = lb + 1
    seg_end = seg.cumsum()
    seg_start = seg_end - seg
    within = np.arange(nb) - seg_start.repeat(seg)        # 0 at sop .. len at the last span token
    b_src = within + (sb - 1).repeat(seg)                 # source index of each Part B input (sop: start-1)
    inp[sep:] = t[b_src]
    inp[sep + seg_start] = specials.sop
    tgt[sep:total - 1] = inp[sep + 1:]                    # targets are the inputs shifted by one inside B ...
    tgt[sep - 1 + seg_end] = specials.eop                 # ... and eop closes every segment
    loss = np.zeros(total, dtype=LOSS_DTYPE)
    loss[sep:] = 1
    position = np.empty(total, dtype=ID_DTYPE)
    position[:sep] = np.arange(sep)
    position[sep:] = mb.repeat(seg)
    block = np.zeros(total, dtype=ID_DTYPE)
    if block_position_encoding:
        within += 1
        block[sep:] = within
    else:
        block[sep:] = 1
    return {"input_ids": inp, "targets": tgt, "loss_mask": loss, "position_ids": position,
            "block_position_ids": block, "sep": sep, "spans": list(zip(sb.tolist(), (sb + lb).tolist()))}


def make_gpt_suffix_data(tokens, generation_length: int, specials: Specials, *, task_mask: bool = False,
                         loss_mask=None, block_position_encoding: bool = True) -> dict:
    """The §3.5 suffix / prefix-LM layout: the last `generation_length` tokens become one span, no eop.

    input  = src + [gMASK|MASK] + [sop] + tgt[:-1];  targets = src + [gMASK|MASK] + tgt
    loss   = 0 on src and the mask, then the source loss mask of tgt (`loss_mask`, default 0 at [CLS], 1 else)
    pos    = 0..len(src) on src+mask, then len(src) repeated; block pos = 0 on src+mask, then 1..G
    sep    = len(src) + 1."""
    t = np.asarray(tokens)
    n = len(t)
    g = int(generation_length)
    if not 1 <= g <= n - 1:
        raise ValueError(f"generation_length={g} must be in [1, {n - 1}] for a chunk of {n} tokens")
    if loss_mask is not None and len(loss_mask) != n:
        raise ValueError(f"loss_mask has {len(loss_mask)} entries for {n} tokens; pass one value per chunk token")
    div = n - g
    mask_id = mask_token_id("gpt", specials, task_mask)
    inp = np.empty(n + 1, dtype=ID_DTYPE)
    inp[:div] = t[:div]
    inp[div] = mask_id
    inp[div + 1] = specials.sop
    inp[div + 2:] = t[div:n - 1]
    tgt = np.empty(n + 1, dtype=ID_DTYPE)
    tgt[:div] = t[:div]
    tgt[div] = mask_id
    tgt[div + 1:] = t[div:]
    loss = np.zeros(n + 1, dtype=LOSS_DTYPE)
    if loss_mask is None:
        np.not_equal(t[div:], specials.cls, out=loss[div + 1:])   # source_loss_mask of the suffix
    else:
        loss[div + 1:] = np.asarray(loss_mask)[div:]
    pos = np.arange(n + 1, dtype=ID_DTYPE)
    pos[div + 1:] = div
    blk = np.zeros(n + 1, dtype=ID_DTYPE)
    blk[div + 1:] = np.arange(1, g + 1) if block_position_encoding else 1
    return {"input_ids": inp, "targets": tgt, "loss_mask": loss, "position_ids": pos,
            "block_position_ids": blk, "sep": div + 1, "spans": [(div, n)]}


def make_masked_lm_data(tokens, spans: Sequence[tuple[int, int]], specials: Specials, *, loss_mask=None) -> dict:
    """§3.8 masked-LM baseline: span tokens replaced in place by [MASK]; sep = n (fully bidirectional);
    targets = the chunk; loss = source loss mask on masked tokens; position 0..n-1, block positions 0."""
    t = np.asarray(tokens)
    n = len(t)
    lm = source_loss_mask(t, specials) if loss_mask is None else np.asarray(loss_mask)
    dd = np.zeros(n + 1, dtype=np.int64)
    if spans:
        sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        np.add.at(dd, sp[:, 0], 1)
        np.add.at(dd, sp[:, 1], -1)
    masked = np.cumsum(dd[:n]) > 0
    inp = np.where(masked, specials.mask, t)
    return _sample_dict(inp, t.copy(), (lm.astype(LOSS_DTYPE) * masked), np.arange(n), np.zeros(n, np.int64), n,
                 [tuple(x) for x in sorted(map(tuple, spans))])


def _sample_dict(inp, tgt, loss, pos, blk, sep, spans) -> dict:
    """A sample: the five token arrays in the shard columns' dtypes, sep and spans."""
    arrays = {"input_ids": inp, "targets": tgt, "loss_mask": loss, "position_ids": pos, "block_position_ids": blk}
    return {**{c: np.ascontiguousarray(a, dtype=ARRAY_COLUMNS[c]) for c, a in arrays.items()},
            "sep": int(sep), "spans": spans}


# --------------------------------------------------------------------------------------------------------------
# the public entry point


def make_sample(tokens, objective: str, rng: np.random.Generator, *, specials: Specials,
                task_mask: bool = False, loss_mask=None, masked_lm: bool = False, shuffle_spans: bool = True,
                block_position_encoding: bool = True, bert_ratio: float = 0.15, sentence_ratio: float = 0.15,
                avg_block_length: float = 3.0, max_block_length: int = 40, gpt_infill_prob: float = 0.5,
                gpt_min_ratio: float = 0.5, sentence_mask_cls: bool = True, single_span_prob: float = 0.0,
                block_mask_prob: float = 0.0, context_mask_ratio: float = 0.0, context_mask_range: int = 3,
                _length_only: bool = False) -> dict:
    """One GLM training sample from one chunk (module docstring has the rules).

    tokens: 1-D int array, `[CLS] doc eos [CLS] doc ...`. objective: "bert" | "sentence" | "gpt".
    rng: a `numpy.random.Generator` (e.g. `np.random.default_rng(seed)`); it is advanced.
    specials: the tokenizer's `Specials` (ids and sentence-end ids). loss_mask: the source loss mask (only the
    gpt suffix and masked-LM layouts read it; default 0 at [CLS], 1 elsewhere).
    single_span_prob, block_mask_prob, context_mask_ratio, context_mask_range: the official corruption knobs
    (module docstring, "Official recipe knobs"); at 0 (default) nothing is drawn for them.
    Returns input_ids, targets, loss_mask, position_ids, block_position_ids (arrays), sep (int), spans (list of
    (start, end) in source coordinates, Part B order), layout (the shard column of that name), objective (the
    one used: "bert" when single_span_prob turned the sample into a single-span one) and single_span (bool).
    Raises ChunkTooShortError, SpanPlacementError (both ValueError) and ValueError for bad options."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng={rng!r}: pass a numpy.random.Generator, e.g. np.random.default_rng(seed); "
                         "global or legacy RandomState generators are not accepted")
    if not isinstance(specials, Specials):
        raise ValueError(f"specials={specials!r}: pass the tokenizer's Specials record (tokenizer.specials)")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: choose one of {OBJECTIVES}")
    if single_span_prob or block_mask_prob or context_mask_ratio:   # all 0 (off) is valid: skip the checks
        for name, p in (("single_span_prob", single_span_prob), ("block_mask_prob", block_mask_prob),
                        ("context_mask_ratio", context_mask_ratio)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p}: must be a probability in [0, 1] (0 = off, the default)")
        if (block_mask_prob > 0 or context_mask_ratio > 0) and specials.dblock is None:
            raise ValueError(f"block_mask_prob={block_mask_prob}, context_mask_ratio={context_mask_ratio} need a "
                             "[dBLOCK] token, and this vocabulary has none (a tokenizer trained before [dBLOCK] "
                             "existed): retrain it with `python jobs/train_tokenizer.py`, or set both knobs to 0")
    if _length_only:                        # sample_length: from the drawn spans, the Generator not advanced
        if (_K.AVAILABLE and not (masked_lm or single_span_prob) and loss_mask is None
                and type(rng.bit_generator) is np.random.PCG64):
            t = _checked_chunk(tokens, objective, specials, bert_ratio, None)
            with rng.bit_generator.lock:    # (the block and context masks never change the length)
                length = _kernel_length(t, objective, rng, specials, shuffle_spans, bert_ratio, sentence_ratio,
                                        avg_block_length, max_block_length, gpt_infill_prob, gpt_min_ratio,
                                        sentence_mask_cls)
            if length is not None:
                return length
        copy = np.random.Generator(type(rng.bit_generator)())   # the numpy path, on a copy of the Generator
        copy.bit_generator.state = rng.bit_generator.state
        return len(make_sample(
            tokens, objective, copy, specials=specials, task_mask=task_mask, loss_mask=loss_mask,
            masked_lm=masked_lm, shuffle_spans=shuffle_spans, block_position_encoding=block_position_encoding,
            bert_ratio=bert_ratio, sentence_ratio=sentence_ratio, avg_block_length=avg_block_length,
            max_block_length=max_block_length, gpt_infill_prob=gpt_infill_prob, gpt_min_ratio=gpt_min_ratio,
            sentence_mask_cls=sentence_mask_cls, single_span_prob=single_span_prob, block_mask_prob=block_mask_prob,
            context_mask_ratio=context_mask_ratio, context_mask_range=context_mask_range)["input_ids"])
    # single span (§3.2): the official construct_blocks turns the whole batch into bert mode with ONE span of
    # Poisson length; here it is drawn per sample, first, so the other draws are unchanged when it is off.
    single_span = single_span_prob > 0 and rng.random() < single_span_prob
    if single_span:
        objective = "bert"
    if (type(tokens) is np.ndarray and tokens.dtype is _I32 and tokens.ndim == 1 and tokens.shape[0] >= 64
            and loss_mask is None and tokens[0] == specials.cls and int(bert_ratio * tokens.shape[0]) >= 1):
        t = tokens                          # a packer's chunk: every check of _checked_chunk holds
    else:
        t = _checked_chunk(tokens, objective, specials, bert_ratio, loss_mask)
    n = len(t)

    if (_K.AVAILABLE and not (masked_lm or single_span or block_mask_prob or context_mask_ratio)
            and loss_mask is None and type(rng.bit_generator) is np.random.PCG64):
        with rng.bit_generator.lock:          # the kernels read and write the state as numpy's methods do
            # (they draw on a copy of the state and write the advanced state back when the sample is made)
            out = _kernel_sample(t, objective, rng, specials, task_mask, shuffle_spans, block_position_encoding,
                                 bert_ratio, sentence_ratio, avg_block_length, max_block_length, gpt_infill_prob,
                                 gpt_min_ratio, sentence_mask_cls)
            if out is not None:
                return out
        # not placeable: the numpy path below makes the same draws and raises its error

    if objective == "bert":
        if single_span:
            cdf = _pmf_and_cdf(avg_block_length, max_block_length)[1]
            lengths = np.array([int(cdf.searchsorted(rng.random(), side="right")) + 1])
        else:
            lengths = draw_span_lengths(rng, int(bert_ratio * n), avg_block_length, max_block_length)
        s, ln = _place_in_documents(t, lengths, rng, specials, bert_ratio)
        if len(s) < len(lengths):
            raise SpanPlacementError(
                f"placed {len(s)} of {len(lengths)} spans (lengths {lengths.tolist()}) in a chunk of {n} "
                "tokens; the official code drops such a sample: count it and skip, or draw with the next seed",
                spans_drawn=len(lengths), spans_placed=len(s))
        if masked_lm:   # the official masked-LM path applies neither block nor context masks
            out = make_masked_lm_data(t, list(zip(s.tolist(), (s + ln).tolist())), specials, loss_mask=loss_mask)
            out.update(layout="masked_lm", objective="bert", single_span=single_span)
            return out
        layout = "bert"
    elif objective == "sentence":
        if masked_lm:
            raise ValueError("masked_lm=True is the bert-span baseline (§3.8); use objective='bert'")
        ss, se = _sentence_bounds(t, specials, sentence_mask_cls)
        if not len(ss):
            raise SpanPlacementError(f"chunk of {n} tokens has no sentence to mask: text before an eos only forms a "
                                     "sentence when it ends with a sentence-end token (official rule); skip it")
        perm = rng.permutation(len(ss))
        # take sentences in shuffled order until >= int(ratio n) tokens are taken (the last one included)
        c = int((se - ss)[perm].cumsum().searchsorted(int(sentence_ratio * n), side="left")) + 1
        pick = np.sort(perm[:c])
        s = ss[pick]
        ln = se[pick] - s
        layout = "sentence"
    else:
        if masked_lm:
            raise ValueError("masked_lm=True is the bert-span baseline (§3.8); use objective='bert'")
        lo = int(gpt_min_ratio * n)
        if lo > n - 2:
            raise ValueError(f"gpt_min_ratio={gpt_min_ratio} gives a minimum span {lo} > n-2={n - 2}; use <= 0.5")
        g = int(rng.integers(lo, n - 1))                 # U{lo .. n-2}, inclusive (official randint)
        eos_idx = (t == specials.eos).nonzero()[0]
        multi_doc = len(eos_idx) > 0 and eos_idx[0] != n - 1
        if multi_doc or rng.random() < gpt_infill_prob:
            out = make_gpt_suffix_data(t, g, specials, task_mask=task_mask, loss_mask=loss_mask,
                                       block_position_encoding=block_position_encoding)
            out.update(layout="gpt_suffix", objective="gpt", single_span=False)
            return out
        # one document (no eos before the last token): its region, the longest, is [1, n-1)
        g = min(g, n - 3)                                # the official code crashes at g = n-2; we shorten it
        start = 1 + int(rng.integers(0, n - 1 - g, size=1)[0])     # sample_spans([g], n-2, rng, offset=1)
        s = np.array([start])
        ln = np.array([g])
        layout = "gpt_single_span"

    order = rng.permutation(len(s)) if len(s) > 1 and shuffle_spans else None
    mask_id = mask_token_id(objective, specials, task_mask)
    out = _layout(t, s, ln, order, specials, mask_id, block_position_encoding)
    if layout == "bert" and block_mask_prob > 0:
        _block_mask(out, rng, specials, block_mask_prob)
    if layout == "bert" and context_mask_ratio > 0:
        _context_mask(out, s, ln, n, rng, specials, context_mask_ratio, context_mask_range)
    out.update(layout=layout, objective=objective, single_span=single_span)
    return out


class ChunkSampler:
    """`make_sample` and `sample_length` for many chunks of one objective with the same options (a packer's):
    the same results, the same Generator advance and the same errors as those functions — they answer every
    call the compiled path does not serve (no numba, the official knobs, a chunk that is not a packer's int32
    chunk of 64+ tokens starting with [CLS], a chunk the kernels cannot place) — without re-reading the options
    on each call (~5 us of a sample's ~15 us of Python)."""

    def __init__(self, objective: str, *, specials: Specials, task_mask: bool = False, shuffle_spans: bool = True,
                 block_position_encoding: bool = True, gpt_infill_prob: float = 0.5, gpt_min_ratio: float = 0.5,
                 single_span_prob: float = 0.0, block_mask_prob: float = 0.0, context_mask_ratio: float = 0.0):
        self.objective, self.specials = objective, specials
        self.options = dict(task_mask=task_mask, shuffle_spans=shuffle_spans,
                            block_position_encoding=block_position_encoding, gpt_infill_prob=gpt_infill_prob,
                            gpt_min_ratio=gpt_min_ratio, single_span_prob=single_span_prob,
                            block_mask_prob=block_mask_prob, context_mask_ratio=context_mask_ratio)
        # the compiled path of make_sample with make_sample's defaults for the options not given here
        self.kernel = (_K.AVAILABLE and objective in OBJECTIVES and isinstance(specials, Specials)
                       and not (single_span_prob or block_mask_prob or context_mask_ratio))
        self.args = (shuffle_spans, 0.15, 0.15, 3.0, 40, gpt_infill_prob, gpt_min_ratio, True)
        self.sample_args = (task_mask, shuffle_spans, block_position_encoding, 0.15, 0.15, 3.0, 40,
                            gpt_infill_prob, gpt_min_ratio, True)
        self.fit_args = self.fill_args = None   # fit()'s kernel arguments, made on its first call

    def _served(self, t, rng) -> bool:
        return (self.kernel and type(t) is np.ndarray and t.dtype is _I32 and t.ndim == 1 and t.shape[0] >= 64
                and t[0] == self.specials.cls and type(rng) is np.random.Generator
                and type(rng.bit_generator) is np.random.PCG64)

    def length(self, tokens, rng: np.random.Generator) -> int:
        """sample_length(tokens, objective, rng, specials=specials, **options)."""
        if self._served(tokens, rng):
            with rng.bit_generator.lock:
                length = _kernel_length(tokens, self.objective, rng, self.specials, *self.args)
            if length is not None:
                return length
        return sample_length(tokens, self.objective, rng, specials=self.specials, **self.options)

    def fit(self, look: np.ndarray, avail: int, n: int, finishing: bool, seq_len: int, slack: int, min_chunk: int,
            min_remnant: int, rng: np.random.Generator) -> tuple[int, int, dict | None] | None:
        """A packer's whole fit (build.Packer._fit: its trial rule, lengths from sample_length, then make_sample
        of the fullest chunk that fits) in one compiled call: look holds the queue's next tokens (every trial
        chunk is a prefix of it), n is the first guess. Returns (trials, chosen length, sample), chosen length 0
        and sample None when no trial fits; None when the compiled path cannot answer every trial the way
        sample_length would (the caller then runs its own loop: nothing was drawn, rng is untouched)."""
        if not (self.kernel and look.dtype is _I32 and look.flags.c_contiguous and look.shape[0] >= 64
                and look[0] == self.specials.cls and type(rng) is np.random.Generator
                and type(rng.bit_generator) is np.random.PCG64 and _K.direct_state()):
            return None
        if self.fit_args is None:   # the options as the kernel's arguments, once
            sp, o = self.specials, self.options
            self.code = code = OBJECTIVES.index(self.objective)
            mask_id = sp.mask if not o["task_mask"] or code == 0 else mask_token_id(self.objective, sp, True)
            self.fit_args = (*_cdf_and_table(3.0, 40), 0.15, 3.0, sp.cls, sp.eos, o["shuffle_spans"],
                             _boundary_lut(sp.eos, sp.sentence_end_ids), 0.15, True, o["gpt_min_ratio"],
                             o["gpt_infill_prob"])
            self.fill_args = (mask_id, sp.sop, sp.eop, o["block_position_encoding"])
        code = self.code
        L = look.shape[0]
        arr = np.empty((4, L + 2 * int(0.15 * L) + 2), ID_DTYPE)   # the longest sample of a prefix of look
        loss = np.empty(arr.shape[1], LOSS_DTYPE)
        work = np.empty(5 * L + 8, np.int64)
        with rng.bit_generator.lock:
            status, trials, best, kg, sep, suffix = _K.fit_sample(
                code, look, avail, n, finishing, seq_len, slack, min_chunk, min_remnant,
                rng.bit_generator.ctypes.state_address, np.empty(6, np.uint64), *self.fit_args, work, arr, loss,
                *self.fill_args)
        if status:
            return None
        if not best:
            return trials, 0, None
        if suffix:
            length, spans, layout = best + 1, [(best - kg, best)], "gpt_suffix"
        else:
            kg = 1 if code == 2 else kg                    # the gpt single-span layout: one span
            length = best + 2 * kg
            pairs = iter(work[3 * kg:5 * kg].tolist())
            spans = list(zip(pairs, pairs))
            layout = "gpt_single_span" if code == 2 else self.objective
        return trials, best, {
            "input_ids": arr[0, :length], "targets": arr[1, :length], "loss_mask": loss[:length],
            "position_ids": arr[2, :length], "block_position_ids": arr[3, :length], "sep": sep, "spans": spans,
            "layout": layout, "objective": self.objective, "single_span": False}

    def sample(self, tokens, rng: np.random.Generator) -> dict:
        """make_sample(tokens, objective, rng, specials=specials, **options)."""
        if self._served(tokens, rng):
            with rng.bit_generator.lock:
                out = _kernel_sample(tokens, self.objective, rng, self.specials, *self.sample_args)
            if out is not None:
                return out
        return make_sample(tokens, self.objective, rng, specials=self.specials, **self.options)


def _as_int32(t: np.ndarray) -> np.ndarray | None:
    """The chunk as contiguous int32 (the one dtype the kernels are compiled for: ids are int32 in the shards);
    None when an id does not fit (the numpy path then decides)."""
    t32 = np.ascontiguousarray(t, dtype=np.int32)
    if t.dtype.itemsize > 2 and t.dtype != _I32 and not np.array_equal(t32, t):
        return None
    return t32


def sample_length(tokens, objective: str, rng: np.random.Generator, *, specials: Specials, **options) -> int:
    """The length of the arrays `make_sample(tokens, objective, rng, specials=specials, **options)` would
    return (n + 2 * #spans; n + 1 for the gpt suffix layout; n for masked_lm), known from the drawn spans before
    any layout is built, WITHOUT advancing `rng`: a packer can try chunk lengths against it and then make the
    one sample it keeps with the same Generator. Raises what make_sample would raise."""
    return make_sample(tokens, objective, rng, specials=specials, _length_only=True, **options)


def _kernel_inputs(t: np.ndarray, rng: np.random.Generator):
    """What a compiled plan/sample call takes besides the options: the chunk as contiguous int32 (None when its ids
    do not fit: the numpy path answers), the Generator's PCG64 state (its address when the kernels can read and
    write it in place, else a copy in `st` and the state dict to put back), and a work array."""
    if t.dtype is not _I32 or not t.flags.c_contiguous:
        t = _as_int32(t)
        if t is None:
            return None
    bg = rng.bit_generator
    st = np.empty(6, np.uint64)
    state = None
    if _K.direct_state():
        addr = bg.ctypes.state_address
    else:
        addr = 0
        st[:], state = _K.get_state(bg)
    return t, addr, st, state, np.empty(5 * len(t) + 8, np.int64)


def _kernel_length(t, objective, rng, specials, shuffle_spans, bert_ratio, sentence_ratio, avg_block_length,
                   max_block_length, gpt_infill_prob, gpt_min_ratio, sentence_mask_cls) -> int | None:
    """The output length of the sample make_sample would make, from the compiled plan alone (the draws and the
    spans; no layout), on a copy of the Generator's state (it is not advanced). None when the numpy path must
    answer (chunk not placeable, bad option)."""
    got = _kernel_inputs(t, rng)
    if got is None:
        return None
    t, addr, st, state, work = got
    n = len(t)
    if objective == "bert":
        target = int(bert_ratio * n)
        status, k = _K.plan_bert(t, addr, st, *_cdf_and_table(avg_block_length, max_block_length), target,
                                 int(target / max(avg_block_length, 1.0) * 1.25) + 8, specials.cls, specials.eos,
                                 shuffle_spans, bert_ratio, work)
    elif objective == "sentence":
        status, k = _K.plan_sentence(t, addr, st, _boundary_lut(specials.eos, specials.sentence_end_ids),
                                     int(sentence_ratio * n), specials.cls, shuffle_spans, sentence_mask_cls, work)
    else:
        lo = int(gpt_min_ratio * n)
        if not 1 <= lo <= n - 2:          # the numpy path raises (or, at lo = 0, handles a G of 0 its own way)
            return None
        suffix, _ = _K.plan_gpt(t, addr, st, lo, gpt_infill_prob, specials.eos, work)
        return n + 1 if suffix else n + 2
    return None if status else n + 2 * k


def _kernel_sample(t, objective, rng, specials, task_mask, shuffle_spans, block_position_encoding, bert_ratio,
                   sentence_ratio, avg_block_length, max_block_length, gpt_infill_prob, gpt_min_ratio,
                   sentence_mask_cls) -> dict | None:
    """make_sample by one compiled call (plan + fill, pipeline/_infill_kernels.py): the numpy path's draws from
    the same PCG64 stream, so the same bytes, and the Generator advanced as the numpy path advances it. None
    when the numpy path must run (chunk not placeable, bad option; the Generator is then untouched)."""
    got = _kernel_inputs(t, rng)
    if got is None:
        return None
    t, addr, st, state, work = got
    n = len(t)
    mask_id = specials.mask if not task_mask or objective == "bert" else mask_token_id(objective, specials, True)
    if objective == "bert":
        target = int(bert_ratio * n)
        arr = np.empty((4, n + 2 * target + 2), ID_DTYPE)
        loss = np.empty(n + 2 * target + 2, LOSS_DTYPE)
        status, k, sep = _K.sample_bert(
            t, addr, st, *_cdf_and_table(avg_block_length, max_block_length), target,
            int(target / max(avg_block_length, 1.0) * 1.25) + 8, specials.cls, specials.eos, shuffle_spans,
            bert_ratio, work, arr, loss, mask_id, specials.sop, specials.eop, block_position_encoding)
        layout = "bert"
    elif objective == "sentence":
        target = int(sentence_ratio * n)
        arr = np.empty((4, n + 2 * target + 2), ID_DTYPE)
        loss = np.empty(n + 2 * target + 2, LOSS_DTYPE)
        status, k, sep = _K.sample_sentence(
            t, addr, st, _boundary_lut(specials.eos, specials.sentence_end_ids), target, specials.cls,
            shuffle_spans, sentence_mask_cls, work, arr, loss, mask_id, specials.sop, specials.eop,
            block_position_encoding)
        layout = "sentence"
    else:
        lo = int(gpt_min_ratio * n)
        if not 1 <= lo <= n - 2:          # the numpy path raises (or, at lo = 0, handles a G of 0 its own way)
            return None
        arr = np.empty((4, n + 2), ID_DTYPE)
        loss = np.empty(n + 2, LOSS_DTYPE)
        suffix, g, sep = _K.sample_gpt(t, addr, st, lo, gpt_infill_prob, specials.eos, specials.cls, work, arr,
                                       loss, mask_id, specials.sop, specials.eop, block_position_encoding)
        status = 0
        if suffix:
            length = n + 1
            spans = [(n - g, n)]
            layout = "gpt_suffix"
        else:
            k = 1
            layout = "gpt_single_span"
    if status:
        return None
    if layout != "gpt_suffix":
        length = n + 2 * k
        pairs = iter(work[3 * k:5 * k].tolist())
        spans = list(zip(pairs, pairs))
    if not addr:
        _K.put_state(rng.bit_generator, st, state)
    return {"input_ids": arr[0, :length], "targets": arr[1, :length], "loss_mask": loss[:length],
            "position_ids": arr[2, :length], "block_position_ids": arr[3, :length], "sep": sep, "spans": spans,
            "layout": layout, "objective": objective, "single_span": False}


def _block_mask(out: dict, rng: np.random.Generator, specials: Specials, p: float) -> None:
    """§3.6 block mask: every Part B input span token (not sop) becomes [dBLOCK] with probability p, one
    independent draw per token as the official loop; the targets keep the true tokens."""
    b = out["input_ids"][out["sep"]:]
    hit = rng.random(len(b)) < p
    hit &= b != specials.sop          # sop never occurs inside a span (a control token no text produces)
    b[hit] = specials.dblock


def _context_mask(out: dict, s: np.ndarray, ln: np.ndarray, n: int, rng: np.random.Generator, specials: Specials,
                  ratio: float, reach: int) -> None:
    """§3.6 context mask, as the official make_block_data builds it: Part A is cut by its mask tokens into
    stretches of kept text; the candidates are the first `reach` tokens of every stretch that does not start
    Part A and the last `reach` tokens of every stretch (so also the chunk's own last tokens, after the last
    span: an official quirk, kept); int(ratio * n) distinct candidates become [dBLOCK] in the inputs (the
    targets of Part A keep the true tokens). Where the official `rng.sample` crashes because there are fewer
    candidates than that, all candidates are taken."""
    sep = out["sep"]
    mpos = s - (ln - 1).cumsum() + (ln - 1)          # mask index of each span in Part A (s sorted)
    starts = np.concatenate(([0], mpos + 1))           # stretch j = [starts[j], ends[j])
    ends = np.concatenate((mpos, [sep]))
    cand = np.zeros(sep, dtype=bool)
    for a, e in zip(starts.tolist(), ends.tolist()):  # (an empty stretch adds nothing, as in the official code)
        if a != 0:
            cand[a:min(e, a + reach)] = True
        cand[max(a, e - reach):e] = True
    idx = cand.nonzero()[0]
    k = min(int(ratio * n), len(idx))
    if k:
        out["input_ids"][rng.choice(idx, size=k, replace=False)] = specials.dblock


def output_length(sample: dict) -> int:
    """Length of a sample's arrays (n + 2 * #spans, n + 1 for gpt_suffix, n for masked_lm)."""
    return len(sample["input_ids"])


def reconstruct(sample: dict, specials: Specials) -> np.ndarray:
    """Recover the original chunk from a sample's arrays alone (the inverse of every layout; for tests and
    `inspect_shards`). Part B segments are cut at their eop targets and placed back at their mask index."""
    tgt, sep = sample["targets"], sample["sep"]
    layout = sample["layout"]
    if layout == "masked_lm":
        return tgt.copy()
    if layout == "gpt_suffix":
        return np.concatenate((tgt[: sep - 1], tgt[sep:]))
    part_a = tgt[:sep]                                    # == the inputs, unless a context mask corrupted them
    b_tgt = tgt[sep:]
    ends = np.flatnonzero(b_tgt == specials.eop)
    starts = np.concatenate(([0], ends[:-1] + 1))
    where = sample["position_ids"][sep + starts]          # each segment's mask index in Part A
    fill = {int(w): b_tgt[s:e] for w, s, e in zip(where, starts, ends)}
    pieces = []
    last = 0
    for w in sorted(fill):
        pieces += [part_a[last:w], fill[w]]
        last = w + 1
    pieces.append(part_a[last:])
    return np.concatenate(pieces)


def pad_batch(samples: Sequence[dict], length: int | None = None, pad_id: int = 0) -> dict:
    """Right-pad samples to one length as the official `pad_batch` (§3.2): every field padded with 0 (ids with
    `pad_id`, which is eos == pad == 0 in the official vocabularies). Returns [B,T] arrays and sep [B]."""
    t = max(output_length(s) for s in samples) if length is None else length
    out = {}
    for key, fill in (("input_ids", pad_id), ("targets", pad_id), ("loss_mask", 0), ("position_ids", 0),
                      ("block_position_ids", 0)):
        dtype = samples[0][key].dtype
        arr = np.full((len(samples), t), fill, dtype=dtype)
        for i, s in enumerate(samples):
            if len(s[key]) > t:
                raise ValueError(f"sample {i} has {len(s[key])} tokens > length={t}; raise length or drop it")
            arr[i, : len(s[key])] = s[key]
        out[key] = arr
    out["sep"] = np.array([s["sep"] for s in samples], dtype=ID_DTYPE)
    return out
