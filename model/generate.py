"""Blank filling (spec §10.1) and cloze scoring (spec §11) on token ids, with a KV cache throughout.

    python jobs/fill_blanks.py --checkpoint CKPT --tokenizer tok.model "The [MASK] of the people"   # text in/out

Ids in, ids out: this module knows no tokenizer. `specials` is any object with integer attributes
cls, eos, sop, eop, mask, smask, gmask (e.g. pipeline.tokenizer.Specials).

Blank filling, as the original generate_samples.py: context = [CLS] + ids (+ [gMASK] when no blank is present)
+ eos (unless it ends with [gMASK]), encoded once, fully bidirectional (sep = its length). Each blank, left to
right, is generated at its mask's position with block positions 1, 2, … (sop = 1), one token per step against
the cache (sep 0: every cached token visible); a blank ends at eop or eos. Its tokens stay in the cache, so
later blanks see earlier answers. Randomness only through an explicit torch.Generator (or `seed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from model.glm import GLM, KVCache

STRATEGIES = ("greedy", "sample", "beam")


class SpecialIds(Protocol):
    cls: int
    eos: int
    sop: int
    eop: int
    mask: int
    smask: int
    gmask: int


def build_context(ids: Sequence[int], specials: SpecialIds) -> tuple[list[int], list[int]]:
    """The Part A of blank filling (spec §10.1) and the positions of its blanks, in order."""
    blanks = {specials.mask, specials.smask, specials.gmask}
    ctx = [int(t) for t in ids]
    if not ctx or ctx[0] != specials.cls:
        ctx.insert(0, specials.cls)
    if not any(t in blanks for t in ctx):
        ctx.append(specials.gmask)  # the original appends a blank when the text has none
    if ctx[-1] not in (specials.gmask, specials.eos):
        ctx.append(specials.eos)
    return ctx, [i for i, t in enumerate(ctx) if t in blanks]


@torch.no_grad()
def fill_blanks(model: GLM, ids: Sequence[int], specials: SpecialIds, strategy: str = "greedy",
                max_new_tokens: int = 32, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                num_beams: int = 4, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                min_length: int = 0, generator: torch.Generator | None = None, seed: int = 0,
                vocab_size: int = 0) -> list[list[int]]:
    """Fill every [MASK]/[sMASK]/[gMASK] in `ids`; returns one answer (ids, without sop/eop) per blank, in order.

    strategy "greedy" (argmax), "sample" (temperature, then top_k, then top_p nucleus; `generator`, else a
    CPU generator seeded with `seed`) or "beam" (num_beams, top-2·beams candidates per step as the released
    seq2seq configs' --select-topk, hypothesis score Σlogp / len^length_penalty with len counting eop, early
    stopping off). no_repeat_ngram_size bans repeating an n-gram of the blank's own tokens (sop included);
    min_length forbids eop/eos before that many answer tokens. At most max_new_tokens tokens per blank.
    vocab_size: the tokenizer's size when the model's embedding is padded beyond it (train.py pads to a multiple):
    ids past it are never chosen (no tokenizer could decode them); 0 = every row of the model's output.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}")
    if strategy == "sample" and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                         f"{top_p}, {top_k}")
    if strategy == "beam" and num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    ctx, blanks = build_context(ids, specials)
    rows = model.config.position_table_rows
    if len(ctx) > rows or max_new_tokens + 1 >= rows:
        raise ValueError(f"context of {len(ctx)} tokens / max_new_tokens={max_new_tokens} exceed the model's "
                         f"{rows}-row position tables; shorten the text or lower max_new_tokens")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    limit = vocab_size or None            # a slice bound: logits[..., :limit]
    was_training = model.training
    model.eval()
    try:
        _, cache = _forward(model, ctx, list(range(len(ctx))), [0] * len(ctx), sep=len(ctx))
        answers: list[list[int]] = []
        for n, p in enumerate(blanks):
            more = n + 1 < len(blanks)
            if strategy == "beam":
                answer = _beam_search(model, cache, p, specials, num_beams, max_new_tokens, length_penalty,
                                      no_repeat_ngram_size, min_length, limit)
                if more:  # put the chosen answer in the cache for the later blanks
                    _, cache = _forward(model, [specials.sop, *answer], [p] * (len(answer) + 1),
                                        list(range(1, len(answer) + 2)), sep=0, cache=cache)
            else:
                answer, cache = _sample_blank(model, cache, p, specials, strategy, max_new_tokens, temperature,
                                              top_k, top_p, no_repeat_ngram_size, min_length, generator, more,
                                              limit)
            answers.append(answer)
        return answers
    finally:
        model.train(was_training)


def _forward(model: GLM, tokens: Sequence[int], positions: Sequence[int], block_positions: Sequence[int], sep: int,
             cache: KVCache | None = None, rows: int = 1) -> tuple[Tensor, KVCache]:
    """One call on a single sequence (repeated `rows` times for beams): logits [rows,T,V] and the grown cache."""
    device = model.word_embeddings.weight.device
    t = lambda xs: torch.tensor(list(xs), dtype=torch.long, device=device).expand(rows, -1)  # [rows,T]
    return model(t(tokens), t(positions), t(block_positions), sep=sep, mems=cache, return_mems=True)


def _sample_blank(model, cache, p, specials, strategy, max_new_tokens, temperature, top_k, top_p,
                  no_repeat_ngram_size, min_length, generator, feed_last, limit):
    stops = (specials.eop, specials.eos)
    seq = [specials.sop]                  # this blank's Part B tokens, fed one per step
    for k in range(max_new_tokens):
        logits, cache = _forward(model, seq[-1:], [p], [k + 1], sep=0, cache=cache)
        scores = _constrain(logits[0, -1, :limit].float().cpu(), seq, stops, min_length, no_repeat_ngram_size)
        token = _choose(scores, strategy, temperature, top_k, top_p, generator)
        if token in stops:                # not fed, not kept (spec §10.1)
            return seq[1:], cache
        seq.append(token)
    if feed_last:                         # length limit hit: later blanks should still see the last token
        _, cache = _forward(model, seq[-1:], [p], [len(seq)], sep=0, cache=cache)
    return seq[1:], cache


def _beam_search(model, cache, p, specials, num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size,
                 min_length, limit) -> list[int]:
    stops = (specials.eop, specials.eos)
    n = num_beams
    cache = cache.index_select(torch.zeros(n, dtype=torch.long, device=cache.keys[0].device))
    seqs = [[specials.sop] for _ in range(n)]
    beam_scores = torch.full((n,), float("-inf"))
    beam_scores[0] = 0.0                  # all beams start identical: expand only the first at step 0
    finished: list[tuple[float, list[int]]] = []
    for k in range(max_new_tokens):
        device = model.word_embeddings.weight.device
        ids = torch.tensor([[s[-1]] for s in seqs], device=device)
        logits, cache = model(ids, torch.full_like(ids, p), torch.full_like(ids, k + 1), sep=0, mems=cache,
                              return_mems=True)
        logp = F.log_softmax(logits[:, -1, :limit].float().cpu(), dim=-1)
        logp = torch.stack([_constrain(logp[b], seqs[b], stops, min_length, no_repeat_ngram_size) for b in range(n)])
        V = logp.shape[-1]
        top_scores, top_idx = (logp + beam_scores[:, None]).view(-1).topk(min(2 * n, n * V))
        keep: list[tuple[int, int, float]] = []
        for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            if score == float("-inf"):
                break
            b, token = divmod(idx, V)
            if token in stops:
                if rank < n:              # as HF's BeamSearchScorer: only eop among the top `n` ends a hypothesis
                    finished.append((score / (len(seqs[b])) ** length_penalty, seqs[b][1:]))
                continue
            keep.append((b, token, score))
            if len(keep) == n:
                break
        if not keep:
            break
        finished = sorted(finished, key=lambda h: -h[0])[:n]
        best_running = keep[0][2] / (len(seqs[0]) + 1) ** length_penalty
        if len(finished) == n and finished[-1][0] >= best_running:
            break                          # no running beam can still beat the worst kept hypothesis
        while len(keep) < n:               # fewer live candidates than beams: pad with dead copies
            keep.append((keep[0][0], keep[0][1], float("-inf")))
        order = torch.tensor([b for b, _, _ in keep], device=cache.keys[0].device)
        cache = cache.index_select(order)
        seqs = [seqs[b] + [token] for b, token, _ in keep]
        beam_scores = torch.tensor([s for _, _, s in keep])
    else:
        for b in range(n):                 # length limit: running beams compete as they are (no eop)
            if beam_scores[b] > float("-inf"):
                finished.append((float(beam_scores[b]) / max(1, len(seqs[b]) - 1) ** length_penalty, seqs[b][1:]))
    if not finished:
        return []
    return max(finished, key=lambda h: h[0])[1]


def _constrain(scores: Tensor, seq: list[int], stops, min_length: int, no_repeat_ngram_size: int) -> Tensor:
    """Min-length and no-repeat-n-gram processors (spec §10.2) on one row of scores; seq = sop + answer so far."""
    if len(seq) - 1 < min_length:
        scores = scores.clone()
        scores[list(stops)] = float("-inf")
    N = no_repeat_ngram_size
    if N > 0 and len(seq) >= N:
        prefix = tuple(seq[len(seq) - N + 1:])
        banned = [seq[i + N - 1] for i in range(len(seq) - N + 1) if tuple(seq[i:i + N - 1]) == prefix]
        if banned:
            scores = scores.clone()
            scores[banned] = float("-inf")
    return scores


def _choose(scores: Tensor, strategy: str, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator) -> int:
    if strategy == "greedy":
        return int(scores.argmax())
    scores = scores / temperature
    if 0 < top_k < scores.numel():
        scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p   # keep the smallest prefix reaching top_p (never empty)
        scores = scores.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


# ---- cloze scoring (spec §11) ---------------------------------------------------------------------------------

@torch.no_grad()
def score_verbalizers(model: GLM, ids: Sequence[int], specials: SpecialIds, verbalizer_ids: Sequence[int]) -> Tensor:
    """Single-token verbalisers: raw logits [num_labels] of each verbaliser id at the sop position.

    Part A = [CLS] pattern (with a blank) eos; Part B = [sop] at the index of the last blank, block position 1.
    """
    ctx, blanks = build_context(ids, specials)
    C = len(ctx)
    was_training = model.training
    model.eval()
    try:
        logits, _ = _forward(model, [*ctx, specials.sop], [*range(C), blanks[-1]], [0] * C + [1], sep=C)
    finally:
        model.train(was_training)
    return logits[0, C, list(verbalizer_ids)].float()


@torch.no_grad()
def score_candidates(model: GLM, ids: Sequence[int], specials: SpecialIds, candidates: Sequence[Sequence[int]],
                     length_penalty: float = 0.0, include_eop: bool = True) -> Tensor:
    """Multi-token answers: Σ log p(answer tokens (+ eop)) / len^length_penalty, one score per candidate.

    As the original (spec §11, §14.15): Part B = [sop] + answer, targets = answer + [eop], eop included by
    default (the hub's multiple-choice head leaves it out: include_eop=False). The context is encoded once.
    """
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("candidates must be a non-empty list of non-empty token-id lists")
    ctx, blanks = build_context(ids, specials)
    C, N, p = len(ctx), len(candidates), blanks[-1]
    Lb = max(len(c) for c in candidates) + 1
    device = model.word_embeddings.weight.device
    was_training = model.training
    model.eval()
    try:
        _, cache = _forward(model, ctx, range(C), [0] * C, sep=C)
        cache = cache.index_select(torch.zeros(N, dtype=torch.long, device=device))
        inputs = torch.full((N, Lb), specials.eos, dtype=torch.long)     # right-padded: padding is never attended
        targets = torch.full((N, Lb), specials.eos, dtype=torch.long)
        weight = torch.zeros(N, Lb)
        for i, cand in enumerate(candidates):
            n = len(cand)
            inputs[i, :n + 1] = torch.tensor([specials.sop, *cand])
            targets[i, :n + 1] = torch.tensor([*cand, specials.eop])
            weight[i, :n + (1 if include_eop else 0)] = 1.0
        positions = torch.full((N, Lb), p, dtype=torch.long)
        blocks = torch.arange(1, Lb + 1).expand(N, Lb)
        logits = model(inputs.to(device), positions.to(device), blocks.to(device), sep=0, mems=cache)
    finally:
        model.train(was_training)
    logp = F.log_softmax(logits.float().cpu(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return (logp * weight).sum(-1) / weight.sum(-1) ** length_penalty
