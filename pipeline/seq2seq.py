"""Seq2seq fine-tuning data as GLM blank infilling of a [gMASK] suffix (paper §2.3, spec §10.2).

    PYTHONPATH=. .venv/bin/python -c "from pipeline.seq2seq import read_pairs; print(read_pairs('pairs.jsonl', 3))"
    PYTHONPATH=. .venv/bin/python -m pytest tests/test_seq2seq.py -q          # tests

Data: a JSONL file (local path or any fsspec URL; .gz/.bz2/.xz/.zst decompressed by suffix), one object per
line with non-empty string fields "source" and "target" (other fields are kept as they are). Blank lines are
allowed; any other bad line stops the read with a ValueError naming file:line and the fix.

One pair -> one sample in the layout of `pipeline/infilling.py` (built by its own layout functions), so
`pipeline.infilling.pad_batch` and the pretraining loss (`model.glm.glm_loss`, GLMComposer.loss) train on it
unchanged:

    Part A = [CLS] source [gMASK]            (sep = len(A); no eos: blank filling appends none after a final
                                              [gMASK] either, spec §10.1, so training and generation agree)
    Part B = [sop] target                    targets: target [eop]; loss 1 on every Part B row (target + eop)
    position_ids = 0..sep-1 on A, the [gMASK] index on B; block_position_ids = 0 on A, 1..len(target)+1 on B

That is `make_block_data` with the target as the one span (layout "gpt_single_span"). Differences from the
official tasks/seq2seq (spec §10.2), deliberately: the blank is a [gMASK] suffix after the source (the issue's
layout, the same Part A that `model.generate.fill_blanks` builds for `source + [gMASK]`, so the fine-tuned model
is used as it was trained), no " Content:" prompt, and Part A is not padded to max_source: the official code pads
it with pad (== eos in its vocabularies), visible to every token unless --mask-pad-token, in training and in
generation alike; ours ends at [gMASK] in both, and pad_batch right-pads after Part B, where no real token
attends.

Truncation, as the official Seq2SeqDataset (counted in each sample's `source_truncated` / `target_truncated`):
  * max_source = the longest Part A, [CLS] and [gMASK] included (the official --src-seq-length counts its prompt
    and mask too): a longer source keeps its FIRST max_source - 2 tokens (the tail is cut).
  * max_target = the longest Part B: target + [eop] keeps its first max_target tokens. A target that does not
    fit therefore loses its eop, as in the official code (the model is not taught to stop where the text did not
    stop); that sample takes the §3.5 suffix layout without eop (`make_gpt_suffix_data`, layout "gpt_suffix").
A sample has at most max_source + max_target tokens; its positions stay below max_source, its block positions at
or below max_target.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline.documents import READ_ERRORS, open_input
from pipeline.infilling import make_block_data, make_gpt_suffix_data

FIELDS = ("source", "target")
FORMAT_HINT = 'write one JSON object per line, e.g. {"source": "the input text", "target": "the output text"}'


def read_pairs(path: str, limit: int = 0, *, storage_options: dict | None = None) -> list[dict]:
    """The {source, target} pairs of a JSONL file, in file order (the first `limit` when limit > 0).

    Raises ValueError naming file:line and the fix for a line that is not UTF-8, not JSON, not an object, or
    lacks a non-empty string "source" or "target"; and for a missing file or one with no pair at all."""
    if limit < 0:
        raise ValueError(f"limit={limit}: use 0 (every pair) or a positive count")
    pairs: list[dict] = []
    try:
        with open_input(path, storage_options) as fh:
            for i, raw in enumerate(fh, start=1):
                if limit and len(pairs) >= limit:
                    break
                if not raw.strip():
                    continue
                pairs.append(_parse_line(raw, f"{path}:{i}", first=i == 1))
    except FileNotFoundError as e:
        raise ValueError(f"seq2seq data file {path!r} does not exist; check the path ({FORMAT_HINT})") from e
    except READ_ERRORS as e:
        raise ValueError(f"{path}: unreadable after {len(pairs)} pairs ({type(e).__name__}: {e}); re-fetch or "
                         "re-compress the file") from e
    if not pairs:
        raise ValueError(f"{path}: no pairs (the file is empty or only blank lines); {FORMAT_HINT}")
    return pairs


def _parse_line(raw: bytes, where: str, first: bool) -> dict:
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); re-encode the "
                         "file as UTF-8") from e
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {FORMAT_HINT}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a JSON {type(obj).__name__}, not an object; {FORMAT_HINT}")
    for name in FIELDS:
        if name not in obj:
            raise ValueError(f"{where}: no {name!r} field (fields: {sorted(obj)}); every line needs non-empty "
                             f"string fields 'source' and 'target' ({FORMAT_HINT})")
        value = obj[name]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} is a {type(value).__name__} ({value!r:.40}), not a string; "
                             f"quote it ({FORMAT_HINT})")
        if not value.strip():
            raise ValueError(f"{where}: field {name!r} is empty; give it text or remove the line")
    return obj


def encode_pair(tok, source: str, target: str, *, max_source: int, max_target: int,
                block_position_encoding: bool = True) -> dict:
    """One training sample: Part A = [CLS] source [gMASK], Part B = [sop] target, loss on target + eop (module
    docstring: layout and truncation). `tok`: a pipeline.tokenizer.Tokenizer (or anything with encode(str) ->
    ids and `.specials`).

    Returns the pipeline.infilling sample dict (input_ids, targets, loss_mask, position_ids, block_position_ids,
    sep, spans, layout, objective "gpt", single_span False) plus source_truncated and target_truncated (bool)."""
    if max_source < 3:
        raise ValueError(f"max_source={max_source}: Part A needs [CLS], at least one source token and [gMASK]; "
                         "use >= 3")
    if max_target < 1:
        raise ValueError(f"max_target={max_target}: Part B needs at least one target token; use >= 1")
    sp = tok.specials
    src = list(tok.encode(source))
    tgt = list(tok.encode(target))
    for name, ids, text in (("source", src, source), ("target", tgt, target)):
        if not ids:
            raise ValueError(f"{name} {text!r} encodes to no tokens; give it text (empty pairs cannot train)")
    keep = max_source - 2
    source_truncated = len(src) > keep
    src = src[:keep]
    target_truncated = len(tgt) + 1 > max_target          # (target + eop)[:max_target] loses the eop
    div = 1 + len(src)                                    # the [gMASK] index in Part A
    if target_truncated:
        tgt = tgt[:max_target]
        out = make_gpt_suffix_data(np.array([sp.cls, *src, *tgt]), len(tgt), sp, task_mask=True,
                                   block_position_encoding=block_position_encoding)
        layout = "gpt_suffix"
    else:
        out = make_block_data(np.array([sp.cls, *src, *tgt]), [(div, div + len(tgt))], sp, "gpt", task_mask=True,
                              block_position_encoding=block_position_encoding)
        layout = "gpt_single_span"
    out.update(layout=layout, objective="gpt", single_span=False, source_truncated=source_truncated,
               target_truncated=target_truncated)
    return out
