"""Zero-shot evaluation of a GLM as blank infilling (spec §11, §12): LAMBADA, multiple choice, bits per byte.

    python jobs/evaluate.py --checkpoint runs/demo/latest-rank0.pt --config demo \\
        --tokenizer data/shards/tokenizer.model --tasks lambada,piqa,arc_easy,bpb

Plain torch on token ids; text comes in through an `encode` callable (str -> ids) and items shaped like
pipeline/evalsets.py's (ClozeItem: .context/.continuation; ChoiceItem: .pairs/.gold; or plain strings for bits per
byte), so any tokenizer works, official GLM vocabularies included (Specials.official_gpt2() + a GPT-2 encoder).

Every item is a GLM blank: Part A = `[CLS] context M [eos]` (M = `mask_id`: [MASK], or [gMASK] for models built
with task_mask, as the 10B's zero-shot LAMBADA), Part B = `[sop] answer[:-1]` at the blank's position with block
positions 1, 2, …; the answer tokens are the targets.
  * LAMBADA (official tasks/language_model, strict): the answer is the passage's last word, encoded as it
    appears after a space; an item counts only if EVERY answer token is the argmax. Bidirectional: Part A holds
    the whole context. Unidirectional: Part A holds only the first context token and the rest of the context
    is fed causally in Part B ahead of the word (loss and accuracy on the word only). Word perplexity =
    exp(mean over items of the word's total negative log-likelihood). Contexts longer than seq_len lose tokens
    on the left; the word is never cut.
  * Multiple choice: the candidates of an item are scored from ONE forward of the shared context: its KV cache
    is expanded to the N candidates and their Part Bs run as one batch of N (model.generate.score_candidates).
    Reported side by side: accuracy by the summed log-likelihood, per token and per character of the candidate,
    and bits per byte of the right answer (informative while accuracy is still at chance). No eop is scored
    (as the LAMBADA target and the hub's multiple-choice head): the continuation need not end the text.
  * Bits per byte: each document is cut into windows; a window's new tokens are Part B targets, the tokens
    before them (up to seq_len) its bidirectional Part A; every token is scored once (the first window from an
    empty Part A); bits = Σ NLL / ln 2 over the UTF-8 bytes of the original text, so vocabularies compare.

`TaskEvaluator` encodes once and runs on every call (standalone, or from the in-training callback in
model/composer.py); results are sums, so ranks split the items and add them up (`all_reduce`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.generate import SpecialIds, score_candidates
from model.glm import GLM

# ---- the scorers (token ids in, log-likelihoods out) ----------------------------------------------------------

@dataclass
class TargetRow:
    """One Part-A/Part-B sequence: Part A = [CLS] context M [eos]; Part B = [sop] targets[:-1]; the last
    `num_scored` targets are scored."""

    context: list[int]
    targets: list[int]
    num_scored: int


@torch.no_grad()
def score_targets(model: GLM, rows: Sequence[TargetRow], specials: SpecialIds, mask_id: int,
                  batch_size: int = 8) -> list[tuple[Tensor, bool]]:
    """Per row: log p of each scored target [num_scored] (fp32, CPU) and whether every one is the argmax.

    Rows are right-padded into batches of `batch_size` with a per-row sep: padding sits after each row's causal
    Part B, so no real token attends to it."""
    device = model.word_embeddings.weight.device
    was_training = model.training
    model.eval()
    out: list[tuple[Tensor, bool]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, pos, blk, seps, picks = [], [], [], [], []
            for r in chunk:
                a = [specials.cls, *r.context, mask_id, specials.eos]
                C, nb = len(a), len(r.targets)
                ids.append(a + [specials.sop, *r.targets[:-1]])
                pos.append(list(range(C)) + [C - 2] * nb)
                blk.append([0] * C + list(range(1, nb + 1)))
                seps.append(C)
                picks.append(range(C + nb - r.num_scored, C + nb))   # input index k predicts targets[k - C]
            T = max(len(x) for x in ids)
            logits = model(_pad(ids, specials.eos, T, device), _pad(pos, 0, T, device), _pad(blk, 0, T, device),
                           sep=torch.tensor(seps, device=device))
            for j, r in enumerate(chunk):
                sel = logits[j, list(picks[j])].float()                      # [num_scored, V]
                tgt = torch.tensor(r.targets[len(r.targets) - r.num_scored:], device=device)
                logp = F.log_softmax(sel, dim=-1).gather(-1, tgt[:, None])[:, 0]
                out.append((logp.cpu(), bool((sel.argmax(-1) == tgt).all())))
    finally:
        model.train(was_training)
    return out


def _pad(rows: list[list[int]], value: int, T: int, device) -> Tensor:
    return torch.tensor([x + [value] * (T - len(x)) for x in rows], dtype=torch.long, device=device)


def lambada_rows(context: Sequence[int], target: Sequence[int], seq_len: int) -> tuple[TargetRow, TargetRow] | None:
    """The bidirectional and unidirectional rows of one LAMBADA item, the context cut on the left so that
    [CLS] context M [eos] [sop] target[:-1] fits seq_len; None if the target alone does not fit."""
    room = seq_len - 3 - len(target)
    if room < 1 or not target:
        return None
    ctx = list(context)[-room:]
    bi = TargetRow(ctx, list(target), len(target))
    uni = TargetRow(ctx[:1], ctx[1:] + list(target), len(target))
    return bi, uni


def text_rows(ids: Sequence[int], seq_len: int, stride: int) -> list[TargetRow]:
    """Windows of one document for bits per byte: every token a target exactly once; a window of `stride` new
    tokens sees up to seq_len - 3 - stride tokens before it in Part A (the first window: up to seq_len - 3
    targets and an empty Part A)."""
    L = seq_len - 3
    if not 0 < stride < L:
        raise ValueError(f"stride={stride} must be between 1 and seq_len - 4 = {L - 1}")
    ids = list(ids)
    rows = [TargetRow([], ids[:L], len(ids[:L]))] if ids else []
    for s in range(L, len(ids), stride):
        new = ids[s:s + stride]
        rows.append(TargetRow(ids[max(0, s - (L - len(new))):s], new, len(new)))
    return rows


# ---- tasks ------------------------------------------------------------------------------------------------------

@dataclass
class _Encoded:
    name: str
    kind: str                      # cloze | choice | text
    units: list                    # per kind: (bi, uni) row pairs | (groups, gold, chars, bytes) | TargetRow
    num_items: int
    skipped: int                   # items that cannot fit seq_len (counted, reported)
    num_bytes: int = 0             # text: UTF-8 bytes of all documents
    chance: float = 0.0


class TaskEvaluator:
    """Encodes tasks once (text -> ids with `encode`), then scores a model on every call.

    tasks: objects with .name, .kind ("cloze" | "choice" | "text"), .items, .chance (pipeline/evalsets.Task).
    mask_id: the blank token (specials.gmask for task_mask models, else specials.mask); seq_len: the longest
    sequence (default: the model's max_position_embeddings); bpb_stride: new tokens per bits-per-byte window
    (default half a window).
    """

    def __init__(self, tasks: Sequence, encode: Callable[[str], list[int]], specials: SpecialIds, mask_id: int,
                 seq_len: int, batch_size: int = 8, bpb_stride: int = 0):
        if seq_len < 8:
            raise ValueError(f"seq_len={seq_len} is too short to evaluate; use the model's max_position_embeddings")
        self.specials, self.mask_id, self.seq_len, self.batch_size = specials, mask_id, seq_len, batch_size
        self.bpb_stride = bpb_stride or (seq_len - 3) // 2
        self.tasks = [self._encode(t, encode) for t in tasks]

    def _encode(self, task, encode) -> _Encoded:
        units, skipped = [], 0
        if task.kind == "cloze":
            for it in task.items:
                rows = lambada_rows(encode(it.context.strip()), encode(it.continuation), self.seq_len)
                if rows is None:
                    skipped += 1
                else:
                    units.append(rows)
            return _Encoded(task.name, "cloze", units, len(task.items), skipped)
        if task.kind == "choice":
            for it in task.items:
                groups: dict[str, tuple[list[int], list[int], list[list[int]]]] = {}   # context -> candidates
                for i, (ctx, cont) in enumerate(it.pairs):
                    g = groups.setdefault(ctx, (encode(ctx.strip()), [], []))
                    g[1].append(i)
                    g[2].append(encode(cont))
                if any(len(c) == 0 or self.seq_len - 4 - len(c) < 1 for _, _, cands in groups.values()
                       for c in cands):
                    skipped += 1
                    continue
                trimmed = []
                for ctx_ids, idx, cands in groups.values():
                    room = self.seq_len - 4 - max(len(c) for c in cands)   # [CLS] ctx M eos | sop cand
                    trimmed.append((ctx_ids[-room:], idx, cands))
                chars = [len(cont) for _, cont in it.pairs]
                nbytes = len(it.pairs[it.gold][1].encode("utf-8"))
                units.append((trimmed, it.gold, chars, nbytes))
            return _Encoded(task.name, "choice", units, len(task.items), skipped, chance=task.chance)
        if task.kind == "text":
            rows, nbytes = [], 0
            for doc in task.items:
                rows += text_rows(encode(doc), self.seq_len, self.bpb_stride)
                nbytes += len(doc.encode("utf-8"))
            return _Encoded(task.name, "text", rows, len(task.items), 0, nbytes)
        raise ValueError(f"task {task.name!r} has kind {task.kind!r}; expected cloze, choice or text")

    # ---- scoring -----------------------------------------------------------------------------------------------
    def __call__(self, model: GLM, rank: int = 0, world: int = 1,
                 all_reduce: Callable[[Tensor], None] | None = None) -> dict[str, dict[str, float]]:
        """{task: {metric: value}}. With world > 1, rank r scores units r, r+world, … (every rank the same
        number of forwards: short ranks repeat a unit with weight 0) and `all_reduce` sums the statistics."""
        results = {}
        for t in self.tasks:
            mine = t.units[rank::world]
            per_rank = -(-len(t.units) // world)
            weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
            mine = mine + [t.units[0]] * (per_rank - len(mine)) if t.units else []
            sums = getattr(self, f"_{t.kind}")(model, mine, weights)
            if all_reduce is not None and world > 1:
                all_reduce(sums)
            results[t.name] = self._finish(t, sums.tolist())
        return results

    def _cloze(self, model, units, weights) -> Tensor:
        rows = [r for pair in units for r in pair]
        scored = score_targets(model, rows, self.specials, self.mask_id, self.batch_size)
        s = torch.zeros(5, dtype=torch.float64)   # items, correct bi, correct uni, nll bi, nll uni
        for i, w in enumerate(weights):
            (lp_bi, ok_bi), (lp_uni, ok_uni) = scored[2 * i], scored[2 * i + 1]
            s += w * torch.tensor([1.0, ok_bi, ok_uni, -float(lp_bi.sum()), -float(lp_uni.sum())], dtype=torch.float64)
        return s

    def _choice(self, model, units, weights) -> Tensor:
        s = torch.zeros(6, dtype=torch.float64)   # items, correct sum / per token / per char, gold bits, gold bytes
        for (groups, gold, chars, nbytes), w in zip(units, weights):
            n = sum(len(idx) for _, idx, _ in groups)
            total, ntok = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
            for ctx_ids, idx, cands in groups:
                # Part A = [CLS] context M [eos], as the LAMBADA rows (build_context adds the [CLS])
                scores = score_candidates(model, [*ctx_ids, self.mask_id, self.specials.eos], self.specials, cands,
                                          include_eop=False)
                total[idx] = scores.double()
                ntok[idx] = torch.tensor([len(c) for c in cands], dtype=torch.float64)
            per_char = total / torch.tensor(chars, dtype=torch.float64)
            ok = [int(x.argmax()) == gold for x in (total, total / ntok, per_char)]
            s += w * torch.tensor([1.0, *ok, -float(total[gold]) / math.log(2), nbytes], dtype=torch.float64)
        return s

    def _text(self, model, units, weights) -> Tensor:
        scored = score_targets(model, units, self.specials, self.mask_id, self.batch_size)
        s = torch.zeros(2, dtype=torch.float64)   # nll (nats), tokens
        for (lp, _), w in zip(scored, weights):
            s += w * torch.tensor([-float(lp.sum()), lp.numel()], dtype=torch.float64)
        return s

    def _finish(self, t: _Encoded, s: list[float]) -> dict[str, float]:
        out: dict[str, float] = {"items": s[0] if t.kind != "text" else t.num_items, "skipped": t.skipped}
        if t.kind == "cloze":
            n = max(s[0], 1.0)
            out.update(acc_bi=s[1] / n, acc_uni=s[2] / n, ppl_bi=math.exp(min(s[3] / n, 50.0)),
                       ppl_uni=math.exp(min(s[4] / n, 50.0)))
        elif t.kind == "choice":
            n = max(s[0], 1.0)
            out.update(acc=s[1] / n, acc_per_token=s[2] / n, acc_per_char=s[3] / n, chance=t.chance,
                       bpb_gold=s[4] / max(s[5], 1.0))
        else:
            out.update(bpb=s[0] / math.log(2) / max(t.num_bytes, 1), tokens=s[1], bytes=t.num_bytes,
                       bytes_per_token=t.num_bytes / max(s[1], 1.0))
        return out


def flat_metrics(results: dict[str, dict[str, float]], prefix: str = "metrics/zeroshot") -> dict[str, float]:
    """{'metrics/zeroshot/lambada/acc_bi': …} for Composer's logger (metrics.jsonl, TensorBoard)."""
    return {f"{prefix}/{task}/{k}": float(v) for task, m in results.items() for k, v in m.items()
            if k not in ("items", "skipped", "tokens", "bytes", "chance", "bytes_per_token")}


def binomial_interval(k: float, n: float, z: float = 3.0) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n at z standard deviations (tests, chance-level checks)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h
