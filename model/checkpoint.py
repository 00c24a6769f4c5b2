"""Load GLM weights from the official release, the hub, our trainer or a state dict; export to the hub layout.

    python -m model.checkpoint SOURCE OUT_DIR [--config config.json|PRESET]   # convert any source to the hub layout

Accepted sources (spec §8.1, §8.2), detected in this order:
* a state dict (mapping of name -> tensor), or a mapping holding one under 'module' (official container) or
  under 'state' -> 'model' / 'model' (Composer checkpoint of our trainer; keys prefixed `model.`);
* an official release folder: a tracker file `latest_checkpointed_iteration.txt` or `latest` (content: an
  iteration or `release`) and `<iter>/mp_rank_00_model_states.pt` whose 'module' is the state dict;
* a hub folder: `config.json` + `model.safetensors` or `pytorch_model.bin` (or their sharded `*.index.json`);
* a single weights file: `.safetensors`, or a torch pickle (`.bin` / `.pt`) holding any mapping above;
* a sharded (torch.distributed.checkpoint) Composer checkpoint folder of our trainer (`.metadata` + `__<rank>_0.distcp`,
  what `composer -n N train.py` saves by default), read in one process.
Key prefixes `glm.` (hub task wrappers), `model.` (Composer wrapper) and `_orig_mod.` (torch.compile), and
`_checkpoint_wrapped_module.` anywhere, are stripped.

Nothing here unpickles code: every torch.load uses weights_only=True with an allow-list of the plain data types a
Composer checkpoint holds (rng states, timedeltas, the torch version), and a sharded checkpoint's `.metadata` pickle
is read by an unpickler that admits only torch.distributed.checkpoint's metadata classes. `safe_checkpoint_loading()`
imposes the same rules on Composer's own loads (autoresume, load_path): a planted pickle that would run code raises
UnsafeCheckpointError instead.

The config comes from the `config` argument (a GLMConfig, a hub config dict, a path to a config.json or a
preset name) or else from a `config.json` beside the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import PRESETS, GLMConfig
from model.glm import GLM

TRACKER_FILES = ("latest_checkpointed_iteration.txt", "latest")
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")
STRIP_PREFIXES = ("glm.", "model.", "_orig_mod.")
_CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."
DCP_METADATA = ".metadata"   # marks a sharded (torch.distributed.checkpoint) checkpoint folder


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects outside the allow-list: loading it could run arbitrary code."""


def load_checkpoint(source: str | os.PathLike | Mapping[str, Any], config: GLMConfig | dict | str | None = None, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> GLM:
    """Build a GLM and load `source` into it with strict key and shape checks (ValueError listing problems).

    dtype None keeps the stored dtype (e.g. fp16 for glm-large-chinese); the model is built on the meta device,
    so no memory is spent on a throw-away random init.
    """
    state_dict, hub_config = read_state_dict(source)
    cfg = resolve_config(config, hub_config, source, state_dict)
    with torch.device("meta"):
        model = GLM(cfg)
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    return model


def resolve_config(config: GLMConfig | dict | str | os.PathLike | None, hub_config: dict | None,
                   source: object = None, state_dict: Mapping[str, Tensor] | None = None) -> GLMConfig:
    """A preset name takes its head size, dropouts etc. from the preset and every shape from the weights."""
    if isinstance(config, GLMConfig):
        return config
    if isinstance(config, Mapping):
        return GLMConfig.from_hub(dict(config))
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config] if state_dict is None else shapes_from_state_dict(state_dict, PRESETS[config])
    if isinstance(config, str | os.PathLike):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"config {str(config)!r} is neither a preset ({sorted(PRESETS)}) nor a config.json")
        return GLMConfig.from_hub(json.loads(path.read_text()))
    if hub_config is not None:
        return GLMConfig.from_hub(hub_config)
    raise ValueError(f"no config.json found beside {source!r}; pass config= (a GLMConfig, a hub config dict, a "
                     f"config.json path or a preset name such as 'glm-large')")


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Tensor], dict | None]:
    """Return (state dict with prefixes stripped, hub config dict or None) for any accepted source."""
    if isinstance(source, Mapping):
        return _unwrap(source, "<state dict>"), None
    path = Path(source)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    hub_config = json.loads(config_path.read_text()) if config_path.is_file() else None
    if path.is_dir() and (path / DCP_METADATA).is_file():
        return _unwrap(read_sharded(path, "state.model")["state"], str(path)), hub_config
    if path.is_dir():
        tracker = next((path / t for t in TRACKER_FILES if (path / t).is_file()), None)
        if tracker is not None:
            return _unwrap(_torch_load(_release_file(path, tracker)), str(path)), hub_config
        weights = next((path / w for w in HUB_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise ValueError(f"{str(path)!r} is neither an official release folder (needs one of {TRACKER_FILES}) "
                             f"nor a hub folder (needs config.json and one of {HUB_WEIGHTS})")
        path = weights
    if path.name.endswith(".index.json"):  # sharded hub weights: {"weight_map": {name: shard file}}
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        merged: dict[str, Tensor] = {}
        for shard in shards:
            merged.update(_read_file(path.parent / shard))
        return _unwrap(merged, str(path)), hub_config
    return _unwrap(_read_file(path), str(path)), hub_config


def shapes_from_state_dict(state_dict: Mapping[str, Tensor], base: GLMConfig) -> GLMConfig:
    """`base` with n_layer, d_model, vocab_size, max_position_embeddings and block_position_encoding read from
    the weights' shapes; n_head keeps base's head_dim (heads are not visible in the shapes)."""
    if "word_embeddings.weight" not in state_dict or "transformer.position_embeddings.weight" not in state_dict:
        raise ValueError("state dict lacks word_embeddings.weight / transformer.position_embeddings.weight; "
                         "is it a GLM checkpoint?")
    vocab_size, d_model = state_dict["word_embeddings.weight"].shape
    block = "transformer.block_position_embeddings.weight" in state_dict
    rows = state_dict["transformer.position_embeddings.weight"].shape[0]
    layers = {k.split(".")[2] for k in state_dict if k.startswith("transformer.layers.")}
    if d_model % base.head_dim:
        raise ValueError(f"d_model={d_model} of the weights is not a multiple of head_dim={base.head_dim} of the "
                         "preset; pass a config.json instead of a preset name")
    return dataclasses.replace(base, n_layer=len(layers), d_model=d_model, n_head=d_model // base.head_dim,
                               vocab_size=vocab_size, max_position_embeddings=rows - (1 if block else 0),
                               block_position_encoding=block)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Raise one ValueError naming every missing key, unexpected key and shape mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    lines = ["checkpoint does not match the GLM config:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12]) + (" …" if len(items) > 12 else ""))
    lines.append("  fix: pass the config the weights were trained with (n_layer, d_model, vocab_size, "
                 "max_position_embeddings, block_position_encoding).")
    raise ValueError("\n".join(lines))


def save_hub(model: GLM, folder: str | os.PathLike, *, safetensors: bool = False) -> Path:
    """Write `config.json` and `pytorch_model.bin` (or `model.safetensors`) — the hub layout (spec §8.2)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(model.config.to_hub(), indent=2) + "\n")
    if safetensors:
        save_file = _safetensors().save_file
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


# ---- helpers -----------------------------------------------------------------------------------------------------

def _release_file(folder: Path, tracker: Path) -> Path:
    iteration = tracker.read_text().strip()
    sub = folder / iteration
    if (sub / "mp_rank_01_model_states.pt").exists():
        raise ValueError(f"{str(sub)!r} holds a model-parallel (mp>1) checkpoint; merge it to mp 1 first with the "
                         "official change_mp.py")
    file = sub / "mp_rank_00_model_states.pt"
    if not file.is_file():
        raise ValueError(f"tracker {str(tracker)!r} names iteration {iteration!r} but {str(file)!r} does not exist")
    return file


def _read_file(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        return _safetensors().load_file(str(path))
    return _torch_load(path)


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """torch.load of plain data only (weights_only + the Composer allow-list). A file that asks for code raises
    UnsafeCheckpointError; a damaged one (truncated, cut inside the zip magic, empty) a ValueError naming it."""
    try:
        with torch.serialization.safe_globals(_composer_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and not _cut_zip(path):   # content beyond plain data, not damage
            raise _unsafe(path, e) from None
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {e}") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or damaged zip / pickle
        first = (str(e).splitlines() or [f"{type(e).__name__} (empty or cut short)"])[0]   # EOFError has no text
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {first}") from None


def read_sharded(folder: str | os.PathLike, *keys: str) -> dict[str, Any]:
    """The entries under `keys` (dotted prefixes such as "state.model", "state.timestamp") of a sharded
    torch.distributed.checkpoint folder, read in this one process whatever the world size that saved it."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with safe_checkpoint_loading(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable")  # one process on purpose
        return _load_state_dict_from_keys(keys=set(keys), checkpoint_id=str(folder))


def _cut_zip(path: Path) -> bool:
    """A file that is empty or a prefix of the zip magic torch.save writes: a checkpoint whose write was cut off
    in its first bytes (torch then parses those bytes as a legacy pickle and refuses an 'operand')."""
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) < 4 and b"PK\x03\x04".startswith(head)


def read_trainer_state(path: str | os.PathLike, *keys: str) -> dict[str, Any]:
    """The entries under `keys` (dotted prefixes: "state.timestamp", "state.callbacks", "state.metadata") of a
    checkpoint our trainer saved, monolithic (`ep0-ba8-rank0.pt`) or sharded (`ep0-ba8/`), as a nested dict.
    Raises UnsafeCheckpointError for a planted pickle and ValueError for a file that is damaged or incomplete
    (truncated, a shard file missing or short): what autoresume needs to know before trusting a checkpoint."""
    path = Path(path)
    if path.is_dir():
        if not (path / DCP_METADATA).is_file():
            raise ValueError(f"{str(path)!r} has no {DCP_METADATA}: an incomplete sharded checkpoint")
        check_sharded_files(path)
        return read_sharded(path, *keys)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return _select(_torch_load(path, mmap=zipfile.is_zipfile(path)), keys)


def _select(tree: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The sub-dicts of `tree` under dotted `keys`, nested as in `tree` (what DCP's keyed read returns)."""
    out: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = tree, out
        for part in parents:
            src = src.get(part) if isinstance(src, Mapping) else None
            dst = dst.setdefault(part, {})
        if isinstance(src, Mapping) and leaf in src:
            dst[leaf] = src[leaf]
    return out


def check_sharded_files(folder: str | os.PathLike) -> None:
    """Every data file a sharded checkpoint's `.metadata` lists exists and is long enough (ValueError if not)."""
    from torch.distributed.checkpoint import FileSystemReader

    with safe_checkpoint_loading():
        metadata = FileSystemReader(str(folder)).read_metadata()
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        file = Path(folder) / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < size:
            raise ValueError(f"sharded checkpoint {str(folder)!r}: {name} "
                             + ("is missing" if have is None else f"has {have} bytes, {size} needed (truncated)"))


@contextlib.contextmanager
def safe_checkpoint_loading() -> Iterator[None]:
    """While active, every torch.load in this process runs with weights_only=True and the Composer allow-list
    (Composer itself passes weights_only=False; so do DCP's byte entries), and torch.distributed.checkpoint reads
    `.metadata` with an unpickler that admits only its own metadata classes. A checkpoint needing anything else
    raises UnsafeCheckpointError naming the file. Composer's loads all happen inside Trainer(...), so wrapping
    that one call covers autoresume, load_path, local and remote, monolithic and sharded checkpoints."""
    import torch.distributed.checkpoint.filesystem as dcp_fs

    real_load, real_pickle = torch.load, dcp_fs.pickle

    def load(f, map_location=None, *args, weights_only=None, **kwargs):
        try:
            with torch.serialization.safe_globals(_composer_safe_globals()):
                return real_load(f, map_location, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            raise _unsafe(getattr(f, "name", f), e) from None

    def load_metadata(file):
        return _MetadataUnpickler(file, getattr(file, "name", DCP_METADATA)).load()

    torch.load = load
    dcp_fs.pickle = types.SimpleNamespace(**{**vars(pickle), "load": load_metadata})
    try:
        yield
    finally:
        torch.load, dcp_fs.pickle = real_load, real_pickle


class _MetadataUnpickler(pickle.Unpickler):
    """The globals a DCP `.metadata` file references: its own dataclasses, torch.Size and dtypes, a layout
    getter and the checkpoint_id path. Anything else (os.system, builtins.eval, ...) is refused."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        ok = (module == "torch.distributed.checkpoint.metadata"
              or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                                    ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}
              or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not ok:
            raise _unsafe(self.path, f"global {module}.{name} is not allow-listed")
        return super().find_class(module, name)


def _unsafe(path: Any, why: Any) -> UnsafeCheckpointError:
    lines = [ln.strip() for ln in str(why).splitlines() if ln.strip()] or ["?"]
    why = next((ln for ln in lines if "global" in ln.lower() and "weights_only" not in ln), lines[-1])
    why = why.split(". Please")[0].removeprefix("WeightsUnpickler error: ")
    return UnsafeCheckpointError(
        f"refusing to load checkpoint {str(path)!r}: it holds pickled Python objects outside the allow-list of "
        f"plain data a checkpoint of this trainer needs: {why[:300]}; unpickling it "
        "could run arbitrary code. Load only checkpoints this trainer wrote; remove or move the file if you did not "
        "put it there.")


def _composer_safe_globals() -> list:
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [np.ndarray, np.dtype, multiarray._reconstruct, datetime.timedelta,
            torch.torch_version.TorchVersion, *dtype_classes]


def _unwrap(obj: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """Find the model state dict in a container and strip wrapper prefixes."""
    if "module" in obj and isinstance(obj["module"], Mapping):          # official release container (§8.1)
        obj = obj["module"]
    elif "state" in obj and isinstance(obj["state"], Mapping) and "model" in obj["state"]:  # Composer
        obj = obj["state"]["model"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a model "
                             "state dict (or an official / Composer checkpoint that holds one)")
        name = key.replace(_CHECKPOINT_WRAPPER, "")  # activation-checkpoint wrappers, should a trainer leave them
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIP_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        out[name] = value
    return out


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ValueError("this checkpoint uses .safetensors but the `safetensors` package is not installed; "
                         "`pip install safetensors`, or convert it to pytorch_model.bin elsewhere") from e
    return safetensors.torch


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Convert any accepted GLM checkpoint to the hub layout.")
    ap.add_argument("source")
    ap.add_argument("out_dir")
    ap.add_argument("--config", default=None, help="config.json path or preset name, when SOURCE has none")
    ap.add_argument("--safetensors", action="store_true")
    args = ap.parse_args()
    m = load_checkpoint(args.source, args.config)
    print(f"wrote {save_hub(m, args.out_dir, safetensors=args.safetensors)} ({m.num_params / 1e6:.1f}M params)")


def trained_data_fingerprint(checkpoint: str | os.PathLike) -> dict:
    """What a checkpoint of our trainer records about its data (train.py DataFingerprint: tokenizer_fingerprint,
    vocab_size, seq_len); {} for other checkpoints (official, hub, plain weights)."""
    path = os.path.realpath(checkpoint)
    ours = os.path.isfile(os.path.join(path, DCP_METADATA)) or (os.path.isfile(path) and path.endswith(".pt"))
    if not ours:
        return {}
    state = read_trainer_state(path, "state.callbacks.DataFingerprint").get("state", {})
    return state.get("callbacks", {}).get("DataFingerprint", {})
