"""Train a GLM on a shard set with Composer (FSDP2 when the world size is > 1).

    composer train.py                                   # demo preset on ./data/shards (train + validation)
    composer train.py configs/train/tiny.yaml --data=data/shards/train --max-duration=20ba   # tiny CPU run
    composer -n 2 train.py configs/train/tiny.yaml --save-folder=runs/tiny2     # 2 processes, gloo + FSDP2 on CPU
    python train.py configs/train/tiny.yaml --max-duration=10ba                # one process, no launcher (runs/tiny)
    composer -n 8 train.py configs/train/glm-large.yaml --data=s3://bucket/shards/train --save-folder=s3://bucket/ckpt

Overrides: `--key=value` for any field of TrainConfig, dotted for sections (`--model.preset=small`,
`--optim.lr=3e-4`, `--stream.num_workers=2`); plain flags for the common ones (`--data`, `--eval-data`,
`--save-folder`, `--max-duration`, `--seed`). Unknown keys are refused with the valid list.

Derived, never configured: vocab_size (rounded up to a multiple of model.pad_vocab_to), seq_len and
max_position_embeddings come from the train shard manifest. Train loss per step and eval loss per evaluation
are written to `<log_folder>/metrics.jsonl` (one JSON object per line), which `jobs/` scripts can plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from composer import Callback, Logger, State, Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, SpeedMonitor
from composer.core import Evaluator
from composer.loggers import FileLogger, LoggerDestination, TensorboardLogger
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW, LinearWithWarmupScheduler
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from model.composer import OBJECTIVES, GLMComposer
from model.config import PRESETS, GLMConfig
from pipeline.config import load_config
from pipeline.stream import ShardStream, StreamConfig, StreamLoader

# --------------------------------------------------------------------------------------------- config


@dataclass
class ModelSettings:
    preset: str = "demo"                  # a model.config.PRESETS name; the fields below override it when set
    n_layer: int = 0                      # 0 = the preset's
    d_model: int = 0                      # 0 = the preset's
    n_head: int = 0                       # 0 = the preset's
    vocab_size: int = 0                   # 0 = derive: manifest vocab_size rounded up to pad_vocab_to
    pad_vocab_to: int = 128               # vocab rounding (spec §7.1 pads to a multiple of 128)
    max_position_embeddings: int = 0      # 0 = derive: the manifest seq_len
    dropout: float = -1.0                 # < 0 = the preset's (0.1); sets embedding, attention and hidden dropout
    attn_impl: str = "sdpa"               # sdpa (any device) | flex (CUDA only: no backward on CPU)
    activation_checkpointing: bool = False  # recompute each layer's activations in backward (large presets)
    init_device: str = "auto"             # auto (meta for presets >= 1B params with FSDP2, else cpu) | cpu | meta


@dataclass
class OptimConfig:
    lr: float = 2e-3                      # peak learning rate (official: 4e-4 base, 2e-4 large, 1e-4 10B; §9)
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas (official: 0.9/0.98; 10B: 0.9/0.95)
    eps: float = 1e-6                     # Adam epsilon (official 1e-6; 10B 1e-8)
    weight_decay: float = 0.1             # AdamW decay (per step: w *= 1 - lr_t*wd); none on biases/LayerNorm (§6.5)
    schedule: str = "cosine"              # cosine | linear decay after warmup (AnnealingLR, §9)
    warmup: str = "30ba"                  # warmup length: a Composer time string (e.g. 8000ba, 0.05dur)
    decay_to: float = 0.1                 # final lr as a fraction of lr (official 0.05 / 0.1 / 0.025)
    decay_duration: str = "1dur"          # when lr reaches decay_to (official: before the last step), e.g. 120000ba
    grad_clip: float = 1.0                # max global grad norm (all official recipes: 1.0)


@dataclass
class TrainConfig:
    data: str = "data/shards/train"       # train shard set: folder or URL of its manifest (s3://..., gs://...)
    eval_data: str = ""                   # validation shard set; "" = the sibling 'validation' of data; "none" = skip
    storage_options: dict = field(default_factory=dict)  # fsspec options for data, e.g. {endpoint_url: ...}
    save_folder: str = ""                 # checkpoints: folder or object-store URL (s3://b/prefix); "" = runs/<preset>
    log_folder: str = ""                  # metrics.jsonl / logs; "" = save_folder if local, else runs/<run_name>
    run_name: str = ""                    # "" = glm-<preset>; autoresume finds checkpoints by it
    max_duration: str = "600ba"           # Composer time string: 600ba, 2ep, 100000sp
    seed: int = 1234                      # model init, dropout and data order
    batch_size: int = 8                   # samples per device per step; global = batch_size x world size
    microbatch_size: int = 0              # device_train_microbatch_size; 0 = batch_size (no accumulation)
    eval_batch_size: int = 0              # 0 = batch_size
    eval_interval: str = "50ba"           # how often to evaluate (and at the end)
    eval_batches: int = 4                 # batches per evaluation (-1: the whole validation set)
    precision: str = "auto"               # auto (amp_bf16 on GPU, fp32 on CPU) | fp32 | amp_bf16
    save_interval: str = "100ba"          # checkpoint interval
    keep_checkpoints: int = 2             # checkpoints kept (-1: all)
    autoresume: bool = True               # resume from the latest checkpoint of run_name in save_folder
    load_path: str = ""                   # start from this checkpoint instead (ignored when autoresume finds one)
    fsdp_state_dict_type: str = "sharded"  # FSDP2 checkpoints: sharded (one file per rank) | full
    logger: str = "file"                  # file | tensorboard (besides metrics.jsonl and the progress bar)
    progress_bar: bool = True             # Composer's tqdm bar (rank 0)
    log_interval: str = "10ba"            # console log interval when the progress bar is off
    wall_clock_limit_s: float = 480.0     # stop (with a checkpoint) after this many seconds; 0 = none
    record_samples: bool = False          # append each trained batch's sample_key to <log_folder>/samples-rank<r>.jsonl
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)


def parse_args(argv: list[str]) -> TrainConfig:
    """`[configs/train/<x>.yaml ...] [--key=value ...]` -> TrainConfig. The plain flags (--data, --eval-data,
    --save-folder, --max-duration, --seed) are fields like any other; sections nest with dots (--optim.lr=...).
    The one loader of every config in the project: pipeline.config.load_config."""
    return load_config(TrainConfig, argv)


# --------------------------------------------------------------------------------------------- callbacks


class JSONLLogger(LoggerDestination):
    """Every metric Composer logs (train loss per step, eval loss per evaluation, lr, throughput), one JSON
    object per line in <folder>/metrics.jsonl, rank 0 only."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "metrics.jsonl")
        self._f = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if dist.get_global_rank() != 0:
            return
        if self._f is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._f = open(self.path, "a")
        row = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            x = float(v.item() if isinstance(v, torch.Tensor) else v) if _is_number(v) else None
            if x is not None and math.isfinite(x):  # NaN (an objective absent from the eval batches) is left out
                row[k] = x
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


class SampleRecorder(Callback):
    """Sample provenance: after each trained batch, append {step, keys} to samples-rank<r>.jsonl (per rank)."""

    def __init__(self, folder: str):
        self.folder = folder

    def batch_end(self, state: State, logger: Logger) -> None:
        keys = state.batch.get("sample_key") if isinstance(state.batch, dict) else None
        if keys is None:
            return
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"samples-rank{dist.get_global_rank()}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"step": int(state.timestamp.batch), "epoch": int(state.timestamp.epoch),
                                "keys": list(keys)}) + "\n")


class WallClockStop(Callback):
    """Ends training (Composer then saves its final checkpoint) once `limit_s` seconds have passed."""

    def __init__(self, limit_s: float):
        self.limit_s, self.t0 = limit_s, time.time()

    def batch_end(self, state: State, logger: Logger) -> None:
        stop = torch.tensor([time.time() - self.t0 > self.limit_s], dtype=torch.uint8)
        dist.all_reduce(stop, reduce_operation="MAX")  # every rank stops at the same step
        if bool(stop.item()):
            state.stop_training()


class DataFingerprint(Callback):
    """Saved in checkpoints: refuses to resume on data with another tokenizer, vocab or seq_len."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def state_dict(self) -> dict:
        return dict(self.fingerprint)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if self.fingerprint.get(k) != v:
                raise ValueError(f"the checkpoint was trained on data with {k}={v!r} but --data has "
                                 f"{k}={self.fingerprint.get(k)!r}; use the shard set built with the run's "
                                 "tokenizer, or start a new run (another --save-folder / run_name)")


# --------------------------------------------------------------------------------------------- build


def model_config(s: ModelSettings, manifest_vocab: int, manifest_seq_len: int) -> GLMConfig:
    if s.preset not in PRESETS:
        raise ValueError(f"model.preset={s.preset!r}: choose one of {sorted(PRESETS)}")
    base = PRESETS[s.preset]
    vocab = s.vocab_size or int(math.ceil(manifest_vocab / s.pad_vocab_to) * s.pad_vocab_to)
    changes: dict[str, Any] = dict(vocab_size=vocab, max_position_embeddings=s.max_position_embeddings
                                   or manifest_seq_len, attn_impl=s.attn_impl)
    for name in ("n_layer", "d_model", "n_head"):
        if getattr(s, name):
            changes[name] = getattr(s, name)
    if s.dropout >= 0:
        changes.update(embedding_dropout=s.dropout, attention_dropout=s.dropout, hidden_dropout=s.dropout)
    return dataclasses.replace(base, **changes)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """spec §6.5: decay everything except biases and LayerNorm parameters (embeddings ARE decayed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> DecoupledAdamW:
    """DecoupledAdamW with the official (torch/DeepSpeed AdamW) meaning of weight_decay: each step multiplies
    a decayed weight by (1 - lr_t * weight_decay). Composer's DecoupledAdamW does NOT scale its weight_decay by
    the lr (it multiplies by 1 - weight_decay * lr_t / lr), so the official 0.1 is passed as 0.1 * lr."""
    wd = o.weight_decay * o.lr
    return DecoupledAdamW(param_groups(model, wd), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=wd)


def _rank0_print(*a) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, flush=True)


def main(cfg: TrainConfig) -> Trainer:
    """Build everything from cfg, train, and return the Trainer (tests inspect its state)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    on_gpu = torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("amp_bf16" if on_gpu else "fp32")
    if precision != "fp32" and not on_gpu:
        raise ValueError(f"precision={precision!r} needs a GPU (Composer refuses it on CPU); use fp32 or auto")
    run_name = cfg.run_name or f"glm-{cfg.model.preset}"
    # each preset gets its own default folder, so autoresume never picks up another model's checkpoint
    save_folder = cfg.save_folder or os.path.join("runs", cfg.model.preset)
    remote_save = "://" in save_folder
    log_folder = cfg.log_folder or (os.path.join("runs", run_name) if remote_save else save_folder)
    reproducibility.seed_all(cfg.seed)

    # ---- data (first: the model's vocab and positions derive from it) ----
    train_ds = ShardStream(cfg.data, cfg.batch_size, seed=cfg.seed, shuffle=True, config=cfg.stream,
                           storage_options=cfg.storage_options)
    m = train_ds.manifest
    gcfg = model_config(cfg.model, m.vocab_size, m.seq_len)
    fp = (m.tokenizer or {}).get("fingerprint")
    train_ds.check(vocab_size=gcfg.vocab_size, max_position_embeddings=gcfg.max_position_embeddings)
    eval_url = cfg.eval_data or (cfg.data.rstrip("/").removesuffix("/manifest.json").rsplit("/", 1)[0]
                                 + "/validation")
    evaluators = []
    if cfg.eval_data != "none":
        eval_ds = ShardStream(eval_url, cfg.eval_batch_size or cfg.batch_size, seed=cfg.seed, shuffle=False,
                              config=cfg.stream, storage_options=cfg.storage_options)
        eval_ds.check(vocab_size=gcfg.vocab_size, max_position_embeddings=gcfg.max_position_embeddings,
                      tokenizer_fingerprint=fp)
        eval_loader = DataLoader(eval_ds, batch_size=None, num_workers=0, generator=torch.Generator())
    objectives = tuple(o for o in OBJECTIVES if (m.config.get("objectives") or {}).get(o, 0) > 0) or OBJECTIVES

    # ---- model ----
    init_device = cfg.model.init_device
    if init_device == "auto":
        init_device = "meta" if (gcfg.num_params >= 1e9 and world > 1 and on_gpu) else "cpu"
    composer_model = GLMComposer(gcfg, objectives=objectives, init_device=init_device,
                                 activation_checkpointing=cfg.model.activation_checkpointing)
    if world == 1:
        composer_model.materialize("cuda" if on_gpu else "cpu")
        if cfg.model.activation_checkpointing:
            composer_model.apply_activation_checkpointing()
    if cfg.model.attn_impl == "flex" and not on_gpu:
        raise ValueError("model.attn_impl='flex' has no backward on CPU; train on CPU with attn_impl=sdpa")
    if cfg.eval_data != "none":
        evaluators.append(Evaluator(label="eval", dataloader=eval_loader,
                                    metric_names=list(composer_model.get_metrics(is_train=False)),
                                    device_eval_microbatch_size=cfg.eval_batch_size or cfg.batch_size))

    # ---- optimisation ----
    o = cfg.optim
    optimizer = make_optimizer(composer_model, o)
    if o.schedule == "cosine":
        scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=o.warmup, alpha_f=o.decay_to, t_max=o.decay_duration)
    elif o.schedule == "linear":
        scheduler = LinearWithWarmupScheduler(t_warmup=o.warmup, alpha_f=o.decay_to, t_max=o.decay_duration)
    else:
        raise ValueError(f"optim.schedule={o.schedule!r}: choose cosine or linear")

    parallelism = None
    if world > 1:
        from composer.utils.parallelism import FSDP2Config

        parallelism = {"fsdp": FSDP2Config(state_dict_type=cfg.fsdp_state_dict_type,
                                           activation_checkpointing=cfg.model.activation_checkpointing)}

    # ---- logging and callbacks ----
    loggers: list[LoggerDestination] = [JSONLLogger(log_folder)]
    if cfg.logger == "tensorboard":
        loggers.append(TensorboardLogger(log_dir=os.path.join(log_folder, "tensorboard")))
    elif cfg.logger == "file":
        loggers.append(FileLogger(filename=os.path.join(log_folder, "log-rank{rank}.txt"), flush_interval=10))
    else:
        raise ValueError(f"logger={cfg.logger!r}: choose file or tensorboard")
    callbacks: list[Callback] = [SpeedMonitor(window_size=10), LRMonitor(), MemoryMonitor(),
                                 DataFingerprint({"tokenizer_fingerprint": fp, "vocab_size": m.vocab_size,
                                                  "seq_len": m.seq_len})]
    if cfg.record_samples:
        callbacks.append(SampleRecorder(log_folder))
    if cfg.wall_clock_limit_s > 0:
        callbacks.append(WallClockStop(cfg.wall_clock_limit_s))

    # ---- derived figures ----
    order = train_ds.order(0)
    tokens_per_batch = train_ds.global_batch_size * m.seq_len
    _rank0_print(
        f"[train] {run_name}: model {cfg.model.preset} L={gcfg.n_layer} d={gcfg.d_model} H={gcfg.n_head} "
        f"params {gcfg.num_params / 1e6:.2f}M | vocab {gcfg.vocab_size} (data {m.vocab_size}) seq_len {m.seq_len} "
        f"P={gcfg.max_position_embeddings} | world {world} x batch {cfg.batch_size} = global "
        f"{train_ds.global_batch_size}, tokens/batch {tokens_per_batch:,} | FLOPs/token "
        f"{gcfg.flops_per_token(m.seq_len):,} ({gcfg.flops_per_token(m.seq_len) * tokens_per_batch:.3g}/batch) | "
        f"steps/epoch {train_ds.batches_per_epoch} ({order.num_dropped} samples dropped at epoch end) | "
        f"precision {precision} | {'FSDP2' if world > 1 else 'single process'} | objectives {objectives}")

    trainer = Trainer(
        model=composer_model,
        train_dataloader=StreamLoader(train_ds),
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_batches,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=o.grad_clip)] if o.grad_clip > 0
        else [],
        device_train_microbatch_size=cfg.microbatch_size or cfg.batch_size,
        precision=precision,
        parallelism_config=parallelism,
        save_folder=save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.keep_checkpoints,
        # A crash between writing a checkpoint and moving the `latest` link leaves a "future" checkpoint beside
        # an older latest; the resumed run recreates it identically, so it may be overwritten.
        save_overwrite=cfg.autoresume,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path or None,
        run_name=run_name,
        loggers=loggers,
        callbacks=callbacks,
        progress_bar=cfg.progress_bar,
        log_to_console=not cfg.progress_bar,
        console_log_interval=cfg.log_interval,
        seed=cfg.seed,
        device="gpu" if on_gpu else "cpu",
    )
    # Composer restores the RNG state of a mid-epoch checkpoint only when it replays the dataloader; our stream
    # resumes itself, so restore it here (dropout masks then match an uninterrupted run exactly).
    if getattr(trainer, "_rng_state", None) is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
        reproducibility.load_rng_state(trainer._rng_state)
        trainer._rng_state = None
    trainer.fit()
    return trainer


def cli(argv: list[str] | None = None) -> None:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    trainer = main(cfg)
    trainer.close()


if __name__ == "__main__":
    cli()
