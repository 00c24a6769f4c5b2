"""Seq2seq evaluation by generation: fill the [gMASK] after each source, score exact match and ROUGE (spec §10.2).

    PYTHONPATH=. .venv/bin/python -m pytest tests/test_seq2seq.py -q

Generation goes through `model.generate.fill_blanks` (greedy, beam or sampling, with its KV cache) on
Part A = [CLS] source [gMASK], the Part A that `pipeline.seq2seq.encode_pair` trains on (same truncation: the
first max_source - 2 source tokens are kept). `tok` is any object with encode(str) -> ids, decode(ids) -> str,
`specials` (cls, eos, sop, eop, mask, smask, gmask) and `vocab_size` (e.g. pipeline.tokenizer.Tokenizer).

References are the targets as the tokenizer gives them back, decode(encode(target)), as the official
tasks/seq2seq compares against `DecodeIds(EncodeAsIds(target))`, so a prediction is never penalised for the
tokenizer's own normalisation. The reference is the full target, also when training truncated it.

Metrics (means over pairs, 0..1):
  * exact_match: prediction == reference after collapsing runs of whitespace and stripping the ends.
  * rouge1 / rouge2 / rougeL: F-measures of Google's `rouge-score` package (rouge_scorer.RougeScorer; rougeL =
    sentence-level LCS, no summary splitting). Tokenization, `rouge_tokenizer`:
      "default"     rouge-score's own: lowercase, then runs of [a-z0-9] are the tokens. Every other character,
                    accented and non-Latin letters included, is a separator and vanishes: Chinese, Japanese,
                    Russian... text scores 0 against anything. Porter stemming with rouge_stemmer=True.
      "whitespace"  lowercased, split on whitespace, nothing removed (any script; punctuation stays attached).
      a callable    str -> list[str], e.g. list (characters, for text without spaces such as Chinese).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rouge_score import rouge_scorer, tokenizers

from model.generate import fill_blanks
from model.glm import GLM

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_TOKENIZERS = ("default", "whitespace")


def source_context(source_ids: Sequence[int], specials, max_source: int) -> list[int]:
    """Part A of a seq2seq pair: [CLS] + the first max_source - 2 source ids + [gMASK] (pipeline.seq2seq's rule)."""
    if max_source < 3:
        raise ValueError(f"max_source={max_source}: Part A needs [CLS], at least one source token and [gMASK]; "
                         "use >= 3")
    return [specials.cls, *[int(i) for i in source_ids][:max_source - 2], specials.gmask]


class _CallableTokenizer(tokenizers.Tokenizer):
    """rouge-score's tokenizer interface around a plain str -> list[str] function."""

    def __init__(self, fn: Callable[[str], list[str]]):
        self.fn = fn

    def tokenize(self, text: str) -> list[str]:
        return list(self.fn(text))


def rouge(predictions: Sequence[str], references: Sequence[str], *, rouge_tokenizer: str | Callable = "default",
          rouge_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures of rouge-score over (prediction, reference) pairs (module docstring)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; pass one each")
    if callable(rouge_tokenizer):
        tokenizer = _CallableTokenizer(rouge_tokenizer)
    elif rouge_tokenizer == "whitespace":
        tokenizer = _CallableTokenizer(lambda s: s.lower().split())
    elif rouge_tokenizer == "default":
        tokenizer = None                      # rouge-score's DefaultTokenizer (with the stemmer flag)
    else:
        raise ValueError(f"rouge_tokenizer={rouge_tokenizer!r}: choose one of {ROUGE_TOKENIZERS} or pass a "
                         "callable str -> list[str]")
    if tokenizer is not None and rouge_stemmer:
        raise ValueError("rouge_stemmer=True applies to rouge-score's default tokenizer only; stem inside your "
                         "rouge_tokenizer callable instead")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=rouge_stemmer, tokenizer=tokenizer)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)       # score(target, prediction)
        for k in ROUGE_TYPES:
            sums[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in sums.items()}


def _normalize(text: str) -> str:
    return " ".join(text.split())


def evaluate_generation(model: GLM, tok, pairs: Sequence[dict], *, strategy: str = "greedy", num_beams: int = 1,
                        max_new_tokens: int = 64, max_source: int | None = None, length_penalty: float = 1.0,
                        no_repeat_ngram_size: int = 0, min_length: int = 0, seed: int = 0,
                        rouge_tokenizer: str | Callable = "default", rouge_stemmer: bool = False) -> dict:
    """Generate the target of every {source, target} pair and score it (module docstring).

    strategy, num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size, min_length, seed: as
    model.generate.fill_blanks (strategy "greedy", "beam" or "sample"). max_source: Part A limit as in
    training (default: the model's max_position_embeddings).
    Returns exact_match, rouge1, rouge2, rougeL (0..1), num_pairs, source_truncated (how many sources lost
    tokens to max_source), predictions and references (lists of str, one per pair, in order)."""
    if not pairs:
        raise ValueError("pairs is empty; pass at least one {source, target} pair (pipeline.seq2seq.read_pairs)")
    if not isinstance(model, GLM):
        raise ValueError(f"model is a {type(model).__name__}; pass the plain GLM (for a GLMComposer: its .model)")
    sp = tok.specials
    limit = model.config.max_position_embeddings if max_source is None else max_source
    predictions, references = [], []
    truncated = 0
    for pair in pairs:
        ids = tok.encode(pair["source"])
        truncated += len(ids) > limit - 2
        ctx = source_context(ids, sp, limit)
        (answer,) = fill_blanks(model, ctx, sp, strategy, max_new_tokens, num_beams=num_beams,
                                length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                min_length=min_length, seed=seed, vocab_size=tok.vocab_size)
        predictions.append(tok.decode(answer))
        references.append(tok.decode(tok.encode(pair["target"])))
    exact = sum(_normalize(p) == _normalize(r) for p, r in zip(predictions, references)) / len(pairs)
    return {"exact_match": exact, **rouge(predictions, references, rouge_tokenizer=rouge_tokenizer,
                                          rouge_stemmer=rouge_stemmer),
            "num_pairs": len(pairs), "source_truncated": truncated, "predictions": predictions,
            "references": references}
