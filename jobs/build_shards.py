r"""Build GLM blank-infilling shards from raw text with Ray.

    python jobs/build_shards.py                                   # bundled SOTU corpus -> ./data/shards
    python jobs/build_shards.py --input 'corpus/*.jsonl' --output data/mycorpus --seq-len 512 --variants 4
    python jobs/build_shards.py --config configs/pipeline/glm-10b-mix.yaml --input 's3://b/raw/*.txt' \
        --output s3://b/shards --tokenizer s3://b/tok/glm.model
    ray job submit --working-dir . -- python jobs/build_shards.py --input s3://b/raw --output s3://b/shards
    # tiny CPU variant (seconds):
    python jobs/build_shards.py --output /tmp/tiny --seq-len 128 --vocab-size 1000 --variants 1
    # many sources, one tokenizer: <output>/<source>/{train,validation} (a YAML preset may hold `sources:` too)
    python jobs/build_shards.py --output data/mix --seq-len 256 \
        --sources "{wiki: {input: 'wiki/*.jsonl'}, books: {input: 'books/*.txt', text_split: blank_lines}}"

Settings: any BuildConfig field (pipeline/config.py) as --key=value; a YAML preset via --config. With no
arguments it uses configs/pipeline/demo.yaml. Rerunning the same command resumes an interrupted build: it
checks every finished shard against its receipt (size + sha256) and rebuilds the groups whose shards are
missing or damaged. Other settings, another tokenizer or vocab_size, or inputs added, removed or changed in
place (size / modification time) are refused against an existing output unless --overwrite, which deletes only
the previous build's own files and refuses a folder that holds anything else. One build at a time per output
(`<output>/_lock.json`; a killed build's lock is taken over). Under `ray job submit`, paths must be absolute or
object-store URLs. S3-compatible endpoints: --storage-options '{endpoint_url: http://127.0.0.1:9000}'
(credentials from AWS_*; for a Ray job, set them before `ray start` or pass them with --runtime-env-json).

With `sources:` every source is built into <output>/<source> with its own manifests, receipts and accounting, all
with ONE tokenizer (--tokenizer, or <output>/tokenizer.model trained on a sample drawn across the sources); a source
may set its own input, text_split, text_field, variants, objectives, validation_fraction and the like (not
seq_len, nor the tokenizer). A rerun skips the sources already built with the same settings and inputs; adding a
source later builds only that one. Train on them with a mixture (train.py --data, README "Mixtures").
"""

from __future__ import annotations

import os
import sys

from pipeline.build import build
from pipeline.config import BuildConfig, describe_fields, load_config

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pipeline",
                    "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"{__doc__}\nSettings (--key=value; default, meaning):\n{describe_fields(BuildConfig)}")
        return 0
    try:
        cfg = load_config(BuildConfig, argv, default_yaml=DEMO)
        build(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
