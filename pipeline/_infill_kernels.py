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
import sys
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


# -------------------------------------------------------------------------------------------- state transfer
# Two ways to hand the Generator's state to the kernels: numpy's state dict (`get_state` / `put_state`, ~3 us a
# sample) or, where verified, the PCG64 state record itself through numpy's documented ctypes interface
# (`bit_generator.ctypes.state_address`, the route numpy's own "extending via numba" example takes; ~0.3 us):
# struct {pcg64_random_t *rng; int has_uint32; uint32_t uinteger}, rng = {uint128 state; uint128 inc}.
# `direct_state()` checks that layout once against the state dict (read and write) and otherwise keeps the dict.


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


if numba is not None:
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _u64_ptr(typingctx, addr):
        """An integer address as a uint64 pointer."""
        if not isinstance(addr, _types.Integer):
            return None
        sig = _types.CPointer(_types.uint64)(addr)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
        return sig, codegen

    @_njit
    def load_state(addr, st):
        """The PCG64 state record at `addr` (ctypes.state_address) into st (little-endian, 128-bit ints)."""
        p = _u64_ptr(addr)
        q = _u64_ptr(p[0])
        st[0], st[1], st[2], st[3] = q[1], q[0], q[3], q[2]
        w = p[1]
        st[4], st[5] = w & _M32, w >> _S32

    @_njit
    def store_state(addr, st):
        """st back into the PCG64 state record at `addr` (the increment never changes)."""
        p = _u64_ptr(addr)
        q = _u64_ptr(p[0])
        q[1], q[0] = st[0], st[1]
        p[1] = (st[4] & _M32) | (st[5] << _S32)

    @_njit
    def seed_into(addr, words, st):
        """seed_state(words, st), and the whole record (increment too) written into the PCG64 at `addr`."""
        u0, u1 = seed_state(words, st)
        p = _u64_ptr(addr)
        q = _u64_ptr(p[0])
        q[1], q[0], q[3], q[2] = st[0], st[1], st[2], st[3]
        p[1] = _ZERO
        return u0, u1


# ------------------------------------------------------------------------------------------------ seeding
# np.random.default_rng(np.random.SeedSequence(words)) without building either object: numpy's SeedSequence
# pool mixing (bit_generator.pyx mix_entropy, a pool of 4 uint32 words), generate_state(4, uint64), and PCG64's
# seeding from those words (pcg64.c pcg64_set_seed: state = words 0-1, increment = words 2-3, pcg_setseq_128
# srandom), written straight into a PCG64's state record. Building a SeedSequence and a Generator per chunk
# costs ~15 us (np.errstate in generate_state, the Generator's ctypes interface); this is one compiled call.
# `direct_seed()` checks it against numpy once per process; tests/test_build.py checks it over many seeds.

_SS_INIT_A = _U(0x43B0D7E5)
_SS_MULT_A = _U(0x931E8875)
_SS_INIT_B = _U(0x8B51F9DD)
_SS_MULT_B = _U(0x58F38DED)
_SS_MIX_L = _U(0xCA01F9DD)
_SS_MIX_R = _U(0x4973F715)
_S16 = _U(16)


@_njit
def _mix(x, y):
    r = (_SS_MIX_L * x - _SS_MIX_R * y) & _M32
    return r ^ (r >> _S16)


@_njit
def seed_state(words, st):
    """st uint64[6] <- the PCG64 record of default_rng(SeedSequence(words)) (words: uint32 entropy, no spawn key);
    returns SeedSequence(words).generate_state(2, np.uint64) as two ints."""
    pool = np.empty(4, np.uint64)
    h = _SS_INIT_A
    nw = words.shape[0]
    for i in range(4):
        v = _U(words[i]) if i < nw else _ZERO
        v ^= h
        h = (h * _SS_MULT_A) & _M32
        v = (v * h) & _M32
        pool[i] = v ^ (v >> _S16)
    for i_src in range(nw if nw > 4 else 4):
        for i_dst in range(4):
            if i_src < 4:
                if i_src == i_dst:
                    continue
                v = pool[i_src]
            else:
                v = _U(words[i_src])
            v ^= h
            h = (h * _SS_MULT_A) & _M32
            v = (v * h) & _M32
            pool[i_dst] = _mix(pool[i_dst], v ^ (v >> _S16))
    h = _SS_INIT_B
    out = np.empty(4, np.uint64)
    for i in range(8):
        v = pool[i % 4] ^ h
        h = (h * _SS_MULT_B) & _M32
        v = (v * h) & _M32
        v ^= v >> _S16
        if i % 2 == 0:
            out[i // 2] = v
        else:
            out[i // 2] |= v << _S32
    # pcg_setseq_128_srandom_r: state = 0; inc = (initseq << 1) | 1; step; state += initstate; step
    st[2] = (out[2] << _ONE) | (out[3] >> _S63)
    st[3] = (out[3] << _ONE) | _ONE
    st[0], st[1] = st[2], st[3]                     # 0 * MULT + inc
    lo = st[1] + out[1]
    st[0] = st[0] + out[0] + (_ONE if lo < st[1] else _ZERO)
    st[1] = lo
    _next64(st)
    st[4], st[5] = _ZERO, _ZERO
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------------ layout
# Two calls per sample, so that no array crosses back from compiled code (each one costs ~1 us to box): a plan
# (the draws; spans into `work`) returns scalars, then the caller allocates the outputs and a fill writes them.
# work: int64[5n + 8]: [0:k] starts (sorted), [k:2k] lengths, [2k:3k] Part B order, [3k:5k] the spans as
# (start, end) pairs in Part B order (written by fill_blocks, for the caller's list).


@_njit
def fill_blocks(t, work, k, out, loss, mask_id, sop, eop, block_positions, addr, st):
    """The §3.6 layout of the planned spans into out int32[4, n + 2k] (input_ids, targets, position_ids,
    block_position_ids) and loss uint8[n + 2k]; returns sep."""
    n = t.shape[0]
    s, ln, order = work[:k], work[k:2 * k], work[2 * k:3 * k]
    pairs = work[3 * k:5 * k]
    inp, tgt, pos, blk = out[0], out[1], out[2], out[3]
    removed = 0
    for j in range(k):
        removed += ln[j] - 1
    sep = n - removed
    mpos = np.empty(k, np.int64)
    a = 0                                          # Part A write index
    last = 0                                       # source read index
    for j in range(k):
        run = s[j] - last
        inp[a:a + run] = t[last:s[j]]
        a += run
        mpos[j] = a                                # the span's mask index in Part A
        inp[a] = mask_id
        a += 1
        last = s[j] + ln[j]
    inp[a:sep] = t[last:n]
    tgt[:sep] = inp[:sep]
    for i in range(sep):
        pos[i] = i
    blk[:sep] = 0
    loss[:sep] = 0
    b = sep
    for jj in range(k):
        j = order[jj]
        st_j, le = s[j], ln[j]
        inp[b] = sop
        inp[b + 1:b + 1 + le] = t[st_j:st_j + le]
        tgt[b:b + le] = t[st_j:st_j + le]
        tgt[b + le] = eop
        pos[b:b + le + 1] = mpos[j]
        if block_positions:
            for q in range(le + 1):
                blk[b + q] = q + 1
        else:
            blk[b:b + le + 1] = 1
        b += le + 1
        pairs[2 * jj] = st_j
        pairs[2 * jj + 1] = st_j + le
    loss[sep:b] = 1
    if addr:
        store_state(addr, st)
    return sep


@_njit
def fill_suffix(t, g, out, loss, mask_id, sop, cls, block_positions, addr, st):
    """The §3.5 suffix / prefix-LM layout into out int32[4, n + 1], loss uint8[n + 1] (0 at [CLS]); returns sep."""
    n = t.shape[0]
    div = n - g
    inp, tgt, pos, blk = out[0], out[1], out[2], out[3]
    inp[:div] = t[:div]
    tgt[:div] = t[:div]
    for i in range(div + 1):
        pos[i] = i
    blk[:div + 1] = 0
    loss[:div + 1] = 0
    inp[div] = mask_id
    tgt[div] = mask_id
    inp[div + 1] = sop
    inp[div + 2:div + 1 + g] = t[div:n - 1]
    tgt[div + 1:div + 1 + g] = t[div:n]
    pos[div + 1:div + 1 + g] = div
    for q in range(g):
        blk[div + 1 + q] = q + 1 if block_positions else 1
        loss[div + 1 + q] = 1 if t[div + q] != cls else 0
    if addr:
        store_state(addr, st)
    return div + 1


@_njit
def _finish(st, work, k, shuffle):
    """Part B order into work[2k:3k]: a permutation when shuffling more than one span, else text order."""
    if k > 1 and shuffle:
        work[2 * k:3 * k] = _permutation(st, k)
    else:
        for j in range(k):
            work[2 * k + j] = j
    return 0, k


# ------------------------------------------------------------------------------------------------------ bert


def length_table(cdf: np.ndarray) -> np.ndarray:
    """table[b] = #(cdf <= b / 1024), b = 0..1023: where the length scan of a uniform u in [b/1024, (b+1)/1024)
    may start (it then steps on while cdf <= u, so the length is exactly searchsorted(cdf, u, 'right') + 1)."""
    return np.searchsorted(cdf, np.arange(1024) / 1024.0, side="right").astype(np.int64)


@_njit
def _sample_spans(st, lengths, total, offset, dest):
    """The official sample_spans into dest: k sorted draws from 0..m, m = total - sum - k + 1, shifted apart."""
    k = lengths.shape[0]
    high = total - lengths.sum() - k + 2
    for i in range(k):
        dest[i] = _bounded(st, 0, high)
    if k <= 32:                                    # insertion sort: fewer steps than a quicksort at this size
        for i in range(1, k):
            v = dest[i]
            j = i - 1
            while j >= 0 and dest[j] > v:
                dest[j + 1] = dest[j]
                j -= 1
            dest[j + 1] = v
    else:
        dest.sort()
    acc = 0
    for i in range(k):
        dest[i] += acc + offset
        acc += lengths[i] + 1


@_njit
def plan_bert(t, addr, st, cdf, table, target, batch, cls, eos, shuffle, bert_ratio, work):
    """Draw and place a bert sample's spans (make_sample's numpy path, same draws) into work; returns
    (status, k): status NO_FIT when not every drawn span can be placed."""
    if addr:
        load_state(addr, st)
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
            idx = table[int(u * 1024.0)]           # #cdf <= floor(1024 u) / 1024 <= u: the scan's head start
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
    if 5 * k_all > work.shape[0]:
        return NO_FIT, 0
    lengths = lengths[:k_all].copy()
    if k_all > 1:
        lengths = lengths[_permutation(st, k_all)]
    s, ln = work[:k_all], work[k_all:2 * k_all]
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
            return NO_FIT, 0
        _sample_spans(st, lengths, n - 2, 1, s)
        ln[:] = lengths
        return _finish(st, work, k_all, shuffle)
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
    for i in range(1, n_reg):                          # insertion sort: stable, as python's sorted
        o, le = off[i], rlen[i]
        j = i - 1
        while j >= 0 and rlen[j] > le:
            off[j + 1] = off[j]
            rlen[j + 1] = rlen[j]
            j -= 1
        off[j + 1] = o
        rlen[j + 1] = le
    placed = np.empty(k_all, np.int64)
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
            _sample_spans(st, lengths[i:i + c], rlen[r], off[r], placed[i:i + c])
            i += c
    if i < k_all:
        return NO_FIT, 0
    srt = np.argsort(placed)                           # starts are distinct: any sort is the stable one
    s[:] = placed[srt]
    ln[:] = lengths[srt]
    return _finish(st, work, k_all, shuffle)


# -------------------------------------------------------------------------------------------------- sentence


@_njit
def plan_sentence(t, addr, st, lut, target, cls, shuffle, mask_cls, work):
    """Pick a sentence sample's sentences (make_sample's numpy path, same draws) into work; returns
    (status, k): status NO_FIT when the chunk has no sentence."""
    if addr:
        load_state(addr, st)
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
        return NO_FIT, 0
    perm = _permutation(st, m)
    c = 0
    acc = 0
    while c < m:
        acc += se[perm[c]] - ss[perm[c]]
        c += 1
        if acc >= target:
            break
    if 5 * c > work.shape[0]:
        return NO_FIT, 0
    pick = np.sort(perm[:c])
    for j in range(c):
        work[j] = ss[pick[j]]
        work[c + j] = se[pick[j]] - ss[pick[j]]
    return _finish(st, work, c, shuffle)


# ------------------------------------------------------------------------------------------------------- gpt


@_njit
def plan_gpt(t, addr, st, lo, infill_prob, eos, work):
    """A gpt sample's draws (make_sample's numpy path): returns (suffix, g); for the single-span layout the
    span is planned into work (k = 1)."""
    if addr:
        load_state(addr, st)
    n = t.shape[0]
    g = _bounded(st, lo, n - 1)                    # U{lo .. n-2}
    first_eos = -1
    for i in range(n):
        if t[i] == eos:
            first_eos = i
            break
    multi_doc = first_eos >= 0 and first_eos != n - 1
    if multi_doc or _next_double(st) < infill_prob:
        return True, g
    g = min(g, n - 3)
    work[0] = 1 + _bounded(st, 0, n - 1 - g)
    work[1] = g
    work[2] = 0
    return False, g


# ------------------------------------------------------------------------------------------ plan + fill, one call
# make_sample's path: the caller allocates out / loss for the longest possible sample (n + 2 (target + 1)
# for bert and sentence, each span masking >= 1 token; n + 2 for gpt) and keeps views of the first
# n + 2k (or n + 1) columns; one compiled call instead of two saves the second dispatch.


@_njit
def sample_bert(t, addr, st, cdf, table, target, batch, cls, eos, shuffle, bert_ratio, work, out, loss, mask_id,
                sop, eop, block_positions):
    status, k = plan_bert(t, addr, st, cdf, table, target, batch, cls, eos, shuffle, bert_ratio, work)
    if status:
        return status, 0, 0
    return 0, k, fill_blocks(t, work, k, out, loss, mask_id, sop, eop, block_positions, addr, st)


@_njit
def sample_sentence(t, addr, st, lut, target, cls, shuffle, mask_cls, work, out, loss, mask_id, sop, eop,
                    block_positions):
    status, k = plan_sentence(t, addr, st, lut, target, cls, shuffle, mask_cls, work)
    if status:
        return status, 0, 0
    return 0, k, fill_blocks(t, work, k, out, loss, mask_id, sop, eop, block_positions, addr, st)


@_njit
def sample_gpt(t, addr, st, lo, infill_prob, eos, cls, work, out, loss, mask_id, sop, eop, block_positions):
    """Returns (suffix, g, sep)."""
    suffix, g = plan_gpt(t, addr, st, lo, infill_prob, eos, work)
    if suffix:
        return True, g, fill_suffix(t, g, out, loss, mask_id, sop, cls, block_positions, addr, st)
    return False, g, fill_blocks(t, work, 1, out, loss, mask_id, sop, eop, block_positions, addr, st)


# A packer's whole fit in one call: the length trials of build.Packer._fit (same rule, same trial lengths: each
# trial is the plan of make_sample's compiled path on a prefix of `look`, on a copy of the state, as
# sample_length does) and then the one sample kept (plan + fill, the state advanced), so the Python per trial
# (a peek, the sampler's checks, the dispatch) is paid once per chunk. Anything the trials cannot answer the
# way sample_length's compiled path does (a chunk under 64 tokens, a span that cannot be placed, a gpt bound
# out of range) returns FALLBACK before any state is written: the caller's Python loop then redoes the fit.
FALLBACK = 2


@_njit
def _trial_length(code, t, addr, st, cdf, table, bert_ratio, avg_block_length, cls, eos, shuffle, lut,
                  sentence_ratio, mask_cls, gpt_min_ratio, infill_prob, work):
    """The output length of make_sample's compiled path on chunk t (-1: the numpy path must answer)."""
    n = t.shape[0]
    if n < 64:
        return -1
    if code == 0:
        target = int(bert_ratio * n)
        status, k = plan_bert(t, addr, st, cdf, table, target, int(target / max(avg_block_length, 1.0) * 1.25) + 8,
                              cls, eos, shuffle, bert_ratio, work[:5 * n + 8])
    elif code == 1:
        status, k = plan_sentence(t, addr, st, lut, int(sentence_ratio * n), cls, shuffle, mask_cls,
                                  work[:5 * n + 8])
    else:
        lo = int(gpt_min_ratio * n)
        if not 1 <= lo <= n - 2:
            return -1
        suffix, _ = plan_gpt(t, addr, st, lo, infill_prob, eos, work[:5 * n + 8])
        return n + 1 if suffix else n + 2
    return -1 if status else n + 2 * k


@_njit
def fit_sample(code, look, avail, n, finishing, seq_len, slack, min_chunk, min_remnant, addr, st, cdf, table,
               bert_ratio, avg_block_length, cls, eos, shuffle, lut, sentence_ratio, mask_cls, gpt_min_ratio,
               infill_prob, work, out, loss, mask_id, sop, eop, block_positions):
    """code 0/1/2 = bert/sentence/gpt; look: the queue's next min(avail, seq_len) tokens; n: the first guess.
    Returns (status, trials, best n (0: none fits), k or g, sep, suffix)."""
    tried = np.zeros(look.shape[0] + 2, np.bool_)
    best, trials = 0, 0
    for _ in range(12):
        if finishing and 0 < avail - n < min_remnant and avail - min_remnant >= min_remnant:
            n = avail - min_remnant
        if n < min_chunk:
            break
        if n > look.shape[0]:
            return FALLBACK, 0, 0, 0, 0, False
        if tried[n]:
            break
        tried[n] = True
        trials += 1
        length = _trial_length(code, look[:n], addr, st, cdf, table, bert_ratio, avg_block_length, cls, eos,
                               shuffle, lut, sentence_ratio, mask_cls, gpt_min_ratio, infill_prob, work)
        if length < 0:
            return FALLBACK, 0, 0, 0, 0, False
        over = length - seq_len
        if over <= 0:
            if n > best:
                best = n
            if over >= -slack or n >= avail or tried[n + 1]:
                break
            n = min(avail, n + max(1, -over // 2))
        else:
            n -= max(1, over)
    if best == 0:
        return 0, trials, 0, 0, 0, False
    t = look[:best]
    w = work[:5 * best + 8]
    if best > look.shape[0]:
        return FALLBACK, 0, 0, 0, 0, False
    if code == 0:
        target = int(bert_ratio * best)
        status, k, sep = sample_bert(t, addr, st, cdf, table, target,
                                     int(target / max(avg_block_length, 1.0) * 1.25) + 8, cls, eos, shuffle,
                                     bert_ratio, w, out, loss, mask_id, sop, eop, block_positions)
    elif code == 1:
        status, k, sep = sample_sentence(t, addr, st, lut, int(sentence_ratio * best), cls, shuffle, mask_cls, w,
                                         out, loss, mask_id, sop, eop, block_positions)
    else:
        suffix, g, sep = sample_gpt(t, addr, st, int(gpt_min_ratio * best), infill_prob, eos, cls, w, out, loss,
                                    mask_id, sop, eop, block_positions)
        return 0, trials, best, g, sep, suffix
    if status:
        return FALLBACK, 0, 0, 0, 0, False
    return 0, trials, best, k, sep, False


_DIRECT: bool | None = None


def direct_state() -> bool:
    """Whether load_state / store_state read and write numpy's PCG64 record correctly here (checked once)."""
    global _DIRECT
    if _DIRECT is None:
        _DIRECT = False
        if AVAILABLE and sys.byteorder == "little":
            a, b = np.random.PCG64(2024), np.random.PCG64(77)
            np.random.Generator(b).integers(0, 10)             # leaves half a 64-bit draw buffered
            st = np.zeros(6, np.uint64)
            load_state(b.ctypes.state_address, st)
            read_ok = np.array_equal(st, get_state(b)[0])
            store_state(a.ctypes.state_address, st)              # b's state with a's increment
            da, db = a.state, b.state
            _DIRECT = bool(read_ok and da["state"]["state"] == db["state"]["state"]
                           and da["state"]["inc"] == np.random.PCG64(2024).state["state"]["inc"]
                           and (da["has_uint32"], da["uinteger"]) == (db["has_uint32"], db["uinteger"]) == (1, st[5]))
    return _DIRECT


_SEED: bool | None = None


def direct_seed() -> bool:
    """Whether seed_into makes exactly np.random.default_rng(np.random.SeedSequence(words)) here (checked once,
    on a few word lists: one word, the pool's four, more than four; multi-word values)."""
    global _SEED
    if _SEED is None:
        _SEED = False
        if direct_state():
            ok = True
            for words in ([0], [7, 0, 1, 2], [7, 0, 5, 1, 4095], [2**32 - 1, 3, 1, 2**32 - 1, 0, 8, 9]):
                w = np.array(words, dtype=np.uint32)
                want = np.random.SeedSequence(w)
                bg = np.random.PCG64(0)
                st = np.zeros(6, np.uint64)
                u0, u1 = seed_into(bg.ctypes.state_address, w, st)
                ok = (ok and bg.state == np.random.PCG64(want).state
                      and [u0, u1] == want.generate_state(2, np.uint64).tolist())
            _SEED = bool(ok)
    return _SEED


_COMPILE_SECONDS: float | None = None


def compiled() -> bool:
    """Whether compile_seconds() has run in this process (its figure is then a cost already paid)."""
    return _COMPILE_SECONDS is not None


def compile_seconds() -> float:
    """Compile (or load from numba's cache) every kernel once on a tiny chunk; wall seconds it took (0 when
    unavailable; later calls return the first figure). Call it before timing anything or once per worker
    process to have the one-off cost up front and measured (benchmarks/infilling.py prints it); otherwise each
    kernel compiles or loads on its first use."""
    global _COMPILE_SECONDS
    if _COMPILE_SECONDS is None:
        if not AVAILABLE:
            _COMPILE_SECONDS = 0.0
            return 0.0
        t0 = time.perf_counter()
        st = get_state(np.random.PCG64(0))[0]
        cdf = np.linspace(0.5, 1.0, 4)
        table = length_table(cdf)
        lut = np.zeros(12, np.int8)
        out, loss = np.empty((4, 64), np.int32), np.empty(64, np.uint8)
        for dtype in (np.int32,):                     # make_sample hands the kernels int32 chunks only
            t = np.array([2, 20, 21, 22, 23, 10, 0, 2, 24, 25, 26, 27, 28], dtype=dtype)
            work = np.empty(5 * len(t) + 8, np.int64)
            plan_bert(t, 0, st, cdf, table, 1, 9, 2, 0, True, 0.15, work)
            plan_sentence(t, 0, st, lut, 1, 2, True, True, work)
            plan_gpt(t, 0, st, 6, 0.5, 0, work)
            fill_blocks(t, work, 1, out, loss, 3, 6, 7, True, 0, st)
            fill_suffix(t, 3, out, loss, 3, 6, 2, True, 0, st)
            sample_bert(t, 0, st, cdf, table, 1, 9, 2, 0, True, 0.15, work, out, loss, 3, 6, 7, True)
            sample_sentence(t, 0, st, lut, 1, 2, True, True, work, out, loss, 3, 6, 7, True)
            sample_gpt(t, 0, st, 6, 0.5, 0, 2, work, out, loss, 3, 6, 7, True)
            for code in range(3):                     # the packer's fit (its chunks: prefixes of an int32 array)
                fit_sample(code, t, 13, 10, False, 16, 1, 4, 16, 0, st, cdf, table, 0.15, 3.0, 2, 0, True, lut,
                           0.15, True, 0.5, 0.5, work, out, loss, 3, 6, 7, True)
        direct_state()
        direct_seed()
        _COMPILE_SECONDS = time.perf_counter() - t0
    return _COMPILE_SECONDS
