"""GPU checks in one prepared script (a few minutes on one H200): FlexAttention vs SDPA numerics, glm-large training
throughput with each, and the CUDA-only test.

    python -m benchmarks.gpu                 # on a CUDA machine: the three steps below, a table at the end
    python -m benchmarks.gpu --steps 30      # fewer training steps (default 50)
    python -m benchmarks.gpu --dry-run       # CPU (tests/test_gpu_bench.py): tiny model, 4 steps, SDPA training only

1. Numerics: the same weights under attn_impl "flex" (compiled FlexAttention, BlockMask from sep) and "sdpa" (dense
   boolean mask), a batch with a different sep per sample (bidirectional Part A, causal Part B): max |difference| of
   the logits (forward) and of every parameter's gradient of glm_loss (backward), relative to the largest value, in
   fp32 and under bf16 autocast.
   On CPU (dry run) FlexAttention runs eagerly and has no backward: forward only.
2. Training: configs/train/glm-large.yaml's model (preset glm-large, activation checkpointing) and batch size (16),
   seq_len 512, amp_bf16, Composer's FSDP2 (one rank per GPU), DecoupledAdamW, `--steps` steps from synthetic
   shards written with the real writer (pipeline.build.ShardWriter: random token chunks through make_sample, bert
   and gpt objectives). Throughput and MFU are Composer's SpeedMonitor figures (window of 10 steps: the last window,
   after compilation and warm-up), for flex and sdpa side by side.
3. The test that is skipped on CPU: tests/test_model_glm.py::test_flex_on_cuda_matches_official (FlexAttention on
   CUDA vs the official test vectors; needs ../shared/testvectors beside the repository, else it skips too).

Exit status 0 when every step ran and the numerics are within tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import fsspec
import numpy as np
import torch
import yaml

from model.composer import GLMComposer
from model.config import PRESETS, GLMConfig
from model.glm import GLM, glm_loss
from pipeline import shards as S
from pipeline.infilling import make_sample
from pipeline.stream import ShardStream, StreamLoader
from pipeline.tokenizer import COMMAND_TOKENS, Specials

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
CUDA_TEST = "tests/test_model_glm.py::test_flex_on_cuda_matches_official"
# bounds of max |flex - sdpa| / max |sdpa|: fp32 differs only in summation order, bf16 autocast also in the rounding
# of scores and probabilities (bf16 keeps 8 bits: 2^-8 = 0.4% per value)
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


# ------------------------------------------------------------------------------------------------ data

def write_synthetic_shards(folder: str, *, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0,
                           rows_per_shard: int = 256) -> S.Manifest:
    """A train shard set of GLM samples from random token chunks, written by the builder's ShardWriter (the real
    encoder, checksums and names) and a manifest: what the trainer reads from a real build."""
    from pipeline.build import ShardWriter  # imports ray: only here

    specials = Specials.ours()
    low = len(COMMAND_TOKENS)   # text tokens: every id after the command tokens
    rng = np.random.default_rng(seed)
    fs, root = fsspec.core.url_to_fs(folder)
    writer = ShardWriter(fs, root, "parquet", group=0, variant=0, rows_per_shard=rows_per_shard)
    n = 0
    while n < num_samples:
        objective = ("bert", "gpt")[n % 2]
        size = int(rng.integers(seq_len // 2, seq_len * 5 // 6))   # bert adds ~10%: [sop]/[eop] per span
        chunk = np.concatenate([[specials.cls], rng.integers(low, vocab_size, size - 2), [specials.eos]])
        sample = make_sample(chunk, objective, rng, specials=specials)
        if len(sample["input_ids"]) > seq_len:
            continue
        writer.add(sample, objective=objective, variant=0, source="synthetic", doc_index=n, chunk_index=n,
                   sample_key=f"train/0/0/{n}")
        n += 1
    writer.flush()
    config = {"synthetic": True, "seq_len": seq_len, "seed": seed}
    m = S.Manifest(schema_version=S.SCHEMA_VERSION, format="parquet", split="train", seq_len=seq_len,
                   vocab_size=vocab_size, tokenizer={"fingerprint": "synthetic"}, specials=specials.to_json(),
                   variants=1, seed=seed, config=config, config_hash=S.config_hash(config), shards=writer.shards)
    S.atomic_write(fs, f"{root}/{S.MANIFEST_NAME}", m.to_json().encode())
    return m


def glm_large_settings() -> tuple[GLMConfig, bool, int]:
    """(model config, activation checkpointing, batch size) of configs/train/glm-large.yaml."""
    with open(os.path.join(REPO, "configs", "train", "glm-large.yaml")) as f:
        y = yaml.safe_load(f)
    return PRESETS[y["model"]["preset"]], bool(y["model"].get("activation_checkpointing", False)), int(y["batch_size"])


# ------------------------------------------------------------------------------------------------ 1. numerics

def numerics(cfg: GLMConfig, device: str, batch_size: int, seq_len: int, backward: bool) -> dict[str, float]:
    """max |flex - sdpa| / max |sdpa| of the logits (and of every parameter's gradient when backward) for one batch
    with per-sample sep, in fp32 and under bf16 autocast (CUDA only)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, embedding_dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0)
    sdpa = GLM(dataclasses.replace(cfg, attn_impl="sdpa")).to(device)
    flex = GLM(dataclasses.replace(cfg, attn_impl="flex")).to(device)
    flex.load_state_dict(sdpa.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g).to(device)
    pos = torch.arange(seq_len).expand(batch_size, -1).to(device)
    sep = torch.randint(1, seq_len, (batch_size,), generator=g).to(device)
    block = (torch.arange(seq_len)[None, :].to(device) >= sep[:, None]).long()   # Part B: nonzero block positions
    targets = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g).to(device)
    loss_mask = block.clone()
    out: dict[str, float] = {}
    kinds = ["fp32"] + (["bf16"] if device == "cuda" else [])
    for kind in kinds:
        logits, grads = {}, {}
        for name, model in (("sdpa", sdpa), ("flex", flex)):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=kind == "bf16"), warnings.catch_warnings():
                warnings.simplefilter("ignore")   # eager FlexAttention on CPU warns that it is unfused
                with torch.set_grad_enabled(backward):
                    y = model(ids, pos, block, sep=sep)
                    if backward:
                        glm_loss(y, targets, loss_mask).backward()
            logits[name] = y.detach().float()
            if backward:
                grads[name] = {n: p.grad.float() for n, p in model.named_parameters()}
        out[f"{kind} logits"] = relative(logits["flex"], logits["sdpa"])
        if backward:
            out[f"{kind} grads"] = max(relative(grads["flex"][n], grads["sdpa"][n]) for n in grads["sdpa"])
    return out


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: the error on the scale of the values (a gradient is small, a logit is not)."""
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ 2. training

def train_throughput(url: str, cfg: GLMConfig, *, attn_impl: str, batch_size: int, steps: int, window: int,
                     activation_checkpointing: bool, on_gpu: bool) -> dict[str, float]:
    """Composer training with FSDP2 on this process's device; SpeedMonitor's last-window figures."""
    from composer import Trainer
    from composer.callbacks import SpeedMonitor
    from composer.loggers import InMemoryLogger
    from composer.optim import DecoupledAdamW
    from composer.utils.parallelism import FSDP2Config

    data = ShardStream(url, batch_size, seed=0)
    cfg = dataclasses.replace(cfg, attn_impl=attn_impl, max_position_embeddings=data.seq_len)
    model = GLMComposer(cfg, objectives=("bert", "gpt"), init_device="cpu")
    memory = InMemoryLogger()
    wd = 0.1 * 2e-4
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        trainer = Trainer(
            model=model, train_dataloader=StreamLoader(data), max_duration=f"{steps}ba",
            optimizers=DecoupledAdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=wd),
            precision="amp_bf16" if on_gpu else "fp32", device="gpu" if on_gpu else "cpu",
            device_train_microbatch_size=batch_size,
            parallelism_config={"fsdp": FSDP2Config(activation_checkpointing=activation_checkpointing)},
            callbacks=[SpeedMonitor(window_size=window)], loggers=[memory], progress_bar=False,
            log_to_console=False, seed=0, save_folder=None)
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
    last = {k: float(v[-1][1]) for k, v in memory.data.items() if k.startswith("throughput/") and v}
    from torch.distributed.fsdp import FSDPModule
    fsdp2 = sum(isinstance(m, FSDPModule) for m in trainer.state.model.modules())   # the Blocks and the root
    trainer.close()
    loss = memory.data.get("loss/train/total", [(None, float("nan"))])[-1][1]
    return {"tokens_per_sec": last.get("throughput/tokens_per_sec", float("nan")),
            "samples_per_sec": last.get("throughput/samples_per_sec", float("nan")),
            "mfu": last.get("throughput/device/mfu", float("nan")),
            "final_loss": float(loss), "wall_s": wall, "fsdp2_modules": fsdp2}


# ------------------------------------------------------------------------------------------------ 3. CUDA test

def cuda_test() -> tuple[str, str]:
    """(outcome, pytest's summary line) of the CUDA-only test, run as pytest runs it (-rs: the skip reason)."""
    r = subprocess.run([sys.executable, "-m", "pytest", CUDA_TEST, "-q", "-rs", "-p", "no:cacheprovider"],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    outcome = "passed" if r.returncode == 0 and "passed" in r.stdout else ("skipped" if "skipped" in r.stdout
                                                                            else "failed")
    detail = "; ".join(x for x in lines if x.startswith(("SKIPPED", "FAILED", "ERROR")) or " in " in x)
    return outcome, detail or (lines[-1] if lines else r.stderr[-500:])


# ------------------------------------------------------------------------------------------------ main

def run(dry_run: bool, steps: int) -> dict:
    on_gpu = torch.cuda.is_available() and not dry_run
    if not on_gpu and not dry_run:
        raise SystemExit("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine, or --dry-run on CPU")
    large, ac, batch_size = glm_large_settings()
    if dry_run:   # the same code path, sized for CPU: 2 layers of glm-large's head size, SDPA only
        model_cfg = dataclasses.replace(large, n_layer=2, d_model=128, n_head=2, vocab_size=1024)
        seq_len, batch_size, steps, window, impls = 64, 4, min(steps, 4), 2, ("sdpa",)
    else:
        model_cfg, seq_len, window, impls = large, 512, 10, ("flex", "sdpa")
    device = "cuda" if on_gpu else "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if on_gpu else "cpu (dry run)",
                    "torch": torch.__version__, "model": f"{model_cfg.n_layer} layers, d_model {model_cfg.d_model}, "
                    f"{model_cfg.num_params / 1e6:.1f}M params", "seq_len": seq_len, "batch_size": batch_size,
                    "steps": steps, "activation_checkpointing": ac}
    t0 = time.perf_counter()
    num_cfg = model_cfg if dry_run else dataclasses.replace(model_cfg, n_layer=4)   # numerics: 4 layers suffice
    report["numerics"] = numerics(num_cfg, device, batch_size=4, seq_len=seq_len, backward=on_gpu)
    report["numerics_ok"] = all(v <= TOLERANCE[k.split()[0]] for k, v in report["numerics"].items())
    print(f"[gpu] numerics ({time.perf_counter() - t0:.0f} s): {report['numerics']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "train")
        write_synthetic_shards(url, num_samples=batch_size * (steps + 2), seq_len=seq_len,
                               vocab_size=model_cfg.vocab_size)
        report["train"] = {}
        for impl in impls:
            t0 = time.perf_counter()
            report["train"][impl] = train_throughput(url, model_cfg, attn_impl=impl, batch_size=batch_size,
                                                     steps=steps, window=window, activation_checkpointing=ac,
                                                     on_gpu=on_gpu)
            print(f"[gpu] train {impl} ({time.perf_counter() - t0:.0f} s): {report['train'][impl]}", flush=True)
    report["cuda_test"] = cuda_test()
    print(f"[gpu] {CUDA_TEST}: {report['cuda_test']}", flush=True)
    return report


def table(report: dict) -> str:
    rows = [f"device: {report['device']}, torch {report['torch']}; model {report['model']}; seq_len "
            f"{report['seq_len']}, batch {report['batch_size']}, {report['steps']} steps, activation checkpointing "
            f"{report['activation_checkpointing']}", "", "| check | value |", "|---|---|"]
    rows += [f"| flex vs sdpa, max abs diff / max abs, {k} | {v:.2e} (bound {TOLERANCE[k.split()[0]]:.0e}) |"
             for k, v in report["numerics"].items()]
    for impl, t in report["train"].items():
        mfu = "n/a" if np.isnan(t["mfu"]) else f"{t['mfu']:.1%}"
        rows.append(f"| {impl}: tokens/s, MFU | {t['tokens_per_sec']:,.0f}, {mfu} |")
    if {"flex", "sdpa"} <= set(report["train"]):
        f, s = report["train"]["flex"]["tokens_per_sec"], report["train"]["sdpa"]["tokens_per_sec"]
        rows.append(f"| flex / sdpa tokens/s | {f / s:.2f} |")
    rows.append(f"| {CUDA_TEST} | {report['cuda_test'][0]}: {report['cuda_test'][1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny model, few steps, SDPA training only")
    p.add_argument("--steps", type=int, default=50, help="training steps per attention implementation")
    p.add_argument("--json", default="", help="also write the report here")
    a = p.parse_args(argv)
    report = run(a.dry_run, a.steps)
    print(table(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    ok = report["numerics_ok"] and report["cuda_test"][0] != "failed" and all(
        np.isfinite(t["final_loss"]) and t["fsdp2_modules"] > 0 for t in report["train"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
