"""SentencePiece tokenizer with the GLM command tokens at fixed ids (spec §7).

    python jobs/train_tokenizer.py --input 'corpus/*.txt' --output tok/glm.model --vocab-size 8000

Our vocabularies put the GLM command tokens first, as sentencepiece control symbols, so each is exactly one
token at a fixed id and ordinary text can never produce one (a corpus that contains the string "[MASK]" is
tokenized as ordinary characters, it does not inject mask tokens into training data):

    id  piece                meaning
    0   <|endoftext|>        eos AND pad (the official code asserts eos == pad for every tokenizer, spec §2)
    1   [UNK]                unknown
    2   [CLS]                start of every document in a chunk ("ENC")
    3   [MASK]               token-level blank (bert objective)
    4   [sMASK]              sentence blank (sentence objective, task_mask)
    5   [gMASK]              document-level blank (gpt objective, task_mask)
    6   <|startofpiece|>     sop: starts every Part B span
    7   <|endofpiece|>       eop: ends every Part B span (as a target)
    8   [SEP]                separator (finetuning formats)
    9   [dBLOCK]             corrupted Part B / context token (--block-mask-prob, --context-mask-ratio; spec §3.6)

[dBLOCK] came later (vocabulary layout 2): a tokenizer trained before it (layout 1, ids 0..8 only; id 9 is an
ordinary piece there) still loads and builds exactly as before, its `Specials.dblock` is None, and a build that
asks for block_mask_prob or context_mask_ratio > 0 with it is refused with a message naming the fix (retrain the
tokenizer, or leave both knobs at 0). Ids 0..8 never moved, so old shard sets and checkpoints keep their meaning.

Bring your own model: `Tokenizer(model_bytes, commands="appended")` (build: `--tokenizer your.model
--tokenizer-commands appended`) takes any sentencepiece model as it is, e.g. the official Chinese
`cog-pretrain.model`, and appends the command tokens after its pieces in the official GLMChineseTokenizer layout
(`Specials.appended`; "appended" = with --fix-command-token, "appended_unfixed" = without it, where [gMASK] shares
eop's id as in glm-10b-chinese), so official checkpoints can be continued on new data.

The typed `Specials` record carries these ids and the sentence-ending ids to the objective code
(`pipeline/infilling.py`), so the same objective code serves the official GLM vocabularies too
(`Specials.official_bert()` etc.). Text that should contain blanks (`fill_blanks`) goes through
`encode_with_blanks`, which splits on the mask strings explicitly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import fsspec
import sentencepiece as spm

from pipeline.documents import open_input, segments

# Command tokens in id order (ids 0..9). Change this list and every shard set and checkpoint changes meaning;
# only appending is allowed (tokenizers trained before an append keep loading, see REQUIRED_COMMAND_TOKENS).
COMMAND_TOKENS = (
    "<|endoftext|>", "[UNK]", "[CLS]", "[MASK]", "[sMASK]", "[gMASK]",
    "<|startofpiece|>", "<|endofpiece|>", "[SEP]", "[dBLOCK]",
)
REQUIRED_COMMAND_TOKENS = 9   # ids 0..8 must match; [dBLOCK] (id 9) is optional (tokenizers of layout 1 lack it)
DBLOCK_ID = COMMAND_TOKENS.index("[dBLOCK]")
COMMAND_LAYOUTS = ("ours", "appended", "appended_unfixed")   # where a Tokenizer finds its command tokens
VOCAB_LAYOUT = 2              # 1: command tokens 0..8; 2: + [dBLOCK] at 9 (written to the tokenizer's .json)
MASK_STRINGS = ("[MASK]", "[sMASK]", "[gMASK]")
# A piece whose string contains one of these ends a sentence (spec §3.4; the official list incl. CJK).
SENTENCE_END_CHARS = ".?!;:。？！；…\n"
# Training text is fed to sentencepiece in whitespace-aligned segments of at most this many characters: it drops
# any "sentence" over max_sentence_length (64 KB) unseen, so a corpus of long single-line documents would leave it
# nothing to train on. 4096 characters stay under 64 KB in any script (<= 4 bytes per character in UTF-8).
TRAIN_SEGMENT_CHARS = 4096
MIN_VOCAB_SIZE = len(COMMAND_TOKENS) + 17   # the command tokens plus a few pieces: sentencepiece's floor


@dataclass(frozen=True)
class Specials:
    """The GLM command-token ids of one vocabulary, plus the ids of tokens that end a sentence."""

    eos: int            # end of document; the official code uses the same id for padding
    pad: int            # right-padding of samples (== eos in every official tokenizer)
    cls: int            # [CLS] / ENC: first token of every document in a chunk
    mask: int           # [MASK]
    smask: int          # [sMASK]
    gmask: int          # [gMASK]
    sop: int            # <|startofpiece|>
    eop: int            # <|endofpiece|>
    sep: int            # [SEP]
    unk: int            # [UNK]
    dblock: int | None = None  # [dBLOCK] (spec §3.6 block / context masks); None: this vocabulary has none
    sentence_end_ids: frozenset[int] = field(default_factory=frozenset)  # ids whose piece ends a sentence

    def to_json(self) -> dict:
        d = asdict(self)
        d["sentence_end_ids"] = sorted(self.sentence_end_ids)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Specials:
        d = dict(d)
        d["sentence_end_ids"] = frozenset(int(i) for i in d.get("sentence_end_ids", ()))
        return cls(**d)

    @classmethod
    def ours(cls, sentence_end_ids: Iterable[int] = (), dblock: bool = True) -> Specials:
        """Ids of every vocabulary trained by this project (the table in the module docstring); dblock=False
        for a tokenizer of vocabulary layout 1 (trained before [dBLOCK] existed)."""
        ids = {name: i for i, name in enumerate(COMMAND_TOKENS)}
        return cls(eos=ids["<|endoftext|>"], pad=ids["<|endoftext|>"], cls=ids["[CLS]"], mask=ids["[MASK]"],
                   smask=ids["[sMASK]"], gmask=ids["[gMASK]"], sop=ids["<|startofpiece|>"],
                   eop=ids["<|endofpiece|>"], sep=ids["[SEP]"], unk=ids["[UNK]"],
                   dblock=ids["[dBLOCK]"] if dblock else None, sentence_end_ids=frozenset(sentence_end_ids))

    # The official vocabularies (spec §7.1): command tokens appended after the text vocabulary in the order
    # sop, eop, [gMASK], [sMASK] (--task-mask), [dBLOCK] (--block-mask-prob / --context-mask-ratio > 0), each
    # taking the next free id; the records below hold the ids of a run with --task-mask and the [dBLOCK] flag.

    @classmethod
    def official_bert(cls, sentence_end_ids: Iterable[int] = ()) -> Specials:
        """BERT-wordpiece GLMs (glm-base/large/410m/515m; spec §7.1), with --task-mask ids ([dBLOCK] 30526;
        a run without --task-mask has [dBLOCK] at 30524 instead)."""
        return cls(eos=0, pad=0, cls=101, mask=103, smask=30525, gmask=30524, sop=30522, eop=30523, sep=102,
                   unk=100, dblock=30526, sentence_end_ids=frozenset(sentence_end_ids))

    @classmethod
    def official_gpt2(cls, sentence_end_ids: Iterable[int] = ()) -> Specials:
        """GPT-2-BPE GLMs (glm-2b, glm-10b; spec §7.1/§7.2); [dBLOCK] 50265 (ds_block_10B.sh: block-mask 0.1)."""
        return cls(eos=50256, pad=50256, cls=50259, mask=50260, smask=50264, gmask=50263, sop=50257, eop=50258,
                   sep=50261, unk=50262, dblock=50265, sentence_end_ids=frozenset(sentence_end_ids))

    @classmethod
    def official_chinese(cls, sentence_end_ids: Iterable[int] = (), fix_command_token: bool = True) -> Specials:
        """The Chinese sentencepiece GLMs (`cog-pretrain.model`, 50,000 pieces; spec §7.1). With
        --fix-command-token (glm-large-chinese): [sMASK] 50008, [gMASK] 50009, [dBLOCK] 50010. Without it
        (glm-10b-chinese) the official code gives [gMASK] the id of eop, 50007 (id 50005 is skipped), [sMASK]
        50008 and [dBLOCK] 50009 — the ids that model was trained with (spec §7.1 surprise, §14.9)."""
        return cls.appended(50000, sentence_end_ids, fix_command_token)

    @classmethod
    def appended(cls, base: int, sentence_end_ids: Iterable[int] = (), fix_command_token: bool = True) -> Specials:
        """The official GLMChineseTokenizer layout for any sentencepiece model of `base` pieces: command tokens
        appended at base + 0 eos/pad, 1 [SEP], 2 [CLS], 3 [MASK], 4 [UNK], (5 unused), 6 sop, 7 eop, then
        with fix_command_token 8 [sMASK], 9 [gMASK], 10 [dBLOCK]; without it 7 [gMASK] (= eop), 8 [sMASK],
        9 [dBLOCK]."""
        b = base
        fixed = dict(smask=b + 8, gmask=b + 9, dblock=b + 10) if fix_command_token else \
            dict(smask=b + 8, gmask=b + 7, dblock=b + 9)
        return cls(eos=b, pad=b, sep=b + 1, cls=b + 2, mask=b + 3, unk=b + 4, sop=b + 6, eop=b + 7,
                   **fixed, sentence_end_ids=frozenset(sentence_end_ids))

    def command_strings(self) -> dict[int, str]:
        """id -> command-token string (an id shared by two tokens, eop = [gMASK] without the fix, reads as eop)."""
        names = (("dblock", "[dBLOCK]"), ("smask", "[sMASK]"), ("gmask", "[gMASK]"), ("unk", "[UNK]"),
                 ("mask", "[MASK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("eop", "<|endofpiece|>"),
                 ("sop", "<|startofpiece|>"), ("eos", "<|endoftext|>"))
        return {getattr(self, a): s for a, s in names if getattr(self, a) is not None}

    @property
    def mask_ids(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


class Tokenizer:
    """A loaded sentencepiece model with the GLM command tokens.

    commands="ours" (default): a model trained here, command tokens at the ids of `Specials.ours()` ([dBLOCK]
    optional: `specials.dblock` is None for a tokenizer of vocabulary layout 1).
    commands="appended" / "appended_unfixed": bring your own sentencepiece model (e.g. the official Chinese
    `cog-pretrain.model`): its pieces are kept as they are and the command tokens get the ids after them, in the
    official GLMChineseTokenizer layout with / without --fix-command-token (`Specials.appended`), so official
    checkpoints can be continued on new data. vocab_size is then the last command id + 1 (50,011 for
    cog-pretrain, padded to 50,048 by the trainer as in the official model)."""

    def __init__(self, model_bytes: bytes, source: str = "<bytes>", commands: str = "ours"):
        if commands not in COMMAND_LAYOUTS:
            raise ValueError(f"commands={commands!r}: choose one of {COMMAND_LAYOUTS}")
        self.model_bytes = model_bytes
        self.source = source
        self.commands = commands
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError as e:   # sentencepiece reports a damaged proto as RuntimeError('INTERNAL: ...')
            raise ValueError(f"{source}: not a readable sentencepiece model ({len(model_bytes)} bytes: {e}); the "
                             "file is damaged or not a .model; restore it or retrain it with "
                             "`python jobs/train_tokenizer.py`") from e
        n = self.sp.get_piece_size()
        ours = n > REQUIRED_COMMAND_TOKENS and all(
            self.sp.id_to_piece(i) == p for i, p in enumerate(COMMAND_TOKENS[:REQUIRED_COMMAND_TOKENS]))
        if commands == "ours" and not ours:
            bad = next(i for i, p in enumerate(COMMAND_TOKENS[:REQUIRED_COMMAND_TOKENS])
                       if i >= n or self.sp.id_to_piece(i) != p)
            raise ValueError(
                f"{source}: id {bad} is {self.sp.id_to_piece(bad) if bad < n else None!r}, expected the GLM "
                f"command token {COMMAND_TOKENS[bad]!r}. This model was not trained by pipeline/tokenizer.py; "
                "retrain it with `python jobs/train_tokenizer.py` so the command tokens sit at their fixed ids, "
                "or bring it as it is with tokenizer_commands=appended (command tokens appended after its "
                "pieces, the official Chinese GLM layout)")
        if commands != "ours" and ours:
            raise ValueError(f"{source}: this model already holds the GLM command tokens at ids 0..8 (trained by "
                             f"pipeline/tokenizer.py); load it with tokenizer_commands=ours, not {commands!r}")
        ends = [i for i, piece in enumerate(self.sp.id_to_piece(list(range(n))))   # one batch call, not 11 per id
                if not self.sp.is_control(i) and not self.sp.is_unknown(i)
                and any(c in piece for c in SENTENCE_END_CHARS)]
        if commands == "ours":
            has_dblock = (n > DBLOCK_ID and self.sp.is_control(DBLOCK_ID)
                          and self.sp.id_to_piece(DBLOCK_ID) == "[dBLOCK]")
            self.layout = VOCAB_LAYOUT if has_dblock else 1
            self.specials = Specials.ours(ends, dblock=has_dblock)
            self._vocab_size = n
        else:
            self.layout = commands
            self.specials = Specials.appended(n, ends, fix_command_token=commands == "appended")
            self._vocab_size = max(self.specials.command_strings()) + 1
        self.command_strings = self.specials.command_strings()
        self.command_ids = frozenset(self.command_strings)

    def check_trained_with(self, saved: dict, checkpoint: str, model_vocab_size: int) -> None:
        """Refuse to decode a model's ids with another vocabulary: `saved` is what the checkpoint records about its
        data (model.checkpoint.trained_data_fingerprint; {} when it records nothing, e.g. an official checkpoint,
        where only a vocabulary larger than the model's output is caught)."""
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"model vocab_size={model_vocab_size} < tokenizer vocab_size={self.vocab_size}: "
                             f"{checkpoint!r} was not trained with tokenizer {self.source!r}")
        want = saved.get("tokenizer_fingerprint")
        if want and want != self.fingerprint:
            raise ValueError(f"tokenizer {self.source!r} (fingerprint {self.fingerprint[:12]}…, {self.vocab_size} "
                             f"pieces) is not the one {checkpoint!r} was trained with (fingerprint {want[:12]}…, "
                             f"{saved.get('vocab_size')} pieces): pass the tokenizer.model of the shard set the run "
                             "trained on (its manifest names the same fingerprint)")

    @classmethod
    def load(cls, path: str, storage_options: dict | None = None, commands: str = "ours") -> Tokenizer:
        """Load a `.model` from a local path or any fsspec URL (storage_options: e.g. {endpoint_url: ...})."""
        try:
            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                data = f.read()
        except FileNotFoundError as e:
            raise ValueError(f"tokenizer model {path!r} does not exist; train one with "
                             f"`python jobs/train_tokenizer.py --input ... --output {path}`") from e
        return cls(data, source=path, commands=commands)

    @property
    def vocab_size(self) -> int:
        """Ids in use: the model's pieces (ours), or up to the last appended command token."""
        return self._vocab_size

    @property
    def fingerprint(self) -> str:
        """sha256 of the model bytes (and of the command layout when it is not ours): identifies the vocabulary
        in manifests and checkpoints."""
        tail = b"" if self.commands == "ours" else f"\0commands={self.commands}".encode()
        return hashlib.sha256(self.model_bytes + tail).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many documents at once with sentencepiece's threaded batch API (-1: one thread per core)."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids; command tokens are rendered as their strings (sentencepiece drops control symbols)."""
        out: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i in self.command_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.command_strings[i] if out or i != self.specials.cls else "")
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return " ".join(s for s in out if s)

    def encode_with_blanks(self, text: str) -> list[int]:
        """Encode text in which the literal strings [MASK], [sMASK], [gMASK] mark blanks (for fill_blanks)."""
        ids: list[int] = []
        for part in re.split(r"(\[MASK\]|\[sMASK\]|\[gMASK\])", text):
            if part in MASK_STRINGS:
                sp = self.specials
                ids.append({"[MASK]": sp.mask, "[sMASK]": sp.smask, "[gMASK]": sp.gmask}[part])
            elif part.strip():
                ids.extend(self.sp.encode(part.strip()))
        return ids

    def save_specials_json(self, path: str, storage_options: dict | None = None) -> None:
        """Write the small JSON of special ids, vocab size and fingerprint that sits beside a `.model`."""
        doc = {"vocab_size": self.vocab_size, "fingerprint": self.fingerprint,
               "vocab_layout": self.layout,
               "command_tokens": {p: i for i, p in sorted(self.command_strings.items())},
               "specials": self.specials.to_json()}
        with fsspec.open(path, "w", **(storage_options or {})) as f:
            json.dump(doc, f, indent=1, sort_keys=True)


def _iter_text_sources(inputs: Sequence[str]) -> Iterator[str]:
    """Yield the text of each input file (paths, globs or fsspec URLs; .gz/.bz2/.xz/.zst decompressed)."""
    for spec in inputs:
        files = fsspec.open_files(spec, "rb", expand=True)
        if not files:
            raise ValueError(f"tokenizer input {spec!r} matched no files; check the path or glob")
        for of in files:
            with open_input(of.full_name) as f:
                yield f.read().decode("utf-8", errors="replace")


def train(documents: Iterable[str] | Sequence[str], vocab_size: int, *, model_type: str = "unigram",
          max_sentences: int = 2_000_000, character_coverage: float = 0.9999, seed: int = 0,
          num_threads: int = 2) -> Tokenizer:
    """Train a sentencepiece model on documents (an iterable of document strings; for files, paths, globs or
    URLs use `train_from_files`).

    Input sampling: every line is cut into whitespace-aligned segments of at most TRAIN_SEGMENT_CHARS, and at
    most `max_sentences` of them are fed, chosen by sentencepiece's seeded reservoir (`input_sentence_size` +
    `shuffle_input_sentence`), so large corpora and long single-line documents train in bounded memory.
    A corpus with too few distinct pieces yields a smaller vocabulary than asked for (hard_vocab_limit=False);
    that warns with both numbers.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type={model_type!r}: choose 'unigram' or 'bpe'")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least {MIN_VOCAB_SIZE}")

    fed = {"segments": 0, "chars": 0}

    def lines() -> Iterator[str]:
        for doc in documents:
            for line in doc.splitlines():
                for seg in segments(line.strip(), TRAIN_SEGMENT_CHARS):
                    if seg := seg.strip():
                        fed["segments"] += 1
                        fed["chars"] += len(seg)
                        yield seg

    spm.set_random_generator_seed(seed)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=out, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, pad_piece=COMMAND_TOKENS[0], unk_id=1, unk_piece=COMMAND_TOKENS[1], bos_id=-1, eos_id=-1,
        control_symbols=list(COMMAND_TOKENS[2:]), character_coverage=character_coverage,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=1 << 16,
        num_threads=num_threads, byte_fallback=True, split_digits=True, hard_vocab_limit=False,
        minloglevel=2)
    tok = Tokenizer(out.getvalue())
    if tok.vocab_size < vocab_size:
        sampled = (f"; sentencepiece sampled {max_sentences:,} of them, raise max_sentences"
                   if fed["segments"] > max_sentences else "")
        warnings.warn(f"asked for vocab_size={vocab_size}, got {tok.vocab_size} pieces: the training text "
                      f"({fed['segments']:,} lines, {fed['chars']:,} characters{sampled}) has too few distinct "
                      "pieces for more (sentencepiece stops short, hard_vocab_limit=False); train on more text or "
                      f"ask for at most {tok.vocab_size}", stacklevel=2)
    return tok


def train_from_files(inputs: Sequence[str], vocab_size: int, **kw) -> Tokenizer:
    """Train on text files given as paths, globs or fsspec URLs."""
    return train(_iter_text_sources(inputs), vocab_size, **kw)


def save(tok: Tokenizer, path: str) -> None:
    """Write `<path>` (the .model) and `<path without .model>.json` (special ids), locally or to a URL."""
    fs, p = fsspec.core.url_to_fs(path)
    parent = os.path.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fsspec.open(path, "wb") as f:
        f.write(tok.model_bytes)
    tok.save_specials_json(re.sub(r"\.model$", "", path) + ".json")


def _join(folder: str, relative: str) -> str:
    """folder/relative with `..` resolved, also in a URL (object stores do not resolve it)."""
    scheme, sep, rest = folder.rpartition("://")
    return f"{scheme}{sep}{posixpath.normpath(posixpath.join(rest, relative))}"


def tokenizer_candidates(recorded: str, manifest: str) -> list[str]:
    """Where the manifest's tokenizer may be. A relative path was written relative to the folder the build ran
    in, and a shard set may have been moved or copied since, so: the recorded path (when absolute or a URL),
    else the recorded path relative to the shard-set folder; then its file name in the shard-set folder and in
    the build's output folder (`<output>/tokenizer.model` is where a build puts the tokenizer it trained);
    last, a relative path as seen from the current folder."""
    if "://" not in manifest:
        manifest = os.path.abspath(manifest)
    folder = posixpath.dirname(manifest)         # the shard set (…/train)
    output = posixpath.dirname(folder)           # the build's output folder
    name = recorded.replace("\\", "/").rsplit("/", 1)[-1]
    absolute = "://" in recorded or os.path.isabs(recorded)
    out = [recorded if absolute else _join(folder, recorded), f"{folder}/{name}", f"{output}/{name}"]
    return list(dict.fromkeys(out + ([] if absolute else [recorded])))


def find_tokenizer(recorded: str, manifest: str, fingerprint: str, storage_options: dict,
                   commands: str = "ours") -> Tokenizer:
    """The first candidate that exists and has the manifest's fingerprint; else a ValueError naming them.
    `commands` is the build's tokenizer_commands (where the command tokens sit in a model you brought)."""
    tried = []
    for path in tokenizer_candidates(recorded, manifest):
        so = storage_options if "://" in path else {}
        fs, p = fsspec.core.url_to_fs(path, **so)
        if not fs.exists(p):
            tried.append(f"{path} (missing)")
            continue
        try:
            tok = Tokenizer.load(path, so, commands=commands)
        except ValueError as e:
            tried.append(f"{path} ({e})")
            continue
        if tok.fingerprint == fingerprint:
            return tok
        tried.append(f"{path} (fingerprint {tok.fingerprint[:16]})")
    raise ValueError(f"the shards' tokenizer (fingerprint {fingerprint[:16]}, recorded as {recorded!r}) is not at "
                     f"any of: {'; '.join(tried)}; pass it with --tokenizer")


def add_tokenizer_arguments(ap) -> None:
    """--tokenizer and --tokenizer-commands, for the job scripts that decode a model's ids (argparse parser)."""
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model the checkpoint was trained with")
    ap.add_argument("--tokenizer-commands", default="ours", choices=("ours", "appended", "appended_unfixed"),
                    help="where the GLM command tokens sit: ours (a model trained here) or appended (a model you "
                         "brought, built with that tokenizer_commands)")
