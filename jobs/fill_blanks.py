"""Fill every [MASK] / [sMASK] / [gMASK] in a text with a GLM and print the filled text.

    python jobs/fill_blanks.py --checkpoint runs/demo/hub --tokenizer data/tok/glm.model \\
        "Four score and seven [MASK] ago our fathers brought forth [sMASK]"
    python jobs/fill_blanks.py --checkpoint runs/demo/latest-rank0.pt --config demo --tokenizer data/tok/glm.model \\
        --strategy sample --temperature 0.8 --top-p 0.9 --seed 1 "We hold these truths [gMASK]"
    python jobs/fill_blanks.py --checkpoint runs/tiny2/ep0-ba20 --config tiny --tokenizer … "…"   # sharded (-n 2)
    python jobs/fill_blanks.py ... --strategy beam --num-beams 4 --length-penalty 1.0 --no-repeat-ngram-size 3 "…"

--checkpoint accepts anything model.checkpoint.load_checkpoint accepts: a hub folder (config.json +
pytorch_model.bin / model.safetensors), an official release folder (latest_checkpointed_iteration.txt or
`latest` + <iter>/mp_rank_00_model_states.pt), a weights file (.bin / .pt / .safetensors state dict), or a
checkpoint of our trainer: a Composer .pt file (state['model'] holds the wrapper's `model.`-prefixed keys) or the
sharded folder `composer -n N train.py` saves by default (`ep0-ba600/` with `.metadata`; `latest-rank0.pt` links to
it), read in this one process. A checkpoint of our trainer records the fingerprint of its tokenizer: another
tokenizer is refused (it would decode the ids into the wrong words).
Sources without a config.json beside them need --config: a config.json path, or a preset name (head size
and dropouts from the preset, every shape read from the weights). A text without blanks gets a [gMASK]
appended, as in the original generate_samples.py.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch

from model.checkpoint import load_checkpoint, trained_data_fingerprint
from model.generate import STRATEGIES, fill_blanks
from pipeline.tokenizer import MASK_STRINGS, Tokenizer, add_tokenizer_arguments


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("text", help='text with [MASK], [sMASK] or [gMASK] blanks (quote it)')
    ap.add_argument("--checkpoint", required=True, help="hub/official folder, weights file or Composer .pt")
    add_tokenizer_arguments(ap)
    ap.add_argument("--config", default=None, help="config.json or preset name, when the checkpoint has none")
    ap.add_argument("--strategy", default="greedy", choices=STRATEGIES)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="per blank")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 = off")
    ap.add_argument("--min-length", type=int, default=0, help="answer tokens before eop is allowed")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampling generator")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    tok = Tokenizer.load(args.tokenizer, commands=args.tokenizer_commands)
    model = load_checkpoint(args.checkpoint, args.config, device=args.device).eval()
    tok.check_trained_with(trained_data_fingerprint(args.checkpoint), args.checkpoint, model.config.vocab_size)
    answers = fill_blanks(
        model, tok.encode_with_blanks(args.text), tok.specials, strategy=args.strategy,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, min_length=args.min_length,
        generator=torch.Generator().manual_seed(args.seed), vocab_size=tok.vocab_size)

    # Put each decoded answer where its blank was (the blanks are in text order, as fill_blanks returns them).
    parts = re.split("(" + "|".join(re.escape(m) for m in MASK_STRINGS) + ")", args.text)
    if not any(p in MASK_STRINGS for p in parts):
        parts.append("[gMASK]")
        parts.insert(-1, " ")
    decoded = iter(tok.decode(a) for a in answers)
    filled = "".join(next(decoded) if p in MASK_STRINGS else p for p in parts)
    print(filled)
    return filled


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
