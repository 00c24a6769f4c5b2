r"""Train a sentencepiece tokenizer with the GLM command tokens at fixed ids (pipeline/tokenizer.py).

    python jobs/train_tokenizer.py --input 'corpus/*.txt' --output tok/glm.model --vocab-size 8000
    python jobs/train_tokenizer.py --input 's3://bucket/raw/*.txt' --output s3://bucket/tok/glm.model \
        --vocab-size 32000 --model-type bpe --max-sentences 5000000
    # tiny CPU variant (about a second):
    python jobs/train_tokenizer.py --output /tmp/tok.model --vocab-size 1000 --max-files 10

Writes the .model and, beside it, a small JSON (<output without .model>.json) with the special ids, the
vocabulary size and the fingerprint. With no --input it trains on the bundled State of the Union corpus.
Large corpora: --max-sentences caps the lines fed to sentencepiece (a seeded random sample of them) and
--max-files takes every k-th file so about that many files are read. A corpus too small for --vocab-size
gives a smaller vocabulary; the job then warns with both numbers.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import documents as D
from pipeline import tokenizer as T
from pipeline.build import demo_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=None, help="paths, globs or URLs (default: bundled SOTU corpus)")
    p.add_argument("--output", required=True, help="where to write the .model (path or URL)")
    p.add_argument("--vocab-size", type=int, default=8000, help="pieces incl. the 9 command tokens")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--max-files", type=int, default=0, help="read about this many files (0: all)")
    p.add_argument("--text-field", default="text", help="JSONL key / Parquet column of the text")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        files = D.list_inputs(a.input or demo_corpus())
        if a.max_files and len(files) > a.max_files:
            files = files[:: -(-len(files) // a.max_files)]
        skips: list[D.Skip] = []
        docs = (d.text for f in files for d in D.read_documents(f, a.text_field, "file", None, skips))
        tok = T.train(docs, a.vocab_size, model_type=a.model_type, max_sentences=a.max_sentences, seed=a.seed)
        T.save(tok, a.output)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in skips:
        print(f"skipped {s.source}: {s.reason}", file=sys.stderr)
    short = f" (asked for {a.vocab_size}: the corpus is too small for more)" if tok.vocab_size < a.vocab_size else ""
    print(f"wrote {a.output}: vocab {tok.vocab_size}{short}, fingerprint {tok.fingerprint[:16]}, "
          f"from {len(files)} files ({len(skips)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
