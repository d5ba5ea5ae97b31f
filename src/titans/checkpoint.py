"""Safe, atomic training checkpoints: safetensors for tensors, JSON for everything else.

Layout of a run directory::

    run_dir/checkpoints/ckpt-000123/model.safetensors   model state dict
                                    state.safetensors   tensors of the optimizer, scheduler and extra state
                                    checkpoint.json     step, non-tensor state, RNG states, sha256 of both files
                                                        and of itself (``meta_sha256``)
    run_dir/checkpoints/latest                          name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced and renamed into place, then ``latest``
is replaced atomically, so a run killed at any moment leaves only complete checkpoints behind; an old checkpoint is
renamed to a temporary name before it is deleted. Non-finite model weights are never saved.
Loading reads nothing but safetensors and JSON (no pickle) and verifies sizes and hashes before
any object is modified. A legacy checkpoint.json (format 1, saved before it carried ``meta_sha256``) still loads, with
a :class:`CheckpointWarning` that its metadata is unprotected; one of format 2 without the field is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from titans.fileio import TMP_PREFIX, atomic_write, fsync_dir, sha256_file

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "atomic_write",
    "capture_rng_state",
    "check_model_state",
    "upgrade_model_state",
    "checkpoint_root",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "non_finite_tensors",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT_VERSION = 2  # 2: checkpoint.json must carry meta_sha256
_LEGACY_VERSION = 1  # written without meta_sha256 before it existed, and with it until format 2
_READABLE_VERSIONS = (1, 2)
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
META_FILE = "checkpoint.json"
LATEST_FILE = "latest"
_NAME = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, truncated or does not match the objects to restore."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but cannot be fully verified (a legacy checkpoint.json without its own sha256)."""


# ----------------------------------------------------------------------------------------------
# Atomic file system operations.


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Finding checkpoints.


def checkpoint_root(run_dir: str | Path) -> Path:
    """The directory holding a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by ``latest`` (else the highest step), or None if the run has none."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if not _NAME.match(name) or not (root / name).is_dir():
            raise CheckpointError(f"{pointer}: points to {name!r}, which is not a checkpoint directory")
        return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory given either itself or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if _NAME.match(path.name) or (path / META_FILE).exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory not found")
        return path
    if checkpoint_root(path).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: run directory has no checkpoint")
        return latest
    raise CheckpointError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")


# ----------------------------------------------------------------------------------------------
# RNG states (JSON-encodable).


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng_state() -> dict:
    """Python, NumPy (global), torch CPU and, when initialised, CUDA generator states as JSON data."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Restore generator states saved by :func:`capture_rng_state` (CUDA only if devices match)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])


# ----------------------------------------------------------------------------------------------
# Nested state <-> JSON + flat tensor dict.


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON data for ``obj``; its tensors and arrays are moved into ``tensors`` under path-like names."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{key}/k{i}", tensors), _encode(v, f"{key}/{k}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{key}' in a checkpoint")


def _decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [_decode(v, tensors) for v in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__ndarray__" in data:
            return tensors[data["__ndarray__"]].numpy()
        if "__tuple__" in data:
            return tuple(_decode(v, tensors) for v in data["__tuple__"])
        if "__items__" in data:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in data["__items__"]}
        return {k: _decode(v, tensors) for k, v in data.items()}
    return data


def _to_storable(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous, non-overlapping tensors for safetensors, plus {alias: name} for tied tensors."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state entry '{name}' is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel() > 0:
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
            if view in views:  # a tied weight: store once
                aliases[name] = views[view]
                continue
            views[view] = name
        t = t.to("cpu").contiguous()
        if t.numel() > 0:
            if t.untyped_storage().data_ptr() in storages:  # overlapping views of one storage
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out, aliases


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _meta_digest(meta: dict) -> str:
    """sha256 of checkpoint.json's content without its own ``meta_sha256`` field (canonical JSON)."""
    content = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [name for name, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


# ----------------------------------------------------------------------------------------------
# Save.


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Atomically write checkpoint ``ckpt-{step:06d}`` of ``run_dir`` and point ``latest`` at it.

    ``extra`` holds anything else to restore (resolved config, data-loader position, ...): nested
    dicts, lists, tuples, scalars, tensors and NumPy arrays. The current RNG states are saved too.
    Afterwards only the newest ``keep_last`` checkpoints are kept (None keeps all). Returns the
    checkpoint directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    state = model.state_dict()
    if bad := non_finite_tensors(state):
        raise ValueError(f"not saving checkpoint step {step}: non-finite values in {', '.join(bad[:3])}"
                         + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""))
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left behind by a run killed while saving
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    name = f"ckpt-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=root))
    try:
        model_tensors, model_aliases = _to_storable(state)
        state_tensors: dict[str, torch.Tensor] = {}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "model_aliases": model_aliases,
            "optimizer": None if optimizer is None else _encode(optimizer.state_dict(), "optimizer", state_tensors),
            "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "scheduler", state_tensors),
            "extra": _encode(extra or {}, "extra", state_tensors),
            "rng": capture_rng_state(),
        }
        state_tensors, meta["state_aliases"] = _to_storable(state_tensors)
        meta["files"] = {
            MODEL_FILE: _write_safetensors(tmp / MODEL_FILE, model_tensors),
            STATE_FILE: _write_safetensors(tmp / STATE_FILE, state_tensors),
        }
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / META_FILE).write_bytes(json.dumps(meta, indent=1).encode("utf-8"))
        _fsync_file(tmp / META_FILE)
        fsync_dir(tmp)

        final = root / name
        if final.exists():  # the same step saved again: move the old one out of the way first
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=root))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / LATEST_FILE, f"{name}\n".encode())
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old.name != name:
                _delete(old)
    return final


def _delete(ckpt: Path) -> None:
    """Rename a checkpoint to a temporary name, then delete it: killed mid-way, it leaves no half-deleted checkpoint
    under its real name (the next save removes the leftover)."""
    doomed = ckpt.with_name(f"{TMP_PREFIX}old-{ckpt.name}-{uuid.uuid4().hex}")
    os.replace(ckpt, doomed)
    fsync_dir(ckpt.parent)
    shutil.rmtree(doomed)


# ----------------------------------------------------------------------------------------------
# Load.


def _read_meta(ckpt: Path) -> tuple[dict, bool]:
    """checkpoint.json's content, verified, and whether it is a legacy file without its own hash.

    Format 2 must carry ``meta_sha256``. Format 1 was written both before checkpoint.json carried its own hash and
    after: with ``meta_sha256`` it is checked like format 2; without, it is a legacy checkpoint whose metadata cannot
    be verified (the caller loads it, after its weight hashes are checked, with a warning)."""
    path = ckpt / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated JSON ({exc})") from None
    required = ("format_version", "step", "files", "model_aliases", "state_aliases", "optimizer", "scheduler",
                "extra", "rng")
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing fields {missing}")
    version = meta["format_version"]
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise CheckpointError(f"{path}: unsupported format version {version!r}")
    legacy = version == _LEGACY_VERSION and "meta_sha256" not in meta
    if not legacy:
        if "meta_sha256" not in meta:
            raise CheckpointError(f"{path}: missing fields ['meta_sha256'] (format version {version} records "
                                  "its own sha256)")
        if (digest := _meta_digest(meta)) != meta["meta_sha256"]:
            raise CheckpointError(f"{path}: sha256 mismatch (changed after it was saved): recorded "
                                  f"{meta['meta_sha256']}, found {digest}")
    return meta, legacy


def _read_tensors(ckpt: Path, filename: str, meta: dict) -> dict[str, torch.Tensor]:
    path = ckpt / filename
    record = meta["files"].get(filename)
    if record is None:
        raise CheckpointError(f"{ckpt / META_FILE}: no record of {filename}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CheckpointError(f"{path}: truncated or wrong size: expected {record['bytes']} bytes, found {size}")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise CheckpointError(f"{path}: sha256 mismatch: recorded {record['sha256']}, found {digest}")
    try:
        return safetensors.torch.load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error type for bad headers and data
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def upgrade_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Bring a model state saved by an older release to ``model``'s names, in place: every submodule with an
    ``upgrade_state_dict(state, prefix)`` (renamed or added parameters) applies it, as ``load_state_dict`` does.
    Returns the parameters it added (filled with the values the older release computed with)."""
    added = []
    for name, module in model.named_modules():
        upgrade = getattr(module, "upgrade_state_dict", None)
        if callable(upgrade):
            added += upgrade(state, f"{name}." if name else "")
    return added


def check_model_state(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly ``model``'s keys and shapes (``model`` may be on the meta
    device: nothing is allocated)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: does not match the model (missing {missing}, unexpected {unexpected}, "
            f"checkpoint vs model shapes {shapes})"
        )


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict:
    """Verify and load a checkpoint (a checkpoint directory, or a run directory: its latest).

    Restores the given model, optimizer and scheduler and, if ``restore_rng``, the RNG states. All
    files are verified (size, sha256, format, keys and shapes against ``model``) before anything
    is modified; problems raise :class:`CheckpointError` naming the file. Nothing is written.
    Returns ``{"path", "step", "extra", "model_state"}`` (``model_state``: the tensors on CPU).
    """
    ckpt = resolve_checkpoint(path)
    meta, legacy = _read_meta(ckpt)
    model_state = _read_tensors(ckpt, MODEL_FILE, meta)
    for alias, target in meta["model_aliases"].items():
        model_state[alias] = model_state[target]
    tensors = _read_tensors(ckpt, STATE_FILE, meta)
    for alias, target in meta["state_aliases"].items():
        tensors[alias] = tensors[target]
    try:
        optimizer_state = _decode(meta["optimizer"], tensors)
        scheduler_state = _decode(meta["scheduler"], tensors)
        extra = _decode(meta["extra"], tensors)
    except KeyError as exc:
        raise CheckpointError(f"{ckpt / STATE_FILE}: missing tensor {exc}") from None
    if legacy:  # weight hashes checked above; only checkpoint.json itself is unverified
        warnings.warn(f"{ckpt / META_FILE}: legacy checkpoint without meta_sha256: its metadata (step, optimizer, "
                      "RNG and extra state) is unprotected; checkpoints saved from it will carry one", CheckpointWarning,
                      stacklevel=2)

    added = [] if model is None else upgrade_model_state(model, model_state)
    if model is not None:
        check_model_state(ckpt / MODEL_FILE, model, model_state)
    if optimizer is not None:
        if optimizer_state is None:
            raise CheckpointError(f"{ckpt / META_FILE}: no optimizer state saved")
        if added:
            raise CheckpointError(f"{ckpt}: written before this release added {added[0]}"
                                  f"{f' and {len(added) - 1} more parameters' if len(added) > 1 else ''}, so its "
                                  "optimizer state cannot resume training (`titans eval` still reads it)")
        try:
            optimizer.load_state_dict(optimizer_state)  # validates groups before changing anything
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{ckpt / META_FILE}: optimizer state does not match ({exc})") from None
    if scheduler is not None:
        if scheduler_state is None:
            raise CheckpointError(f"{ckpt / META_FILE}: no scheduler state saved")
        scheduler.load_state_dict(scheduler_state)
    if model is not None:
        model.load_state_dict(model_state)
    if restore_rng:
        restore_rng_state(meta["rng"])
    return {"path": ckpt, "step": meta["step"], "extra": extra, "model_state": model_state}
