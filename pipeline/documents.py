"""Read sources through fsspec, clean them, frame documents as `[CLS] doc eos`, pack them into chunks.

Pure functions and small classes, no ray: `pipeline/build.py` wires them into tasks.

Inputs (paths, globs or URLs such as file://, s3://, gs://, memory://):
  *.txt / other text  one document per file (default), or one per blank-line-separated block (text_split)
  *.jsonl / *.json    one JSON object per line; the document is its `text_field`
  *.parquet           the `text_field` column, one document per row
  any of them .gz/.bz2/.xz/.zst compressed (the codec is inferred from the suffix)
Bad input never disappears silently: every file or document left out is reported as a `Skip` with a reason
and ends up in the manifest's accounting. A bad JSONL line (invalid JSON or UTF-8, no text) skips that line; a
corrupt or truncated file skips the file, or its rest after the documents already read, which are used.

Packing follows the official BlockDataset (spec §2): a chunk starts with [CLS]; documents are appended as
`[CLS] doc eos` until the chunk is full; a document cut at a chunk's end continues in the next chunk behind
a fresh [CLS] (the official "too long" path: `[CLS] + doc[s:]`). Unlike the official random sampler nothing
is thrown away: every token of every document lands in exactly one chunk per mask variant.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import zstandard

TEXT_SUFFIXES = (".txt", ".text", ".md", "")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".xz")
# What a damaged file raises while being read: I/O and codec errors (gzip/bz2 raise OSError or EOFError, xz and
# zstd their own), and pyarrow's for a corrupt Parquet file. Each becomes a counted Skip naming the file.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError, pa.ArrowException)
MAX_SEGMENT_CHARS = 1 << 16   # long documents are encoded in whitespace-aligned segments of at most this size

# Transcript annotations of the State of the Union corpus and similar speech transcripts: "[Applause]",
# "[Laughter]", "[see APP Note]", "[Inaudible]". Only these, so editorial brackets like "[the States]" stay.
_ANNOTATION = re.compile(r"\[\s*(?:applause|laughter|inaudible|see app note|cheers|booing)[^\]\n]{0,40}\]",
                         re.IGNORECASE)
_NEWLINE_RUNS = re.compile(r"\n{3,}")
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class InputFile:
    url: str      # fully qualified URL (protocol://path), sorted order = document order
    size: int     # bytes, from the listing (used to form packing groups without reading)


@dataclass(frozen=True)
class Document:
    text: str
    source: str      # URL of the file
    index: int       # index of the document within its file


@dataclass(frozen=True)
class Skip:
    source: str      # file URL (and document index, when a single document was skipped)
    reason: str      # human-readable reason naming the problem

    def to_json(self) -> dict:
        return {"source": self.source, "reason": self.reason}


def _kind(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    for c in COMPRESSION_SUFFIXES:
        if name.endswith(c):
            name = name[: -len(c)]
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def list_inputs(specs: list[str], storage_options: dict | None = None) -> list[InputFile]:
    """Expand paths, globs and URLs into a sorted, de-duplicated list of files. Raises ValueError naming
    any spec that matches nothing or cannot be reached (a missing path is a user error, not a skip)."""
    out: dict[str, InputFile] = {}
    for spec in specs:
        try:
            fs, _, paths = fsspec.get_fs_token_paths(spec, storage_options=storage_options or {})
            paths = [p for p in paths if fs.exists(p)]  # a plain path comes back even when it is missing
            expanded: list[str] = []
            for p in paths:
                if fs.isdir(p):
                    expanded += sorted(f for f in fs.find(p) if not f.rsplit("/", 1)[-1].startswith("."))
                else:
                    expanded.append(p)
            infos = [(p, fs.size(p)) for p in expanded]
        except (FileNotFoundError, PermissionError, OSError) as e:
            raise ValueError(f"input {spec!r} cannot be read ({type(e).__name__}: {e}); check the path, "
                             "bucket name, endpoint and credentials (AWS_* / GOOGLE_* environment)") from e
        if not infos:
            raise ValueError(f"input {spec!r} matched no files; check the path or glob (quote globs in the shell)")
        for p, size in infos:
            url = fs.unstrip_protocol(p)
            out[url] = InputFile(url, int(size or 0))
    return [out[k] for k in sorted(out)]


def clean(text: str) -> str:
    """Drop transcript annotations, normalise spaces, keep paragraph breaks; strip NULs and BOMs.

    The rules, in order: remove U+FEFF and NUL; remove `_ANNOTATION` matches; every run of [ \\t\\f\\v\\r]
    becomes one space; every line is str.strip()ped; runs of 3+ newlines become 2; the whole is stripped.
    Each step runs only when its trigger is present, with plain str scans (memchr-fast) instead of a regex
    that matches at every single space: a regex per space cost as much as sentencepiece encoding of the text
    (issue 15). tests/test_documents.py checks the output equals the regex rules on real and hostile text."""
    if "\ufeff" in text:
        text = text.replace("\ufeff", "")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if "[" in text:   # every annotation starts with "["
        text = _ANNOTATION.sub("", text)
    for c in "\t\f\v\r":   # a run of these and spaces -> one space, in two steps: each becomes a space ...
        if c in text:
            text = text.replace(c, " ")
    while "  " in text:   # ... then every run of spaces halves until none is longer than one
        text = text.replace("  ", " ")
    text = "\n".join(line.strip() for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _NEWLINE_RUNS.sub("\n\n", text)
    return text.strip()


class _ZstdReader(io.RawIOBase):
    """zstd decompression that raises EOFError when the data ends inside a frame. zstandard's stream_reader
    (fsspec's codec) returns what it decoded so far and no error, so a cut-off .zst would pass as a shorter
    file, or as an empty one."""

    def __init__(self, raw):
        self.raw = raw
        self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.in_frame = False      # bytes of a frame fed that did not complete it yet
        self.out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self.out:
            data = self.raw.read(1 << 16)
            if not data:
                if self.in_frame:
                    raise EOFError("zstd data ends inside a frame: the file is truncated")
                return 0
            while data:              # a .zst may hold several frames, one after another
                self.out += self.dobj.decompress(data)
                self.in_frame = not self.dobj.eof
                data = self.dobj.unused_data if self.dobj.eof else b""
                if self.dobj.eof:
                    self.dobj = zstandard.ZstdDecompressor().decompressobj()
        n = min(len(buf), len(self.out))
        buf[:n], self.out = self.out[:n], self.out[n:]
        return n


@contextlib.contextmanager
def open_input(url: str, storage_options: dict | None = None) -> Iterator:
    """Open an input file for binary reading, decompressed by its suffix: .gz .bz2 .xz through fsspec, .zst
    through `_ZstdReader` (which notices truncation)."""
    if url.lower().endswith(".zst"):
        with fsspec.open(url, "rb", **(storage_options or {})) as raw:
            yield io.BufferedReader(_ZstdReader(raw))
    else:
        with fsspec.open(url, "rb", compression="infer", **(storage_options or {})) as fh:
            yield fh


def read_documents(f: InputFile, text_field: str, text_split: str, storage_options: dict | None,
                   skips: list[Skip]) -> Iterator[Document]:
    """Yield the cleaned documents of one file; append a Skip for the file or any document left out. A file
    that breaks off (truncated, corrupt) after some documents were yielded keeps those: its Skip says how many."""
    kind = _kind(f.url)
    used = 0
    try:
        with open_input(f.url, storage_options) as fh:
            reader = {"parquet": _read_parquet, "jsonl": _read_jsonl}.get(kind, _read_text)
            for doc in reader(fh, f, text_field if kind != "text" else text_split, skips):
                yield doc
                used += 1
    except READ_ERRORS as e:
        if used:
            skips.append(Skip(f.url, f"truncated or corrupt after {used} documents, which are kept; the rest is "
                                     f"lost ({type(e).__name__}: {e}); re-fetch or re-compress the file"))
        else:
            skips.append(Skip(f.url, f"unreadable ({type(e).__name__}: {e}); check the file (a truncated or "
                                     "corrupt download?)"))


def _read_text(fh, f: InputFile, text_split: str, skips: list[Skip]) -> Iterator[Document]:
    raw = fh.read()
    if not raw.strip():
        skips.append(Skip(f.url, "empty file"))
        return
    if b"\x00" in raw[:8192]:
        skips.append(Skip(f.url, "binary file (NUL bytes); not text"))
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.append(Skip(f.url, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); re-encode "
                                 "the file as UTF-8"))
        return
    if text_split != "blank_lines":
        if doc := clean(text):
            yield Document(doc, f.url, 0)
        else:
            skips.append(Skip(f.url, "empty after cleaning (only annotations and spaces)"))
        return
    for i, part in enumerate(_BLANK_LINES.split(text)):
        if doc := clean(part):
            yield Document(doc, f.url, i)


def _read_jsonl(fh, f: InputFile, text_field: str, skips: list[Skip]) -> Iterator[Document]:
    for i, raw in enumerate(fh):        # binary lines: one bad byte costs its line, not the file
        if not raw.strip():
            continue
        where = f"{f.url}#{i}"
        try:
            line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
        except UnicodeDecodeError as e:
            skips.append(Skip(where, f"line {i + 1}: not valid UTF-8 (byte {e.start}: "
                                     f"{raw[e.start:e.start + 4]!r}); re-encode the file as UTF-8"))
            continue
        try:
            text = json.loads(line)[text_field]
            if not isinstance(text, str):
                raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            skips.append(Skip(where, f"bad JSONL record (line {i + 1}): {type(e).__name__}: {e}"))
            continue
        if doc := clean(text):
            yield Document(doc, f.url, i)
        else:
            skips.append(Skip(where, f"line {i + 1}: field {text_field!r} is empty after cleaning"))


def _read_parquet(fh, f: InputFile, text_field: str, skips: list[Skip]) -> Iterator[Document]:
    import pyarrow.parquet as pq  # only Parquet inputs need it

    pf = pq.ParquetFile(fh)
    if text_field not in pf.schema_arrow.names:
        skips.append(Skip(f.url, f"no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                                 "set --text-field"))
        return
    i = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024, use_threads=False):  # see shards.py
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                what = "null" if text is None else f"a {type(text).__name__}, not a string"
                skips.append(Skip(f"{f.url}#{i}", f"row {i}: column {text_field!r} is {what}"))
            elif doc := clean(text):
                yield Document(doc, f.url, i)
            else:
                skips.append(Skip(f"{f.url}#{i}", f"row {i}: column {text_field!r} is empty after cleaning"))
            i += 1


def is_validation(doc: Document, fraction: float) -> bool:
    """Deterministic split by a hash of the document text: the same document lands in the same split on any
    machine and in any order, and duplicate documents never straddle train and validation."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(doc.text.encode()).digest()[:8], "little")
    return (h % 1_000_000) < fraction * 1_000_000


def segments(text: str, max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """Split a long document at whitespace into pieces of at most max_chars, so a 50 MB single-line document
    is encoded in bounded pieces (and in parallel) instead of as one sentencepiece lattice."""
    if len(text) <= max_chars:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + max_chars // 2, end)
            end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def group_files(files: list[InputFile], group_bytes: int) -> list[list[InputFile]]:
    """Contiguous runs of input files of about group_bytes each: the packing groups. Depends only on the
    listing (names and sizes), never on worker count or timing, so chunk boundaries are reproducible."""
    groups: list[list[InputFile]] = []
    cur: list[InputFile] = []
    size = 0
    for f in files:
        cur.append(f)
        size += f.size
        if size >= group_bytes:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


@dataclass
class Piece:
    """A run of framed tokens from one document, waiting in the packer."""
    tokens: np.ndarray     # int32; starts with [CLS] at a document start, ends with eos at its end
    source: str
    doc_index: int


class TokenQueue:
    """FIFO of framed document tokens from which chunks are cut; remembers provenance of the first token."""

    def __init__(self, cls_id: int):
        self.cls_id = cls_id
        self.pieces: list[Piece] = []
        self.head = 0          # offset into pieces[0]
        self.size = 0          # tokens queued

    def push(self, tokens: np.ndarray, source: str, doc_index: int) -> None:
        self.pieces.append(Piece(tokens, source, doc_index))
        self.size += len(tokens)

    @property
    def fresh_cls(self) -> int:
        """1 when the head is mid-document, so the next chunk starts with an added [CLS] (spec §2 step 3)."""
        return 1 if self.head > 0 else 0   # pieces always start with the document's own [CLS]

    @property
    def available(self) -> int:
        """Length of a chunk holding everything queued (the added [CLS] included)."""
        return self.size + self.fresh_cls

    @property
    def provenance(self) -> tuple[str, int]:
        """(source, doc_index) of the document the next chunk starts in."""
        return self.pieces[0].source, self.pieces[0].doc_index

    def peek(self, n: int) -> np.ndarray:
        """The next chunk of at most n tokens, without consuming it; it starts with [CLS]."""
        parts = []
        need = n
        if self.fresh_cls:
            parts.append(np.array([self.cls_id], dtype=np.int32))
            need -= 1
        off = self.head
        for p in self.pieces:
            if need <= 0:
                break
            take = p.tokens[off: off + need]
            parts.append(take)
            need -= len(take)
            off = 0
        return np.concatenate(parts)

    def consume(self, chunk_len: int) -> None:
        """Drop the tokens of a chunk of chunk_len returned by peek (its added [CLS] is not queue content)."""
        n = chunk_len - self.fresh_cls
        self.size -= n
        while n > 0:
            p = self.pieces[0]
            avail = len(p.tokens) - self.head
            if n >= avail:
                n -= avail
                self.pieces.pop(0)
                self.head = 0
            else:
                self.head += n
                n = 0
        # A chunk that ended exactly on a document's eos leaves the next document's [CLS] at the head.
