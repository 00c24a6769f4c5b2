"""The trainer-side streaming dataset: GLM samples from a shard set (local folder or any fsspec URL).

    # what a loader yields, on one CPU process (tiny shards):
    python -m pipeline.stream data/shards/train --batch-size 4 --num-batches 3

`ShardStream` is a torch `IterableDataset` that yields whole per-rank BATCHES (dict of [B, seq_len] int64 tensors,
`sep` [B], and `objective` / `sample_key` lists); wrap it in `StreamLoader` (a DataLoader with batch_size=None),
which also advances the epoch at every `iter()`. The sample order is a pure function of the manifest and
(seed, epoch) — no data is read to compute it:

  1. epoch e reads mask variant e mod K (K = the variants present in the manifest, spec §3: every chunk is stored
     K times with independent masks);
  2. the shards of that variant are permuted by rng(seed, e); their rows form one flat sequence;
  3. the flat sequence is shuffled inside consecutive windows of `shuffle_window` samples (the bounded in-memory
     shuffle buffer), each window by its own rng(seed, e, window);
  4. the epoch's tail is dropped so the count is a multiple of global_batch_size = batch_size x world_size;
  5. global step s covers global samples [s*GB, (s+1)*GB); rank r takes the slice [r*B, (r+1)*B) of it, so
     concatenating the ranks' batches in rank order gives the global order for ANY world size; dataloader worker
     w of a rank produces that rank's batches w, w+W, w+2W, ... and PyTorch returns worker batches round-robin,
     so the rank's order is preserved for any worker count; every rank gets the same number of batches.

A dataloader process gathers a block of its steps at once (about one shuffle window of samples) straight from the
decoded shards' flat columns and list offsets, no per-row Python (`batches`, `gather`, ShardSamples.pad_into), and
reads the next block's shards on a background thread meanwhile; a batch is the per-row padding of its samples
(pipeline.shards.pad_row), int64, as a view of its block's tensors.

Resume follows Composer's dataset protocol: `state_dict(num_samples, from_beginning)` (Composer passes the GLOBAL
sample count of the current epoch, summed over ranks) and `load_state_dict`, after which the next epoch iteration
starts exactly after those samples without reading the shards it skips. Remote shards go through a local cache
folder (per user, content-addressed by sha256 and verified against it on every hit, atomic temp+rename writes,
LRU eviction under a byte bound, no shared memory; a full disk evicts, else serves from memory uncached);
transient store errors (network, timeouts, unreachable endpoints, 5xx) are retried with capped exponential backoff,
each retry logged; a missing, truncated or corrupt shard raises `ShardError` naming it.
`ShardStream.check(...)` refuses a shard set that does not fit the model.

`MixedStream` reads a weighted mixture of shard sets with the same contract (order, ranks, workers, resume); the
mixture itself — spec, weights, schedule, fingerprint, budget — is `pipeline/mixture.py`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import time
import zlib
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import mixture as X
from pipeline.shards import (
    ARRAY_COLUMNS,
    SCALAR_COLUMNS,
    SUFFIX,
    TRAINING_COLUMNS,
    Manifest,
    ShardError,
    ShardInfo,
    ShardSamples,
    decode_checked,
    manifest_url,
    read_manifest,
    read_shard,
)

log = logging.getLogger(__name__)


def _store_errors() -> tuple[tuple, tuple]:
    """(transient, credentials) error types. Object-store clients raise their own types, not OSError: botocore's
    EndpointConnectionError / ConnectTimeoutError / ReadTimeoutError / ConnectionClosedError, aiohttp's
    ClientError family (http, gcs, abfs); only after their own few retries (~12 s for s3fs), so an outage longer
    than that must be retried here."""
    transient: list[type] = [OSError]            # ConnectionError, TimeoutError (and asyncio's) included
    credentials: list[type] = []
    try:
        import botocore.exceptions as B
        transient += [B.ConnectionError, B.HTTPClientError]
        credentials += [B.NoCredentialsError, B.PartialCredentialsError]
    except ImportError:
        pass
    try:
        import aiohttp
        transient.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(transient), tuple(credentials)


_TRANSIENT, _CREDENTIALS = _store_errors()
# never healed by waiting: a missing file, or a store that refuses us (s3fs maps AccessDenied to PermissionError)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# remote shards below this size are fetched with one ranged GET; larger ones by the filesystem's own (concurrent) read
_SINGLE_GET_BYTES = 32 << 20


@dataclass
class StreamConfig:
    shuffle_window: int = 2048        # samples per in-memory shuffle window (the buffer); >= a few shards' rows
    num_workers: int = 0              # dataloader worker processes per rank (0: load in the training process)
    prefetch_factor: int = 2          # batches each worker prepares ahead (ignored with num_workers=0)
    cache_dir: str = ""               # local cache of remote shards; "" = ~/.cache/glm-stack/shards (or XDG_CACHE_HOME)
    cache_bytes: int = 8 << 30        # byte bound of the cache folder; least recently used shards go first
    retries: int = 8                  # re-reads after a transient store error; defaults ride out ~2 min of outage
    retry_backoff_s: float = 1.0      # first wait before a retry; doubles each retry ...
    retry_backoff_max_s: float = 30.0  # ... up to this: 1+2+4+...+30 = 121 s in all; keep the total under
    #                                    Composer's dist_timeout (300 s) or the other ranks stop waiting
    verify_checksum: bool = True      # sha256 of every shard read and cache hit vs the manifest (~5% of a decode)


def _dist_env() -> tuple[int, int]:
    """(rank, world_size): torch.distributed when initialised, else the launcher's env (composer -n N sets it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _placement(rank: int | None, world_size: int | None, batch_size: int) -> tuple[int, int, int]:
    """(rank, world_size, global batch size): given values, else the launcher's environment."""
    env_rank, env_world = _dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    return rank, world_size, batch_size * world_size


def default_cache_dir() -> str:
    """Per user, never a shared temp folder: $XDG_CACHE_HOME/glm-stack/shards or ~/.cache/glm-stack/shards
    (glm-stack created 0700)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.makedirs(base, exist_ok=True)
    os.makedirs(os.path.join(base, "glm-stack"), mode=0o700, exist_ok=True)
    return os.path.join(base, "glm-stack", "shards")


# ------------------------------------------------------------------------------------------------ cache

class ShardCache:
    """A local folder of shard files named by their sha256, bounded in bytes, least recently used evicted first.

    Safe across processes: files appear atomically (temp + rename); a file evicted by another process while we
    look for it is simply a miss. Nothing lives in shared memory, so a crash leaves at most a temp file, which
    the next cache start removes once it is an hour old. The folder is created private (0700); its contents are
    still only trusted after the reader checks them against the manifest's sha256. A full disk never fails a
    read: `put` evicts and retries once, else leaves the shard uncached (with a warning).
    """

    def __init__(self, folder: str, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.num_uncached = 0   # shards that did not fit on the disk (served from memory)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        now = time.time()
        for n in os.listdir(folder):
            p = os.path.join(folder, n)
            try:
                if ".tmp-" in n and now - os.path.getmtime(p) > 3600:
                    os.remove(p)
            except FileNotFoundError:
                pass

    def _path(self, key: str) -> str:
        assert "/" not in key and os.sep not in key and not key.startswith("."), key  # manifest entries are checked
        return os.path.join(self.folder, key)

    def get(self, key: str) -> bytes | None:
        p = self._path(key)
        try:
            with open(p, "rb") as f:
                data = f.read()
            os.utime(p)  # LRU: mtime = last use
            return data
        except FileNotFoundError:
            return None

    def discard(self, key: str) -> None:
        try:
            os.remove(self._path(key))
        except FileNotFoundError:
            pass

    def put(self, key: str, data: bytes) -> bool:
        """Store `data` under `key`; False when it was not cached (larger than the bound, or no disk space)."""
        if len(data) > self.max_bytes:
            return False
        try:
            self._write(key, data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):   # disk full: make room from our own oldest shards, once
                self._evict(keep="", need_free=len(data))
                try:
                    self._write(key, data)
                except OSError as e2:
                    return self._uncached(key, e2)
            else:
                return self._uncached(key, e)
        self._evict(keep=key)
        return True

    def _write(self, key: str, data: bytes) -> None:
        tmp = f"{self._path(key)}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(key))
        except OSError:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
            raise

    def _uncached(self, key: str, e: OSError) -> bool:
        self.num_uncached += 1
        if self.num_uncached == 1:   # once per process: every later shard would say the same
            log.warning("shard cache %s cannot store %s (%s) even after evicting its older shards; serving shards "
                        "from memory without caching them (each epoch fetches them again). Free space there, or "
                        "set --stream.cache_dir to a larger disk or lower --stream.cache_bytes (now %d)",
                        self.folder, key, e, self.max_bytes)
        return False

    def _evict(self, keep: str, need_free: int = 0) -> None:
        """Remove least recently used shards until the folder is within max_bytes and, when need_free > 0, the
        disk has need_free bytes free (a little more: block rounding)."""
        entries = []
        for n in os.listdir(self.folder):
            if ".tmp-" in n:
                continue
            try:
                st = os.stat(os.path.join(self.folder, n))
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, n))
        total = sum(e[1] for e in entries)
        for _, size, n in sorted(entries):
            if total <= self.max_bytes and (need_free <= 0 or
                                            shutil.disk_usage(self.folder).free >= need_free + (64 << 10)):
                break
            if n == keep:
                continue
            try:
                os.remove(os.path.join(self.folder, n))
            except FileNotFoundError:
                pass
            total -= size


# ------------------------------------------------------------------------------------------------ order

class EpochOrder:
    """Global sample index -> (shard, row) for one epoch, from the manifest alone (module docstring steps 1-4)."""

    def __init__(self, manifest: Manifest, epoch: int, seed: int, shuffle: bool, shuffle_window: int,
                 global_batch_size: int):
        present = sorted({s.variant for s in manifest.shards})
        if not present:
            raise ShardError("the manifest lists no shards; rebuild the shard set")
        self.variant = present[epoch % len(present)]
        index = [i for i, s in enumerate(manifest.shards) if s.variant == self.variant]
        if shuffle:
            perm = np.random.default_rng([seed, epoch]).permutation(len(index))
            index = [index[i] for i in perm]
        self.index = np.array(index, dtype=np.int64)   # position in manifest.shards of each shard, in read order
        self.shards: list[ShardInfo] = [manifest.shards[i] for i in index]
        rows = np.array([s.rows for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(rows)])   # flat index of each shard's first row
        self.num_total = int(self.starts[-1])
        self.num_used = self.num_total // global_batch_size * global_batch_size
        self.num_dropped = self.num_total - self.num_used
        self.seed, self.epoch, self.shuffle, self.window = seed, epoch, shuffle, max(1, shuffle_window)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _window_perm(self, w: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != w:
            size = min(self.window, self.num_total - w * self.window)
            self._perm_cache = (w, np.random.default_rng([self.seed, self.epoch, 1, w]).permutation(size))
        return self._perm_cache[1]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global indices [n] -> (shard position in self.shards [n], row in that shard [n])."""
        g = np.asarray(g, dtype=np.int64)
        if self.shuffle:
            w = g // self.window
            flat = np.empty_like(g)
            for wi in np.unique(w).tolist():                 # a batch spans one or two windows
                m = w == wi
                flat[m] = wi * self.window + self._window_perm(wi)[g[m] - wi * self.window]
        else:
            flat = g
        k = np.searchsorted(self.starts, flat, side="right") - 1
        return k, flat - self.starts[k]


# ------------------------------------------------------------------------------------------------ dataset

class ShardStream(IterableDataset):
    """Per-rank batches of GLM samples from a shard set; see the module docstring for the order and resume."""

    def __init__(self, url: str, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 config: StreamConfig | None = None, storage_options: dict | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1 (samples per device per step)")
        self.url = manifest_url(url)
        self.base = self.url.rsplit("/", 1)[0]
        self.storage_options = dict(storage_options or {})
        self.config = config or StreamConfig()
        self.manifest = self._retry(lambda: read_manifest(self.url, self.storage_options), self.url)
        self.batch_size = batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.global_batch_size = _placement(rank, world_size, batch_size)
        self.seq_len = self.manifest.seq_len
        self.max_seq_len = self.seq_len  # Composer reads this name for token counts
        validation = self.manifest.split == "validation"
        # an empty or tiny VALIDATION set (small corpus, low validation_fraction) is no reason to rebuild
        skip_eval = ("; or train without evaluation: --eval-data=none (or --eval-data=<another validation set>)"
                     if validation else "")
        if not self.manifest.shards:
            vf = self.manifest.config.get("validation_fraction", "?")
            raise ValueError(
                f"{self.url}: the validation set has no samples: the build's validation_fraction={vf} put none "
                f"of its documents into it; rebuild with more documents or a larger --validation-fraction{skip_eval}"
                if validation else f"{self.url}: the manifest lists no shards: the build found no usable samples; "
                "rebuild from more (or longer) input documents")
        order = self.order(0)
        if order.num_used == 0:
            what = "the validation set's" if validation else "its"
            lower = "--eval-batch-size" if validation else "--batch-size"
            raise ValueError(f"{self.url}: {what} {order.num_total} samples per epoch are fewer than one global "
                             f"batch ({self.global_batch_size} = batch_size {batch_size} x world_size "
                             f"{self.world_size}); lower {lower} or build more data{skip_eval}")
        # epoch bookkeeping (main process): see begin_epoch / state_dict
        self._epoch = 0          # epoch of the current (or next, if not started) iteration
        self._started = False    # has an iteration of self._epoch begun?
        self._skip = 0           # global samples of self._epoch to skip at its next iteration (resume)
        self._iter_skip = 0      # skip used by the iteration in progress (copied into workers)
        self._fs = None          # per process, lazily
        self._cache: ShardCache | None = None

    # ---- derived figures --------------------------------------------------------------------------------
    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.manifest, epoch, self.seed, self.shuffle, self.config.shuffle_window,
                          self.global_batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank in one epoch (the same on every rank; epoch 0's count, variants are the same size)."""
        return self.order(self._epoch).num_used // self.global_batch_size

    def __len__(self) -> int:
        # With batch_size=None the DataLoader's length is this: batches per rank per epoch.
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    # ---- checks -------------------------------------------------------------------------------------------
    def check(self, *, vocab_size: int | None = None, max_position_embeddings: int | None = None,
              tokenizer_fingerprint: str | None = None, seq_len: int | None = None) -> None:
        """Refuse a shard set that does not fit the model / the run (error names both values and the fix)."""
        m, where = self.manifest, self.url   # (the schema version was checked when the manifest was read)
        fp = (m.tokenizer or {}).get("fingerprint")
        if tokenizer_fingerprint is not None and fp != tokenizer_fingerprint:
            raise ValueError(f"{where}: tokenizer fingerprint {fp} but the run expects {tokenizer_fingerprint}; "
                             "the shards were tokenized with another tokenizer — rebuild them with the run's "
                             "tokenizer (jobs/build_shards.py --tokenizer <its .model>) or point to the right set")
        if vocab_size is not None and m.vocab_size > vocab_size:
            raise ValueError(f"{where}: vocab_size {m.vocab_size} in the shards > model vocab_size {vocab_size}; "
                             f"set model.vocab_size >= {m.vocab_size} (0 derives it from the manifest) or rebuild "
                             "the shards with the model's tokenizer")
        if seq_len is not None and m.seq_len != seq_len:
            raise ValueError(f"{where}: seq_len {m.seq_len} but the run trains on seq_len {seq_len}; build the "
                             f"shards with --seq_len={seq_len} or use a shard set of that length")
        if max_position_embeddings is not None and m.seq_len > max_position_embeddings:
            raise ValueError(f"{where}: seq_len {m.seq_len} > model max_position_embeddings "
                             f"{max_position_embeddings}; set model.max_position_embeddings >= {m.seq_len} "
                             "(0 derives it) or rebuild the shards with a shorter --seq_len")

    # ---- epochs and resume (Composer's dataset protocol) ------------------------------------------------
    def begin_epoch(self) -> None:
        """Called (by StreamLoader) in the main process at every iter(): the next epoch starts."""
        if self._started:
            self._epoch += 1
            self._skip = 0
        self._started = True
        self._iter_skip, self._skip = self._skip, 0

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict:
        """num_samples: GLOBAL samples consumed in the current epoch (Composer sums over ranks)."""
        if not from_beginning:
            num_samples += self._iter_skip if self._started else self._skip
        epoch = self._epoch
        if num_samples == 0 and self._started:
            epoch += 1  # called after the epoch rolled over (Composer's sample_in_epoch is back to 0)
        return {"epoch": epoch, "sample_in_epoch": int(num_samples), "world_size": self.world_size,
                "global_batch_size": self.global_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "mixture" in state:
            names = ", ".join(state["mixture"]["sources"])
            raise ValueError(f"the checkpoint was trained on a mixture of sources ({names}), not on the one shard "
                             f"set {self.url}; resume with the same mixture as --data")
        n = int(state["sample_in_epoch"])
        if n % self.global_batch_size:
            raise ValueError(f"resume at sample {n} of epoch {state['epoch']} is not a whole number of global "
                             f"batches of {self.global_batch_size}; resume with batch_size x world_size = "
                             f"{state.get('global_batch_size')} (as saved)")
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming a stream saved with seed %s under seed %s: the order changes", state["seed"],
                        self.seed)
        self._epoch, self._skip, self._started = int(state["epoch"]), n, False

    def __getstate__(self):
        # sent to dataloader workers: they open their own filesystem (s3fs sessions do not survive a fork)
        d = dict(self.__dict__)
        d["_fs"], d["_cache"] = None, None
        return d

    # ---- reading ------------------------------------------------------------------------------------------
    def _filesystem(self):
        if self._fs is None:
            self._fs, manifest_path = fsspec.core.url_to_fs(self.url, **self.storage_options)
            self._folder = manifest_path.rsplit("/", 1)[0]   # shard names are plain file names (checked)
        return self._fs

    def _is_local(self) -> bool:
        p = self._filesystem().protocol
        return any(x in ("file", "local") for x in ((p,) if isinstance(p, str) else p))

    def _shard_path(self, info: ShardInfo) -> str:
        self._filesystem()
        return f"{self._folder}/{info.name}"

    def read(self, info: ShardInfo) -> ShardSamples:
        """One shard, through the cache for remote stores, with retries on transient errors."""
        fs, path, fmt = self._filesystem(), self._shard_path(info), self.manifest.format
        name, verify = f"{self.base}/{info.name}", self.config.verify_checksum
        if self._is_local():
            return self._retry(lambda: read_shard(fs, path, info, fmt, verify=verify, columns=TRAINING_COLUMNS),
                               name)
        if self._cache is None:
            try:
                self._cache = ShardCache(self.config.cache_dir or default_cache_dir(), self.config.cache_bytes)
            except OSError as e:
                raise ValueError(f"cannot create the local shard cache ({e}); set --stream.cache_dir to a writable "
                                 "local folder") from e
        key = info.sha256 + SUFFIX[fmt]
        data = self._cache.get(key)
        if data is not None:
            # a hit is trusted only after the same checks as a fetch, so a replaced or damaged cache file is never
            # trained on (sha256 of a 6 MB shard of 2048 x 512 tokens: ~4 ms, its decode ~70 ms)
            try:
                return decode_checked(data, info, fmt, name, verify, TRAINING_COLUMNS)
            except ShardError as e:
                log.warning("cached copy %s does not match the manifest entry of %s (%s); fetching it again",
                            self._cache._path(key), name, e)
                self._cache.discard(key)

        def fetch() -> bytes:
            try:
                if info.bytes < _SINGLE_GET_BYTES:
                    # one ranged GET, no HEAD for the size (s3fs asks for it to split large reads); asking for one
                    # byte more than the manifest says still reveals a file that grew
                    return fs.cat_file(path, start=0, end=info.bytes + 1)
                return fs.cat_file(path)
            except FileNotFoundError as e:
                raise ShardError(f"shard {name} listed in the manifest is missing; restore it "
                                 "or rebuild the shard set (jobs/build_shards.py with the same arguments)") from e

        data = self._retry(fetch, name)
        samples = decode_checked(data, info, fmt, name, verify, TRAINING_COLUMNS)
        self._cache.put(key, data)
        return samples

    def _endpoint(self) -> str:
        return (self.storage_options.get("endpoint_url")
                or (self.storage_options.get("client_kwargs") or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL") or "the store's default endpoint")

    def _retry(self, fn, what: str):
        """fn() with retries on transient store errors: capped exponential backoff, each retry logged, then a
        ShardError naming `what`, the endpoint and the settings that allow a longer outage."""
        c = self.config
        delay, t0 = c.retry_backoff_s, time.monotonic()
        for attempt in range(c.retries + 1):
            try:
                return fn()
            except ShardError:
                raise
            except _CREDENTIALS as e:
                raise ShardError(f"{what}: no credentials for the store ({e}); export AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) before starting — for `ray job submit` "
                                 "pass them in --runtime-env-json — or give key/secret in --storage-options") from e
            except PermissionError as e:
                raise ShardError(f"{what}: permission denied ({e}); on an object store check the credentials "
                                 "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --storage-options key/secret) "
                                 "and that they may read this bucket, locally the file's permissions") from e
            except _PERMANENT:
                raise
            except _TRANSIENT as e:
                status = getattr(e, "status", None)   # aiohttp's HTTP errors: a 4xx will not heal by waiting
                if (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)
                        or getattr(e, "errno", None) == errno.EINVAL):   # s3fs: malformed request / bucket name
                    raise
                err = f"{type(e).__name__}: {e}"
                if attempt == c.retries:
                    raise ShardError(
                        f"reading {what} failed ({attempt + 1} attempts in {time.monotonic() - t0:.0f} s; last: "
                        f"{err}); is {self._endpoint()} up, reachable and right (--storage-options "
                        "'{endpoint_url: https://host:port}' for S3-compatible stores)? To ride out longer outages "
                        f"raise --stream.retries (now {c.retries}) or --stream.retry_backoff_max_s (now "
                        f"{c.retry_backoff_max_s}); then resume (autoresume restarts at the last checkpoint)") from e
                log.warning("store error reading %s (%s); retry %d of %d in %.1f s", what, err, attempt + 1,
                            c.retries, delay)
                time.sleep(delay)
                delay = min(delay * 2, c.retry_backoff_max_s)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order(self._epoch)
        keep = max(2, order.window // max(1, min(s.rows for s in order.shards)) + 2)
        decoded = DecodedShards(keep, lambda i: self.read(self.manifest.shards[i]))

        def locate(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            k, rows = order.locate(g)
            return order.index[k], rows   # shard codes: positions in the manifest's shards

        for _, batch in batches(locate, decoded, self.seq_len, 0, self._iter_skip, order.num_used,
                                self.global_batch_size, self.batch_size, self.rank, worker, num_workers,
                                order.window):
            yield batch


# ------------------------------------------------------------------------------------------------ batches

def gather(shards: list[ShardSamples], which: np.ndarray, rows: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Samples i = row rows[i] of shards[which[i]], in that order: the token columns as [n, seq_len] int64 arrays
    right-padded with 0 (spec §3.2), `sep` [n] int64, `objective` / `sample_key` [n] object arrays of str. Copied
    from each shard's flat columns by its list offsets (ShardSamples.pad_into): one write per output position."""
    n = len(rows)
    # one allocation for the token columns (pad_into writes every position): from 4 MB on numpy asks for huge pages,
    # so a block's fresh memory costs a few page faults instead of one per 4 KB (a third of the gather time)
    buf = np.empty((len(ARRAY_COLUMNS), n, seq_len), dtype=np.int64)
    out = dict(zip(ARRAY_COLUMNS, buf))
    out["sep"] = np.empty(n, dtype=np.int64)
    strings = [c for c in TRAINING_COLUMNS if SCALAR_COLUMNS.get(c) is object]
    out.update({c: np.empty(n, dtype=object) for c in strings})
    for j, s in enumerate(shards):
        at = np.arange(n) if len(shards) == 1 else np.flatnonzero(which == j)
        r = rows[at]
        s.pad_into(r, seq_len, out, at)
        for c in ("sep", *strings):
            out[c][at] = s.scalars[c][r]
    return out


PREFETCH_BLOCKS = 2    # blocks located ahead of the one being gathered; their shards are read in the background
PREFETCH_THREADS = 2   # background reads at a time (fetch latency overlaps; decode mostly releases the GIL)


class DecodedShards:
    """A process's small LRU of decoded shards, keyed by an int code (the stream's own numbering); read(code)
    reads and decodes a shard on a miss. prefetch(codes) starts reading shards on background threads (fetch,
    checksum and Parquet decode mostly run outside the GIL), so the next blocks' shards arrive while this one is
    gathered; a read's error (ShardError, retries exhausted) is raised where the shard is needed, as without it."""

    def __init__(self, keep: int, read):
        self.keep, self.read = keep, read
        self.lru: OrderedDict[int, ShardSamples] = OrderedDict()
        self.pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def prefetch(self, codes) -> None:
        for code in codes:
            if code not in self.lru and code not in self.pending:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="shard-prefetch")
                self.pending[code] = self._pool.submit(self.read, code)

    def get(self, code: int) -> ShardSamples:
        if code in self.lru:
            self.lru.move_to_end(code)
            return self.lru[code]
        f = self.pending.pop(code, None)
        s = self.lru[code] = f.result() if f is not None else self.read(code)
        while len(self.lru) > self.keep:
            self.lru.popitem(last=False)
        return s

    def close(self) -> None:
        """Drop reads not started yet (the iteration ended or failed); one in progress finishes on its own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.pending.clear()


def batches(locate, decoded: DecodedShards, seq_len: int, start: int, skip: int, num_samples: int,
            global_batch_size: int, batch_size: int, rank: int, worker: int, num_workers: int, window: int):
    """(shard codes [B], batch) of one rank's dataloader worker (module docstring, step 5), shared by ShardStream
    and MixedStream: global samples [start, start + num_samples) less the first `skip` (resume);
    locate(global indices [n]) -> (shard codes [n], rows [n]).

    Steps are located and gathered a block at a time (up to 32 steps, spanning about one shuffle window, so the
    shards a block touches stay few): one gather per column and shard for the whole block, and every batch is a
    view of the block's tensors (its own rows)."""
    gb, b = global_batch_size, batch_size
    steps = np.arange(skip // gb + worker, num_samples // gb, num_workers, dtype=np.int64)
    block = int(np.clip(window // (gb * num_workers), 1, 32))

    def located(s0: int) -> tuple:
        todo = steps[s0:s0 + block]
        codes, rows = locate((start + todo[:, None] * gb + rank * b + np.arange(b)[None, :]).reshape(-1))
        return todo, codes, rows, *np.unique(codes, return_inverse=True)

    starts = range(0, len(steps), block)
    ahead: deque = deque()   # located blocks: the current one, then up to PREFETCH_BLOCKS whose shards are read now
    try:
        for i in range(len(starts)):
            while len(ahead) <= PREFETCH_BLOCKS and i + len(ahead) < len(starts):
                ahead.append(located(starts[i + len(ahead)]))
                if len(ahead) > 1:
                    decoded.prefetch([int(u) for u in ahead[-1][3]])
            todo, codes, rows, uniq, which = ahead.popleft()
            cols = gather([decoded.get(int(u)) for u in uniq], which, rows, seq_len)
            tensors = {c: torch.from_numpy(v) for c, v in cols.items() if v.dtype != object}
            strings = {c: v for c, v in cols.items() if v.dtype == object}
            for k in range(len(todo)):
                at = slice(k * b, (k + 1) * b)
                batch = {c: t[at] for c, t in tensors.items()}
                batch.update({c: v[at].tolist() for c, v in strings.items()})
                yield codes[at], batch
    finally:
        decoded.close()


# ------------------------------------------------------------------------------------------------ mixtures

class MixedStream(IterableDataset):
    """Per-rank batches from a weighted mixture of shard sets (pipeline/mixture.py: the spec, the schedule, the
    meaning of a weight). Same contract as ShardStream: the global sample sequence is a pure function of
    (manifests, mixture, seed) — one endless sequence, never dependent on world size, batch size or worker count;
    epoch e is its samples [e E, (e+1) E) with E = samples_per_epoch rounded down to whole global batches (nothing
    is dropped: the next epoch continues the sequence); ranks and workers split each global batch as in ShardStream;
    resume is exact mid-epoch at any world size. Batches carry `mixture_source` [B] (the source's name) and
    `sample_key` prefixed with it ("<source>:<key>", unique across sources).

    The checkpoint state holds the mixture's description (manifest fingerprints, shares) and each source's consumed
    count; `load_state_dict` refuses another mixture unless allow_change (then: pipeline/mixture.py, SEGMENT)."""

    def __init__(self, mixture, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 config: StreamConfig | None = None, storage_options: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, allow_change: bool = False):
        super().__init__()
        self.mixture = mixture if isinstance(mixture, X.Mixture) else X.load_mixture(mixture)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1 (samples per device per step)")
        self.config = config or StreamConfig()
        self.batch_size, self.seed, self.shuffle, self.allow_change = batch_size, seed, shuffle, allow_change
        self.rank, self.world_size, self.global_batch_size = _placement(rank, world_size, batch_size)
        # one reader per source: its manifest, cache and retries (a one-sample "batch" never drops anything)
        self.readers = [ShardStream(s.path, 1, seed=seed, shuffle=shuffle, config=self.config,
                                    storage_options=storage_options, rank=0, world_size=1)
                        for s in self.mixture.sources]
        self.names = self.mixture.names
        manifests = {n: r.manifest for n, r in zip(self.names, self.readers)}
        first = self.readers[0].manifest
        for n, r in zip(self.names, self.readers):
            m = r.manifest
            for what, a, b in (("seq_len", m.seq_len, first.seq_len), ("split", m.split, first.split),
                               ("tokenizer fingerprint", (m.tokenizer or {}).get("fingerprint"),
                                (first.tokenizer or {}).get("fingerprint"))):
                if a != b:
                    raise ValueError(f"{self.mixture.where}: source {n} ({r.url}) has {what} {a} but source "
                                     f"{self.names[0]} has {b}; every source of a mixture must be built with the same "
                                     "tokenizer and seq_len (a multi-source build does that: jobs/build_shards.py "
                                     "with `sources:`), and all train or all validation sets")
        self.manifest = first        # what train.py derives vocab_size and seq_len from (the same for every source)
        self.seq_len = self.max_seq_len = first.seq_len
        self.variants = [sorted({s.variant for s in r.manifest.shards}) for r in self.readers]
        self.pass_sizes = [np.array([sum(s.rows for s in r.manifest.shards if s.variant == v) for v in vs], np.int64)
                           for r, vs in zip(self.readers, self.variants)]
        self.cycle_starts = [np.concatenate([[0], np.cumsum(p)]) for p in self.pass_sizes]
        # each source's own order seed: the same source under the same seed reads the same sequence in any mixture
        self.source_seeds = [int(np.random.SeedSequence([seed, zlib.crc32(n.encode())]).generate_state(1)[0])
                             for n in self.names]
        self.description = X.describe(self.mixture, manifests)
        self.fingerprint = X.fingerprint(self.description)
        self.schedule = X.Schedule(self.mixture.quanta)
        raw = self.mixture.samples_per_epoch or int(sum(p[0] for p in self.pass_sizes))
        self.samples_per_epoch = raw // self.global_batch_size * self.global_batch_size
        if self.samples_per_epoch == 0:
            raise ValueError(f"{self.mixture.where}: {raw} samples per epoch are fewer than one global batch "
                             f"({self.global_batch_size}); lower the batch size or raise samples_per_epoch")
        self._epoch, self._started, self._skip, self._iter_skip = 0, False, 0, 0
        self._epoch_start, self._epoch_end = 0, self.samples_per_epoch
        self._warned: set[str] = set()
        # per process (see __iter__), never sent to workers: decoded shards, pass orders
        self._decoded: DecodedShards | None = None
        self._orders: dict = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_decoded"], d["_orders"] = None, {}
        return d

    # ---- derived figures --------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        return (self._epoch_end - self._epoch_start) // self.global_batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def check(self, **kw) -> None:
        """ShardStream.check for every source."""
        for r in self.readers:
            r.check(**kw)

    def _pass_of(self, i: int, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices j of source i -> (pass, index within that pass)."""
        cs = self.cycle_starts[i]
        c, rem = np.divmod(j, cs[-1])
        v = np.searchsorted(cs, rem, side="right") - 1
        return c * len(self.pass_sizes[i]) + v, rem - cs[v]

    def progress(self, num_samples: int | None = None) -> dict[str, dict]:
        """Per source at global sample `epoch start + num_samples` (Composer's sample_in_epoch; None = the end of
        the current epoch): samples consumed, realised and target share, passes, and whether masks are reused."""
        g = self._epoch_end if num_samples is None else self._epoch_start + int(num_samples)
        counts = self.schedule.counts(g)
        total = max(1, int(counts.sum()))
        out = {}
        for i, n in enumerate(self.names):
            c = int(counts[i])
            last_pass = int(self._pass_of(i, np.array([max(c - 1, 0)]))[0][0]) + 1 if c else 0   # 1-based
            out[n] = {"samples": c, "share": c / total, "target": float(self.mixture.shares[i]),
                      "passes": round(c / float(self.pass_sizes[i].mean()), 4), "pass": last_pass,
                      "masks_reused": last_pass > len(self.variants[i])}
        return out

    def check_budget(self, max_duration: str) -> dict[str, dict]:
        """Refuse up front (ValueError naming source and numbers) a run that would read a source more than its
        max_repeats times; returns per source the samples and passes the run needs. Warns once per source whose
        repeats will reuse stored masks (more passes than K variants)."""
        end = X.samples_for_duration(max_duration, seq_len=self.seq_len, global_batch_size=self.global_batch_size,
                                     samples_per_epoch=self.samples_per_epoch)
        per = {n: X.pass_samples(r.manifest) for n, r in zip(self.names, self.readers)}
        budget = X.check_budget(self.mixture, self.schedule, per, {n: len(v) for n, v in
                                                                   zip(self.names, self.variants)}, end)
        for n, b in budget.items():
            if b["masks_reused"] and n not in self._warned:
                self._warned.add(n)
                k = len(self.variants[self.names.index(n)])
                log.warning("mixture source %s will be read %.2f times but has K=%d stored mask variants: passes "
                            "beyond %d reuse a variant's masks (in a new order); build it with more --variants for "
                            "fresh masks on every repeat", n, b["passes"], k, k)
        return budget

    # ---- epochs and resume (Composer's dataset protocol, as ShardStream) ----------------------------------
    def begin_epoch(self) -> None:
        if self._started:
            self._epoch += 1
            self._epoch_start, self._epoch_end = self._epoch_end, self._epoch_end + self.samples_per_epoch
            self._skip = 0
        self._started = True
        self._iter_skip, self._skip = self._skip, 0
        for n, p in self.progress().items():   # said once per source, in the main process
            if p["masks_reused"] and n not in self._warned:
                self._warned.add(n)
                k = len(self.variants[self.names.index(n)])
                log.warning("mixture source %s reaches pass %d by the end of epoch %d but has only K=%d stored mask "
                            "variants: from pass %d on its repeats reuse masks (in a new order); build it with more "
                            "--variants for fresh masks on every repeat", n, p["pass"], self._epoch, k, k + 1)

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict:
        """num_samples: GLOBAL samples consumed in the current epoch (Composer sums over ranks)."""
        if not from_beginning:
            num_samples += self._iter_skip if self._started else self._skip
        epoch, start = self._epoch, self._epoch_start
        if num_samples == 0 and self._started:   # after the epoch rolled over
            epoch, start = epoch + 1, self._epoch_end
        g = start + int(num_samples)
        consumed = self.schedule.counts(g)
        return {"epoch": epoch, "sample_in_epoch": int(num_samples), "epoch_start": start,
                "samples_per_epoch": self.samples_per_epoch, "world_size": self.world_size,
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "mixture": self.description, "fingerprint": self.fingerprint,
                "segment": {"start": self.schedule.start,
                            "base": {n: int(b) for n, b in zip(self.names, self.schedule.base)}},
                "consumed": {n: int(c) for n, c in zip(self.names, consumed)}}

    def load_state_dict(self, state: dict) -> None:
        n = int(state["sample_in_epoch"])
        if n % self.global_batch_size:
            raise ValueError(f"resume at sample {n} of epoch {state['epoch']} is not a whole number of global "
                             f"batches of {self.global_batch_size}; resume with batch_size x world_size = "
                             f"{state.get('global_batch_size')} (as saved)")
        if "mixture" not in state:
            raise ValueError("the checkpoint's data state is of a single shard set, not a mixture; resume with "
                             "the shard set it was trained on (--data=<its folder>)")
        if state.get("seed", self.seed) != self.seed:
            log.warning("resuming a mixture saved with seed %s under seed %s: the order changes", state["seed"],
                        self.seed)
        start = int(state["epoch_start"])
        g = start + n
        if X.check_change(state["mixture"], self.description, self.allow_change):
            consumed = state["consumed"]
            log.warning("resuming with a changed mixture (allow_change): %s; the new shares apply from global "
                        "sample %d, every source continues after the samples it has consumed: %s",
                        "; ".join(X.diff(state["mixture"], self.description)), g, consumed)
            self.schedule = X.Schedule(self.mixture.quanta, start=g,
                                       base=[int(consumed.get(name, 0)) for name in self.names])
        else:
            seg = state["segment"]
            self.schedule = X.Schedule(self.mixture.quanta, start=int(seg["start"]),
                                       base=[int(seg["base"][name]) for name in self.names])
        end = start + self.samples_per_epoch
        if end <= g:   # a shorter epoch now (changed mixture or batch): the resumed epoch runs one epoch more
            end = g + self.samples_per_epoch
        self._epoch, self._skip, self._started = int(state["epoch"]), n, False
        self._epoch_start, self._epoch_end = start, end

    # ---- reading ------------------------------------------------------------------------------------------
    def _order(self, cache: dict, i: int, p: int) -> EpochOrder:
        key = (i, p)
        if key not in cache:
            if len(cache) > 4 * len(self.names):
                cache.pop(next(iter(cache)))
            cache[key] = EpochOrder(self.readers[i].manifest, p, self.source_seeds[i], self.shuffle,
                                    self.config.shuffle_window, 1)
        return cache[key]

    def locate(self, g: np.ndarray, orders: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices [n] -> (shard codes [n]: source index << 32 | position in its manifest's shards,
        rows [n])."""
        orders = self._orders if orders is None else orders
        src, j = self.schedule.locate(g)
        codes, rows = np.empty(len(src), dtype=np.int64), np.empty(len(src), dtype=np.int64)
        for i in np.unique(src).tolist():
            m = np.flatnonzero(src == i)
            passes, idx = self._pass_of(i, j[m])
            for p in np.unique(passes).tolist():
                mm = m[passes == p]
                order = self._order(orders, i, p)
                k, rows[mm] = order.locate(idx[passes == p])
                codes[mm] = (i << 32) | order.index[k]
        return codes, rows

    def _read(self, code: int) -> ShardSamples:
        i = code >> 32
        return self.readers[i].read(self.readers[i].manifest.shards[code & 0xFFFFFFFF])

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # decoded shards (small LRU), kept across epochs in this process: mixture epochs are cuts through one
        # continuous sequence, so the next epoch starts inside the shards the last one was reading
        if self._decoded is None:
            keep = sum(max(2, self.config.shuffle_window // max(1, min(s.rows for s in r.manifest.shards)) + 2)
                       for r in self.readers)
            self._decoded = DecodedShards(keep, self._read)
        prefixes = [f"{n}:" for n in self.names]
        for codes, batch in batches(self.locate, self._decoded, self.seq_len, self._epoch_start, self._iter_skip,
                                    self._epoch_end - self._epoch_start, self.global_batch_size, self.batch_size,
                                    self.rank, worker, num_workers,
                                    self.config.shuffle_window * len(self.readers)):   # each source: about W
            src = (codes >> 32).tolist()
            batch["sample_key"] = [prefixes[i] + k for i, k in zip(src, batch["sample_key"])]
            batch["mixture_source"] = [self.names[i] for i in src]
            yield batch


def _as_is(batch: dict) -> dict:
    """StreamLoader's collate_fn (module level so that worker processes can unpickle it)."""
    return batch


class StreamLoader(DataLoader):
    """A DataLoader over a ShardStream: batch_size=None (the dataset batches); each iter() starts the next epoch.

    Workers are not persistent, so every epoch re-sends the dataset (with its epoch and resume offset) to them.
    """

    def __init__(self, dataset: ShardStream | MixedStream, num_workers: int | None = None,
                 prefetch_factor: int | None = None):
        n = dataset.config.num_workers if num_workers is None else num_workers
        pf = dataset.config.prefetch_factor if prefetch_factor is None else prefetch_factor
        # its own generator: creating an iterator must not draw from the global torch RNG (dropout masks after
        # a mid-epoch resume would then differ from an uninterrupted run); the stream needs no worker seeds
        # collate_fn: the dataset already yields tensors; the default (default_convert) would walk every string of
        # the objective / sample_key lists on every batch for nothing
        super().__init__(dataset, batch_size=None, num_workers=n, prefetch_factor=pf if n > 0 else None,
                         persistent_workers=False, generator=torch.Generator(), collate_fn=_as_is)

    def __iter__(self):
        self.dataset.begin_epoch()
        return super().__iter__()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    ds = ShardStream(a.url, a.batch_size, seed=a.seed, rank=0, world_size=1)
    order = ds.order(0)
    print(f"{ds.url}: {order.num_total} samples/epoch, {order.num_dropped} dropped, {ds.batches_per_epoch} "
          f"batches of {a.batch_size}, seq_len {ds.seq_len}, variants {ds.manifest.variants}")
    for i, batch in enumerate(StreamLoader(ds)):
        if i >= a.num_batches:
            break
        print(i, batch["sample_key"], batch["objective"], tuple(batch["input_ids"].shape))


if __name__ == "__main__":
    main()
