"""Complete, atomic, safely loadable training checkpoints, and a preemption handler.

A checkpoint holds everything a resume needs: the model, the optimizer (any registry optimizer, quantized
state included), the LR scheduler, the GradScaler, the RNG states (Python, NumPy, torch CPU and CUDA), the
step, the data position, the lmopt version and the run's config. A run stopped at step k and resumed from it
continues bit for bit as if it had not stopped.

A checkpoint is one file: a small JSON manifest (the payload's SHA-256 and size, the format version, the step)
in a header, then the payload as ``torch.save`` wrote it. Writing is atomic: the file goes to a temporary name
in the same directory, is flushed and fsynced, read back (hash and a ``weights_only`` load), and only then renamed
over the final name (and the directory fsynced); manifest and payload are committed by that one rename, so a
crash, a kill or an error at any point leaves the previous checkpoint intact. :class:`CheckpointManager` keeps
the last N, deleting older ones only after the new one is verified. The older layout (a payload file with a
``.json`` manifest beside it) still loads, verified.

Loading uses ``torch.load(weights_only=True)`` only: a checkpoint from an untrusted source cannot run code.
A missing or malformed manifest is an error (``verify=False`` is the explicit opt-out); everything is
checked before the model, optimizer or scheduler change, and restored if a later part fails to load.
Clear :class:`CheckpointError` messages name the problem: another model shape, another optimizer, a
truncated or corrupted file, a newer format version.

:class:`PreemptionHandler` turns SIGTERM / SIGINT into a flag that the training loop checks between steps:
it saves a checkpoint there and returns cleanly (a second signal interrupts at once).

Example:
    >>> manager = CheckpointManager("ckpt", keep_last=3)
    >>> manager.save(step, model=model, optimizer=opt, scheduler=sched, data_position=step, config=cfg)
    >>> state = manager.load_latest(model=model, optimizer=opt, scheduler=sched)   # None when empty
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from ..optim.schedule_free import schedule_free_mode

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointManager",
    "PreemptionHandler",
    "TrainState",
    "capture_rng_state",
    "load_checkpoint",
    "read_manifest",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT_NAME = "lmopt-checkpoint"
#: the checkpoint layout version this lmopt writes (and the newest it reads)
FORMAT_VERSION = 2
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


@dataclass
class TrainState:
    """What :func:`load_checkpoint` gives back besides restoring the objects passed to it."""

    step: int
    data_position: Any
    config: dict[str, Any]
    extra: dict[str, Any]
    path: Path
    lmopt_version: str
    rng_restored: bool = False
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# RNG states, in a form torch.load(weights_only=True) accepts
# --------------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when initialised) CUDA generator states."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> list[str]:
    """Restore what :func:`capture_rng_state` captured; returns warnings for states that could not be set."""
    warnings = []
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["gauss"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        else:
            warnings.append(
                f"the checkpoint has CUDA RNG states for {len(state['cuda'])} devices; this "
                f"process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}: "
                f"CUDA random streams are not restored"
            )
    return warnings


# --------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------
# One file per checkpoint: MAGIC, the manifest's length (8 bytes, big-endian), the manifest (JSON: SHA-256 and
# size of the payload), then the payload as torch.save wrote it. Manifest and payload are committed by one
# rename, so a kill at any point leaves the old file or the new one, never a mix.
MAGIC = b"LMOPT-CHECKPOINT\n"
#: bytes before the payload: MAGIC, the manifest's length, the manifest padded with spaces
_HEADER = 4096
_CHUNK = 1 << 24
_MAX_MANIFEST = 1 << 20
#: the layouts this lmopt reads: 1 (payload file + ``.json`` manifest beside it), 2 (one combined file)
SUPPORTED_FORMAT_VERSIONS = (1, 2)
_MANIFEST_FIELDS = ("format", "format_version", "lmopt_version", "step")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _optimizer_signature(optimizer: Optimizer) -> dict[str, Any]:
    cls = type(optimizer)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "group_shapes": [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups],
    }


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)


def _plain(value: Any, where: str) -> Any:
    """``value`` as data ``torch.load(weights_only=True)`` reads back.

    Lossless conversions: NumPy scalars become Python numbers, paths become strings; anything else that is not
    None / bool / int / float / str / bytes / tensor / list / tuple / dict is refused, naming where it is.
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float, complex, str, bytes)):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise ValueError(
                    f"{where} has a key of type {type(k).__name__} ({k!r:.60}); checkpoints keep dict keys that "
                    f"are str / int / float / bool / None"
                )
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    hint = "dataclasses.asdict(...)" if hasattr(value, "__dataclass_fields__") else "plain data (str, int, list ...)"
    raise ValueError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a safe load "
        f"(torch.load(weights_only=True)) cannot read back; convert it to {hint} before saving"
    )


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


class _Window(io.RawIOBase):
    """A file seen from ``start`` on: torch.save streams the payload behind the header, torch.load reads it there
    (neither ever holds the whole payload as bytes)."""

    def __init__(self, f: Any, start: int, digest: Any = None) -> None:
        self.f, self.start, self.digest = f, start, digest
        f.seek(start)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self.f.readinto(b)

    def write(self, b: Any) -> int:
        if self.digest is not None:  # hashed as written: the save's read-back then checks the disk against it
            self.digest.update(b)
        return self.f.write(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(self.start + offset if whence == 0 else offset, whence) - self.start

    def tell(self) -> int:
        return self.f.tell() - self.start


def _hash_region(f: Any, start: int, size: int) -> str:
    digest = hashlib.sha256()
    f.seek(start)
    left = size
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _write_combined(f: Any, payload: dict[str, Any]) -> None:
    """Write a combined checkpoint into ``f`` (at its start): the header slot, the payload streamed by torch.save
    (hashed as it is written), then the manifest (the payload's SHA-256 and size) into the slot, padded with spaces
    (JSON ignores them)."""
    slot = _HEADER - len(MAGIC) - 8
    f.write(MAGIC + slot.to_bytes(8, "big") + b" " * slot)
    digest = hashlib.sha256()
    torch.save(payload, _Window(f, _HEADER, digest))
    end = f.tell()
    f.flush()
    manifest = {key: payload.get(key) for key in _MANIFEST_FIELDS}
    manifest.update(sha256=digest.hexdigest(), size=end - _HEADER)
    text = json.dumps(manifest).encode()
    if len(text) > slot:
        raise ValueError(f"the checkpoint manifest is {len(text)} bytes, more than its {slot}-byte slot")
    f.seek(len(MAGIC) + 8)
    f.write(text.ljust(slot))
    f.seek(end)


def _encode(payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """(header, payload bytes) of a combined checkpoint, in memory (tests write files from them)."""
    buffer = io.BytesIO()
    _write_combined(buffer, payload)
    data = buffer.getvalue()
    return data[:_HEADER], data[_HEADER:]


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    data_position: Any = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Save a complete checkpoint to ``path``: one file, written to a temporary name, verified, then renamed.

    Args:
        path: destination file.
        step: optimizer steps taken.
        model: the model (``state_dict``).
        optimizer, scheduler, scaler: saved with their ``state_dict`` when given.
        data_position: where the data stream stands (plain data: an int, a dict of ints, ...).
        config: the run's configuration (plain data), saved for reproducibility.
        extra: any further plain data (e.g. the health monitor's history).
        rng: save the random generators' states (default True).

    ``data_position``, ``config`` and ``extra`` must be plain data or tensors so that
    ``torch.load(weights_only=True)`` reads them back: NumPy scalars are stored as Python numbers and paths as
    strings; anything else (a dataclass, an arbitrary object) raises ``ValueError`` naming its key.

    With an optimizer that has train/eval modes (Schedule-Free) in train mode, the model weights saved are the
    averaged point x (what evaluation and export want); the training point y is saved too, so that resuming
    (loading with the optimizer) continues bit for bit.

    The written file is read back (SHA-256 and a ``weights_only`` load) before it replaces ``path``; a failed
    save leaves any previous checkpoint at ``path`` untouched and no temporary file behind.
    """
    from .._version import __version__

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lmopt_version": __version__,
        "torch_version": str(torch.__version__),
        "step": step,
        "data_position": _plain(data_position, "data_position"),
        "config": _plain(dict(config or {}), "config"),
        "extra": _plain(dict(extra or {}), "extra"),
    }
    if optimizer is not None and schedule_free_mode(optimizer) == "train":
        train_point = _clone_state(model.state_dict())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        held = [p.detach().clone() for p in params]
        optimizer.eval()
        try:
            model_state = _clone_state(model.state_dict())
        finally:
            optimizer.train()
            with torch.no_grad():  # train() after eval() is not bit-exact: put y back as it was
                for p, y in zip(params, held, strict=True):
                    p.copy_(y)
        payload["model_train_point"] = train_point
    else:
        model_state = model.state_dict()
    payload["model"] = model_state
    payload["model_shapes"] = {k: list(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        payload["optimizer_signature"] = _optimizer_signature(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        # parameter names per group: what a conversion to the sharded layout (keys by name) needs
        payload["optimizer_signature"]["group_params"] = [
            [names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups
        ]
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if rng:
        payload["rng"] = capture_rng_state()
    return _commit_payload(path, payload)


def _commit_payload(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as a combined checkpoint at ``path``: temporary name, fsync, read back, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w+b") as f:
            _write_combined(f, payload)
            f.flush()
            os.fsync(f.fileno())
        # what is on disk loads back, before it replaces anything: its SHA-256 read again from the file, and a
        # weights_only load of everything but tensor data (meta tensors: no memory)
        _read(tmp, "meta", verify=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    _manifest_path(path).unlink(missing_ok=True)  # a layout-1 manifest of an older checkpoint at this path
    return path


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
def _check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise CheckpointError(f"the manifest of {where} is not a JSON object (got {type(manifest).__name__})")
    size, sha = manifest.get("size"), manifest.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CheckpointError(f"the manifest of {where} has no valid size (got {size!r:.40})")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CheckpointError(f"the manifest of {where} has no valid sha256 (got {sha!r:.80})")
    return manifest


def _verify_region(f: Any, start: int, size: int, manifest: dict[str, Any], path: Path) -> None:
    if size != manifest["size"]:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted: {size:,} payload bytes on disk, "
            f"{manifest['size']:,} written; use an earlier checkpoint"
        )
    if _hash_region(f, start, size) != manifest["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its SHA-256 differs from the one recorded when "
            f"it was written; use an earlier checkpoint"
        )


def _payload_region(f: Any, path: Path, verify: bool) -> tuple[int, dict[str, Any] | None, bool]:
    """Where the torch.save payload of an open checkpoint file starts (either layout), checked against its
    manifest (streamed: the file is never held in memory); (start, manifest, combined layout)."""
    total = os.fstat(f.fileno()).st_size
    head = f.read(len(MAGIC) + 8)
    if head.startswith(MAGIC):
        start = len(MAGIC) + 8
        length = int.from_bytes(head[len(MAGIC) :], "big") if len(head) == start else -1
        if length < 0 or length > min(_MAX_MANIFEST, total - start):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted (its manifest header is damaged)")
        if not verify:
            return start + length, None, True
        try:
            manifest = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: its manifest is unreadable ({err}); load it with verify=False "
                f"only if you trust the file"
            ) from None
        _verify_region(f, start + length, total - start - length, _check_manifest(manifest, str(path)), path)
        return start + length, manifest, True
    # layout 1: the payload file with a manifest beside it
    if not verify:
        return 0, None, False
    manifest_path = _manifest_path(path)
    if not manifest_path.exists():
        raise CheckpointError(
            f"checkpoint {path} has no manifest ({manifest_path.name}), so it cannot be verified; "
            f"load it with verify=False only if you trust the file"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"the manifest {manifest_path} is unreadable ({err}); load {path.name} with verify=False only "
            f"if you trust the file"
        ) from None
    _verify_region(f, 0, total, _check_manifest(manifest, str(manifest_path)), path)
    return 0, manifest, False


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest a checkpoint file carries (format, version, lmopt version, step, payload SHA-256 and size).

    Raises:
        CheckpointError: the file is missing, of the older layout without a manifest, or its manifest is damaged.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 8:
                raise CheckpointError(f"{path} is not a layout-{FORMAT_VERSION} lmopt checkpoint")
            length = int.from_bytes(head[len(MAGIC) :], "big")
            if length > _MAX_MANIFEST:
                raise CheckpointError(f"checkpoint {path} is corrupted (its manifest header is damaged)")
            text = f.read(length)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    try:
        return _check_manifest(json.loads(text), str(path))
    except (ValueError, UnicodeDecodeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is corrupted: its manifest is unreadable ({err})") from None


def _read(path: Path, map_location: Any, verify: bool) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, after torch.load read from it)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    try:
        start, manifest, combined = _payload_region(f, path, verify)
        payload = torch.load(_Window(f, start), map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), "")
            raise CheckpointError(
                f"checkpoint {path} holds objects that safe loading (weights_only=True) refuses to "
                f"unpickle; lmopt never loads arbitrary pickles. {detail}"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({err})") from None
    except Exception as err:  # a damaged file can fail anywhere in torch's reader
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({first})") from None
    finally:
        f.close()
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an lmopt checkpoint (no '{FORMAT_NAME}' header)")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_FORMAT_VERSIONS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r:.40}"
            + (
                f", newer than this lmopt reads ({FORMAT_VERSION}; written by lmopt "
                f"{payload.get('lmopt_version')}); upgrade lmopt"
                if newer
                else f", not one this lmopt reads ({', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})"
            )
        )
    if manifest is not None:  # the manifest's own fields are not hashed: they must agree with the payload
        for key in _MANIFEST_FIELDS:
            if (combined or key in manifest) and (manifest.get(key) != payload.get(key) or key not in manifest):
                raise CheckpointError(
                    f"checkpoint {path} is corrupted: its manifest's {key} ({manifest.get(key)!r:.40}) differs "
                    f"from the payload's ({payload.get(key)!r:.40}); use an earlier checkpoint"
                )
    return payload


def _check_payload(payload: dict[str, Any], path: Path) -> None:
    """The structure of everything besides the model and optimizer, before anything is loaded."""
    step = payload.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path}: step must be an int >= 0, got {step!r:.40}")
    for key in ("config", "extra"):
        if not isinstance(payload.get(key, {}), dict):
            raise CheckpointError(f"checkpoint {path}: {key} must be a dict, got {type(payload[key]).__name__}")
    for key in ("model", "model_shapes", "model_train_point"):
        if key in payload and not isinstance(payload[key], dict):
            raise CheckpointError(f"checkpoint {path}: {key} must be a dict, got {type(payload[key]).__name__}")
    if "model" not in payload or "model_shapes" not in payload:
        raise CheckpointError(f"checkpoint {path} has no model state")
    for key in ("scheduler", "scaler"):
        if key in payload and not isinstance(payload[key], dict):
            raise CheckpointError(f"checkpoint {path}: {key} state must be a dict, got {type(payload[key]).__name__}")
    if "rng" in payload:
        _check_rng(payload["rng"], path)


def _check_rng(rng: Any, path: Path) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: the saved RNG state is malformed ({what})")

    if not isinstance(rng, dict):
        raise bad("not a dict")
    if "python" in rng:
        py = rng["python"]
        if not (isinstance(py, (tuple, list)) and len(py) == 3 and isinstance(py[1], (tuple, list))):
            raise bad("python")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in py[1]):
            raise bad("python")
    if "numpy" in rng:
        n = rng["numpy"]
        if not isinstance(n, dict) or not isinstance(n.get("keys"), torch.Tensor) or n["keys"].numel() != 624:
            raise bad("numpy")
        if not isinstance(n.get("name"), str) or not all(
            isinstance(n.get(k), (int, float)) for k in ("pos", "has_gauss", "gauss")
        ):
            raise bad("numpy")
    if "torch" in rng and not (isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8):
        raise bad("torch")
    if "cuda" in rng and not (
        isinstance(rng["cuda"], (list, tuple)) and all(isinstance(s, torch.Tensor) for s in rng["cuda"])
    ):
        raise bad("cuda")


def check_model_shapes(saved_payload: Mapping[str, Any], live: Mapping[str, Any], path: Path) -> dict[str, list[int]]:
    """Refuse a checkpoint whose ``model_shapes`` differ from the live model state ``live`` (missing, unexpected or
    differently shaped tensors, named), pointing at the run config it was saved with; returns the live shapes.
    Both layouts use it."""
    saved = saved_payload.get("model_shapes", {})
    current = {k: list(v.shape) for k, v in live.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k])}, model {tuple(current[k])}"
        for k in current
        if k in saved and saved[k] != current[k]
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} tensors differ in shape ({'; '.join(mismatched[:3])})")
        if missing:
            parts.append(f"{len(missing)} model tensors are not in the checkpoint ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint tensors are not in the model ({', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"checkpoint {path} is of another model shape: {'; '.join(parts)}. Build the model "
            f"with the configuration it was saved with (its run config: "
            f"{saved_payload.get('config') or 'not saved'})"
        )
    return current


def _check_model(payload: dict[str, Any], model: nn.Module, path: Path) -> None:
    current = check_model_shapes(payload, model.state_dict(), path)
    for key in ("model", "model_train_point"):
        state = payload.get(key)
        if state is None:
            continue
        for name, shape in current.items():
            value = state.get(name)
            if not isinstance(value, torch.Tensor) or list(value.shape) != shape:
                raise CheckpointError(
                    f"checkpoint {path}: {key}[{name!r}] is not a tensor of shape {tuple(shape)} "
                    f"(the checkpoint is inconsistent)"
                )


def _check_optimizer(payload: dict[str, Any], optimizer: Optimizer, path: Path) -> None:
    if "optimizer" not in payload:
        raise CheckpointError(f"checkpoint {path} has no optimizer state; load it without an optimizer")
    saved = payload.get("optimizer_signature", {})
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path}: optimizer_signature is malformed")
    current = _optimizer_signature(optimizer)
    if saved.get("class") != current["class"]:
        raise CheckpointError(
            f"checkpoint {path} was saved with optimizer {saved.get('class')}; this run uses "
            f"{current['class']}. Resume with the same optimizer, or load only the model "
            f"(optimizer=None) to start a new optimizer from these weights"
        )
    if saved.get("group_shapes") != current["group_shapes"]:
        raise CheckpointError(
            f"checkpoint {path}: the optimizer's param groups differ (saved "
            f"{[len(g) for g in saved.get('group_shapes', []) if isinstance(g, list)]} tensors per group, now "
            f"{[len(g) for g in current['group_shapes']]}, or their shapes differ); "
            f"build the param groups as in the saved run"
        )
    state_dict = payload["optimizer"]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path}: the optimizer state must be a dict")
    groups, state = state_dict.get("param_groups"), state_dict.get("state", {})
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: the optimizer state needs a 'param_groups' list and a 'state' dict")
    for gi, (group, shapes) in enumerate(zip(groups, current["group_shapes"], strict=False)):
        if (
            not isinstance(group, dict)
            or not isinstance(group.get("params"), list)
            or len(group["params"]) != len(shapes)
        ):
            raise CheckpointError(f"checkpoint {path}: optimizer param group {gi} is malformed")
    if len(groups) != len(current["group_shapes"]):
        raise CheckpointError(
            f"checkpoint {path}: the optimizer state has {len(groups)} param groups, not {len(current['group_shapes'])}"
        )
    for key, entry in state.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"checkpoint {path}: optimizer state for parameter {key!r:.40} is not a dict")


def _snapshot(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Optimizer):  # load_state_dict replaces state and groups with new objects
        return dict(obj.__dict__)
    return copy.deepcopy(obj.state_dict())


def _restore(obj: Any, snapshot: Any) -> None:
    if isinstance(obj, Optimizer):
        obj.__dict__.clear()
        obj.__dict__.update(snapshot)
    else:
        obj.load_state_dict(snapshot)


def _load_full_into_shards(
    name: str, obj: Any, source: dict[str, Any], model: nn.Module, payload: dict[str, Any], path: Path
) -> None:
    """A single file's full tensors into a model with DTensor (FSDP2) parameters and its optimizer, through
    torch.distributed.checkpoint.state_dict (each rank keeps its shards; quantized state is re-blocked)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if name == "model":
        set_model_state_dict(model, source, options=options)
        return
    names = (payload.get("optimizer_signature") or {}).get("group_params")
    if not isinstance(names, list) or any(n is None for g in names for n in g):
        raise CheckpointError(
            f"checkpoint {path} does not record its optimizer's parameter names, which loading into sharded "
            f"(FSDP2) parameters needs; load it in one process and save it again with this lmopt"
        )
    index_to_name = {}
    groups = []
    for group, group_names in zip(source["param_groups"], names, strict=True):
        index_to_name.update(zip(group["params"], group_names, strict=True))
        groups.append({**group, "params": list(group_names)})
    by_name = {"state": {index_to_name[k]: v for k, v in source["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, obj, by_name, options=options)
    skipped = source.get("lmopt", {}).get("skipped_steps") if isinstance(source.get("lmopt"), dict) else None
    if isinstance(skipped, int) and hasattr(obj, "skipped_steps"):
        from .dcp import _set_skipped_steps

        _set_skipped_steps(obj, skipped)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
    verify: bool = True,
) -> TrainState:
    """Load a checkpoint safely (``weights_only=True``) into the given objects; return the run's position.

    Everything is checked before anything is changed: the manifest (size, SHA-256), the format version, the
    step, config, RNG, model shapes, the optimizer's class, param groups and state. The optimizer loads first
    (lmopt optimizers validate their whole state before changing anything); if anything fails after that, the
    model, optimizer, scheduler and scaler are restored to their previous state.

    With the optimizer given, a Schedule-Free checkpoint restores the training point y (bit-exact resume);
    without it, the model gets the averaged point x.

    Args:
        verify: check the payload against its manifest (default True). ``verify=False`` is for a trusted file
            whose manifest is lost; it is still loaded with ``weights_only=True``.

    Raises:
        CheckpointError: missing, truncated or corrupted file or manifest; an unsupported format; another model
            shape; another optimizer; malformed state; a scheduler or scaler state the checkpoint lacks.
    """
    path = Path(path)
    if path.is_dir():
        from .dcp import load_sharded_checkpoint

        return load_sharded_checkpoint(
            path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            restore_rng=restore_rng,
            verify=verify,
        )
    payload = _read(path, map_location, verify)
    _check_payload(payload, path)
    if model is not None:
        _check_model(payload, model, path)
    if optimizer is not None:
        _check_optimizer(payload, optimizer, path)
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and name not in payload:
            raise CheckpointError(f"checkpoint {path} has no {name} state; pass {name}=None or start it fresh")
    # the optimizer first (lmopt's validates its whole state before changing anything), the model last: its names
    # and shapes were checked above, so its load cannot fail half-way, and it is not copied (a copy of the weights
    # would double the memory a load needs)
    objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "model": model}
    before = {name: _snapshot(obj) for name, obj in objects.items() if name != "model"}
    weights = payload["model"]
    if optimizer is not None and isinstance(payload.get("model_train_point"), dict):
        weights = payload["model_train_point"]
    sources = {"optimizer": payload.get("optimizer"), "model": weights}
    sources.update({k: payload.get(k) for k in ("scheduler", "scaler")})
    loaded = []
    into_shards = model is not None and any(hasattr(p, "device_mesh") for p in model.parameters())
    try:
        for name, obj in objects.items():
            if obj is not None:
                loaded.append(name)
                if into_shards and name in ("optimizer", "model"):  # FSDP2: full tensors distributed to the shards
                    _load_full_into_shards(name, obj, sources[name], model, payload, path)
                else:
                    obj.load_state_dict(sources[name])
    except Exception as err:
        for done in reversed([n for n in loaded if n in before]):
            try:
                _restore(objects[done], before[done])
            except Exception:  # pragma: no cover - restoring what was there cannot normally fail
                pass
        first = (str(err).splitlines() or [""])[0]
        raise CheckpointError(
            f"checkpoint {path}: the {name} state does not load ({type(err).__name__}: {first}); nothing was changed"
        ) from err
    warnings: list[str] = []
    restored = False
    rank = (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )
    if restore_rng and "rng" in payload and rank != 0:
        # one process's streams: rank 0 takes them; copying them to every rank would make the ranks draw alike
        warnings = [f"a single-file checkpoint holds one process's random streams: rank {rank} keeps its own"]
    elif restore_rng and "rng" in payload:
        warnings = restore_rng_state(payload["rng"])
        restored = True
    return TrainState(
        step=int(payload["step"]),
        data_position=payload.get("data_position"),
        config=dict(payload.get("config") or {}),
        extra=dict(payload.get("extra") or {}),
        path=path,
        lmopt_version=str(payload.get("lmopt_version")),
        rng_restored=restored,
        warnings=warnings,
    )


# --------------------------------------------------------------------------------------------------------
# a directory of checkpoints
# --------------------------------------------------------------------------------------------------------
class CheckpointManager:
    """Numbered checkpoints in a directory, keeping the last ``keep_last``: one file per checkpoint
    (``step-00000100.pt``) or, for a sharded run, one directory (``step-00000100/``, written through
    ``torch.distributed.checkpoint`` by every rank; :mod:`lmopt.train.dcp`).

    Args:
        directory: where checkpoints live (created on the first save).
        keep_last: how many to keep (>= 1; older ones are deleted after each successful save).
        sharded: the layout to write. ``None`` (default) picks the sharded one when a process group of more than
            one rank is initialised or the model holds DTensor parameters (FSDP2), else one file. Under a process
            group every rank calls :meth:`save` and :meth:`load_latest` in the sharded layout; the single file is
            written by the calling process alone (call it on rank 0).

    :meth:`load_latest` finds the newest checkpoint of either layout.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int = 3, sharded: bool | None = None) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if sharded is not None and not isinstance(sharded, bool):
            raise ValueError(f"sharded must be True, False or None (pick by the run), got {sharded!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.sharded = sharded

    def path_for(self, step: int, *, sharded: bool = False) -> Path:
        return self.directory / (f"step-{step:08d}" if sharded else f"step-{step:08d}.pt")

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of both layouts, oldest first (temporaries of interrupted saves are not listed)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_FILE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), 0, p))
            m = _STEP_DIR.match(p.name)
            if m and (p / "manifest.json").is_file():
                found.append((int(m.group(1)), 1, p))
        return [p for *_, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint, or None (a local listing: no collective; a sharded load checks that every rank
        found the same one)."""
        found = self.checkpoints()
        return found[-1] if found else None

    def uses_sharded(self, model: nn.Module | None) -> bool:
        """The layout :meth:`save` writes for ``model``."""
        from .dcp import uses_sharded_checkpoints

        if self.sharded is not None:
            return self.sharded
        return model is not None and uses_sharded_checkpoints(model)

    def save(self, step: int, **kwargs: Any) -> Path:
        """:func:`save_checkpoint` (or :func:`~lmopt.train.dcp.save_sharded_checkpoint`) to the step's name,
        then delete all but the last ``keep_last``."""
        from .dcp import _barrier, _rank, remove_checkpoint, save_sharded_checkpoint

        if not self.uses_sharded(kwargs.get("model")):
            self._remove_stale_temporaries()
            path = save_checkpoint(self.path_for(step), step=step, **kwargs)
            for old in self.checkpoints()[: -self.keep_last]:
                remove_checkpoint(old)
            return path
        if _rank() == 0:
            self._remove_stale_temporaries()
        path = save_sharded_checkpoint(self.path_for(step, sharded=True), step=step, **kwargs)
        if _rank() == 0:
            for old in self.checkpoints()[: -self.keep_last]:
                remove_checkpoint(old)
        _barrier()
        return path

    def load_latest(self, **kwargs: Any) -> TrainState | None:
        """:func:`load_checkpoint` from the newest checkpoint of either layout; None when there is none."""
        path = self.latest()
        return None if path is None else load_checkpoint(path, **kwargs)

    def _remove_stale_temporaries(self) -> None:
        if not self.directory.is_dir():
            return
        mine = f".tmp-{os.getpid()}"
        for p in [*self.directory.glob(".step-*.tmp-*"), *self.directory.glob(".step-*.old-*")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif not p.name.endswith(mine):
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# preemption
# --------------------------------------------------------------------------------------------------------
class PreemptionHandler:
    """Turn SIGTERM / SIGINT into a flag a training loop checks between steps.

    Inside the ``with`` block the first signal sets :attr:`requested` (its name) instead of killing the
    process; the loop then saves a checkpoint and returns. A second signal restores the previous handler and
    re-delivers itself, so a stuck run can still be stopped. Outside the main thread (where Python cannot set
    handlers) the handler does nothing.

    Example:
        >>> with PreemptionHandler() as preempt:
        ...     for step in range(steps):
        ...         train_step()
        ...         if preempt.requested:
        ...             manager.save(step + 1, model=model, optimizer=opt); break
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.requested: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.requested is not None:  # second signal: behave as before we were installed
            signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))
            signal.raise_signal(sig)
            return
        self.requested = sig.name

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
