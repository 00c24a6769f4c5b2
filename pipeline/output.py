"""What a build keeps in its output folder besides the shards, and the rules that protect it: the layout (split
folders, receipts, the build record), which files a build of ours wrote (the only ones --overwrite may delete),
the lock that keeps a second build out, the record that refuses a rerun with other settings or changed inputs,
and the check of finished shards against their receipts. No ray, no torch."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import threading
import time
import uuid

import fsspec

from pipeline import documents as D
from pipeline import shards as S

SPLITS = ("train", "validation")
RECEIPTS = "_receipts"
BUILD_RECORD = "_build.json"
BUILD_FORMAT = 4    # shape of _build.json, the receipts and the shard bytes (2: input stamps, tokenizer settings,
#                     build_format key; 3: inputs named without the building machine's folders: input_names;
#                     4: Parquet token columns without dictionary encoding — same rows, other shard bytes)
LOCK = "_lock.json"
LOCK_HEARTBEAT_S = 30     # the lock owner rewrites its heartbeat this often
LOCK_TIMEOUT_S = 300      # a lock whose heartbeat is older than this is stale (its owner died elsewhere)
LOCK_SETTLE_S = 1.0       # object stores: wait this long after writing the lock, then read it back to confirm
SHARD_NAME = re.compile(r"g\d{5}-v\d{2}-\d{4}\.(parquet|tar)")   # ShardWriter's names: the only ones we write
RECEIPT_NAME = re.compile(r"g\d{5}\.json")
MANIFEST_NAMES = (S.MANIFEST_NAME, S.LEGACY_MANIFEST_NAME)   # a split's manifest, now and before schema 2
TEMP_NAME = re.compile(r"\.(.+)\.tmp-[0-9a-f]{32}")                 # shards.atomic_write's temp files


# ------------------------------------------------------------------------------------------- output lock


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def _boot_id() -> str:
    """This machine (and boot) on Linux, where host names may repeat across containers and nodes."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _who(lock: dict) -> str:
    if not lock:
        return "an unknown build (the lock file is unreadable)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lock.get("started", 0))))
    return (f"build {lock.get('build_id')} (pid {lock.get('pid')} on host {lock.get('host')}, started {started}, "
            f"last heartbeat {time.time() - float(lock.get('heartbeat', 0)):.0f} s ago)")


class OutputLock:
    """One build at a time per output. `_lock.json` names the owner (host, pid, build id) and carries a heartbeat
    that a daemon thread rewrites every LOCK_HEARTBEAT_S. Another build refuses while the lock is live. A lock is
    stale — and taken over, with a message — when its owner ran on this host and its process is gone (a killed
    build), or when its heartbeat is older than LOCK_TIMEOUT_S (an owner that died on another machine).

    Local disks: the lock is created with link(2), which fails when it exists. Object stores offer no such
    primitive through fsspec, so the writer reads the lock back after LOCK_SETTLE_S and backs off if another
    build's id is there; each heartbeat re-reads it too, and a build that finds its lock taken stops."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.path, self.url = fs, f"{root}/{LOCK}", f"{url.rstrip('/')}/{LOCK}"
        self.owner = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                      "build_id": uuid.uuid4().hex, "started": time.time()}
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}, sort_keys=True).encode()

    def _read(self) -> dict | None:
        try:
            lock = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}
        return lock if isinstance(lock, dict) else {}

    def _stale(self, lock: dict) -> str | None:
        """Why a lock no longer protects a running build; None while its owner may still be at work."""
        try:
            pid, beat = int(lock["pid"]), float(lock["heartbeat"])
        except (KeyError, TypeError, ValueError):
            return "the lock file is unreadable"
        here = all(lock.get(k) == self.owner[k] for k in ("host", "boot_id"))
        if here and not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        age = time.time() - beat
        if age > LOCK_TIMEOUT_S:
            return f"its last heartbeat is {age:.0f} s old (timeout {LOCK_TIMEOUT_S} s)"
        return None

    def _busy(self, lock: dict) -> ValueError:
        return ValueError(
            f"output {self.url.rsplit('/', 1)[0]} is being built by {_who(lock)}; two builds into one output would "
            f"mix their files. Wait for it to finish, or use another --output. If that build is dead (its machine "
            f"is gone), delete {self.url} — or wait: a lock without a heartbeat for {LOCK_TIMEOUT_S} s is taken "
            "over automatically (a dead build on this same host is detected at once).")

    def acquire(self) -> None:
        old = self._read()
        if old is not None:
            why = self._stale(old)
            if why is None:
                raise self._busy(old)
            print(f"[build] taking over the stale lock {self.url} of {_who(old)}: {why}", flush=True)
        if _is_local(self.fs) and old is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{os.path.dirname(self.path)}/.{LOCK}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(self._payload())
            try:
                os.link(tmp, self.path)   # atomic create-if-absent, with the full content at once
            except FileExistsError:
                raise self._busy(self._read() or {}) from None
            finally:
                os.unlink(tmp)
        else:
            S.atomic_write(self.fs, self.path, self._payload())
            time.sleep(LOCK_SETTLE_S)
            now = self._read()
            if not now or now.get("build_id") != self.owner["build_id"]:
                raise self._busy(now or {})
        self._thread = threading.Thread(target=self._beat, name="build-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                now = self._read()
                if not now or now.get("build_id") != self.owner["build_id"]:
                    self.lost = now or {}
                    return
                S.atomic_write(self.fs, self.path, self._payload())
            except OSError as e:   # a passing store error: the next beat tries again
                print(f"[build] warning: could not refresh the lock {self.url}: {e}", flush=True)

    def check(self) -> None:
        if self.lost is not None:
            raise ValueError(f"this build lost its lock {self.url} to {_who(self.lost)} (its heartbeat was taken "
                             f"as stale); it stops so the two do not mix. Rerun when the other build has finished.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            now = self._read()
            if now and now.get("build_id") == self.owner["build_id"]:
                self.fs.rm(self.path)
        except OSError as e:
            print(f"[build] warning: could not remove the lock {self.url} ({e}); the next build takes it over "
                  "once it is stale", flush=True)


# ------------------------------------------------------------------------------------------- what is ours

def read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def our_files(fs, root: str, url: str) -> tuple[list[str], list[str]]:
    """Split every file under the output into (written by a build of ours, anything else). Ours: the build
    record, the lock, receipts, each split's manifest and shards (by ShardWriter's names, so a crashed group's
    uncommitted shards count too), a tokenizer trained here, and atomic_write's temp files of any of these —
    and only in a folder that holds a build record or a manifest."""
    fs.invalidate_cache()
    if not fs.exists(root):
        return [], []
    files = sorted(fs.find(root))
    record = read_json(fs, f"{root}/{BUILD_RECORD}")
    manifests = [read_json(fs, f"{root}/{s}/{n}") for s in SPLITS for n in MANIFEST_NAMES]
    ours_build = record is not None or any(m is not None for m in manifests)
    trained_here = bool((record or {}).get("tokenizer", {}).get("trained")) or any(
        (m or {}).get("tokenizer", {}).get("path") in (f"{url.rstrip('/')}/tokenizer.model", "../tokenizer.model")
        for m in manifests)

    def mine(path: str) -> bool:
        parts = path[len(root) + 1:].split("/")
        temp = TEMP_NAME.fullmatch(parts[-1])
        name = temp.group(1) if temp else parts[-1]
        if len(parts) == 1:
            return name == LOCK or (ours_build and (
                name == BUILD_RECORD or (trained_here and name in ("tokenizer.model", "tokenizer.json"))))
        if len(parts) == 2 and ours_build:
            if parts[0] == RECEIPTS:
                return bool(RECEIPT_NAME.fullmatch(name))
            if parts[0] in SPLITS:
                return name in MANIFEST_NAMES or bool(SHARD_NAME.fullmatch(name))
        return False

    ours = [p for p in files if mine(p)]
    return ours, [p for p in files if not mine(p)]


def is_lock(root: str, path: str) -> bool:
    """The lock or one of its heartbeat's temp files: never cleaned up by the lock holder's own build."""
    name = path[len(root) + 1:]
    temp = TEMP_NAME.fullmatch(name)
    return (temp.group(1) if temp else name) == LOCK


def _names(paths: list[str], limit: int = 8) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def clear(fs, root: str, url: str) -> None:
    """--overwrite: delete the previous build's own files, after refusing if anything else is in the folder."""
    ours, foreign = our_files(fs, root, url)
    if foreign:
        raise ValueError(
            f"--overwrite refused: output {url} holds {len(foreign)} file(s) that no build wrote: "
            f"{_names(foreign)}. --overwrite deletes only a previous build's own files (its _build.json, "
            "_receipts, manifests, shards and trained tokenizer); move the other files away or choose an --output "
            "folder of its own. Nothing was deleted.")
    first = [f"{root}/{s}/{n}" for s in ("train", "validation") for n in MANIFEST_NAMES]   # not 'complete' first
    ordered = [p for p in first if p in ours] + [p for p in ours if p not in first and not is_lock(root, p)]
    if ordered:
        print(f"[build] --overwrite: deleting {len(ordered)} files of the previous build in {url}", flush=True)
        fs.rm(ordered)
    if _is_local(fs):   # object stores have no folders to leave behind
        for d in (RECEIPTS, *SPLITS):
            if os.path.isdir(f"{root}/{d}") and not os.listdir(f"{root}/{d}"):
                os.rmdir(f"{root}/{d}")
    fs.invalidate_cache()


# ------------------------------------------------------------------------------------------- build record

def _stamp(info: dict) -> str | None:
    """What tells a changed input from an unchanged one without reading it: an object store's ETag (the MD5 of
    the content for single-part uploads) or else the modification time."""
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def input_names(files: list[D.InputFile]) -> dict[str, str]:
    """How records, receipts, skip lists and the shards' `source` column name each input: an object-store URL as it
    is (it names a bucket, not a machine); a local file by its path below the deepest folder holding every local
    input of the build (`1790-Washington-1.txt`, `wiki/part-001.jsonl`), never by an absolute path of this machine,
    so a shard set and its records travel. Moving the corpus folder as a whole leaves the names unchanged."""
    local = {f.url: f.url.split("://", 1)[1] if f.url.startswith("file://") else f.url
             for f in files if f.url.startswith("file://") or "://" not in f.url}
    root = os.path.commonpath([os.path.dirname(p) for p in local.values()]) if local else ""
    return {f.url: os.path.relpath(local[f.url], root) if f.url in local else f.url for f in files}


def portable_skip(skip: dict, names: dict[str, str]) -> dict:
    """A skip entry ({source, reason}) with its input named as input_names does (also inside the reason)."""
    url, hash_, rest = skip["source"].partition("#")
    name = names.get(url, url)
    reason = skip["reason"]
    if url != name:
        local = url.split("://", 1)[1] if url.startswith("file://") else url
        reason = reason.replace(url, name).replace(local, name)
    return {**skip, "source": name + hash_ + rest, "reason": reason}


def input_record(files: list[D.InputFile], storage_options: dict) -> list[list]:
    names = input_names(files)
    out = []
    for f in files:
        fs, path = fsspec.core.url_to_fs(f.url, **storage_options)
        out.append([names[f.url], f.size, _stamp(fs.info(path))])
    return out


def _input_changes(old: list[list], new: list[list]) -> list[str]:
    o = {u: tuple(rest) for u, *rest in old}
    n = {u: tuple(rest) for u, *rest in new}
    out = []
    for label, urls in (("changed in place (size or modification time)", [u for u in n if u in o and o[u] != n[u]]),
                        ("added", [u for u in n if u not in o]), ("removed", [u for u in o if u not in n])):
        if urls:
            out.append(f"inputs {label}: {_names(sorted(urls), 5)}")
    return out


def check_record(url: str, old: dict, new: dict) -> None:
    """Refuse to mix builds: an output made with other settings or inputs needs --overwrite."""
    if old.get("build_format") != BUILD_FORMAT:
        raise ValueError(
            f"output {url} was made by an older version of this builder (build record format "
            f"{old.get('build_format', 1)}, this version writes {BUILD_FORMAT}) and cannot be resumed; pass "
            "--overwrite to delete that build and rebuild, or use another --output")
    o, n = old["config"], new["config"]
    diff = [f"{k}: {o.get(k)!r} -> {n.get(k)!r}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    ot, nt = old["tokenizer"], new["tokenizer"]
    if "trained" in nt:
        if "trained" not in ot:
            diff.append(f"tokenizer: {ot.get('given')!r} -> train one here")
        else:
            diff += [f"{k}: {ot['trained'].get(k)!r} -> {v!r}" for k, v in nt["trained"].items()
                     if ot["trained"].get(k) != v]
    diff += _input_changes(old["inputs"], new["inputs"])
    if diff:
        raise ValueError(f"output {url} holds a build with different settings ({'; '.join(diff)}). "
                         "Use another --output, or pass --overwrite to delete it and rebuild.")



# ------------------------------------------------------------------------------------------- rerun checks

def verified_groups(fs, root: str, n_groups: int) -> set[int]:
    """Groups whose receipt and every shard it lists are intact: size and sha256 against the receipt. A damaged
    group loses its receipt (so even a crash during its rebuild rebuilds it) and is built again. Cost: every
    finished shard is read once per rerun — about a second per GB and thread on a local disk, a full download
    on an object store (8 threads)."""
    fs.invalidate_cache()
    folder = f"{root}/{RECEIPTS}"
    receipts = {}
    for p in (fs.ls(folder, detail=False) if fs.exists(folder) else []):
        name = p.rsplit("/", 1)[-1]
        if RECEIPT_NAME.fullmatch(name) and int(name[1:6]) < n_groups:
            receipts[int(name[1:6])] = p

    t0 = time.time()
    read = [0, 0]   # shards, bytes (for the log line)
    counting = threading.Lock()

    def damage(item: tuple[int, str]) -> str | None:
        g, p = item
        r = read_json(fs, p)
        if r is None or r.get("build_format") != BUILD_FORMAT:
            return f"its receipt {p.rsplit('/', 1)[-1]} is unreadable"
        for split in SPLITS:
            for i in r["splits"][split]["shards"]:
                name = f"{split}/{i['name']}"
                if not SHARD_NAME.fullmatch(i["name"]):
                    return f"its receipt lists a shard named {i['name']!r}, not one this builder writes"
                try:
                    data = fs.cat_file(f"{root}/{name}")
                except FileNotFoundError:
                    return f"shard {name} is missing"
                with counting:
                    read[0] += 1
                    read[1] += len(data)
                if len(data) != i["bytes"]:
                    return f"shard {name} has {len(data)} bytes, its receipt says {i['bytes']} (truncated?)"
                if S.sha256(data) != i["sha256"]:
                    return f"shard {name} has the right size but not the sha256 of its receipt (altered)"
        return None

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        found = dict(zip(receipts, ex.map(damage, receipts.items())))
    if receipts:
        print(f"[build] checked {read[0]} finished shards ({read[1] / 1e6:,.1f} MB) against their receipts in "
              f"{time.time() - t0:.1f}s", flush=True)
    for g, why in sorted(found.items()):
        if why is not None:
            print(f"[build] group {g} will be rebuilt: {why}", flush=True)
            fs.rm(receipts[g])
    return {g for g, why in found.items() if why is None}
