"""THE shard contract: schema version, columns, manifest, Parquet and WebDataset encode/decode.

Writer (`pipeline/build.py`) and reader (`pipeline/stream.py`, `jobs/inspect_shards.py`) import this one module;
no other file spells a column name or dtype.

A shard set is a folder (local or any fsspec URL) holding shard files and `_manifest.json`, which is written
LAST: a folder without a manifest is an incomplete build. The leading underscore makes Parquet dataset readers
(`pyarrow.dataset`, `pandas.read_parquet(folder)`, DuckDB) skip it, so a Parquet shard folder opens as a plain
dataset. Nothing in a manifest names a path of the building machine: the tokenizer is named relative to the shard
folder (`../tokenizer.model`), so a shard set copied elsewhere (another disk, a bucket) reads as it is.

Schema versions: 2 (this) = `_manifest.json`, no absolute paths; 1 = `manifest.json`, `tokenizer.path` absolute.
Both are read (the old name is looked for when the new one is absent); the columns are the same.

One row = one GLM training sample, stored unpadded
(the reader right-pads to `seq_len` with zeros, as the official collate does, spec §3.2):

    column              type           meaning
    input_ids           list<int32>    [Part A ; Part B inputs]                                  (spec §3.6)
    targets             list<int32>    aligned labels: targets[i] is the label at position i      (no shift)
    loss_mask           list<uint8>    1 on Part B, 0 on Part A
    position_ids        list<int32>    row 0 of the 2D positions: index in the corrupted text A
    block_position_ids  list<int32>    row 1: 0 in Part A, 1..len+1 inside each Part B span
    sep                 int32          length of Part A (A bidirectional, B causal)
    objective           string         bert | sentence | gpt
    layout              string         bert | sentence | gpt_suffix | gpt_single_span | masked_lm
    variant             int32          mask variant k in [0, variants): epoch e reads variant e mod variants
    source              string         URI of the input file holding the chunk's first document
    doc_index           int64          index of that document within its file
    chunk_index         int64          index of the chunk within its packing group and variant
    sample_key          string         globally unique, stable id "<split>/<group>/<variant>/<chunk>"

Parquet shards use zstd and row groups of `ROW_GROUP_SIZE` rows. WebDataset shards are plain POSIX tar files
whose members are `<key>.<column>.npy` (arrays) and `<key>.json` (scalars), written with fixed metadata
(mtime 0, uid 0) so the same samples give the same bytes; `webdataset.WebDataset` reads them as they are.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)          # 1: the same columns; `manifest.json`, an absolute tokenizer path
MANIFEST_NAME = "_manifest.json"    # dataset readers skip names starting with '_' or '.'
LEGACY_MANIFEST_NAME = "manifest.json"
# Rows per Parquet row group. Our readers fetch and decode whole shard files (only the columns they need), never
# one row group, so this only sets the unit of compression for us and of row-group reads for other Parquet tools.
ROW_GROUP_SIZE = 256
FORMATS = ("parquet", "wds")
SUFFIX = {"parquet": ".parquet", "wds": ".tar"}

ARRAY_COLUMNS = {  # name -> numpy dtype of the per-token columns
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.uint8,
    "position_ids": np.int32,
    "block_position_ids": np.int32,
}
SCALAR_COLUMNS = {  # name -> numpy dtype (object = str)
    "sep": np.int32,
    "objective": object,
    "layout": object,
    "variant": np.int32,
    "source": object,
    "doc_index": np.int64,
    "chunk_index": np.int64,
    "sample_key": object,
}
COLUMNS = {**ARRAY_COLUMNS, **SCALAR_COLUMNS}  # every column, in file order
_STRING_COLUMNS = [c for c, t in SCALAR_COLUMNS.items() if t is object]
_ARROW = {np.int32: pa.int32(), np.int64: pa.int64(), np.uint8: pa.uint8(), object: pa.string()}
SCHEMA = pa.schema(
    [pa.field(n, pa.list_(_ARROW[t])) for n, t in ARRAY_COLUMNS.items()]
    + [pa.field(n, _ARROW[t]) for n, t in SCALAR_COLUMNS.items()],
    metadata={"glm_shard_schema_version": str(SCHEMA_VERSION)},
)


def canonical_schema(schema: pa.Schema = SCHEMA) -> str:
    """A column schema as canonical text (names, order, types; no version): the hash of ours is snapshotted in
    tests/test_shards.py, so a changed schema fails there until SCHEMA_VERSION is bumped."""
    def kind(t: pa.DataType) -> str:  # list<int32>, whatever the list's child field is named
        return f"list<{t.value_type}>" if pa.types.is_list(t) else str(t)

    return json.dumps([[f.name, kind(f.type)] for f in schema])


class ShardError(RuntimeError):
    """A shard is missing, truncated or does not match the manifest; the message names it and the fix."""


# ------------------------------------------------------------------------------------------------ samples

_KERNEL: list = []   # [the compiled pad kernel, or None without numba], filled at the first pad_into


def _pad_kernel():
    """ShardSamples.pad_into's numba kernel, compiled (or loaded from numba's cache) at first use; None when numba
    is not installed: the numpy path runs (the same result)."""
    if not _KERNEL:
        try:
            import numba
        except ImportError:
            _KERNEL.append(None)
        else:
            @numba.njit(cache=True, nogil=True)
            def pad_rows(flat, starts, lengths, out, at):   # out[at[i]] = flat[starts[i]:+lengths[i]], then zeros
                seq_len = out.shape[1]
                for i in range(len(starts)):
                    a, n, r = starts[i], lengths[i], at[i]
                    for t in range(n):
                        out[r, t] = flat[a + t]
                    for t in range(n, seq_len):
                        out[r, t] = 0

            _KERNEL.append(pad_rows)
    return _KERNEL[0]


class ShardSamples:
    """Columnar samples of one shard: flat token arrays plus offsets, cheap row access without python dicts."""

    def __init__(self, arrays: dict[str, np.ndarray], offsets: np.ndarray, scalars: dict[str, np.ndarray]):
        self.arrays = arrays      # column -> flat 1-D array of all rows' tokens
        self.offsets = offsets    # int64 [rows+1]; row i is arrays[c][offsets[i]:offsets[i+1]]
        self.scalars = scalars    # column -> 1-D array [rows]
        self._padded: dict[str, np.ndarray] = {}   # numpy path of pad_into: column -> its tokens, then one 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pad_into(self, rows: np.ndarray, seq_len: int, out: dict[str, np.ndarray], at: np.ndarray) -> None:
        """Right-pad rows `rows` of this shard with 0 to seq_len into out[c][at] (int64 [len(rows), seq_len]) for
        every token column out has, straight from the flat Arrow values and list offsets, no per-row Python: each
        output position written once (compiled kernel; without numba: one numpy gather per column). Row by row the
        same as pad_row."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        too_long = np.flatnonzero(lengths > seq_len)
        if len(too_long):
            r = int(rows[too_long[0]])
            key = self.scalars["sample_key"][r] if "sample_key" in self.scalars else f"row {r}"
            raise ShardError(f"sample {key!r} has {int(lengths[too_long[0]])} tokens > seq_len {seq_len}; the shard "
                             "set was built for a longer seq_len — rebuild it or raise seq_len")
        kernel = _pad_kernel()
        if kernel is not None:   # each row's tokens copied (and cast) straight into its output row, then zeros
            for c, flat in self.arrays.items():
                if c in out:
                    kernel(flat, starts, lengths, out[c], at)
            return
        end = int(self.offsets[-1])                    # numpy: one gather per column; the 0 after the last token
        idx = starts[:, None] + np.arange(seq_len)     # [b, seq_len]        is every padding position's source
        idx[idx >= (starts + lengths)[:, None]] = end
        for c, flat in self.arrays.items():
            if c in out:
                if c not in self._padded:
                    self._padded[c] = np.append(flat, np.zeros(1, flat.dtype))
                out[c][at] = self._padded[c].take(idx, mode="clip")   # (clip: unbuffered; idx is in range)

    def row(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        out: dict = {c: v[a:b] for c, v in self.arrays.items()}
        for c, v in self.scalars.items():
            x = v[i]
            out[c] = x if isinstance(x, str) else int(x)
        return out

    @classmethod
    def from_rows(cls, rows: list[dict]) -> ShardSamples:
        lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        arrays = {}
        for c, t in ARRAY_COLUMNS.items():
            arrays[c] = (np.concatenate([np.asarray(r[c], dtype=t) for r in rows]) if rows
                         else np.zeros(0, dtype=t))
            if len(arrays[c]) != offsets[-1]:
                raise ValueError(f"column {c!r} has a different length than input_ids in some row")
        scalars = {c: np.array([r[c] for r in rows], dtype=t) for c, t in SCALAR_COLUMNS.items()}
        return cls(arrays, offsets, scalars)


def sample_row(sample: dict, **provenance) -> dict:
    """One shard row: an infilling sample's token arrays, sep and layout, plus the provenance columns (objective,
    variant, source, doc_index, chunk_index, sample_key) as keywords; a missing or unknown column raises."""
    row = {c: sample[c] for c in (*ARRAY_COLUMNS, "sep", "layout")}
    need = set(SCALAR_COLUMNS) - set(row)
    if set(provenance) != need:
        raise ValueError(f"sample_row: provenance columns {sorted(provenance)} do not match the schema's "
                         f"{sorted(need)}; pass exactly those (pipeline/shards.py SCALAR_COLUMNS)")
    row.update(provenance)
    return {c: row[c] for c in COLUMNS}


_PROVENANCE = frozenset(SCALAR_COLUMNS) - {"sep", "layout"}
_ARRAY_NAMES = tuple(ARRAY_COLUMNS)


class ShardBuffer:
    """The rows of one shard being written, as column buffers: every sample's token arrays are copied once into
    one growing flat array per column (kept across shards, so memory stays at one shard's worth), the scalars
    into lists. `samples()` hands the shard to `encode` as contiguous arrays plus list offsets, without a
    per-row dict or a per-row array on the way."""

    def __init__(self, capacity: int = 1 << 16):
        self.arrays = {c: np.empty(capacity, dtype=t) for c, t in ARRAY_COLUMNS.items()}
        self.lengths: list[int] = []
        self.scalars: dict[str, list] = {c: [] for c in SCALAR_COLUMNS}
        self.used = 0   # tokens in the buffers

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, sample: dict, **provenance) -> None:
        """One row: an infilling sample's token arrays, sep and layout, plus the provenance columns (objective,
        variant, source, doc_index, chunk_index, sample_key) as keywords; a missing or unknown column raises."""
        if provenance.keys() != _PROVENANCE:
            raise ValueError(f"ShardBuffer.add: provenance columns {sorted(provenance)} do not match the schema's "
                             f"{sorted(_PROVENANCE)}; pass exactly those (pipeline/shards.py SCALAR_COLUMNS)")
        self.add_sample(sample, **provenance)

    def add_sample(self, sample: dict, objective: str, variant: int, source: str, doc_index: int,
                   chunk_index: int, sample_key: str) -> None:
        """add(sample, objective=..., ...) with the provenance columns positional (the packer's per-sample path:
        no keyword dict to build and check)."""
        a, n = self.used, len(sample["input_ids"])
        arrays = self.arrays
        if a + n > len(arrays["input_ids"]):   # grow: double, or to what this row needs
            cap = max(2 * len(arrays["input_ids"]), a + n)
            for c, old in arrays.items():
                arrays[c] = np.empty(cap, dtype=old.dtype)
                arrays[c][:a] = old[:a]
        for c in _ARRAY_NAMES:
            v = sample[c]
            if len(v) != n:
                raise ValueError(f"column {c!r} has {len(v)} entries and input_ids {n} in row {sample_key!r}; "
                                 "every token column needs one entry per token")
            arrays[c][a:a + n] = v
        self.used = a + n
        self.lengths.append(n)
        sc = self.scalars
        sc["sep"].append(sample["sep"])
        sc["layout"].append(sample["layout"])
        sc["objective"].append(objective)
        sc["variant"].append(variant)
        sc["source"].append(source)
        sc["doc_index"].append(doc_index)
        sc["chunk_index"].append(chunk_index)
        sc["sample_key"].append(sample_key)

    def samples(self) -> ShardSamples:
        """The buffered rows (views into the buffers: encode them before the next add)."""
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return ShardSamples({c: v[:self.used] for c, v in self.arrays.items()}, offsets,
                            {c: np.array(v, dtype=SCALAR_COLUMNS[c]) for c, v in self.scalars.items()})

    def clear(self) -> None:
        self.lengths = []
        self.scalars = {c: [] for c in SCALAR_COLUMNS}
        self.used = 0


def pad_row(row: dict, seq_len: int) -> dict[str, np.ndarray]:
    """Right-pad one row's token columns with 0 to seq_len (spec §3.2: every field padded with 0)."""
    n = len(row["input_ids"])
    if n > seq_len:
        raise ShardError(f"sample {row.get('sample_key')!r} has {n} tokens > seq_len {seq_len}; "
                         "the shard set was built for a longer seq_len — rebuild or raise seq_len")
    out = {}
    for c, t in ARRAY_COLUMNS.items():
        a = np.zeros(seq_len, dtype=np.int64 if t != np.uint8 else np.uint8)
        a[:n] = row[c]
        out[c] = a
    return out


# ------------------------------------------------------------------------------------------------ encode

def _arrow(values: np.ndarray, t) -> pa.Array:
    """One column as an Arrow array over its numpy buffer (strings: one UTF-8 buffer plus offsets). Built with
    from_buffers because pa.array() imports pandas on first use: ~0.3 s in every fresh build worker."""
    if t is object:
        data = [v.encode() for v in values.tolist()]
        ends = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in data], out=ends[1:])
        if ends[-1] >= 2**31:
            raise ValueError(f"string column of {ends[-1]} bytes in one shard: lower samples_per_shard")
        return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(ends.astype(np.int32)),
                                                              pa.py_buffer(b"".join(data))])
    a = np.ascontiguousarray(values, dtype=t)
    return pa.Array.from_buffers(_ARROW[t], len(a), [None, pa.py_buffer(a)])


def encode_parquet(samples: ShardSamples) -> bytes:
    """Parquet from the contiguous column arrays and one offsets array shared by the list columns (no copy of
    the tokens before the writer). Dictionary encoding only for the string columns: the token columns do not
    repeat enough for it to pay, and without it they also decode twice as fast."""
    n = len(samples)
    if samples.offsets[-1] >= 2**31:
        raise ValueError(f"shard of {samples.offsets[-1]} tokens: Arrow lists hold under 2**31 per shard; lower "
                         "samples_per_shard")
    offsets = _arrow(samples.offsets, np.int32)
    cols = [pa.ListArray.from_arrays(offsets, _arrow(samples.arrays[c], t)) for c, t in ARRAY_COLUMNS.items()]
    cols += [_arrow(samples.scalars[c], t) for c, t in SCALAR_COLUMNS.items()]
    table = pa.Table.from_arrays(cols, schema=SCHEMA)
    assert table.num_rows == n
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_SIZE, write_statistics=False,
                   use_dictionary=_STRING_COLUMNS)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


def encode_wds(samples: ShardSamples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(len(samples)):
            row = samples.row(i)
            key = row["sample_key"].replace("/", "_")
            members = [(f"{key}.{c}.npy", _npy(np.asarray(row[c], dtype=t))) for c, t in ARRAY_COLUMNS.items()]
            meta = {c: row[c] for c in SCALAR_COLUMNS}
            members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def encode(samples: ShardSamples, fmt: str) -> bytes:
    check_format(fmt)
    return encode_parquet(samples) if fmt == "parquet" else encode_wds(samples)


# ------------------------------------------------------------------------------------------------ decode

TRAINING_COLUMNS = (*ARRAY_COLUMNS, "sep", "objective", "sample_key")  # what a training batch needs


def decode_parquet(data: bytes, name: str = "<shard>", columns: tuple[str, ...] | None = None) -> ShardSamples:
    """columns: read only these (input_ids always); None = all. Skipping the provenance strings is cheaper."""
    if columns is not None:
        columns = tuple(dict.fromkeys(("input_ids", *columns)))
    try:
        # ParquetFile.read, not pq.read_table: read_table's dataset scanner drops its last reference to the
        # Python bytes on a background thread, which needs the GIL; at interpreter exit that aborts the process
        # (rc 134, "terminate called without an active exception").
        table = pq.ParquetFile(pa.BufferReader(data)).read(columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"shard {name} is not a readable Parquet file ({e}); it is truncated or corrupt — "
                         "rebuild the shard set (jobs/build_shards.py, same command) or restore the file") from e
    missing = [c for c in (columns or COLUMNS) if c not in table.column_names]
    if missing:
        raise ShardError(f"shard {name} lacks columns {missing}; it was written by another schema version")
    first = table.column("input_ids").combine_chunks()
    offsets = first.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    arrays = {c: table.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(t, copy=False)
              for c, t in ARRAY_COLUMNS.items() if c in table.column_names}
    scalars = {c: table.column(c).to_numpy(zero_copy_only=False).astype(t, copy=False)   # strings: object [str]
               for c, t in SCALAR_COLUMNS.items() if c in table.column_names}
    return ShardSamples(arrays, offsets, scalars)


def decode_wds(data: bytes, name: str = "<shard>") -> ShardSamples:
    rows: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                f = tar.extractfile(m)
                if f is None:
                    continue
                key, _, rest = m.name.partition(".")
                if key not in rows:
                    rows[key] = {}
                    order.append(key)
                payload = f.read()
                if rest == "json":
                    rows[key].update(json.loads(payload))
                else:
                    rows[key][rest[:-4]] = np.load(io.BytesIO(payload), allow_pickle=False)
    except (tarfile.TarError, ValueError, EOFError) as e:
        raise ShardError(f"shard {name} is not a readable tar file ({e}); it is truncated or corrupt — "
                         "rebuild the shard set (jobs/build_shards.py, same command) or restore the file") from e
    lst = [rows[k] for k in order]
    need = set(COLUMNS)
    for r in lst:
        if not need <= set(r):
            raise ShardError(f"shard {name} has a sample missing {sorted(need - set(r))}; it is truncated")
    return ShardSamples.from_rows(lst)


def decode(data: bytes, fmt: str, name: str = "<shard>", columns: tuple[str, ...] | None = None) -> ShardSamples:
    check_format(fmt)
    if fmt == "parquet":
        return decode_parquet(data, name, columns)
    samples = decode_wds(data, name)   # a tar has no column layout to skip; drop what was not asked for
    if columns is not None:
        samples.arrays = {c: v for c, v in samples.arrays.items() if c in columns or c == "input_ids"}
        samples.scalars = {c: v for c, v in samples.scalars.items() if c in columns}
    return samples


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {FORMATS}")


# ------------------------------------------------------------------------------------------------ manifest

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")   # a shard file name: no folder, no '..'
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class ShardInfo:
    name: str          # file name inside the shard-set folder
    rows: int          # samples in the shard
    bytes: int         # file size
    sha256: str        # checksum of the file bytes
    variant: int       # mask variant its samples belong to
    group: int         # packing group (a fixed, contiguous range of input files) it was built from


@dataclass
class Manifest:
    schema_version: int
    format: str                      # parquet | wds
    split: str                       # train | validation
    seq_len: int                     # every sample has at most seq_len tokens (the reader pads to it)
    vocab_size: int                  # tokenizer vocabulary size (model vocab must be >= this)
    tokenizer: dict                  # {"fingerprint": sha256 of the .model, "path": relative to this folder, or a URL}
    specials: dict                   # Specials.to_json() of the tokenizer
    variants: int                    # independently masked versions of every chunk
    seed: int                        # global seed of the build
    config: dict                     # the build settings that determine the bytes (objective mix etc.)
    config_hash: str                 # sha256 of canonical JSON of `config`: refuses mismatched rebuilds
    shards: list[ShardInfo] = field(default_factory=list)
    accounting: dict = field(default_factory=dict)   # documents, tokens, pad fraction, histograms, skips
    build_format: int = 0            # pipeline.output.BUILD_FORMAT of the writer (0: written before this field)

    @property
    def num_samples(self) -> int:
        return sum(s.rows for s in self.shards)

    def shards_of_variant(self, variant: int) -> list[ShardInfo]:
        return [s for s in self.shards if s.variant == variant]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        d = json.loads(text)
        v = d.get("schema_version")
        if v not in READABLE_VERSIONS:
            raise ShardError(f"{where}: schema_version {v} but this code reads version {SCHEMA_VERSION}; rebuild the "
                             "shard set with this version of jobs/build_shards.py (readable versions: "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        m = cls(**d)
        m.check_entries(where)
        return m

    def check_entries(self, where: str = "manifest") -> None:
        """Refuse a manifest whose entries could reach outside the shard folder or a cache keyed by sha256."""
        if self.format not in FORMATS:
            raise ShardError(f"{where}: format {self.format!r} is not one of {FORMATS}; the manifest is damaged or "
                             "not ours — rebuild the shard set")
        for s in self.shards:
            if not _PLAIN_NAME.fullmatch(s.name):
                raise ShardError(f"{where}: shard name {s.name!r} is not a plain file name (letters, digits, '.', "
                                 "'_', '-'; no folders, no leading '.'); refusing a manifest that points outside "
                                 "its folder — rebuild the shard set or restore the manifest")
            if not _SHA256_HEX.fullmatch(s.sha256):
                raise ShardError(f"{where}: shard {s.name} has sha256 {s.sha256!r}, not 64 lowercase hex digits; "
                                 "the manifest is damaged or not ours — rebuild the shard set or restore it")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def sibling_validation(url: str) -> str:
    """The validation shard set beside a train set (`<output>/train` -> `<output>/validation`); url is the train
    set's folder or its manifest file."""
    folder = url.rstrip("/")
    if folder.endswith(".json"):
        folder = folder.rsplit("/", 1)[0]
    return f"{folder.rsplit('/', 1)[0]}/validation"


def manifest_url(url: str) -> str:
    """Accept a shard-set folder or its manifest file; return the manifest URL (of the current name)."""
    url = url.rstrip("/")
    return url if url.endswith(".json") else f"{url}/{MANIFEST_NAME}"


def tokenizer_url(manifest_where: str, manifest: Manifest) -> str | None:
    """Where the manifest's tokenizer is: its `path` joined to the manifest's folder when relative (version 2;
    version 1 recorded it as the build saw it)."""
    path = (manifest.tokenizer or {}).get("path")
    if not path or "://" in path or path.startswith("/") or manifest.schema_version < 2:
        return path
    folder = manifest_where.rsplit("/", 1)[0]
    while path.startswith("../") and "/" in folder:
        folder, path = folder.rsplit("/", 1)[0], path[3:]
    return f"{folder}/{path.removeprefix('./')}"


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    murl = manifest_url(url)
    fs, path = fsspec.core.url_to_fs(murl, **(storage_options or {}))
    tries = [(path, murl)]
    if murl.endswith("/" + MANIFEST_NAME):   # a shard set of schema version 1 has the old name
        tries.append((f"{path[:-len(MANIFEST_NAME)]}{LEGACY_MANIFEST_NAME}",
                      f"{murl[:-len(MANIFEST_NAME)]}{LEGACY_MANIFEST_NAME}"))
    for p, where in tries:   # one GET per name (no exists() round trips before it)
        try:
            return Manifest.from_json(fs.cat_file(p).decode(), where=where)
        except FileNotFoundError:
            continue
    # neither name: say what the folder is instead
    folder = murl.rsplit("/", 1)[0]
    parent, _, leaf = folder.rpartition("/")
    here = path.rsplit('/', 1)[0]
    sources = sorted(p.split("/")[-3] for p in fs.glob(f"{here}/*/train/*manifest.json")
                     if p.rsplit("/", 1)[-1] in (MANIFEST_NAME, LEGACY_MANIFEST_NAME))
    if any(fs.exists(f"{here}/train/{n}") for n in (MANIFEST_NAME, LEGACY_MANIFEST_NAME)):   # a build's --output
        hint = f"{folder} is the output folder of a build; point to its shard set {folder}/train (or /validation)"
    elif sources:   # the output of a multi-source build
        hint = (f"{folder} is the output folder of a multi-source build (sources {', '.join(sources)}); point to "
                f"one source's shard set ({folder}/{sources[0]}/train) or train on a mixture of them: "
                f"--data='{{sources: {{{sources[0]}: {{path: {folder}/{sources[0]}/train, weight: 1}}, ...}}}}'")
    elif leaf in ("train", "validation") and parent:
        hint = (f"run jobs/build_shards.py --output {parent} (it writes {parent}/train and {parent}/validation; "
                "rerunning resumes an interrupted build)")
    else:
        hint = (f"point to a shard set (<build output>/train or /validation) or build one with "
                f"jobs/build_shards.py --output {folder} and use {folder}/train")
    raise ShardError(f"no {MANIFEST_NAME} at {murl}: the shard set does not exist or its build did not finish "
                     f"(the manifest is written last); {hint}")


# ------------------------------------------------------------------------------------------------ I/O

def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Commit `data` at `path` all at once: temp file + rename locally, one whole-object PUT on object stores."""
    if "file" in fs.protocol or "local" in fs.protocol:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # object stores: a single PUT is atomic; no rename exists there


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_shard(fs: fsspec.AbstractFileSystem, path: str, info: ShardInfo, fmt: str, verify: bool = True,
               columns: tuple[str, ...] | None = None) -> ShardSamples:
    """Read one shard, check it against its manifest entry, decode it."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as e:
        raise ShardError(f"shard {path} listed in the manifest is missing; restore it or rebuild the shard set "
                         "(jobs/build_shards.py with the same arguments rewrites only what is missing)") from e
    return decode_checked(data, info, fmt, path, verify, columns)


def decode_checked(data: bytes, info: ShardInfo, fmt: str, name: str, verify: bool = True,
                   columns: tuple[str, ...] | None = None) -> ShardSamples:
    """Decode shard bytes after checking size and checksum against the manifest, then the row count."""
    if len(data) != info.bytes or (verify and sha256(data) != info.sha256):
        raise ShardError(f"shard {name} has {len(data)} bytes (manifest: {info.bytes}) or a wrong checksum: it "
                         "is truncated or was overwritten; rebuild the shard set or restore the file")
    samples = decode(data, fmt, name=name, columns=columns)
    if len(samples) != info.rows:
        raise ShardError(f"shard {name} holds {len(samples)} rows, the manifest says {info.rows}")
    return samples
