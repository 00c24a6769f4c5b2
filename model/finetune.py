"""Cloze fine-tuning on the plain GLM (paper §2.3, spec §11): batches, differentiable label scores, loss, metrics.

    python -m pytest -q tests/test_finetune.py        # the entry point is `composer finetune.py …` (finetune.py)

Plain torch on token ids (pipeline/finetune_tasks.py encodes the text). Every example is a GLM blank:
Part A = `[CLS] pattern(with one [MASK]) eos` (bidirectional, sep = its length), Part B at the blank's position.
  * Single-token labels: Part B = `[sop]` (block position 1); the score of a label is the raw logit of its
    verbaliser token at the sop position, as model.generate.score_verbalizers; loss = cross-entropy over the
    label set (Eq. 3's softmax over the verbaliser logits, not over the vocabulary).
  * Multi-token candidates (COPA): one row per candidate, Part B = `[sop] answer[:-1]` (+ the last answer token
    when eop is scored), targets = answer (+ eop); the score is Σ log p of the targets, as
    model.generate.score_candidates (eop included, the official default) and, with include_eop=False and the
    blank last, exactly model.evaluate.score_choices (the zero-shot evaluator); loss = CE over the candidates.
Batches are [B, …] in every tensor (multi-token: [B, N, T], N candidates per example), so Composer can split
them into microbatches; padding is to the right, after each row's causal Part B, so no real token sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassF1Score

from model.evaluate import _logits
from model.glm import GLM


def collate(examples: Sequence, specials, include_eop: bool = True) -> dict[str, Tensor]:
    """Encoded examples (pipeline.finetune_tasks.Encoded: .context, .label, .choice_ids | .candidates) -> a batch.

    Single-token: input_ids / position_ids / block_position_ids [B,T], sep [B], score_index [B], choice_ids [B,N],
    choice_mask [B,N], label [B], valid [B] (False: a padding copy that metrics skip). Multi-token: the same per
    candidate row, [B,N,T] and sep [B,N], plus targets and target_mask [B,N,T]; a missing candidate (fewer than N)
    is a dummy row with choice_mask 0."""
    label = torch.tensor([e.label for e in examples], dtype=torch.long)
    valid = torch.tensor([getattr(e, "valid", True) for e in examples], dtype=torch.bool)
    if not examples[0].candidates:
        rows = [_row(e.context, [], specials) for e in examples]
        n = max(len(e.choice_ids) for e in examples)
        batch = _stack(rows)
        batch["score_index"] = torch.tensor([len(e.context) + 2 for e in examples])   # the sop: [CLS] ctx eos | sop
        batch["choice_ids"] = torch.tensor([list(e.choice_ids) + [0] * (n - len(e.choice_ids)) for e in examples])
        batch["choice_mask"] = torch.tensor([[1] * len(e.choice_ids) + [0] * (n - len(e.choice_ids))
                                             for e in examples], dtype=torch.bool)
        batch["label"], batch["valid"] = label, valid
        return batch
    n = max(len(e.candidates) for e in examples)
    rows = []
    for e in examples:
        for c in list(e.candidates) + [None] * (n - len(e.candidates)):
            rows.append(_row(e.context, c, specials, include_eop) if c is not None else _row([], [], specials))
    flat = _stack(rows)
    batch = {k: v.view(len(examples), n, *v.shape[1:]) for k, v in flat.items()}
    batch["choice_mask"] = torch.tensor([[1] * len(e.candidates) + [0] * (n - len(e.candidates)) for e in examples],
                                        dtype=torch.bool)
    batch["label"], batch["valid"] = label, valid
    return batch


def _row(context: Sequence[int], answer: Sequence[int] | None, specials, include_eop: bool = True) -> dict:
    """One sequence: [CLS] context eos | sop answer… with its positions (Part B at the blank's index)."""
    a = [specials.cls, *context, specials.eos]
    C = len(a)
    blanks = [i for i, t in enumerate(a) if t in (specials.mask, specials.smask, specials.gmask)]
    p = blanks[-1] if blanks else C - 1
    if not answer:
        b, tgt = [specials.sop], []
    else:
        tgt = [*answer, specials.eop] if include_eop else list(answer)
        b = [specials.sop, *tgt[:-1]]
    return {"input_ids": a + b, "position_ids": list(range(C)) + [p] * len(b),
            "block_position_ids": [0] * C + list(range(1, len(b) + 1)), "sep": C,
            "targets": [0] * C + tgt + [0] * (len(b) - len(tgt)),
            "target_mask": [0] * C + [1] * len(tgt) + [0] * (len(b) - len(tgt))}


def _stack(rows: list[dict]) -> dict[str, Tensor]:
    T = max(len(r["input_ids"]) for r in rows)
    pad = lambda key, v: torch.tensor([r[key] + [v] * (T - len(r[key])) for r in rows], dtype=torch.long)
    out = {k: pad(k, 0) for k in ("input_ids", "position_ids", "block_position_ids", "targets", "target_mask")}
    out["target_mask"] = out["target_mask"].bool()
    out["sep"] = torch.tensor([r["sep"] for r in rows], dtype=torch.long)
    return out


def cloze_scores(model: GLM, batch: dict[str, Tensor]) -> Tensor:
    """Differentiable label scores [B, N] (fp32; -inf where choice_mask is 0): verbaliser logits at the sop
    (single-token), or each candidate's Σ log p of its targets (multi-token)."""
    ids = batch["input_ids"]
    if ids.dim() == 2:
        hidden = model(ids, batch["position_ids"], batch["block_position_ids"], sep=batch["sep"], return_hidden=True)
        h = hidden[torch.arange(ids.shape[0], device=ids.device), batch["score_index"]]             # [B,D]
        w = model.word_embeddings.weight
        w = w.full_tensor() if hasattr(w, "full_tensor") else w                                      # FSDP2: gather
        scores = torch.einsum("bd,bnd->bn", h.float(), w[batch["choice_ids"]].float())               # [B,N]
    else:
        B, N, T = ids.shape
        flat = lambda k: batch[k].reshape(B * N, *batch[k].shape[2:])
        hidden = model(flat("input_ids"), flat("position_ids"), flat("block_position_ids"), sep=flat("sep"),
                       return_hidden=True)                                                            # [BN,T,D]
        where = flat("target_mask").nonzero()                                                         # [K,2]
        logits = _logits(model, hidden[where[:, 0], where[:, 1]])                                     # [K,V] fp32
        tgt = flat("targets")[where[:, 0], where[:, 1]]
        logp = F.log_softmax(logits, dim=-1).gather(-1, tgt[:, None])[:, 0]
        scores = torch.zeros(B * N, dtype=torch.float32, device=ids.device).index_add(0, where[:, 0], logp)
        scores = scores.view(B, N)
    return scores.masked_fill(~batch["choice_mask"], float("-inf"))


def cloze_loss(scores: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy over each example's label set (mean over the batch)."""
    return F.cross_entropy(scores, label)


class ClozeAccuracy(Metric):
    """Share of examples whose gold label has the highest score."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, label: Tensor) -> None:
        self.correct += (scores.argmax(-1) == label).sum().double()
        self.count += label.numel()

    def compute(self) -> Tensor:
        return (self.correct / self.count.clamp(min=1)).float()


class ClozeF1(MulticlassF1Score):
    """Macro-F1 over the labels (CB's second metric), from the argmax of the scores."""

    def update(self, scores: Tensor, label: Tensor) -> None:   # noqa: D102 (torchmetrics signature, scores in)
        super().update(scores.argmax(-1), label)


def cloze_metrics(num_labels: int) -> dict[str, Metric]:
    """accuracy always; f1_macro when the task has a fixed label set (single-token tasks)."""
    out: dict[str, Metric] = {"accuracy": ClozeAccuracy()}
    if num_labels >= 2:
        out["f1_macro"] = ClozeF1(num_classes=num_labels, average="macro")
    return out
