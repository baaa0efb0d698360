"""Memory-mapped optimizer state: state tensors backed by files, for CPU runs whose state does not fit in RAM.

:func:`map_state` moves every state tensor of an optimizer into a file of its own in a directory the user names
(``torch.from_file(..., shared=True)``: a shared file mapping, so in-place updates write through to the page cache
and the kernel writes them back). After every step the mapped pages are released from the process
(``madvise(MADV_DONTNEED)``: for a shared file mapping the data stays in the file / page cache): between steps the
process holds parameters and gradients, not the state, and during a step the state is paged in as the step walks
it. Under memory pressure the kernel evicts those pages (writing dirty ones back) instead of the run dying, which
is what makes state larger than RAM trainable, at the disk's speed.

For lmopt's optimizers the state is created directly in the files (a step pre-hook builds each parameter's state
before the first step touches it); for other optimizers it is created by their first step and moved right after.
``load_state_dict`` moves the loaded state into the files at once. ``state_dict()`` holds the mapped tensors:
``torch.save`` reads them like any tensor, so checkpoints work unchanged (and load anywhere as plain tensors).

Linux only (``madvise`` through libc); the files are the user's to delete after training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["DEFAULT_MIN_NUMEL", "map_state", "mapped_bytes", "mapped_resident_bytes", "release_mapped_pages"]

#: state tensors with fewer elements stay in memory (step counters, small vectors); the memory planner's
#: ``mapped_state`` uses the same threshold
DEFAULT_MIN_NUMEL = 4096

_MADV_DONTNEED = 4
_libc: Any = None


def _madvise() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise


def _file_tensor(path: Path, like: Tensor) -> Tensor:
    nbytes = like.numel() * like.element_size()
    with open(path, "wb") as f:  # sized (sparse) before mapping
        f.truncate(max(nbytes, 1))
    mapped = torch.from_file(str(path), shared=True, size=max(like.numel(), 1), dtype=like.dtype)
    mapped = mapped[: like.numel()].view(like.shape)
    mapped.copy_(like)
    return mapped


class _Mapper:
    def __init__(self, optimizer: Optimizer, directory: Path, min_numel: int) -> None:
        self.optimizer = optimizer
        self.directory = directory
        self.min_numel = min_numel
        # storage address -> file, for the tensors this mapper created (not a tensor attribute: torch.save would
        # carry it into checkpoints)
        self.files: dict[int, str] = {}

    def is_mapped(self, t: Any) -> bool:
        return isinstance(t, Tensor) and self.files.get(t.untyped_storage().data_ptr()) is not None

    def _index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}

    def move(self) -> None:
        """Move every state tensor not yet in a file into one (in place in the state dicts)."""
        index = self._index()
        moved = False
        for p, state in self.optimizer.state.items():
            i = index.get(id(p))
            if i is None:
                continue
            for key, value in list(state.items()):
                if not isinstance(value, Tensor) or self.is_mapped(value) or value.device.type != "cpu":
                    continue
                if value.numel() < self.min_numel or value.is_sparse:
                    continue
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(key))
                path = self.directory / f"param{i}.{safe}.bin"
                mapped = _file_tensor(path, value.detach())
                self.files[mapped.untyped_storage().data_ptr()] = str(path)
                state[key] = mapped
                moved = True
        if moved:  # forget files whose tensors were replaced (a load): only when something new was mapped
            live = {v.untyped_storage().data_ptr() for st in self.optimizer.state.values() for v in st.values()
                    if isinstance(v, Tensor)}  # fmt: skip
            self.files = {ptr: f for ptr, f in self.files.items() if ptr in live}

    def pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        init = getattr(optimizer, "_init_state", None)
        if init is not None:  # lmopt's optimizers: create each new state straight in its files
            created = False
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not optimizer.state[p]:
                        init(group, p, optimizer.state[p])
                        created = True
            if created:
                self.move()

    def post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.move()
        release_mapped_pages(optimizer)

    def post_load(self, optimizer: Optimizer) -> None:
        self.move()
        release_mapped_pages(optimizer)

    def tensors(self) -> list[Tensor]:
        return [v for state in self.optimizer.state.values() for v in state.values() if self.is_mapped(v)]


def map_state(
    optimizer: Optimizer, directory: str | os.PathLike[str], *, min_numel: int = DEFAULT_MIN_NUMEL
) -> Optimizer:
    """Keep ``optimizer``'s state in files under ``directory`` (created if missing; see the module docstring).

    Args:
        optimizer: any torch optimizer (lmopt's create their state directly in the files).
        directory: where the state files go (one per state tensor, ``param<i>.<key>.bin``); an existing directory
            holding files other than lmopt's state files is refused, so nothing of the user's is overwritten.
        min_numel: tensors with fewer elements (step counters, small vectors) stay in memory (default 4096).

    Returns:
        the optimizer itself (hooks registered on it).

    Raises:
        ValueError: ``directory`` is a file or holds other files, or ``min_numel`` is not an int >= 1.
        OSError: not Linux (``madvise`` is needed to release the pages).
    """
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 1:
        raise ValueError(f"min_numel must be an integer >= 1, got {min_numel!r}")
    if not os.uname().sysname == "Linux":
        raise OSError("map_state needs Linux (madvise releases the mapped pages between steps)")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"directory {str(path)!r} is a file; pass a directory for the state files")
    path.mkdir(parents=True, exist_ok=True)
    foreign = [f.name for f in path.iterdir() if not re.fullmatch(r"param\d+\..+\.bin", f.name)]
    if foreign:
        raise ValueError(
            f"directory {str(path)!r} holds other files ({', '.join(sorted(foreign)[:3])}); pass an empty directory "
            "or one used for lmopt's state files before"
        )
    mapper = _Mapper(optimizer, path, min_numel)
    optimizer.register_step_pre_hook(mapper.pre_step)
    optimizer.register_step_post_hook(mapper.post_step)
    optimizer.register_load_state_dict_post_hook(mapper.post_load)
    mapper.move()  # state that exists already (a resumed optimizer)
    optimizer._lmopt_mapper = mapper  # type: ignore[attr-defined]
    return optimizer


def _mapper(optimizer: Optimizer) -> _Mapper:
    mapper = getattr(optimizer, "_lmopt_mapper", None)
    if mapper is None:
        raise ValueError("this optimizer's state is not memory-mapped; call lmopt.optim.mapped.map_state first")
    return mapper


def _mapped_tensors(optimizer: Optimizer) -> list[Tensor]:
    return _mapper(optimizer).tensors()


def mapped_bytes(optimizer: Optimizer) -> int:
    """Bytes of state held in files (what :func:`map_state` keeps out of the process's memory between steps)."""
    return sum(t.numel() * t.element_size() for t in _mapped_tensors(optimizer))


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def mapped_resident_bytes(optimizer: Optimizer) -> int:
    """Bytes of the mapped state resident in this process now (the ``Rss`` of its file mappings in
    ``/proc/self/smaps``): near 0 between steps, what a step pages in during it."""
    files = set(_mapper(optimizer).files.values())
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            if _MAPPING.match(line):
                fields = line.split(maxsplit=5)
                current = fields[5].strip() if len(fields) > 5 else None
            elif line.startswith("Rss:") and current in files:
                total += int(line.split()[1]) * 1024
    return total


def release_mapped_pages(optimizer: Optimizer) -> None:
    """Release the process's pages of every mapped state tensor (the data stays in the files); :func:`map_state`
    calls it after every step."""
    madvise = _madvise()
    page = os.sysconf("SC_PAGE_SIZE")
    for t in _mapped_tensors(optimizer):
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first = (start + page - 1) // page * page  # whole pages inside the tensor only
        if end - first >= page:
            madvise(first, (end - first) // page * page, _MADV_DONTNEED)
