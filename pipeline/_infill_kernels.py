"""Compiled (numba) fast path of `pipeline.infilling.make_sample`: the same samples, byte for byte.

    PYTHONPATH=. .venv/bin/python -m pytest tests/test_infilling.py -q -k kernel     # kernel == numpy path

`make_sample` spends its time in a few dozen numpy and Generator calls per sample (~50 us at n=512). Here one
compiled call per sample draws the random numbers, places the spans and writes the layout. The draws are the
ones the numpy reference path makes, in the same order, from the same stream: the kernel runs numpy's PCG64
(the bit generator of `np.random.default_rng`) on a copy of the Generator's state, with numpy's algorithms for
`random()` (53-bit doubles), `integers()` (Lemire's bounded 32-bit rejection) and `permutation()` (Fisher-Yates
with masked rejection, `random_interval`), and writes the advanced state back. So a sample is the same bytes
whichever path made it, and the Generator is left where the numpy path would leave it
(tests/test_infilling.py::test_kernel_equals_numpy_path_sample_for_sample checks both over thousands of chunks).

Only the default hot path runs here (a PCG64 Generator; no masked_lm, single_span_prob, block or context mask,
explicit loss_mask); `make_sample` sends everything else, and every chunk a kernel cannot place, to the numpy
path, which then raises the same error as before. Compiled functions are cached on disk (`cache=True`, numba's
`__pycache__` beside this file, or NUMBA_CACHE_DIR): the first import in a fresh checkout compiles them once
(`compile_seconds()` says how long); set GLM_INFILL_KERNEL=0 to use the numpy path only. Without numba
installed, `AVAILABLE` is False and the numpy path is used.
"""

from __future__ import annotations

import os
import time

import numpy as np

try:
    import numba
except ImportError:          # the numpy path in pipeline/infilling.py serves alone
    numba = None

AVAILABLE = numba is not None and os.environ.get("GLM_INFILL_KERNEL", "1") != "0"

# status codes of the kernels (besides 0 = done): the numpy path takes over and raises its own error
NO_FIT = 1

_U = np.uint64
_M32 = _U(0xFFFFFFFF)
_MULT_HI = _U(0x2360ED051FC65DA4)      # PCG64's 128-bit LCG multiplier (PCG_DEFAULT_MULTIPLIER_128)
_MULT_LO = _U(0x4385DF649FCCF645)
_S32 = _U(32)
_S11 = _U(11)
_S58 = _U(58)
_S63 = _U(63)
_S64 = _U(64)
_ONE = _U(1)
_ZERO = _U(0)
_TWO53 = 1.0 / 9007199254740992.0
_MASK64 = (1 << 64) - 1


def _njit(fn):
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


# ------------------------------------------------------------------------------------------------ PCG64 stream
# st: uint64[6] = [state_hi, state_lo, inc_hi, inc_lo, has_uint32, uinteger] (numpy's PCG64 state record)


@_njit
def _next64(st):
    hi, lo = st[0], st[1]
    # (hi, lo) * MULT mod 2^128: lo * MULT_LO in full, plus the cross terms in the high word
    a0, a1 = lo & _M32, lo >> _S32
    b0, b1 = _MULT_LO & _M32, _MULT_LO >> _S32
    w0 = a0 * b0
    t = a1 * b0 + (w0 >> _S32)
    w1 = (t & _M32) + a0 * b1
    phi = a1 * b1 + (t >> _S32) + (w1 >> _S32)
    plo = lo * _MULT_LO
    phi = phi + hi * _MULT_LO + lo * _MULT_HI
    nlo = plo + st[3]
    nhi = phi + st[2] + (_ONE if nlo < plo else _ZERO)
    st[0], st[1] = nhi, nlo
    x = nhi ^ nlo                                   # XSL-RR output of the new state
    rot = nhi >> _S58
    return (x >> rot) | (x << ((_S64 - rot) & _S63))


@_njit
def _next32(st):
    if st[4] != _ZERO:
        st[4] = _ZERO
        return st[5]
    nxt = _next64(st)
    st[4] = _ONE
    st[5] = nxt >> _S32
    return nxt & _M32


@_njit
def _next_double(st):
    return float(_next64(st) >> _S11) * _TWO53


@_njit
def _bounded(st, low, high):
    """numpy Generator.integers(low, high) (high exclusive, high - low < 2^32 - 1): Lemire's rejection."""
    rng = _U(high - low - 1)
    if rng == _ZERO:
        return low
    excl = rng + _ONE
    m = _next32(st) * excl
    left = m & _M32
    if left < excl:
        threshold = (_M32 - rng) % excl
        while left < threshold:
            m = _next32(st) * excl
            left = m & _M32
    return low + np.int64(m >> _S32)


@_njit
def _interval(st, mx):
    """numpy's random_interval(max) for max < 2^32: masked rejection on 32-bit draws."""
    if mx == 0:
        return 0
    m = _U(mx)
    mask = m
    mask |= mask >> _U(1)
    mask |= mask >> _U(2)
    mask |= mask >> _U(4)
    mask |= mask >> _U(8)
    mask |= mask >> _U(16)
    mask |= mask >> _S32
    v = _next32(st) & mask
    while v > m:
        v = _next32(st) & mask
    return np.int64(v)


@_njit
def _permutation(st, k):
    """numpy Generator.permutation(k): arange(k) shuffled by Fisher-Yates from the end."""
    p = np.arange(k)
    for i in range(k - 1, 0, -1):
        j = _interval(st, i)
        p[i], p[j] = p[j], p[i]
    return p


# ------------------------------------------------------------------------------------------------------ layout


@_njit
def _layout(t, s, ln, order, mask_id, sop, eop, block_positions):
    """The §3.6 layout (spans `s` sorted, lengths `ln`, Part B order `order`): int32[4, L] (input_ids, targets,
    position_ids, block_position_ids) and uint8[L] loss mask, L = n + 2k; and sep."""
    n = t.shape[0]
    k = s.shape[0]
    removed = 0
    for j in range(k):
        removed += ln[j] - 1
    sep = n - removed
    total = n + 2 * k
    out = np.empty((4, total), np.int32)
    loss = np.zeros(total, np.uint8)
    mpos = np.empty(k, np.int64)
    a = 0                                          # Part A write index
    last = 0                                       # source read index
    for j in range(k):
        for i in range(last, s[j]):
            out[0, a] = t[i]
            a += 1
        mpos[j] = a
        out[0, a] = mask_id
        a += 1
        last = s[j] + ln[j]
    for i in range(last, n):
        out[0, a] = t[i]
        a += 1
    for i in range(sep):
        out[1, i] = out[0, i]
        out[2, i] = i
        out[3, i] = 0
    b = sep
    for jj in range(k):
        j = order[jj]
        st, m = s[j], mpos[j]
        out[0, b] = sop
        for q in range(ln[j] + 1):
            if q > 0:
                out[0, b + q] = t[st + q - 1]
            out[1, b + q] = t[st + q] if q < ln[j] else eop
            out[2, b + q] = m
            out[3, b + q] = q + 1 if block_positions else 1
            loss[b + q] = 1
        b += ln[j] + 1
    return out, loss, sep


@_njit
def _suffix_layout(t, g, mask_id, sop, cls, block_positions):
    """The §3.5 suffix / prefix-LM layout (loss mask from the tokens: 0 at [CLS])."""
    n = t.shape[0]
    div = n - g
    total = n + 1
    out = np.empty((4, total), np.int32)
    loss = np.zeros(total, np.uint8)
    for i in range(div):
        out[0, i] = t[i]
        out[1, i] = t[i]
        out[2, i] = i
        out[3, i] = 0
    out[0, div] = mask_id
    out[1, div] = mask_id
    out[2, div] = div
    out[3, div] = 0
    out[0, div + 1] = sop
    for q in range(g):
        p = div + 1 + q
        if q > 0:
            out[0, p] = t[div + q - 1]
        out[1, p] = t[div + q]
        out[2, p] = div
        out[3, p] = q + 1 if block_positions else 1
        loss[p] = 1 if t[div + q] != cls else 0
    return out, loss, div + 1


@_njit
def _empty_spans():
    return np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------------------ bert


@_njit
def _sample_spans(st, lengths, total, offset):
    """The official sample_spans: k sorted draws from 0..m, m = total - sum - k + 1, then shifted apart."""
    k = lengths.shape[0]
    c1 = np.empty(k, np.int64)
    acc = 0
    for i in range(k):
        acc += lengths[i] + 1
        c1[i] = acc
    high = total - c1[k - 1] + 2
    places = np.empty(k, np.int64)
    for i in range(k):
        places[i] = _bounded(st, 0, high)
    places.sort()
    for i in range(k):
        places[i] += c1[i] - lengths[i] + offset - 1
    return places


@_njit
def bert(t, st, cdf, target, batch, cls, eos, mask_id, sop, eop, shuffle, block_positions, bert_ratio):
    """A bert sample of chunk t (make_sample's numpy path, same draws). Returns (status, arrays, loss, sep,
    starts and lengths in Part B order); status NO_FIT when not every drawn span can be placed."""
    n = t.shape[0]
    # span lengths: batches of `batch` uniforms until the lengths sum to >= target (every batch fully drawn)
    cap = batch
    lengths = np.empty(cap, np.int64)
    k_all = 0
    acc = 0
    hit = False
    nc = cdf.shape[0]
    while not hit:
        for _ in range(batch):
            u = _next_double(st)
            if hit:
                continue
            idx = 0
            while idx < nc and cdf[idx] <= u:
                idx += 1
            if k_all == cap:
                grown = np.empty(2 * cap, np.int64)
                grown[:cap] = lengths
                lengths = grown
                cap *= 2
            lengths[k_all] = idx + 1
            k_all += 1
            acc += idx + 1
            if acc >= target:
                hit = True
    lengths = lengths[:k_all].copy()
    if k_all > 1:
        lengths = lengths[_permutation(st, k_all)]
    # documents: one (no eos before the last token), or regions in the official order
    n_eos = 0
    first_eos = -1
    for i in range(n):
        if t[i] == eos:
            if first_eos < 0:
                first_eos = i
            n_eos += 1
    if n_eos == 0 or (n_eos == 1 and first_eos == n - 1):
        c = 0
        acc = 0
        while c < k_all and acc + lengths[c] + 1 <= n - 2:
            acc += lengths[c] + 1
            c += 1
        if c < k_all:
            return NO_FIT, np.empty((4, 0), np.int32), np.empty(0, np.uint8), 0, _empty_spans(), _empty_spans()
        s = _sample_spans(st, lengths, n - 2, 1)
        ln = lengths
    else:
        # regions (offset, length), last document first, then stably sorted by length
        n_reg = n_eos + 1
        off = np.empty(n_reg, np.int64)
        rlen = np.empty(n_reg, np.int64)
        last = n
        r = 0
        for back in range(n - 1, -2, -1):
            if back >= 0 and t[back] != eos:
                continue
            start = back
            if start + 1 < n and t[start + 1] == cls:
                start += 1
            length = last - start - 1
            if last == n and length > 0:
                length -= 1
            off[r] = start + 1
            rlen[r] = length
            r += 1
            last = back
        for i in range(1, n_reg):                     # insertion sort: stable, as python's sorted
            o, le = off[i], rlen[i]
            j = i - 1
            while j >= 0 and rlen[j] > le:
                off[j + 1] = off[j]
                rlen[j + 1] = rlen[j]
                j -= 1
            off[j + 1] = o
            rlen[j + 1] = le
        s = np.empty(k_all, np.int64)
        ln = np.empty(k_all, np.int64)
        i = 0
        for r in range(n_reg):
            if i >= k_all:
                break
            c = 0
            acc = 0
            if r == n_reg - 1:
                while i + c < k_all and acc + lengths[i + c] + c + 1 <= rlen[r]:
                    acc += lengths[i + c]
                    c += 1
            else:
                cap_r = int(rlen[r] * bert_ratio)
                while i + c < k_all and acc + lengths[i + c] <= cap_r:
                    acc += lengths[i + c]
                    c += 1
            if c > 0:
                part = lengths[i:i + c]
                s[i:i + c] = _sample_spans(st, part, rlen[r], off[r])
                ln[i:i + c] = part
                i += c
        if i < k_all:
            return NO_FIT, np.empty((4, 0), np.int32), np.empty(0, np.uint8), 0, _empty_spans(), _empty_spans()
        srt = np.argsort(s)                            # starts are distinct: any sort is the stable one
        s = s[srt]
        ln = ln[srt]
    k = s.shape[0]
    order = _permutation(st, k) if k > 1 and shuffle else np.arange(k)
    out, loss, sep = _layout(t, s, ln, order, mask_id, sop, eop, block_positions)
    return 0, out, loss, sep, s[order], ln[order]


# -------------------------------------------------------------------------------------------------- sentence


@_njit
def sentence(t, st, lut, target, cls, mask_id, sop, eop, shuffle, block_positions, mask_cls):
    """A sentence sample (make_sample's numpy path, same draws); status NO_FIT when the chunk has no sentence."""
    n = t.shape[0]
    nl = lut.shape[0]
    ss = np.empty(n + 1, np.int64)
    se = np.empty(n + 1, np.int64)
    m = 0
    start = 1 if n > 0 and t[0] == cls else 0
    for i in range(n):
        x = t[i]
        kind = lut[x] if 0 <= x < nl else (lut[nl - 1] if x >= nl else lut[0])
        if kind == 0:
            continue
        if kind == 1 and start < i + 1:
            ss[m] = start
            se[m] = i + 1
            m += 1
        start = i + 1
        if kind == 2 and not mask_cls and start < n and t[start] == cls:
            start += 1
    if start < n:
        ss[m] = start
        se[m] = n
        m += 1
    if m == 0:
        return NO_FIT, np.empty((4, 0), np.int32), np.empty(0, np.uint8), 0, _empty_spans(), _empty_spans()
    perm = _permutation(st, m)
    c = 0
    acc = 0
    while c < m:
        acc += se[perm[c]] - ss[perm[c]]
        c += 1
        if acc >= target:
            break
    pick = np.sort(perm[:c])
    s = ss[pick]
    ln = se[pick] - s
    order = _permutation(st, c) if c > 1 and shuffle else np.arange(c)
    out, loss, sep = _layout(t, s, ln, order, mask_id, sop, eop, block_positions)
    return 0, out, loss, sep, s[order], ln[order]


# ------------------------------------------------------------------------------------------------------- gpt


@_njit
def gpt(t, st, lo, infill_prob, eos, cls, mask_id, sop, eop, block_positions):
    """A gpt sample (make_sample's numpy path, same draws). Returns (status, arrays, loss, sep, starts,
    lengths, suffix) where suffix says which layout was made."""
    n = t.shape[0]
    g = _bounded(st, lo, n - 1)                    # U{lo .. n-2}
    first_eos = -1
    for i in range(n):
        if t[i] == eos:
            first_eos = i
            break
    multi_doc = first_eos >= 0 and first_eos != n - 1
    if multi_doc or _next_double(st) < infill_prob:
        out, loss, sep = _suffix_layout(t, g, mask_id, sop, cls, block_positions)
        s = np.full(1, n - g, np.int64)
        ln = np.full(1, g, np.int64)
        return 0, out, loss, sep, s, ln, True
    g = min(g, n - 3)
    s = np.full(1, 1 + _bounded(st, 0, n - 1 - g), np.int64)
    ln = np.full(1, g, np.int64)
    out, loss, sep = _layout(t, s, ln, np.zeros(1, np.int64), mask_id, sop, eop, block_positions)
    return 0, out, loss, sep, s, ln, False


# -------------------------------------------------------------------------------------------- state transfer

def get_state(bit_generator) -> tuple[np.ndarray, dict]:
    """A PCG64's state as the kernels' uint64[6] record, and numpy's state dict (to write back into)."""
    d = bit_generator.state
    s, inc = d["state"]["state"], d["state"]["inc"]
    st = np.array([s >> 64, s & _MASK64, inc >> 64, inc & _MASK64, d["has_uint32"], d["uinteger"]], dtype=np.uint64)
    return st, d


def put_state(bit_generator, st: np.ndarray, d: dict) -> None:
    """Write the kernels' advanced record back into the PCG64 (numpy's state setter)."""
    hi, lo, _, _, has32, u32 = st.tolist()
    d["state"]["state"] = (hi << 64) | lo
    d["has_uint32"] = has32
    d["uinteger"] = u32
    bit_generator.state = d


_COMPILE_SECONDS: float | None = None


def compile_seconds() -> float:
    """Compile (or load from numba's cache) every kernel once on a tiny chunk; seconds it took (0 when
    unavailable). The build calls it once per worker, so the cost is measured and reported, not hidden."""
    global _COMPILE_SECONDS
    if _COMPILE_SECONDS is None:
        if not AVAILABLE:
            _COMPILE_SECONDS = 0.0
            return 0.0
        t0 = time.perf_counter()
        st = get_state(np.random.PCG64(0))[0]
        cdf = np.linspace(0.5, 1.0, 4)
        lut = np.zeros(12, np.int8)
        for dtype in (np.int32, np.int64):
            t = np.array([2, 20, 21, 22, 23, 10, 0, 2, 24, 25, 26, 27, 28], dtype=dtype)
            bert(t, st, cdf, 1, 9, 2, 0, 3, 6, 7, True, True, 0.15)
            sentence(t, st, lut, 1, 2, 3, 6, 7, True, True, True)
            gpt(t, st, 6, 0.5, 0, 2, 3, 6, 7, True)
        _COMPILE_SECONDS = time.perf_counter() - t0
    return _COMPILE_SECONDS
