"""Train a GLM on a shard set with Composer (FSDP2 when the world size is > 1).

    composer train.py                                   # demo preset: a 1:3 mixture of two sources in ./data/mix
    python train.py configs/train/tiny.yaml --data='{sources: {a: {path: o/a/train}, b: {path: o/b/train, weight: 3}}}'
    composer train.py configs/train/tiny.yaml --data=data/shards/train --max-duration=20ba   # tiny CPU run (runs/tiny)
    composer -n 2 train.py configs/train/tiny.yaml --save-folder=runs/tiny2     # 2 processes, gloo + FSDP2 on CPU
    python train.py configs/train/tiny.yaml --max-duration=10ba --save-folder=runs/tiny1   # no launcher
    composer -n 8 train.py configs/train/glm-large.yaml --data=s3://bucket/shards/train --save-folder=s3://bucket/ckpt
    python train.py --help                              # every setting with its comment

Overrides: `--key=value` for any field of TrainConfig, dotted for sections (`--model.preset=small`,
`--optim.lr=3e-4`, `--stream.num_workers=2`); plain flags for the common ones (`--data`, `--eval-data`,
`--save-folder`, `--max-duration`, `--seed`). Unknown keys are refused with the valid list. Without a preset the
demo preset (configs/train/demo.yaml) applies. `--data` may be a weighted mixture of shard sets (pipeline/mixture.py,
README "Mixtures"): per-source train and eval loss and realised shares go to metrics.jsonl; a changed mixture is
refused on resume unless --allow-data-change.

Derived, never configured: vocab_size (rounded up to a multiple of model.pad_vocab_to), seq_len and
max_position_embeddings come from the train shard manifest. Train loss per step and eval loss per evaluation
are written to `<log_folder>/metrics.jsonl` (one JSON object per line), which `jobs/` scripts can plot.

Starting and stopping: the same command resumes from the newest readable checkpoint in save_folder (it says
"resuming from step N"; a resumed run appends {"event": "resume", "from_step": N} to metrics.jsonl and
samples-rank*.jsonl, after which steps > N that the interrupted run had logged appear again). Checkpoints are
loaded as plain data only (weights_only; a checkpoint that holds code is refused). A folder whose checkpoints
are all unreadable is not started over unless --allow-fresh-start=true; a finished run (at max_duration) is
not restarted (another --save-folder, or a longer --max-duration). Exit status: 0 at max_duration, 3 when
wall_clock_limit_s stopped the run (its checkpoint saved: requeue the same command), 1 on an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from composer import Callback, Logger, State, Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, SpeedMonitor
from composer.core import Evaluator, Time, TimeUnit
from composer.loggers import FileLogger, LoggerDestination, TensorboardLogger
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW, LinearWithWarmupScheduler
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from model.checkpoint import UnsafeCheckpointError, read_trainer_state, safe_checkpoint_loading
from model.composer import OBJECTIVES, GLMComposer, ZeroShotEval
from model.config import PRESETS, GLMConfig
from model.glm import glm_loss
from pipeline import mixture as X
from pipeline.config import load_config
from pipeline.shards import manifest_url, sibling_validation
from pipeline.stream import MixedStream, ShardStream, StreamConfig, StreamLoader
from pipeline.tokenizer import Tokenizer, find_tokenizer

# --------------------------------------------------------------------------------------------- config

# FSDP2 warns that each transformer Block returns a view: the (k, v) cache pair, views of the qkv projection, which
# GLM.forward drops unless a cache is asked for; nothing applies an in-place op to them, so no gradient is lost
# (tests/test_train.py::test_fsdp2_view_warning_leaves_gradients_right compares 2-rank FSDP2 and 1-process grads).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")

DEMO_PRESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "train", "demo.yaml")


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
    data: str = "data/shards/train"       # train shard set (folder or URL of its manifest: s3://..., gs://...), or a
                                          # mixture: a .yaml file or inline '{sources: {name: {path, weight}}}'
    eval_data: str = ""                   # validation set or mixture; "" = the sibling 'validation' of data (of every
                                          # source of a mixture: one evaluator each); "none" = skip
    allow_data_change: bool = False       # resume with another mixture: its weights from the resumed step on
    storage_options: dict = field(default_factory=dict)  # fsspec options for data, e.g. {endpoint_url: ...}
    save_folder: str = ""                 # checkpoints: folder or object-store URL (s3://b/prefix); "" = runs/<preset>
    log_folder: str = ""                  # metrics.jsonl / logs; "" = save_folder if local, else runs/<run_name>
    run_name: str = ""                    # "" = glm-<preset>; autoresume finds checkpoints by it
    max_duration: str = "600ba"           # Composer time string: 600ba, 2ep, 100000sp, 5000000tok (= sp x seq_len)
    seed: int = 1234                      # model init, dropout and data order
    batch_size: int = 8                   # samples per device per step; global = batch_size x world size
    microbatch_size: int = 0              # device_train_microbatch_size; 0 = batch_size (no accumulation)
    eval_batch_size: int = 0              # 0 = batch_size
    eval_interval: str = "50ba"           # how often to evaluate (and at the end)
    eval_batches: int = 4                 # batches per evaluation (-1: the whole validation set)
    eval_tasks: str = ""                  # zero-shot tasks every eval_interval, e.g. "lambada,arc_easy,bpb" ("" = none)
    eval_tasks_limit: int = 200           # items per zero-shot task in training: a fixed seeded subset (0 = all: slow)
    eval_tokenizer: str = ""              # tokenizer for eval_tasks; "" = the train manifest's (found beside it)
    precision: str = "auto"               # auto (amp_bf16 on GPU, fp32 on CPU) | fp32 | amp_bf16
    save_interval: str = "100ba"          # checkpoint interval
    keep_checkpoints: int = 2             # checkpoints kept (-1: all)
    autoresume: bool = True               # resume from the newest readable checkpoint in save_folder
    allow_fresh_start: bool = False       # start at step 0 although save_folder holds checkpoints none can be used
    load_path: str = ""                   # start from this checkpoint instead (ignored when autoresume finds one)
    load_weights_only: bool = False       # from load_path take the weights only (new optimizer, schedule, step 0,
                                          # other seq_len allowed): stage 2 of a recipe, or continuing a model
    fsdp_state_dict_type: str = "sharded"  # FSDP2 checkpoints: sharded (one file per rank) | full
    logger: str = "file"                  # file | tensorboard (besides metrics.jsonl and the progress bar)
    progress_bar: bool = True             # Composer's tqdm bar (rank 0)
    log_interval: str = "10ba"            # console log interval when the progress bar is off
    wall_clock_limit_s: float = 0.0       # stop after this many seconds: checkpoint, then exit code 3; 0 = none
    record_samples: bool = False          # append each trained batch's sample_key to <log_folder>/samples-rank<r>.jsonl
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)


def parse_args(argv: list[str]) -> TrainConfig:
    """`[configs/train/<x>.yaml ...] [--key=value ...]` -> TrainConfig. The plain flags (--data, --eval-data,
    --save-folder, --max-duration, --seed) are fields like any other; sections nest with dots (--optim.lr=...).
    With no preset, configs/train/demo.yaml (the demo, bounded at 8 minutes) is the preset. The one loader of every
    config in the project: pipeline.config.load_config."""
    return load_config(TrainConfig, argv, default_yaml=DEMO_PRESET)


# --------------------------------------------------------------------------------------------- callbacks


class JSONLLogger(LoggerDestination):
    """Every metric Composer logs (train loss per step, eval loss per evaluation, lr, throughput), one JSON
    object per line in <folder>/metrics.jsonl, rank 0 only. A resumed run first appends
    {"event": "resume", "from_step": N}: the steps after N that an interrupted run had logged are logged again."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "metrics.jsonl")
        self._f = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if dist.get_global_rank() != 0:
            return
        self._write({"step": step, "time": round(time.time(), 3), **self._numbers(metrics)})

    def fit_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) > 0 and dist.get_global_rank() == 0:  # steps after this may repeat earlier ones
            self._write({"event": "resume", "from_step": int(state.timestamp.batch), "time": round(time.time(), 3)})

    def _write(self, row: dict) -> None:
        if self._f is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._f = open(self.path, "a")
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    @staticmethod
    def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
        row = {}
        for k, v in metrics.items():
            x = float(v.item() if isinstance(v, torch.Tensor) else v) if _is_number(v) else None
            if x is not None and math.isfinite(x):  # NaN (an objective absent from the eval batches) is left out
                row[k] = x
        return row

    def close(self, state: State, logger: Logger) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


class SampleRecorder(Callback):
    """Sample provenance: after each trained batch, append {step, keys} to samples-rank<r>.jsonl (per rank); a
    resumed run first appends {"event": "resume", "from_step": N} (the steps after N may appear twice)."""

    def __init__(self, folder: str):
        self.folder = folder

    def fit_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) > 0:
            self._append({"event": "resume", "from_step": int(state.timestamp.batch)})

    def batch_end(self, state: State, logger: Logger) -> None:
        keys = state.batch.get("sample_key") if isinstance(state.batch, dict) else None
        if keys is not None:
            self._append({"step": int(state.timestamp.batch), "epoch": int(state.timestamp.epoch),
                          "keys": list(keys)})

    def _append(self, row: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"samples-rank{dist.get_global_rank()}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


class WallClockStop(Callback):
    """Ends training once `limit_s` seconds have passed; stop_training() makes this step the last one, so
    Composer's checkpoint saver writes it (BATCH_CHECKPOINT follows BATCH_END) before fit returns. `stopped_at`
    is then the step, and cli() exits with EXIT_WALL_CLOCK so a scheduler can requeue the same command."""

    def __init__(self, limit_s: float):
        self.limit_s, self.t0 = limit_s, time.time()
        self.stopped_at: int | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        stop = torch.tensor([time.time() - self.t0 > self.limit_s], dtype=torch.uint8)
        dist.all_reduce(stop, reduce_operation="MAX")  # every rank stops at the same step
        if bool(stop.item()) and self.stopped_at is None:
            self.stopped_at = int(state.timestamp.batch)
            state.stop_training()


class AppendingFileLogger(FileLogger):
    """Composer's FileLogger opens its file with "w+": a rerun, even one that fails at once, wipes the log of the
    attempt before. This one appends, so every attempt of a run stays in log-rank<r>.txt."""

    def init(self, state: State, logger: Logger) -> None:
        self._is_newline, self._run_name = True, state.run_name
        os.makedirs(os.path.dirname(self.filename) or ".", exist_ok=True)
        self.file = open(self.filename, "a", buffering=self.buffer_size)
        self._flush_queue()


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


class MixtureMetrics(Callback):
    """A mixture's per-source metrics: the train loss of every source (Σ CE over its samples' Part-B tokens / their
    count, over all ranks) each step as train/loss/<source>, and every `interval` steps the realised share of the
    samples trained so far, the target share, the passes and whether masks are reused: data/share/<source>,
    data/target/<source>, data/passes/<source>, data/masks_reused/<source>."""

    def __init__(self, ds: MixedStream, interval: int):
        self.ds, self.interval, self.names = ds, max(1, interval), list(ds.names)
        self._zero()

    def _zero(self) -> None:
        self.sums = torch.zeros(2, len(self.names), dtype=torch.float64)   # [loss sum, token count] per source

    def after_loss(self, state: State, logger: Logger) -> None:   # once per microbatch; outputs: logits [B, T, V]
        b = state.batch
        names = b.get("mixture_source") if isinstance(b, dict) else None
        if names is None:
            return
        with torch.no_grad():
            per = glm_loss(state.outputs, b["targets"], b["loss_mask"], reduction="none").sum(1).double().cpu()
            count = b["loss_mask"].sum(1).double().cpu()
        idx = torch.tensor([self.names.index(n) for n in names])
        self.sums[0].index_add_(0, idx, per)
        self.sums[1].index_add_(0, idx, count)

    def batch_end(self, state: State, logger: Logger) -> None:
        sums = state.device.tensor_to_device(self.sums)
        dist.all_reduce(sums)                      # every rank: the same sources in the same order
        sums = sums.cpu()
        out = {f"train/loss/{n}": float(sums[0, i] / sums[1, i]) for i, n in enumerate(self.names) if sums[1, i] > 0}
        self._zero()
        if int(state.timestamp.batch) % self.interval == 0:
            for n, p in self.ds.progress(int(state.timestamp.sample_in_epoch)).items():
                out.update({f"data/share/{n}": p["share"], f"data/target/{n}": p["target"],
                            f"data/passes/{n}": p["passes"], f"data/masks_reused/{n}": float(p["masks_reused"])})
        logger.log_metrics(out)


# --------------------------------------------------------------------------------------------- build
# main() reads top-down: where the run lives, the data (first: the model derives from it), the model, the
# optimiser, logging and callbacks, which checkpoint to start from, then Composer's Trainer.


@dataclass
class Run:
    """Where and how this process trains (derived from the config and the launcher's environment)."""
    world: int
    on_gpu: bool
    precision: str
    run_name: str
    save_folder: str
    log_folder: str


@dataclass
class Data:
    train: ShardStream | MixedStream
    eval_loaders: dict[str, DataLoader]   # evaluator label ("eval", or "eval/<source>" per mixture source) -> loader
    manifest: Any              # of a mixture: its first source's (every source has the same tokenizer and seq_len)
    model_config: GLMConfig
    objectives: tuple[str, ...]
    fingerprint: dict          # what DataFingerprint saves in checkpoints and checks on resume

    @property
    def mixed(self) -> bool:
        return isinstance(self.train, MixedStream)


@dataclass
class Start:
    """The checkpoint a run starts from (None: step 0) and what autoresume found on the way."""
    load_path: str | None = None
    composer_autoresume: bool = False   # remote save folders: Composer's autoresume finds `latest` itself
    full_state_dict: bool = False       # a monolithic checkpoint resumed under FSDP2 loads (and saves) full
    weights_only: bool = False          # load_path gives the weights only (load_weights_only, not autoresume)
    notes: list[str] = field(default_factory=list)


def main(cfg: TrainConfig) -> Trainer:
    """Build everything from cfg, train, and return the Trainer (tests inspect its state)."""
    run = resolve_run(cfg)
    reproducibility.seed_all(cfg.seed)
    data = build_data(cfg)
    composer_model, evaluators = build_model(cfg, run, data)
    optimizer, scheduler = build_optimizer(composer_model, cfg.optim)
    loggers, callbacks = build_logging(cfg, run, data)
    start = plan_start(cfg, run, data)
    print_summary(cfg, run, data, start)
    trainer = build_trainer(cfg, run, data, start, composer_model, evaluators, optimizer, scheduler, loggers, callbacks)
    if data.mixed:   # after the checkpoint is loaded: the schedule is the resumed one (allow_data_change included)
        check_mixture_budget(cfg, data.train)
    trainer.fit()
    return trainer


def run_of(precision: str, run_name: str, save_folder: str, log_folder: str, storage_options: dict,
           *load_paths: str) -> Run:
    """Where and how a run runs (train.py and finetune.py): the precision ("auto": bf16 on a GPU, else fp32), the
    log folder (default: the save folder, or runs/<run_name> for a remote one), and storage_options handed to
    Composer's object store for a remote save folder or load path."""
    on_gpu = torch.cuda.is_available()
    precision = precision if precision != "auto" else ("amp_bf16" if on_gpu else "fp32")
    if precision != "fp32" and not on_gpu:
        raise ValueError(f"precision={precision!r} needs a GPU (Composer refuses it on CPU); use fp32 or auto")
    log_folder = log_folder or (os.path.join("runs", run_name) if _remote(save_folder) else save_folder)
    object_store_credentials(storage_options, save_folder, *load_paths)
    return Run(int(os.environ.get("WORLD_SIZE", 1)), on_gpu, precision, run_name, save_folder, log_folder)


def resolve_run(cfg: TrainConfig) -> Run:
    if cfg.model.attn_impl == "flex" and not torch.cuda.is_available():
        raise ValueError("model.attn_impl='flex' has no backward on CPU; train on CPU with attn_impl=sdpa")
    # each preset gets its own default folder, so autoresume never picks up another model's checkpoint
    return run_of(cfg.precision, cfg.run_name or f"glm-{cfg.model.preset}",
                  cfg.save_folder or os.path.join("runs", cfg.model.preset), cfg.log_folder, cfg.storage_options,
                  cfg.load_path)


def build_data(cfg: TrainConfig) -> Data:
    """The train stream (a ShardStream, or a MixedStream when cfg.data is a mixture) and the eval loaders: one for
    a shard set, one per source for a mixture (Composer logs them as metrics/eval/<source>/...)."""
    kw = dict(seed=cfg.seed, config=cfg.stream, storage_options=cfg.storage_options)
    if X.is_mixture(cfg.data):
        train_ds = MixedStream(cfg.data, cfg.batch_size, shuffle=True, allow_change=cfg.allow_data_change, **kw)
    else:
        train_ds = ShardStream(cfg.data, cfg.batch_size, shuffle=True, **kw)
    m = train_ds.manifest
    gcfg = model_config(cfg.model, m.vocab_size, m.seq_len)
    fp = (m.tokenizer or {}).get("fingerprint")
    train_ds.check(vocab_size=gcfg.vocab_size, max_position_embeddings=gcfg.max_position_embeddings)
    if cfg.eval_data == "none":
        sets = {}
    elif X.is_mixture(cfg.eval_data):            # a mixture of validation sets: one evaluator per source
        sets = {f"eval/{s.name}": s.path for s in X.load_mixture(cfg.eval_data).sources}
    elif not cfg.eval_data and isinstance(train_ds, MixedStream):   # every source's sibling validation set
        sets = {f"eval/{n}": p for n, p in X.validation_of(train_ds.mixture).items()}
    else:
        sets = {"eval": cfg.eval_data or sibling_validation(cfg.data)}
    eval_loaders = {}
    for label, url in sets.items():
        eval_ds = ShardStream(url, cfg.eval_batch_size or cfg.batch_size, shuffle=False, **kw)
        eval_ds.check(vocab_size=gcfg.vocab_size, max_position_embeddings=gcfg.max_position_embeddings,
                      tokenizer_fingerprint=fp)
        eval_loaders[label] = DataLoader(eval_ds, batch_size=None, num_workers=0, generator=torch.Generator())
    manifests = [r.manifest for r in train_ds.readers] if isinstance(train_ds, MixedStream) else [m]
    objectives = tuple(o for o in OBJECTIVES
                       if any((mm.config.get("objectives") or {}).get(o, 0) > 0 for mm in manifests)) or OBJECTIVES
    return Data(train_ds, eval_loaders, m, gcfg, objectives,
                {"tokenizer_fingerprint": fp, "vocab_size": m.vocab_size, "seq_len": m.seq_len})


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


def build_model(cfg: TrainConfig, run: Run, data: Data) -> tuple[GLMComposer, list[Evaluator]]:
    init_device = cfg.model.init_device
    if init_device == "auto":
        init_device = "meta" if (data.model_config.num_params >= 1e9 and run.world > 1 and run.on_gpu) else "cpu"
    composer_model = GLMComposer(data.model_config, objectives=data.objectives, init_device=init_device,
                                 activation_checkpointing=cfg.model.activation_checkpointing)
    if run.world == 1:
        composer_model.materialize("cuda" if run.on_gpu else "cpu")
        if cfg.model.activation_checkpointing:
            composer_model.apply_activation_checkpointing()
    evaluators = [Evaluator(label=label, dataloader=loader,
                            metric_names=list(composer_model.get_metrics(is_train=False)),
                            device_eval_microbatch_size=cfg.eval_batch_size or cfg.batch_size)
                  for label, loader in data.eval_loaders.items()]
    return composer_model, evaluators


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> tuple[DecoupledAdamW, Any]:
    optimizer = make_optimizer(model, o)
    if o.schedule == "cosine":
        scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=o.warmup, alpha_f=o.decay_to, t_max=o.decay_duration)
    elif o.schedule == "linear":
        scheduler = LinearWithWarmupScheduler(t_warmup=o.warmup, alpha_f=o.decay_to, t_max=o.decay_duration)
    else:
        raise ValueError(f"optim.schedule={o.schedule!r}: choose cosine or linear")
    return optimizer, scheduler


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


def build_logging(cfg: TrainConfig, run: Run, data: Data) -> tuple[list[LoggerDestination], list[Callback]]:
    loggers: list[LoggerDestination] = [JSONLLogger(run.log_folder)]
    if cfg.logger == "tensorboard":
        loggers.append(TensorboardLogger(log_dir=os.path.join(run.log_folder, "tensorboard")))
    elif cfg.logger == "file":
        loggers.append(AppendingFileLogger(filename=os.path.join(run.log_folder, "log-rank{rank}.txt"),
                                           flush_interval=10))
    else:
        raise ValueError(f"logger={cfg.logger!r}: choose file or tensorboard")
    callbacks: list[Callback] = [SpeedMonitor(window_size=10), LRMonitor(), MemoryMonitor(),
                                 DataFingerprint(data.fingerprint)]
    if data.mixed:
        every = Time.from_input(cfg.log_interval, TimeUnit.BATCH)
        callbacks.append(MixtureMetrics(data.train, interval=every.value if every.unit == TimeUnit.BATCH else 10))
    if cfg.record_samples:
        callbacks.append(SampleRecorder(run.log_folder))
    if cfg.wall_clock_limit_s > 0:
        callbacks.append(WallClockStop(cfg.wall_clock_limit_s))
    if cfg.eval_tasks:
        callbacks.append(zero_shot_callback(cfg, data))
    return loggers, callbacks


def zero_shot_callback(cfg: TrainConfig, data: Data) -> Callback:
    """GLM's zero-shot tasks (model/evaluate.py) every eval_interval and at the end of training, logged as
    metrics/zeroshot/<task>/<metric> (metrics.jsonl, TensorBoard); every rank scores its share of the items."""
    from model.evaluate import TaskEvaluator
    from pipeline.evalsets import load_tasks

    m, fp = data.manifest, data.fingerprint["tokenizer_fingerprint"]
    commands = m.config.get("tokenizer_commands", "ours")
    if cfg.eval_tokenizer:
        tok = Tokenizer.load(cfg.eval_tokenizer, cfg.storage_options, commands=commands)
        if fp and tok.fingerprint != fp:
            raise ValueError(f"eval_tokenizer {cfg.eval_tokenizer!r} (fingerprint {tok.fingerprint[:12]}) is not the "
                             f"tokenizer the shards were built with ({fp[:12]}); pass that one with --eval-tokenizer")
    elif fp:   # beside the train manifest (of a mixture: its first source's; every source has this tokenizer)
        where = data.train.readers[0].url if data.mixed else cfg.data
        tok = find_tokenizer((m.tokenizer or {}).get("path") or "tokenizer.model", manifest_url(where), fp,
                             cfg.storage_options, commands)
    else:
        raise ValueError("eval_tasks needs the tokenizer: the train manifest records none; pass --eval-tokenizer")
    sp = tok.specials
    mask_id = sp.gmask if m.config.get("task_mask", True) else sp.mask   # the build's task_mask decides the blank
    evaluator = TaskEvaluator(load_tasks(cfg.eval_tasks, cfg.eval_tasks_limit, cfg.seed), tok.encode, sp, mask_id,
                              data.model_config.max_position_embeddings,
                              batch_size=cfg.eval_batch_size or cfg.batch_size)
    return ZeroShotEval(evaluator, interval=cfg.eval_interval)


# ---- where to start: autoresume, checked before Composer sees a checkpoint ----

CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)(-rank0\.pt)?$")   # Composer's default names, ours
LATEST = "latest-rank0.pt"


def plan_start(cfg: TrainConfig, run: Run, data: Data) -> Start:
    """Pick the checkpoint to start from and check it against this run before Composer loads it.

    A local save folder is scanned: the newest checkpoint that reads back completely is used, whatever `latest`
    says (a truncated or deleted latest falls back, and says so). Checkpoints that exist but none of which can be
    used stop the run (it would start over at step 0 and its rotation would overwrite them) unless
    allow_fresh_start. A remote save folder is left to Composer's autoresume (it downloads `latest`)."""
    start = Start()
    if cfg.autoresume and _remote(run.save_folder):
        return Start(load_path=cfg.load_path or None, composer_autoresume=True)
    found, unusable = _readable_checkpoint(run.save_folder) if cfg.autoresume else (None, [])
    if found is None and unusable:
        listing = "; ".join(f"{name}: {why}" for name, why in unusable)
        if not cfg.allow_fresh_start:
            raise ValueError(
                f"save_folder {run.save_folder!r} holds checkpoints none of which can be used ({listing}). Starting "
                "from step 0 would overwrite them: restore a good checkpoint, move these away or use another "
                "--save-folder, or pass --allow-fresh-start=true to start over in this folder anyway")
        start.notes.append(f"WARNING: starting from step 0 although {run.save_folder} holds unusable checkpoints "
                           f"({listing}) (allow_fresh_start)")
    elif found is not None:
        path, state = found
        if unusable:
            start.notes.append(f"WARNING: autoresume skipped {'; '.join(f'{n}: {w}' for n, w in unusable)}; "
                               f"resuming from the newest readable checkpoint {os.path.basename(path)}")
        return _check_start(cfg, run, data, start, path, state)
    if cfg.load_path:
        start.weights_only = cfg.load_weights_only
        return _check_start(cfg, run, data, start, cfg.load_path,
                            None if _remote(cfg.load_path) else _read_start_state(cfg.load_path))
    return start


def _readable_checkpoint(folder: str) -> tuple[tuple[str, dict] | None, list[tuple[str, str]]]:
    """(newest checkpoint in folder that reads back, with its state summary) and [(name, why)] of the newer
    ones that do not. A planted pickle is never skipped over: UnsafeCheckpointError propagates."""
    if not os.path.isdir(folder):
        return None, []
    names = [n for n in os.listdir(folder) if CHECKPOINT_NAME.match(n)]
    names.sort(key=lambda n: tuple(int(x) for x in CHECKPOINT_NAME.match(n).groups()[:2]), reverse=True)
    latest = os.path.join(folder, LATEST)
    if os.path.lexists(latest) and not (os.path.islink(latest) and os.readlink(latest) in names):
        names.insert(0, LATEST)   # a plain file or a dangling link where Composer looks first
    unusable = []
    for name in names:
        try:
            return (os.path.join(folder, name), _read_start_state(os.path.join(folder, name))), unusable
        except UnsafeCheckpointError:
            raise
        except (ValueError, OSError) as e:
            unusable.append((name, str(e)))
    return None, unusable


def _read_start_state(path: str) -> dict:
    return read_trainer_state(path, "state.timestamp.Timestamp", "state.callbacks.DataFingerprint",
                              "state.metadata.world_size")["state"]


def _check_start(cfg: TrainConfig, run: Run, data: Data, start: Start, path: str, state: dict | None) -> Start:
    """Refuse, with the fix, what Composer would fail on later with a raw error: another data fingerprint (a
    seq_len change is a size mismatch there), a finished run, a sharded checkpoint of another world size."""
    start.load_path = path
    if state is None:      # a remote load_path: Composer downloads it (and safe_checkpoint_loading guards it)
        return start
    saved = state.get("callbacks", {}).get("DataFingerprint")
    if saved and start.weights_only:   # new data may have another seq_len; the vocabulary must be the same
        saved = {k: v for k, v in saved.items() if k in ("tokenizer_fingerprint", "vocab_size")}
    if saved:
        DataFingerprint(data.fingerprint).load_state_dict(saved)
    if start.weights_only:
        start.notes.append(f"loading the weights only from {path} (load_weights_only): new optimizer, schedule, "
                           "step 0")
    ts = state.get("timestamp", {}).get("Timestamp", {})
    limit = Time.from_input(cfg.max_duration, TimeUnit.EPOCH)
    done = int(ts.get(limit.unit.name.lower(), 0))
    if not start.weights_only and limit.unit != TimeUnit.DURATION and done >= limit.value:
        raise ValueError(
            f"{path!r} is the end of a finished run ({done}{limit.unit.value} of max_duration {cfg.max_duration}): "
            f"start a new run in another folder (--save-folder=...), or extend --max-duration beyond "
            f"{done}{limit.unit.value} to continue this one")
    saved_world = int(state.get("metadata", {}).get("world_size", run.world))
    if os.path.isdir(path) and saved_world != run.world:
        raise ValueError(
            f"{path!r} is a sharded checkpoint saved by {saved_world} processes; this run has {run.world}. "
            f"Resume with the same world size (composer -n {saved_world} ...), or save full checkpoints "
            "(--fsdp-state-dict-type=full), which resume at any world size")
    if not os.path.isdir(path) and run.world > 1 and cfg.fsdp_state_dict_type != "full":
        start.full_state_dict = True
        start.notes.append(f"{os.path.basename(path)} is a full (monolithic) checkpoint: loading and saving full "
                           "checkpoints in this run (fsdp_state_dict_type=full)")
    return start


def _remote(url: str) -> bool:
    return "://" in url


def object_store_credentials(storage_options: dict, *urls: str) -> None:
    """Composer builds its own S3 client for a remote save folder or load path; it reads the endpoint from
    S3_ENDPOINT_URL and credentials from the AWS_* variables, so storage_options are handed over that way."""
    if not storage_options or not any(_remote(u) for u in urls if u):
        return
    if not any(u.startswith("s3://") for u in urls if u):
        warnings.warn(f"storage_options reach Composer's object store only for s3:// save folders; {urls} get "
                      "none (set the store's own environment variables)", stacklevel=2)
        return
    endpoint = storage_options.get("endpoint_url") or storage_options.get("client_kwargs", {}).get("endpoint_url")
    for var, value in (("S3_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", storage_options.get("key")),
                       ("AWS_SECRET_ACCESS_KEY", storage_options.get("secret")),
                       ("AWS_SESSION_TOKEN", storage_options.get("token"))):
        if value:
            os.environ[var] = str(value)


def print_summary(cfg: TrainConfig, run: Run, data: Data, start: Start) -> None:
    g, m, ds = data.model_config, data.manifest, data.train
    tokens_per_batch = ds.global_batch_size * m.seq_len
    # a mixture drops nothing: its epochs are cuts through one continuous sequence
    dropped = 0 if data.mixed else ds.order(0).num_dropped
    _rank0_print(
        f"[train] {run.run_name}: model {cfg.model.preset} L={g.n_layer} d={g.d_model} H={g.n_head} "
        f"params {g.num_params / 1e6:.2f}M | vocab {g.vocab_size} (data {m.vocab_size}) seq_len {m.seq_len} "
        f"P={g.max_position_embeddings} | world {run.world} x batch {cfg.batch_size} = global "
        f"{ds.global_batch_size}, tokens/batch {tokens_per_batch:,} | FLOPs/token "
        f"{g.flops_per_token(m.seq_len):,} ({g.flops_per_token(m.seq_len) * tokens_per_batch:.3g}/batch) | "
        f"steps/epoch {ds.batches_per_epoch} ({dropped} samples dropped at epoch end) | max_duration "
        f"{cfg.max_duration}{_in_steps(cfg.max_duration, tokens_per_batch)} | "
        f"precision {run.precision} | {'FSDP2' if run.world > 1 else 'single process'} | objectives "
        f"{data.objectives}")
    if data.mixed:
        _rank0_print(f"[train] mixture ({ds.mixture.where}, samples/epoch {ds.samples_per_epoch:,}): " + "; ".join(
            f"{n} {r.url.removesuffix('/_manifest.json')} target share {ds.mixture.shares[i]:.4f} "
            f"({X.pass_samples(r.manifest):,} samples/pass)" for i, (n, r) in enumerate(zip(ds.names, ds.readers))))
    for note in start.notes:
        _rank0_print(f"[train] {note}", file=sys.stderr)


def composer_duration(max_duration: str, tokens_per_batch: int) -> str:
    """max_duration for Composer: a token count becomes the steps that reach it (ceil(tokens / tokens per batch);
    every batch is [global batch, seq_len]), as Composer stops at the first step that reaches it; the warmup and
    decay schedules then share max_duration's unit (Composer refuses `1dur` in tokens beside a warmup in ba)."""
    t = Time.from_input(max_duration, TimeUnit.EPOCH)
    return f"{math.ceil(t.value / tokens_per_batch)}ba" if t.unit == TimeUnit.TOKEN else max_duration


def _in_steps(max_duration: str, tokens_per_batch: int) -> str:
    steps = composer_duration(max_duration, tokens_per_batch)
    return f" = {steps}" if steps != max_duration else ""


def check_mixture_budget(cfg: TrainConfig, ds: MixedStream) -> None:
    """Refuse, before training, a max_duration that reads a source more than its max_repeats times (ValueError
    naming the source and the numbers); print what every source gives."""
    budget = ds.check_budget(cfg.max_duration)
    _rank0_print(f"[train] mixture up to max_duration {cfg.max_duration}: " + "; ".join(
        f"{n} {b['samples']:,} samples = {b['passes']:.2f} passes"
        f"{' (masks reused beyond K)' if b['masks_reused'] else ''}" for n, b in budget.items()))


def build_trainer(cfg: TrainConfig, run: Run, data: Data, start: Start, model: GLMComposer,
                  evaluators: list[Evaluator], optimizer: DecoupledAdamW, scheduler: Any,
                  loggers: list[LoggerDestination], callbacks: list[Callback]) -> Trainer:
    parallelism = None
    if run.world > 1:
        from composer.utils.parallelism import FSDP2Config

        parallelism = {"fsdp": FSDP2Config(
            state_dict_type="full" if start.full_state_dict else cfg.fsdp_state_dict_type,
            activation_checkpointing=cfg.model.activation_checkpointing)}
    o = cfg.optim
    # Every checkpoint load happens inside Trainer(...): none of them may unpickle code (model/checkpoint.py).
    with safe_checkpoint_loading():
        trainer = Trainer(
            model=model,
            train_dataloader=StreamLoader(data.train),
            eval_dataloader=evaluators or None,
            eval_interval=cfg.eval_interval,
            eval_subset_num_batches=cfg.eval_batches,
            max_duration=composer_duration(cfg.max_duration, data.train.global_batch_size * data.manifest.seq_len),
            optimizers=optimizer,
            schedulers=scheduler,
            step_schedulers_every_batch=True,
            algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=o.grad_clip)]
            if o.grad_clip > 0 else [],
            device_train_microbatch_size=cfg.microbatch_size or cfg.batch_size,
            precision=run.precision,
            parallelism_config=parallelism,
            save_folder=run.save_folder,
            save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.keep_checkpoints,
            # A crash between writing a checkpoint and moving the `latest` link leaves a "future" checkpoint beside
            # an older latest; the resumed run recreates it identically, so it may be overwritten.
            save_overwrite=cfg.autoresume,
            autoresume=start.composer_autoresume,
            load_path=start.load_path,
            load_weights_only=start.weights_only,
            run_name=run.run_name,
            loggers=loggers,
            callbacks=callbacks,
            progress_bar=cfg.progress_bar,
            log_to_console=not cfg.progress_bar,
            console_log_interval=cfg.log_interval,
            seed=cfg.seed,
            device="gpu" if run.on_gpu else "cpu",
        )
    step = int(trainer.state.timestamp.batch)
    _rank0_print(f"[train] resuming from step {step} ({trainer.state.load_path})" if step else
                 "[train] starting from step 0")
    # Composer restores the RNG state of a mid-epoch checkpoint only when it replays the dataloader; our stream
    # resumes itself, so restore it here (dropout masks then match an uninterrupted run exactly).
    if getattr(trainer, "_rng_state", None) is not None and int(trainer.state.timestamp.batch_in_epoch) > 0:
        reproducibility.load_rng_state(trainer._rng_state)
        trainer._rng_state = None
    return trainer


def _rank0_print(*a, file=None) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, flush=True, file=file)


EXIT_WALL_CLOCK = 3   # the run stopped at wall_clock_limit_s after saving a checkpoint: rerun it to continue


def run_cli(argv: list[str] | None, *, doc: str, config_cls, parse, run, name: str):
    """The command line of train.py and finetune.py: --help prints the doc and every setting; otherwise parse, run
    and close the trainer. Returns (exit status, trainer): EXIT_WALL_CLOCK (with a message) when the wall-clock
    limit stopped the run before max_duration, else 0; trainer is None after --help."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        from pipeline.config import describe_fields

        print(doc.strip() + f"\n\nSettings ({config_cls.__name__}; --key=value, sections dotted):\n"
              + describe_fields(config_cls))
        return 0, None
    cfg = parse(argv)
    trainer = run(cfg)
    trainer.close()
    stop = next((c for c in trainer.state.callbacks if isinstance(c, WallClockStop)), None)
    if stop is not None and stop.stopped_at is not None:
        _rank0_print(f"[{name}] stopped by wall_clock_limit_s={stop.limit_s:g} at step {stop.stopped_at} before "
                     f"max_duration {cfg.max_duration} (checkpoint saved); exit code {EXIT_WALL_CLOCK}: run the same "
                     "command again to resume", file=sys.stderr)
        return EXIT_WALL_CLOCK, trainer
    return 0, trainer


def cli(argv: list[str] | None = None) -> int:
    """Run main(); return the exit status: 0 when max_duration was reached, EXIT_WALL_CLOCK when the wall-clock
    limit stopped the run first (its checkpoint is saved; the same command resumes it)."""
    return run_cli(argv, doc=__doc__, config_cls=TrainConfig, parse=parse_args, run=main, name="train")[0]


if __name__ == "__main__":
    sys.exit(cli())
