"""Look inside a shard set: manifest summary, decoded samples (Part A and each blank's answer), histograms.

    python jobs/inspect_shards.py data/shards/train                      # summary + 3 decoded samples
    python jobs/inspect_shards.py data/shards/train -n 10 --plot /tmp/shards.png
    python jobs/inspect_shards.py s3://bucket/shards/train --storage-options '{endpoint_url: http://...}'

The tokenizer is found from the manifest (`tokenizer.path`) unless --tokenizer is given: where it was recorded,
else beside the shard set (its folder, the build's output folder), so a shard set can be inspected from any
folder and after it was moved; it must match the manifest's fingerprint.
"""

from __future__ import annotations

import argparse
import json
import sys

import fsspec
import numpy as np
import yaml

from pipeline import shards as S
from pipeline.tokenizer import Tokenizer, find_tokenizer


def describe(row: dict, tok: Tokenizer) -> str:
    """Part A with its blanks, then each Part B span (in Part B order) as the answer of its blank."""
    ids, sep = np.asarray(row["input_ids"]), int(row["sep"])
    tgt, pos = np.asarray(row["targets"]), np.asarray(row["position_ids"])
    sp = tok.specials
    lines = [" ".join(f"{c}={row[c]}" for c in S.SCALAR_COLUMNS) + f" length={len(ids)}",
             "  Part A: " + tok.decode(ids[:sep])]
    starts = [i for i in range(sep, len(ids)) if ids[i] == sp.sop]
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(ids)
        answer = [t for t in tgt[s:e] if t != sp.eop]
        lines.append(f"  blank at A[{pos[s]}] ({tok.decode([ids[pos[s]]])}): {tok.decode(answer)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="shard-set folder or its _manifest.json (path or URL)")
    p.add_argument("-n", "--num-samples", type=int, default=3, help="samples to decode")
    p.add_argument("--tokenizer", default=None, help=".model to decode with (default: from the manifest)")
    p.add_argument("--plot", default=None, help="write span-length and sample-length histograms to this PNG")
    p.add_argument("--storage-options", default="{}", help="fsspec options as YAML, e.g. {endpoint_url: ...}")
    a = p.parse_args(argv)
    so = yaml.safe_load(a.storage_options) or {}
    try:
        m = S.read_manifest(a.shards, so)
    except S.ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = m.accounting
    print(f"shard set {S.manifest_url(a.shards)}: split={m.split} format={m.format} seq_len={m.seq_len} "
          f"vocab={m.vocab_size} variants={m.variants} samples={m.num_samples} shards={len(m.shards)}")
    print(f"  tokenizer {m.tokenizer['fingerprint'][:16]} at {m.tokenizer.get('path')}")
    print(f"  documents {acc['documents']}, tokens in {acc['tokens_in']:,}, Part-A tokens {acc['part_a_tokens']:,}, "
          f"loss tokens {acc['loss_tokens']:,}, pad fraction {acc['pad_fraction']:.2%}")
    print(f"  objectives {json.dumps(acc['objectives'])}  layouts {json.dumps(acc['layouts'])}")
    print(f"  skipped inputs: {acc['skipped_count']}")
    for s in acc["skipped"][:20]:
        print(f"    {s['source']}: {s['reason']}")
    fs, root = fsspec.core.url_to_fs(S.manifest_url(a.shards).rsplit("/", 1)[0], **so)
    lengths, shown = [], 0
    tok = None
    if a.num_samples > 0:
        try:
            commands = m.config.get("tokenizer_commands", "ours")   # where a brought model's command tokens sit
            if a.tokenizer:
                tok = Tokenizer.load(a.tokenizer, so if "://" in a.tokenizer else None, commands=commands)
                if tok.fingerprint != m.tokenizer["fingerprint"]:
                    raise ValueError(f"tokenizer {a.tokenizer} has fingerprint {tok.fingerprint[:16]}, the shards "
                                     f"were built with {m.tokenizer['fingerprint'][:16]}; pass the right --tokenizer")
            else:
                tok = find_tokenizer(m.tokenizer.get("path") or "tokenizer.model", S.manifest_url(a.shards),
                                     m.tokenizer["fingerprint"], so, commands)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for info in m.shards:
        if shown >= a.num_samples and not a.plot:
            break
        samples = S.read_shard(fs, f"{root}/{info.name}", info, m.format)
        for i in range(len(samples)):
            row = samples.row(i)
            lengths.append(len(row["input_ids"]))
            if shown < a.num_samples:
                print(describe(row, tok))
                shown += 1
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hists = acc["span_length_hist"]
        fig, axes = plt.subplots(1, len(hists) + 1, figsize=(4.5 * (len(hists) + 1), 3.5))
        for ax, (obj, h) in zip(axes, sorted(hists.items())):
            ks = sorted(h, key=int)
            ax.bar([int(k) for k in ks], [h[k] for k in ks], width=1.0)
            ax.set_title(f"span lengths: {obj}")
            ax.set_xlabel("tokens")
        axes[-1].hist(lengths, bins=50)
        axes[-1].axvline(m.seq_len, color="k", linestyle="--", label="seq_len")
        axes[-1].set_title("sample lengths")
        axes[-1].legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=90)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
