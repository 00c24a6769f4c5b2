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
    is expanded to the N candidates and their Part Bs run as one batch (`score_choices`, many items at once).
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

from model.generate import SpecialIds
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

    Rows are sorted by length and right-padded into batches of `batch_size` with a per-row sep: padding sits
    after each row's causal Part B, so no real token attends to it. Logits are computed for scored positions only."""
    device = model.word_embeddings.weight.device
    was_training = model.training
    model.eval()
    out: list[tuple[Tensor, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].context) + len(rows[i].targets))
    try:
        for start in range(0, len(rows), batch_size):
            chunk = [rows[i] for i in order[start:start + batch_size]]
            ids, pos, blk, seps, picks = [], [], [], [], []
            for j, r in enumerate(chunk):
                a = [specials.cls, *r.context, mask_id, specials.eos]
                C, nb = len(a), len(r.targets)
                ids.append(a + [specials.sop, *r.targets[:-1]])
                pos.append(list(range(C)) + [C - 2] * nb)
                blk.append([0] * C + list(range(1, nb + 1)))
                seps.append(C)
                picks += [(j, k) for k in range(C + nb - r.num_scored, C + nb)]   # input k predicts targets[k - C]
            T = max(len(x) for x in ids)
            hidden = model(_pad(ids, specials.eos, T, device), _pad(pos, 0, T, device), _pad(blk, 0, T, device),
                           sep=torch.tensor(seps, device=device), return_hidden=True)
            where = torch.tensor(picks, device=device)
            logits = _logits(model, hidden[where[:, 0], where[:, 1]])                   # [scored, V] fp32
            tgt = torch.tensor([t for r in chunk for t in r.targets[len(r.targets) - r.num_scored:]], device=device)
            logp = F.log_softmax(logits, dim=-1).gather(-1, tgt[:, None])[:, 0].cpu()
            hit = (logits.argmax(-1) == tgt).cpu()
            n = 0
            for i, r in zip(order[start:start + batch_size], chunk):
                out[i] = (logp[n:n + r.num_scored], bool(hit[n:n + r.num_scored].all()))
                n += r.num_scored
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def score_choices(model: GLM, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], specials: SpecialIds,
                  mask_id: int, batch_size: int = 8) -> list[Tensor]:
    """Σ log p of each candidate (no eop), per group (context ids, candidate ids lists): [num candidates] fp64.

    Groups sorted by length, `batch_size` contexts at a time: ONE forward of their Part As (right-padded; an
    explicit mask hides the padding), then ONE forward of all their candidates' Part Bs against the cache, each
    candidate row reading its own context's keys — a context is encoded once however many candidates it has
    (model.generate.score_candidates does the same for one context). Logits only at real candidate tokens."""
    device = model.word_embeddings.weight.device
    was_training = model.training
    model.eval()
    out: list[Tensor | None] = [None] * len(groups)
    order = sorted(range(len(groups)), key=lambda i: (len(groups[i][0]), max(len(c) for c in groups[i][1])))
    try:
        for start in range(0, len(groups), batch_size):
            chunk = [groups[i] for i in order[start:start + batch_size]]
            parts_a = [[specials.cls, *ctx, mask_id, specials.eos] for ctx, _ in chunk]
            lens = torch.tensor([len(a) for a in parts_a], device=device)
            Tc = int(lens.max())
            key_ok = torch.arange(Tc, device=device)[None, :] < lens[:, None]                  # [k,Tc]
            _, cache = model(_pad(parts_a, specials.eos, Tc, device),
                             _pad([list(range(len(a))) for a in parts_a], 0, Tc, device),
                             torch.zeros(len(chunk), Tc, dtype=torch.long, device=device),
                             attention_mask=key_ok[:, None, None, :].expand(-1, 1, Tc, Tc), return_mems=True,
                             return_hidden=True)
            owner = torch.tensor([i for i, (_, cands) in enumerate(chunk) for _ in cands], device=device)
            cands = [list(c) for _, cs in chunk for c in cs]
            Lb = max(len(c) for c in cands)
            cache = cache.index_select(owner)                                                 # [R,H,Tc,K] per layer
            inputs = _pad([[specials.sop, *c[:-1]] for c in cands], specials.eos, Lb, device)
            causal = torch.ones(Lb, Lb, dtype=torch.bool, device=device).tril()
            mask = torch.cat([key_ok[owner][:, None, None, :].expand(-1, 1, Lb, Tc),
                              causal.expand(len(cands), 1, Lb, Lb)], dim=-1)                 # [R,1,Lb,Tc+Lb]
            positions = (lens[owner] - 2)[:, None].expand(-1, Lb)                             # the blank's index
            blocks = torch.arange(1, Lb + 1, device=device).expand(len(cands), Lb)
            hidden = model(inputs, positions, blocks, attention_mask=mask, mems=cache, return_hidden=True)
            real = _pad([[1] * len(c) for c in cands], 0, Lb, device).bool()
            tgt = torch.tensor([t for c in cands for t in c], device=device)
            logp = F.log_softmax(_logits(model, hidden[real]), dim=-1).gather(-1, tgt[:, None])[:, 0].double()
            sums = torch.zeros(len(cands), dtype=torch.float64, device=device).index_add_(
                0, real.nonzero()[:, 0], logp).cpu()                                          # per candidate
            for i, (_, cs) in zip(order[start:start + batch_size], chunk):
                out[i], sums = sums[:len(cs)], sums[len(cs):]
    finally:
        model.train(was_training)
    return out


def _logits(model: GLM, hidden: Tensor) -> Tensor:
    """The tied output layer on selected final hidden states [N,D] -> fp32 [N,V] (GLM.forward's last step).
    Under FSDP2 the word embedding may be sharded between forwards: gather it (every rank calls this in step)."""
    w = model.word_embeddings.weight
    if hasattr(w, "full_tensor"):
        w = w.full_tensor()
    return F.linear(hidden, w).float()


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
    sequence, Part A + Part B (normally the model's max_position_embeddings); batch_size: rows (LAMBADA, bits
    per byte) or contexts (multiple choice) per forward; bpb_stride: new tokens per bits-per-byte window
    (default half a window). Perplexities are capped at e^50 (an untrained model's word NLL can overflow).
    """

    def __init__(self, tasks: Sequence, encode: Callable[[str], list[int]], specials: SpecialIds, mask_id: int,
                 seq_len: int, batch_size: int = 8, bpb_stride: int = 0):
        if seq_len < 8:
            raise ValueError(f"seq_len={seq_len} is too short to evaluate; use the model's max_position_embeddings")
        self.specials, self.mask_id, self.seq_len, self.batch_size = specials, mask_id, seq_len, batch_size
        self.bpb_stride = bpb_stride or (seq_len - 3) // 2
        self.tasks = [self._encode(t, encode) for t in tasks]
        # what the numbers were measured on: data files, their sha256, the package version (pipeline/evalsets.py)
        self.provenance = {t.name: t.provenance() for t in tasks if hasattr(t, "provenance")}

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
        flat = [(ctx_ids, cands) for groups, _, _, _ in units for ctx_ids, _, cands in groups]
        scores = iter(score_choices(model, flat, self.specials, self.mask_id, self.batch_size))
        s = torch.zeros(6, dtype=torch.float64)   # items, correct sum / per token / per char, gold bits, gold bytes
        for (groups, gold, chars, nbytes), w in zip(units, weights):
            n = sum(len(idx) for _, idx, _ in groups)
            total, ntok = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
            for _, idx, cands in groups:
                total[idx] = next(scores)
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


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One markdown row per task; accuracies in %, chance beside them."""
    pct = lambda x: f"{100 * x:.1f}"
    lines = ["| task | items | accuracy | chance | per token | per char | bits/byte | perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        items = f"{int(r['items'])}" + (f" (+{int(r['skipped'])} too long)" if r.get("skipped") else "")
        if "acc_bi" in r:
            lines.append(f"| {name} (bidirectional) | {items} | {pct(r['acc_bi'])} | 0 | | | | {r['ppl_bi']:.4g} |")
            lines.append(f"| {name} (unidirectional) | {items} | {pct(r['acc_uni'])} | 0 | | | | {r['ppl_uni']:.4g} |")
        elif "acc" in r:
            lines.append(f"| {name} | {items} | {pct(r['acc'])} | {pct(r['chance'])} | {pct(r['acc_per_token'])} | "
                         f"{pct(r['acc_per_char'])} | {r['bpb_gold']:.3f} (answer) | |")
        else:
            lines.append(f"| {name} | {int(r['items'])} docs, {int(r['tokens']):,} tokens | | | | | {r['bpb']:.3f} | "
                         f"{math.exp(r['bpb'] * math.log(2) * r['bytes_per_token']):.4g} (token) |")
    return "\n".join(lines)


def binomial_interval(k: float, n: float, z: float = 3.0) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n at z standard deviations (tests, chance-level checks)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h
