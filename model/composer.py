"""The ComposerModel wrapper around the plain GLM: loss, eval metrics, FLOPs, FSDP2 wrap policy, checkpointing.

    python -c "from model.composer import GLMComposer as G; from model.config import PRESETS as P; print(G(P['tiny']))"

`model/glm.py` stays plain torch; everything that is about *training* it is decided here, in one place
(torchtitan style): which modules are FSDP2 units (one per transformer layer; the root GLM, with the tied word
embedding, is the last unit), which are activation-checkpointed, how parameters are initialised after a
meta-device construction, and what the loss and metrics are. This is the only model file importing composer, so
the zero-shot evaluation callback (`ZeroShotEval`, around model/evaluate.py's TaskEvaluator) lives here too.

Batches are the dicts of `pipeline/stream.py`: input_ids, targets, loss_mask, position_ids, block_position_ids
[B,T]; sep [B]; objective and sample_key lists [B].
"""

from __future__ import annotations

import torch
from composer import Callback, Event, Logger, State
from composer.core.precision import get_precision_context
from composer.models import ComposerModel
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler
from torch import Tensor
from torchmetrics import Metric

from model.config import GLMConfig
from model.evaluate import flat_metrics
from model.glm import GLM, Block, glm_loss

OBJECTIVES = ("bert", "sentence", "gpt")


class MaskedTokenMetric(Metric):
    """Cross-entropy or top-1 accuracy over Part B tokens (loss_mask 1), optionally of one objective only."""

    full_state_update = False

    def __init__(self, kind: str, objective: str | None = None):
        super().__init__()
        if kind not in ("loss", "accuracy"):
            raise ValueError(f"kind={kind!r}: choose loss or accuracy")
        self.kind, self.objective = kind, objective
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, batch: dict) -> None:
        mask = batch["loss_mask"].to(torch.bool)
        if self.objective is not None:
            keep = torch.tensor([o == self.objective for o in batch["objective"]], device=mask.device)
            mask = mask & keep[:, None]
        if not mask.any():
            return
        if self.kind == "loss":
            value = glm_loss(logits, batch["targets"], mask, reduction="none").sum()
        else:
            value = (logits[mask].argmax(-1) == batch["targets"][mask]).sum()
        self.total += value.to(torch.float64)
        self.count += mask.sum().to(torch.float64)

    def compute(self) -> Tensor:
        if self.count == 0:  # no sample of this objective in the evaluated batches
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class GLMComposer(ComposerModel):
    """ComposerModel around `GLM`. init_device "meta" builds no weights until FSDP2 (or `materialize`) does."""

    def __init__(self, config: GLMConfig, *, objectives: tuple[str, ...] = OBJECTIVES,
                 activation_checkpointing: bool = False, init_device: str = "cpu"):
        super().__init__()
        self.config = config
        if init_device not in ("cpu", "meta", "cuda"):
            raise ValueError(f"init_device={init_device!r}: choose cpu, cuda or meta (meta: large presets + FSDP2)")
        with torch.device(init_device):
            self.model = GLM(config)
        # FSDP2 units and the activation-checkpointing choice (read by Composer's FSDP2 path; see module doc)
        self.model.fsdp_wrap_fn = lambda m: isinstance(m, Block)
        self.model.activation_checkpointing_fn = lambda m: isinstance(m, Block)
        self.model.param_init_fn = self.model.init_weights  # Composer's meta init: per module, after sharding
        self.activation_checkpointing = activation_checkpointing
        self.train_metrics: dict[str, Metric] = {}
        self.objectives = tuple(objectives)
        evals = {"loss": MaskedTokenMetric("loss"), "accuracy": MaskedTokenMetric("accuracy")}
        for o in self.objectives:
            evals[f"loss_{o}"] = MaskedTokenMetric("loss", o)
            evals[f"accuracy_{o}"] = MaskedTokenMetric("accuracy", o)
        self.eval_metrics: dict[str, Metric] = evals  # a plain dict: Composer moves metrics, FSDP never wraps them

    # ---- initialisation ---------------------------------------------------------------------------------
    def materialize(self, device: str | torch.device) -> None:
        """Single-process meta init: allocate on `device` and apply the official init (FSDP2 does its own)."""
        if any(p.is_meta for p in self.model.parameters()):
            self.model.to_empty(device=device)
            self.model.init_weights()

    def apply_activation_checkpointing(self) -> None:
        """Checkpoint every transformer layer without FSDP2 (with FSDP2, FSDP2Config(activation_checkpointing=True)
        makes Composer apply the same choice through `activation_checkpointing_fn`)."""
        from composer.distributed.activation_checkpointing import apply_ac

        apply_ac(self.model, True, False, self.model.activation_checkpointing_fn)

    # ---- ComposerModel protocol -------------------------------------------------------------------------
    def forward(self, batch: dict) -> Tensor:
        return self.model(batch["input_ids"], batch["position_ids"], batch["block_position_ids"], batch["sep"])

    def loss(self, outputs: Tensor, batch: dict, *args, **kwargs) -> Tensor:
        return glm_loss(outputs, batch["targets"], batch["loss_mask"])

    def eval_forward(self, batch: dict, outputs: Tensor | None = None) -> Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return dict(self.train_metrics) if is_train else dict(self.eval_metrics)

    def update_metric(self, batch: dict, outputs: Tensor, metric: Metric) -> None:
        metric.update(outputs, batch)

    def flops_per_batch(self, batch: dict) -> int:
        b, t = batch["input_ids"].shape
        return self.config.flops_per_token(t) * b * t


class ZeroShotEval(Callback):
    """Zero-shot tasks inside training (model/evaluate.py): runs a TaskEvaluator every `interval` and at the end
    of training, logs `metrics/zeroshot/<task>/<metric>` through Composer's logger (metrics.jsonl, TensorBoard).

    Every rank runs its share of the items with the same number of forwards (FSDP2 all-gathers need every rank),
    and the sums are added over ranks."""

    def __init__(self, evaluator, interval: str = "50ba"):
        self.evaluator = evaluator
        self._due = create_interval_scheduler(interval, include_end_of_training=False, checkpoint_events=False)
        self._last_step = -1

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:         # the data files' paths, sha256s and package version, once per run
            logger.log_hyperparameters({"zeroshot_data": self.evaluator.provenance})
            return
        if not ((event == Event.BATCH_END and self._due(state, event)) or event == Event.FIT_END):
            return
        step = int(state.timestamp.batch)
        if step == self._last_step:          # FIT_END right after an interval evaluation of the same step
            return
        self._last_step = step
        glm = state.model.model
        device = next(glm.parameters()).device

        def all_reduce(t: Tensor) -> None:
            on_device = t.to(device)
            dist.all_reduce(on_device, reduce_operation="SUM")
            t.copy_(on_device.cpu())

        with get_precision_context(state.precision):
            results = self.evaluator(glm, dist.get_global_rank(), dist.get_world_size(), all_reduce)
        logger.log_metrics(flat_metrics(results))
