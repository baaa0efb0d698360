"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), atomic and resumable at another world size.

A sharded checkpoint is a directory ``step-<step>/``:

* DCP's files (``.metadata``, ``__<rank>_0.distcp``): the model and the optimizer, as
  ``torch.distributed.checkpoint.state_dict.get_state_dict`` gives them (keys by parameter name, each rank
  writing its own shards);
* ``common.pt``: step, data position, config, extra, scheduler, GradScaler, the optimizer's class and param
  groups, the model's global shapes, the world size and versions (rank 0 writes it);
* ``rng-<rank>.pt``: each rank's RNG states (Python, NumPy, torch CPU and CUDA);
* ``manifest.json``, written last: the SHA-256 and size of every other file.

Saving is atomic: every rank writes into ``.step-<step>.tmp-<token>/``; after a barrier rank 0 hashes every file,
writes the manifest, checks that what is on disk loads back, and renames the directory to its final name (then
the older checkpoints beyond ``keep_last`` are deleted). A process killed at any point leaves the previous
checkpoints as they were and, at worst, a temporary directory that listing ignores and the next save deletes.

Loading checks the manifest (every file's size and hash, by rank 0, the verdict shared with every rank), the
optimizer's class and the model's names and global shapes before anything changes; then DCP reads into copies
of the live state (so a failure leaves the model and optimizer as they were) and ``set_state_dict`` installs
them. Everything is read without running code: ``common.pt`` and ``rng-*.pt`` with ``weights_only=True``, DCP's
pickled metadata with an unpickler that accepts DCP's own records only, and DCP's non-tensor entries (Python
numbers in the optimizer state) with ``weights_only=True`` too (DCP's default planner does not).

**Another world size.** The model's DTensors and every optimizer state entry whose global shape does not depend
on the sharding are resharded by DCP itself. lmopt's quantized state (8/4-bit ``<name>_codes`` /
``<name>_scales``) is blockwise per shard, so its global size depends on the number of shards it was computed
on (``<name>_shards``): where the saved and the current sizes differ, the entry is read whole (a plain tensor in
the saved slot layout) and the optimizer's ``load_state_dict`` requantizes it into the current blocks (a
``UserWarning`` "requantized ..."; each value moves by at most one rounding, docs/low-bit-state.md); where they
agree (same world size) it is copied bit for bit. RNG states restore per rank at the same world size; at another,
rank ``r`` takes the saved rank ``r``'s states where there is one, and ranks beyond the saved world size keep
theirs (a warning says so).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ..optim.schedule_free import schedule_free_mode
from .checkpoint import (
    FORMAT_NAME,
    CheckpointError,
    TrainState,
    _check_rng,
    _fsync_dir,
    _plain,
    capture_rng_state,
    check_model_shapes,
    restore_rng_state,
)

__all__ = [
    "SHARDED_FORMAT_VERSION",
    "convert_checkpoint",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
    "read_sharded_manifest",
    "save_sharded_checkpoint",
    "uses_sharded_checkpoints",
]

SHARDED_FORMAT_NAME = FORMAT_NAME + "-dcp"
#: the sharded layout version this lmopt writes (and the newest it reads)
SHARDED_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMMON = "common.pt"
_CHUNK = 1 << 24


# --------------------------------------------------------------------------------------------------------
# process group helpers (all of them work, as no-ops, without a process group)
# --------------------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank."""
    if not _distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank failed (never a hang with some ranks waiting in a collective): the
    failing rank its own error, the others a :class:`CheckpointError` naming it."""
    message = None if error is None else f"rank {_rank()}: {type(error).__name__}: {error}"
    if _distributed():
        everyone: list[Any] = [None] * _world_size()
        dist.all_gather_object(everyone, message)
        failed = [m for m in everyone if m is not None]
    else:
        failed = [message] if message is not None else []
    if failed:
        if error is not None:  # this rank's own error, as raised
            raise error
        raise CheckpointError(f"{what} failed: {failed[0]}")


class _quiet_single_process(warnings.catch_warnings):
    """DCP warns that it assumes one process whenever no process group is initialised: that is the intent here."""

    def __enter__(self) -> Any:
        out = super().__enter__()
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return out


def _as_checkpoint_error(error: BaseException | None, path: Path, what: str) -> BaseException | None:
    """A load failure as a one-line :class:`CheckpointError` (what a caller of load_checkpoint catches)."""
    if error is None or isinstance(error, (CheckpointError, KeyboardInterrupt)):
        return error
    first = (str(error).splitlines() or [""])[0][:300]
    wrapped = CheckpointError(f"{what} failed ({type(error).__name__}: {first}); nothing was changed")
    wrapped.__cause__ = error
    return wrapped


def _has_dtensors(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") and hasattr(p, "to_local") for p in model.parameters())


def uses_sharded_checkpoints(model: nn.Module) -> bool:
    """Whether :class:`~lmopt.train.CheckpointManager` picks the sharded layout for ``model`` by default: a
    process group of more than one rank is initialised, or the model holds DTensor parameters (FSDP2)."""
    return _world_size() > 1 or _has_dtensors(model)


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete sharded checkpoint (a directory with its manifest)."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


# --------------------------------------------------------------------------------------------------------
# reading DCP's files without running code
# --------------------------------------------------------------------------------------------------------
_SAFE_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided by name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle: accept DCP's metadata records, torch sizes and dtypes, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"the checkpoint's DCP metadata refers to {module}.{name}, which lmopt does not unpickle "
            f"(only DCP's own metadata records)"
        )


def _read_metadata(path: Path) -> Any:
    try:
        with open(path / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise CheckpointError(f"sharded checkpoint {path}: DCP's metadata is unreadable ({err})") from None


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self) -> Any:
            metadata = _read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _load_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import set_element  # noqa: F401 (present in torch >= 2.2)

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, reading non-tensor entries with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


# --------------------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------------------
def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_manifest(directory: Path, fields: dict[str, Any]) -> None:
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            sha, size = _hash_file(p)
            files[p.name] = {"sha256": sha, "size": size}
    manifest = {**fields, "files": files}
    target = directory / MANIFEST
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_sharded_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a sharded checkpoint (format, version, step, world size, every file's hash and size)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: not a complete sharded checkpoint") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"sharded checkpoint {path}: its manifest is unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT_NAME:
        raise CheckpointError(f"{path} is not an lmopt sharded checkpoint (no '{SHARDED_FORMAT_NAME}' manifest)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SHARDED_FORMAT_VERSION:
        raise CheckpointError(
            f"sharded checkpoint {path} has format version {version!r:.40}; this lmopt reads "
            f"1..{SHARDED_FORMAT_VERSION}" + ("; upgrade lmopt" if isinstance(version, int) else "")
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise CheckpointError(f"sharded checkpoint {path}: its manifest lists no files")
    return manifest


def _verify(path: Path) -> dict[str, Any]:
    manifest = read_sharded_manifest(path)
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or "/" in name or name.startswith(".."):
            raise CheckpointError(f"sharded checkpoint {path}: its manifest entry {name!r:.60} is malformed")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"sharded checkpoint {path} is incomplete: {name} is missing")
        sha, size = _hash_file(file)
        if size != entry.get("size"):
            raise CheckpointError(
                f"sharded checkpoint {path} is truncated or corrupted: {name} has {size:,} bytes, "
                f"{entry.get('size')!r} were written; use an earlier checkpoint"
            )
        if sha != entry.get("sha256"):
            raise CheckpointError(
                f"sharded checkpoint {path} is corrupted: the SHA-256 of {name} differs from the one recorded "
                f"when it was written; use an earlier checkpoint"
            )
    for needed in (".metadata", COMMON):
        if needed not in manifest["files"]:
            raise CheckpointError(f"sharded checkpoint {path} is incomplete: its manifest has no {needed}")
    return manifest


# --------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------
def _optimizer_signature(optim_state: dict[str, Any], optimizer: Optimizer) -> dict[str, Any]:
    cls = type(optimizer)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "group_params": [list(g["params"]) for g in optim_state["param_groups"]],
    }


def _clone(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return copy.deepcopy(tree)


def _state_dicts(model: nn.Module, optimizer: Optimizer | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model), None
    return get_state_dict(model, optimizer)


def save_sharded_checkpoint(
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
    """Save a sharded checkpoint to the directory ``path`` (collective: every rank calls it).

    Arguments as :func:`~lmopt.train.save_checkpoint`. Model and optimizer go through
    ``torch.distributed.checkpoint`` (each rank writes its shards); RNG states are saved per rank. Written into a
    temporary directory, verified (manifest of hashes) and renamed by rank 0 after a barrier; a failure on any
    rank raises on every rank and leaves any previous checkpoint at ``path`` untouched.
    """

    from .._version import __version__

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("config", config), ("extra", extra)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    path = Path(path)
    common: dict[str, Any] = {
        "format": SHARDED_FORMAT_NAME,
        "format_version": SHARDED_FORMAT_VERSION,
        "lmopt_version": __version__,
        "torch_version": str(torch.__version__),
        "step": step,
        "world_size": _world_size(),
        "data_position": _plain(data_position, "data_position"),
        "config": _plain(dict(config or {}), "config"),
        "extra": _plain(dict(extra or {}), "extra"),
    }
    token = _from_rank0(f"{os.getpid()}-{time.time_ns()}")
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    error: BaseException | None = None
    try:
        if _rank() == 0:
            tmp.mkdir(parents=True)
    except BaseException as err:
        error = err
    _agree(error, f"creating {tmp}")
    try:
        _save_into(tmp, path, common, model, optimizer, scheduler, scaler, rng)
    except BaseException:
        if _rank() == 0:  # a failed save leaves no temporary behind (a killed one does; the next save cleans it)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_into(
    tmp: Path,
    path: Path,
    common: dict[str, Any],
    model: nn.Module,
    optimizer: Optimizer | None,
    scheduler: Any,
    scaler: Any,
    rng: bool,
) -> None:
    import torch.distributed.checkpoint as dcp

    error: BaseException | None = None
    try:
        model_sd, optim_sd = _state_dicts(model, optimizer)
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None and schedule_free_mode(optimizer) == "train":
            # as save_checkpoint: the weights saved as "model" are the averaged point x, the training point y
            # is saved beside them so that a resume with the optimizer continues bit for bit
            params = [p for g in optimizer.param_groups for p in g["params"]]
            held = [p.detach().clone() for p in params]
            state["model_train_point"] = _clone(model_sd)
            optimizer.eval()
            try:
                state["model"] = _clone(_state_dicts(model, None)[0])
            finally:
                optimizer.train()
                with torch.no_grad():  # train() after eval() is not bit-exact: put y back as it was
                    for p, y in zip(params, held, strict=True):
                        p.copy_(y)
        if optim_sd is not None:
            state["optimizer"] = optim_sd
            common["optimizer_signature"] = _optimizer_signature(optim_sd, optimizer)
            if hasattr(optimizer, "skipped_steps"):  # lmopt's own entry, which get_state_dict leaves out
                common["optimizer_lmopt"] = {"skipped_steps": int(optimizer.skipped_steps)}
        common["model_shapes"] = {k: list(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
        common["schedule_free_point"] = "model_train_point" in state
        if scheduler is not None:
            common["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            common["scaler"] = scaler.state_dict()
    except BaseException as err:
        error = err
    _agree(error, "collecting the state to save")
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp))
        if rng:
            rng_file = tmp / f"rng-{_rank():05d}.pt"
            torch.save(capture_rng_state(), rng_file)
            _fsync_file(rng_file)
        if _rank() == 0:
            torch.save(common, tmp / COMMON)
            _fsync_file(tmp / COMMON)
    except BaseException as err:
        error = err
    _agree(error, f"writing {tmp}")
    try:
        if _rank() == 0:
            _commit(tmp, path, common)
    except BaseException as err:
        error = err
    _agree(error, f"committing {path}")


def _commit(tmp: Path, path: Path, common: dict[str, Any]) -> None:
    """Rank 0, after every rank wrote: manifest, read-back, rename."""
    fields = {k: common[k] for k in ("format", "format_version", "lmopt_version", "step", "world_size")}
    _write_manifest(tmp, fields)
    _fsync_dir(tmp)
    _verify(tmp)  # what is on disk hashes as written and its parts parse, before it replaces anything
    _read_metadata(tmp)
    torch.load(tmp / COMMON, weights_only=True, map_location="cpu")
    if path.exists():  # the same step saved again: the old one goes only once the new one is in place
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
def _get(tree: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        if isinstance(tree, dict) and k in tree:
            tree = tree[k]
        elif isinstance(tree, list) and isinstance(k, int) and 0 <= k < len(tree):
            tree = tree[k]
        else:
            return None
    return tree


def _target(metadata: Any, live: dict[str, Any], top: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    """What DCP reads into: copies of the live tensors where the saved global shape and dtype agree (DCP
    reshards them), a plain tensor of the saved shape where they do not (quantized state computed on another
    number of shards: read whole, requantized by ``load_state_dict``); saved non-tensor entries of the optimizer
    state are read as they were saved. Returns the target and the names read whole."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    target = {name: _clone(live[name]) for name in top if name in live}
    whole = []
    state_root = target.get("optimizer", {}).get("state") if "optimizer" in target else None
    if state_root is not None:
        state_root.clear()  # rebuilt from what was saved: keys the fresh optimizer lacks are read too
    for fqn, meta in metadata.state_dict_metadata.items():
        keys = metadata.planner_data.get(fqn) if metadata.planner_data else None
        if keys is None or keys[0] not in target:
            continue
        keys = tuple(keys)
        if keys[0] == "optimizer" and (len(keys) < 3 or keys[1] != "state"):
            continue  # param_groups: loaded into the live structure
        if keys[0] != "optimizer":
            continue  # model tensors: the live copies, resharded by DCP
        current = _get(live, keys)
        if isinstance(meta, TensorStorageMetadata):
            if (
                isinstance(current, torch.Tensor)
                and tuple(current.shape) == tuple(meta.size)
                and current.dtype == meta.properties.dtype
            ):
                value: Any = current.detach().clone()
            else:
                value = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                if isinstance(current, torch.Tensor):
                    whole.append(".".join(map(str, keys[2:])))
        else:
            value = current
        node = target["optimizer"]["state"]
        for k in keys[2:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return target, whole


def load_sharded_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> TrainState:
    """Load a sharded checkpoint (collective: every rank calls it) into the given objects, at any world size.

    Arguments and result as :func:`~lmopt.train.load_checkpoint`. The manifest is verified by rank 0 (every
    file's size and SHA-256; ``verify=False`` skips it), the optimizer's class, param groups and the model's
    names and global shapes are checked, all before anything changes. See the module docstring for another
    world size (quantized state requantized where its blocks do not align, RNG streams per rank).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    error: BaseException | None = None
    try:
        if not path.is_dir():
            raise CheckpointError(f"no sharded checkpoint at {path}")
        first = _from_rank0(str(path.resolve()))
        if first != str(path.resolve()):
            raise CheckpointError(
                f"rank {_rank()} loads {path}, rank 0 loads {first}: every rank must load the same checkpoint "
                f"(a directory every rank sees the same way: a shared file system)"
            )
        if _rank() == 0:
            if verify:
                _verify(path)
            else:
                read_sharded_manifest(path)
    except BaseException as err:
        error = err
    _agree(_as_checkpoint_error(error, path, f"verifying {path}"), f"verifying {path}")
    try:
        try:
            common = torch.load(path / COMMON, weights_only=True, map_location="cpu")
        except Exception as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"sharded checkpoint {path}: {COMMON} does not load ({first})") from None
        _check_common(common, path)
        live_model, live_optim = _state_dicts(model, optimizer) if model is not None else ({}, None)
        if model is not None:
            check_model_shapes(common, live_model, path)
        if optimizer is not None:
            if model is None:
                raise CheckpointError("loading an optimizer from a sharded checkpoint needs its model too")
            _check_optimizer(common, live_optim, optimizer, path)
        for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None and name not in common:
                raise CheckpointError(f"checkpoint {path} has no {name} state; pass {name}=None or start it fresh")
    except BaseException as err:
        error = err
    _agree(_as_checkpoint_error(error, path, f"checking {path}"), f"checking {path}")
    if model is None:
        return _finish(common, path, scheduler, scaler, restore_rng)
    try:
        metadata = _read_metadata(path)
        weights_key = "model"
        if optimizer is not None and common.get("schedule_free_point"):
            weights_key = "model_train_point"
        live = {weights_key: live_model}
        if optimizer is not None:
            live["optimizer"] = live_optim
        target, whole = _target(metadata, live, tuple(live))
    except BaseException as err:
        error = err
    _agree(_as_checkpoint_error(error, path, f"preparing to read {path}"), f"preparing to read {path}")
    try:
        with _quiet_single_process():
            dcp.load(target, checkpoint_id=str(path), storage_reader=_reader(path), planner=_load_planner())
    except BaseException as err:
        error = err
    _agree(_as_checkpoint_error(error, path, f"reading {path}"), f"reading {path}")
    before = dict(optimizer.__dict__) if optimizer is not None else None
    try:
        with warnings.catch_warnings():
            if whole:  # the requantization is announced once, below, not per entry
                warnings.filterwarnings("ignore", message=".*requantiz.*")
            if optimizer is not None:
                set_state_dict(
                    model, optimizer, model_state_dict=target[weights_key], optim_state_dict=target["optimizer"]
                )
            else:
                set_model_state_dict(model, target[weights_key])
        if optimizer is not None and isinstance(common.get("optimizer_lmopt"), dict):
            _set_skipped_steps(optimizer, int(common["optimizer_lmopt"].get("skipped_steps", 0)))
    except BaseException as err:
        if optimizer is not None and before is not None:
            optimizer.__dict__.clear()
            optimizer.__dict__.update(before)
        error = err
    _agree(_as_checkpoint_error(error, path, f"installing the state of {path}"), f"installing the state of {path}")
    state = _finish(common, path, scheduler, scaler, restore_rng)
    if whole:
        state.warnings.append(
            f"{len(whole)} quantized state entries were saved on {common['world_size']} ranks with blocks that "
            f"do not align with this run's shards: requantized ({', '.join(whole[:3])}"
            + (", ..." if len(whole) > 3 else "")
            + ")"
        )
        warnings.warn(state.warnings[-1], UserWarning, stacklevel=2)
    return state


def _set_skipped_steps(optimizer: Any, value: int) -> None:
    """lmopt's own state entry, which DCP's get_state_dict leaves out; wrappers (Lookahead) hold it in the inner
    optimizer."""
    while isinstance(getattr(type(optimizer), "skipped_steps", None), property) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if hasattr(optimizer, "skipped_steps"):
        optimizer.skipped_steps = value


def _finish(common: dict[str, Any], path: Path, scheduler: Any, scaler: Any, restore_rng: bool) -> TrainState:
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(common["scaler"])
    notes: list[str] = []
    restored = False
    if restore_rng:
        saved_world = int(common.get("world_size", 1))
        rng_file = path / f"rng-{_rank():05d}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True, map_location="cpu")
            _check_rng(rng, rng_file)
            notes += restore_rng_state(rng)
            restored = True
            if saved_world != _world_size():
                notes.append(
                    f"saved on {saved_world} ranks, loaded on {_world_size()}: rank {_rank()} took the saved "
                    f"rank {_rank()}'s random streams"
                )
        elif _rank() < saved_world:
            notes.append(f"the checkpoint has no RNG state for rank {_rank()} (saved with rng=False)")
        else:
            notes.append(f"saved on {saved_world} ranks: rank {_rank()} has no saved random streams and keeps its own")
    return TrainState(
        step=int(common["step"]),
        data_position=common.get("data_position"),
        config=dict(common.get("config") or {}),
        extra=dict(common.get("extra") or {}),
        path=path,
        lmopt_version=str(common.get("lmopt_version")),
        rng_restored=restored,
        warnings=notes,
    )


def _check_common(common: Any, path: Path) -> None:
    if not isinstance(common, dict) or common.get("format") != SHARDED_FORMAT_NAME:
        raise CheckpointError(f"{path} is not an lmopt sharded checkpoint ({COMMON} has no '{SHARDED_FORMAT_NAME}')")
    step = common.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"sharded checkpoint {path}: step must be an int >= 0, got {step!r:.40}")
    for key in ("scheduler", "scaler", "config", "extra", "model_shapes"):
        if key in common and not isinstance(common[key], dict):
            raise CheckpointError(f"sharded checkpoint {path}: {key} must be a dict")


def _check_optimizer(common: dict[str, Any], live: dict[str, Any] | None, optimizer: Optimizer, path: Path) -> None:
    saved = common.get("optimizer_signature")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} has no optimizer state; load it without an optimizer")
    current = _optimizer_signature(live or {"param_groups": []}, optimizer)
    if saved.get("class") != current["class"]:
        raise CheckpointError(
            f"checkpoint {path} was saved with optimizer {saved.get('class')}; this run uses {current['class']}. "
            f"Resume with the same optimizer, or load only the model (optimizer=None) to start a new optimizer "
            f"from these weights"
        )
    if saved.get("group_params") != current["group_params"]:
        raise CheckpointError(
            f"checkpoint {path}: the optimizer's param groups differ (saved "
            f"{[len(g) for g in saved.get('group_params') or []]} parameters per group, now "
            f"{[len(g) for g in current['group_params']]}, or other names); build the param groups as in the "
            f"saved run"
        )


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint of either layout (rank 0 only for a sharded one)."""
    if path.is_dir():
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# conversion between the single-file and the sharded layout
# --------------------------------------------------------------------------------------------------------
def _read_whole(path: Path) -> dict[str, Any]:
    """Every entry of a sharded checkpoint's DCP files as plain full tensors, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _read_metadata(path)
    tree: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        keys = tuple(metadata.planner_data[fqn]) if metadata.planner_data else tuple(fqn.split("."))
        is_tensor = isinstance(meta, TensorStorageMetadata)
        _put(tree, keys, torch.empty(tuple(meta.size), dtype=meta.properties.dtype) if is_tensor else None)
    with _quiet_single_process():
        dcp.load(tree, checkpoint_id=str(path), storage_reader=_reader(path), planner=_load_planner(), no_dist=True)
    return tree


def _put(tree: Any, keys: tuple[Any, ...], value: Any) -> None:
    """Set ``tree[k0][k1]...`` = value, creating dicts (str keys) and lists (int keys: param_groups) on the way."""
    node = tree
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        fresh: Any = value if last else ([] if isinstance(keys[i + 1], int) else {})
        if isinstance(node, list):
            node.extend([None] * (k + 1 - len(node)))
            if last or node[k] is None:
                node[k] = fresh
            node = node[k]
        else:
            if last:
                node[k] = fresh
            node = node.setdefault(k, fresh)


def _single_to_sharded(src: Path, dst: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    from .checkpoint import _check_payload, _read

    payload = _read(src, "cpu", True)
    _check_payload(payload, src)
    state: dict[str, Any] = {"model": payload["model"]}
    if isinstance(payload.get("model_train_point"), dict):
        state["model_train_point"] = payload["model_train_point"]
    common = {k: payload.get(k) for k in ("lmopt_version", "torch_version", "step", "data_position")}
    common.update(
        format=SHARDED_FORMAT_NAME,
        format_version=SHARDED_FORMAT_VERSION,
        world_size=1,
        config=payload.get("config") or {},
        extra=payload.get("extra") or {},
        model_shapes=payload["model_shapes"],
        schedule_free_point="model_train_point" in state,
        converted_from=src.name,
    )
    for key in ("scheduler", "scaler"):
        if key in payload:
            common[key] = payload[key]
    if "optimizer" in payload:
        signature = payload.get("optimizer_signature") or {}
        names = signature.get("group_params")
        if not isinstance(names, list) or any(n is None for g in names for n in g):
            raise CheckpointError(
                f"checkpoint {src} does not record its optimizer's parameter names (written by an lmopt before "
                f"sharded checkpoints): load it and save it again with this lmopt, then convert"
            )
        optim = payload["optimizer"]
        index_to_name = {}
        groups = []
        for group, group_names in zip(optim["param_groups"], names, strict=True):
            index_to_name.update(zip(group["params"], group_names, strict=True))
            groups.append({**group, "params": list(group_names)})
        state["optimizer"] = {
            "state": {index_to_name[k]: v for k, v in optim["state"].items()},
            "param_groups": groups,
        }
        common["optimizer_signature"] = {"class": signature.get("class"), "group_params": names}
        if isinstance(optim.get("lmopt"), dict):
            common["optimizer_lmopt"] = optim["lmopt"]
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir(parents=True)
    try:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
        if "rng" in payload:
            torch.save(payload["rng"], tmp / "rng-00000.pt")
        torch.save(common, tmp / COMMON)
        _commit(tmp, dst, common)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _sharded_to_single(src: Path, dst: Path) -> Path:
    from .checkpoint import FORMAT_VERSION, _commit_payload

    _verify(src)
    common = torch.load(src / COMMON, weights_only=True, map_location="cpu")
    _check_common(common, src)
    tree = _read_whole(src)
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **{k: common.get(k) for k in ("lmopt_version", "torch_version", "step", "data_position")},
        "config": common.get("config") or {},
        "extra": common.get("extra") or {},
        "model": tree["model"],
        "model_shapes": common["model_shapes"],
    }
    if "model_train_point" in tree:
        payload["model_train_point"] = tree["model_train_point"]
    if "optimizer" in tree:
        signature = common["optimizer_signature"]
        names = signature["group_params"]
        name_to_index = {n: i for i, n in enumerate(n for g in names for n in g)}
        optim = tree["optimizer"]
        groups = [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in optim["param_groups"]]
        payload["optimizer"] = {
            "state": {name_to_index[k]: v for k, v in optim.get("state", {}).items()},
            "param_groups": groups,
        }
        if isinstance(common.get("optimizer_lmopt"), dict):
            payload["optimizer"]["lmopt"] = common["optimizer_lmopt"]
        shapes = common["model_shapes"]
        payload["optimizer_signature"] = {
            "class": signature["class"],
            "group_shapes": [[shapes[n] for n in g] for g in names],
            "group_params": names,
        }
    for key in ("scheduler", "scaler"):
        if key in common:
            payload[key] = common[key]
    rng_file = src / "rng-00000.pt"
    if rng_file.is_file():
        payload["rng"] = torch.load(rng_file, weights_only=True, map_location="cpu")
    return _commit_payload(dst, payload)


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Convert a checkpoint between the single-file layout and the sharded (DCP) one, in one process.

    ``src`` a single file (``step-N.pt``) -> ``dst`` a sharded directory; ``src`` a sharded directory -> ``dst``
    a single file (its shards gathered into full tensors: the whole model and optimizer in this process's
    memory). Either result loads at any world size with :func:`~lmopt.train.load_checkpoint` /
    :class:`~lmopt.train.CheckpointManager`; quantized state keeps its saved blocks and is re-blocked by the
    optimizer when loaded (see :mod:`lmopt.train.dcp`). RNG states: rank 0's. Both sides are verified (hashes)
    and ``dst`` is written atomically.

    Raises:
        CheckpointError: ``src`` is missing, corrupted or not an lmopt checkpoint; ``dst`` exists (pass
            ``overwrite=True``); a single file without parameter names (written before lmopt had sharded
            checkpoints: load and save it again first).
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"no checkpoint at {src}")
    if dst.exists() and not overwrite:
        raise CheckpointError(
            f"{dst} exists; choose another destination or pass overwrite=True (lmopt checkpoint convert --overwrite)"
        )
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"source and destination are the same path ({src})")
    if src.is_dir():
        if dst.is_dir():
            raise CheckpointError(f"{dst} is a directory; a sharded checkpoint converts to a file (e.g. step-N.pt)")
        return _sharded_to_single(src, dst)
    if dst.is_file():
        raise CheckpointError(f"{dst} is a file; a single-file checkpoint converts to a directory")
    return _single_to_sharded(src, dst)
