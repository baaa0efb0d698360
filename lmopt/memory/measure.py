"""Measure a real training step's memory, component by component, to check plans against.

* parameters, gradients, optimizer state: ``nbytes`` of the live tensors, counting each storage once and
  looking inside tensor subclasses (quantized state: codes + scales) through ``__tensor_flatten__``;
* activations: the tensors autograd saves for backward during the forward pass, counted once per storage
  with ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded);
* peak: on CUDA, ``torch.cuda.max_memory_allocated``; on CPU, where torch has no such counter, the allocator
  itself: under ``torch.profiler.profile(profile_memory=True)`` torch's CPU allocator reports every allocation
  and free with the running total of bytes it handed out since profiling began ("Total Allocated" of the
  ``[memory]`` events). The step's peak is the bytes live before the step (parameters, buffers, optimizer
  state, counted from the tensors) plus the largest rise of that total during the step. This sees every
  allocation, including buffers inside operators that Python never sees. A tensor that existed before the
  step and is freed during it is not reported by the allocator (its size was recorded before profiling), so a
  step that replaces pre-existing state tensors instead of updating them in place would read high.

The step measured is the second one (the optimizer's state exists), run as
``zero_grad(set_to_none=True)`` -> ``loss = loss_fn()`` -> ``loss.backward()`` -> ``optimizer.step()``.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MeasuredMemory", "measure_training_step", "optimizer_state_bytes", "tensor_bytes"]


def _storages(t: Tensor) -> Iterable[tuple[int, int, str]]:
    """(address, bytes, device) of every storage behind ``t``, looking inside wrapper subclasses."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = flatten()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, Tensor):
                yield from _storages(inner)
        return
    if t.device.type == "meta":
        return
    st = t.untyped_storage()
    yield st.data_ptr(), st.nbytes(), t.device.type


def tensor_bytes(tensors: Iterable[Any], seen: set[int] | None = None) -> int:
    """Bytes of the storages behind ``tensors`` (nested lists/tuples/dicts allowed), each storage once.

    ``seen`` (addresses already counted) lets several calls share the once-only rule.
    """
    seen = set() if seen is None else seen
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            for ptr, nbytes, _ in _storages(obj):
                if nbytes and ptr not in seen:
                    seen.add(ptr)
                    total += nbytes
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for obj in tensors:
        visit(obj)
    return total


def _optimizer_states(optimizer: torch.optim.Optimizer, seen_ids: set[int]) -> list[Any]:
    """``optimizer.state`` and that of optimizers it wraps (Lookahead's inner optimizer, ...)."""
    if id(optimizer) in seen_ids:
        return []
    seen_ids.add(id(optimizer))
    out: list[Any] = list(optimizer.state.values())
    for value in vars(optimizer).values():
        if isinstance(value, torch.optim.Optimizer):
            out += _optimizer_states(value, seen_ids)
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (inner tensors of subclasses included, storages once),
    and in the state of optimizers it wraps (an attribute holding a torch optimizer)."""
    return tensor_bytes(_optimizer_states(optimizer, set()))


@dataclass(frozen=True)
class MeasuredMemory:
    """Memory of one measured training step, in bytes.

    Attributes:
        parameters, gradients, optimizer_state: live tensor bytes (gradients right after backward).
        activations: bytes autograd saved for backward during the forward pass.
        peak: the step's peak of allocated memory (see the module docstring for how).
        baseline: bytes live before the step (parameters, buffers, optimizer state).
        method: how ``peak`` was measured.
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    peak: int
    baseline: int
    method: str


def _cpu_peak_from_profile(prof: Any) -> int:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    if not mem:
        return 0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - start


def measure_training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], Tensor],
    *,
    warmup_steps: int = 1,
) -> MeasuredMemory:
    """Run ``warmup_steps`` steps, then measure one training step of ``model`` with ``optimizer``.

    Args:
        model: the model (its parameters and buffers make the baseline with the optimizer state).
        optimizer: any torch optimizer over ``model``'s parameters.
        loss_fn: runs the forward pass and returns the loss, e.g.
            ``lambda: model(input_ids=x, labels=x).loss``.
        warmup_steps: steps before the measured one (>= 1 so lazily created state exists).

    Example:
        >>> m = measure_training_step(model, opt, lambda: model(input_ids=x, labels=x).loss)
        >>> print(m.peak, m.optimizer_state)
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1 (optimizer state is created lazily), got {warmup_steps}")
    params = [p for p in model.parameters()]
    for _ in range(warmup_steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    cuda = any(p.is_cuda for p in params)
    seen: set[int] = set()
    parameters = tensor_bytes(params, seen)
    buffers = tensor_bytes(list(model.buffers()), seen)
    state = tensor_bytes(_optimizer_states(optimizer, set()), seen)
    baseline = parameters + buffers + state
    saved: dict[int, int] = {}
    param_ptrs = {ptr for p in params for ptr, _, _ in _storages(p)}

    def pack(t: Tensor) -> Tensor:
        for ptr, nbytes, _ in _storages(t):
            if ptr not in param_ptrs:
                saved.setdefault(ptr, nbytes)
        return t

    grads = 0

    def step() -> None:
        nonlocal grads
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
        loss.backward()
        del loss
        grads = tensor_bytes([p.grad for p in params if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = baseline + torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        peak = baseline + _cpu_peak_from_profile(prof)
        method = "CPU allocator events (torch.profiler profile_memory)"
    return MeasuredMemory(
        parameters=parameters,
        gradients=grads,
        optimizer_state=state,
        activations=sum(saved.values()),
        peak=peak,
        baseline=baseline,
        method=method,
    )
