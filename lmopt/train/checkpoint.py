"""Complete, atomic, safely loadable training checkpoints, and a preemption handler.

A checkpoint holds everything a resume needs: the model, the optimizer (any registry optimizer, quantized
state included), the LR scheduler, the GradScaler, the RNG states (Python, NumPy, torch CPU and CUDA), the
step, the data position, the lmopt version and the run's config. A run stopped at step k and resumed from it
continues bit for bit as if it had not stopped.

Writing is atomic: the payload goes to a temporary file in the same directory, is flushed and fsynced, then
renamed over the final name (and the directory fsynced), so a crash or a kill during a save leaves the
previous checkpoint intact. A small JSON manifest beside each file records its SHA-256 and size, so a
truncated or corrupted file is detected before it is trusted. :class:`CheckpointManager` keeps the last N.

Loading uses ``torch.load(weights_only=True)`` only: a checkpoint from an untrusted source cannot run code.
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

import hashlib
import json
import os
import pickle
import random
import re
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointManager",
    "PreemptionHandler",
    "TrainState",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT_NAME = "lmopt-checkpoint"
#: the checkpoint layout version this lmopt writes (and the newest it reads)
FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


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
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (torch.save writes sequentially)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


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


def _atomic_write(path: Path, write: Any) -> tuple[str, int]:
    """Write through ``write(fileobj)`` to a temporary file, fsync, rename over ``path``; (sha256, size)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return writer.sha256.hexdigest(), writer.size


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _optimizer_signature(optimizer: Optimizer) -> dict[str, Any]:
    cls = type(optimizer)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "group_shapes": [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups],
    }


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
    """Save a complete checkpoint atomically to ``path`` (and its manifest ``path + ".json"``).

    Args:
        path: destination file.
        step: optimizer steps taken.
        model: the model (``state_dict``).
        optimizer, scheduler, scaler: saved with their ``state_dict`` when given.
        data_position: where the data stream stands (plain data: an int, a dict of ints, ...).
        config: the run's configuration (plain data), saved for reproducibility.
        extra: any further plain data (e.g. the health monitor's history).
        rng: save the random generators' states (default True).

    Everything must be plain data or tensors so that ``torch.load(weights_only=True)`` can read it back.
    """
    from .._version import __version__

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_state = model.state_dict()
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lmopt_version": __version__,
        "torch_version": str(torch.__version__),
        "step": step,
        "model": model_state,
        "model_shapes": {k: list(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)},
        "data_position": data_position,
        "config": dict(config or {}),
        "extra": dict(extra or {}),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        payload["optimizer_signature"] = _optimizer_signature(optimizer)
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if rng:
        payload["rng"] = capture_rng_state()
    sha, size = _atomic_write(path, lambda f: torch.save(payload, f))
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lmopt_version": __version__,
        "step": step,
        "sha256": sha,
        "size": size,
        "file": path.name,
    }
    data = json.dumps(manifest, indent=1).encode()
    _atomic_write(_manifest_path(path), lambda f: f.write(data))
    return path


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
def _verify(path: Path) -> dict[str, Any] | None:
    manifest_path = _manifest_path(path)
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"the manifest {manifest_path} is unreadable ({err}); delete it to load {path.name} without verification"
        ) from None
    size = path.stat().st_size
    if size != manifest.get("size"):
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted: {size:,} bytes on disk, "
            f"{manifest.get('size', 0):,} written; use an earlier checkpoint"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != manifest.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its SHA-256 differs from the one recorded when "
            f"it was written; use an earlier checkpoint"
        )
    return manifest


def _read(path: Path, map_location: Any, verify: bool) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if verify:
        _verify(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), "")
            raise CheckpointError(
                f"checkpoint {path} holds objects that safe loading (weights_only=True) refuses to "
                f"unpickle; lmopt never loads arbitrary pickles. {detail}"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({err})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({str(err).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an lmopt checkpoint (no '{FORMAT_NAME}' header)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, newer than this lmopt "
            f"reads ({FORMAT_VERSION}; written by lmopt {payload.get('lmopt_version')}); "
            f"upgrade lmopt"
        )
    return payload


def _check_model(payload: dict[str, Any], model: nn.Module, path: Path) -> None:
    saved = payload.get("model_shapes", {})
    current = {k: list(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
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
            f"{payload.get('config') or 'not saved'})"
        )


def _check_optimizer(payload: dict[str, Any], optimizer: Optimizer, path: Path) -> None:
    if "optimizer" not in payload:
        raise CheckpointError(f"checkpoint {path} has no optimizer state; load it without an optimizer")
    saved = payload.get("optimizer_signature", {})
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
            f"{[len(g) for g in saved.get('group_shapes', [])]} tensors per group, now "
            f"{[len(g) for g in current['group_shapes']]}, or their shapes differ); "
            f"build the param groups as in the saved run"
        )


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

    Everything is checked before anything is changed: model shapes, the optimizer's class and param groups.

    Raises:
        CheckpointError: missing, truncated or corrupted file; newer format; another model shape; another
            optimizer; a scheduler or scaler state the checkpoint lacks.
    """
    path = Path(path)
    payload = _read(path, map_location, verify)
    if model is not None:
        _check_model(payload, model, path)
    if optimizer is not None:
        _check_optimizer(payload, optimizer, path)
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and name not in payload:
            raise CheckpointError(f"checkpoint {path} has no {name} state; pass {name}=None or start it fresh")
    if model is not None:
        model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(payload["scaler"])
    warnings: list[str] = []
    restored = False
    if restore_rng and "rng" in payload:
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
    """Numbered checkpoints (``step-00000100.pt``) in a directory, keeping the last ``keep_last``.

    Args:
        directory: where checkpoints live (created on the first save).
        keep_last: how many to keep (>= 1; older ones are deleted after each successful save).
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int = 3) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.pt"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary files of interrupted saves are not listed)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_FILE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, **kwargs: Any) -> Path:
        """:func:`save_checkpoint` to ``step-<step>.pt``, then delete all but the last ``keep_last``."""
        self._remove_stale_temporaries()
        path = save_checkpoint(self.path_for(step), step=step, **kwargs)
        for old in self.checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)
            _manifest_path(old).unlink(missing_ok=True)
        return path

    def load_latest(self, **kwargs: Any) -> TrainState | None:
        """:func:`load_checkpoint` from the newest checkpoint; None when there is none."""
        path = self.latest()
        return None if path is None else load_checkpoint(path, **kwargs)

    def _remove_stale_temporaries(self) -> None:
        if not self.directory.is_dir():
            return
        mine = f".tmp-{os.getpid()}"
        for p in self.directory.glob(".step-*.tmp-*"):
            if not p.name.endswith(mine):
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
