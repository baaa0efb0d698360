"""Shared machinery for lmopt's step-speed benchmarks (see ../shared/BENCHMARKS.md for the protocol).

Each case runs in a fresh interpreter so allocator state, thread pools and compile caches do not leak between
implementations. The parent process measures the machine (CPU model, flags, in-place add bandwidth) and writes one
Markdown table with ratios taken within the same run.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Case:
    """One implementation to time.

    Attributes:
        name: label in the table ("lmopt AdamW (fused)").
        algorithm: cases with the same algorithm are compared; ratios are to the fastest peer of it.
        factory: name of a function in the suite module: ``f(params: list[Parameter]) -> Optimizer``.
        peer: True for a peer library's implementation.
        bytes_per_param: bytes the algorithm must read + write per parameter (the roofline).
        prepare: optional function name in the suite module, ``g(optimizer)``, called before every step outside the
            timed region (e.g. to record the gradient norm that clipping computes anyway).
        note: shown in the table.
    """

    name: str
    algorithm: str
    factory: str
    peer: bool = False
    bytes_per_param: float = 28.0
    prepare: str | None = None
    note: str = ""


@dataclass
class Result:
    case: Case
    ok: bool
    first_ms: float = math.nan
    median_ms: float = math.nan
    min_ms: float = math.nan
    max_ms: float = math.nan
    steps: int = 0
    state_bytes: int = 0
    n_params: int = 0
    other_cpu: float = math.nan
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["case"] = asdict(self.case)
        return out


def transformer_shapes(n_params: float) -> list[tuple[int, ...]]:
    """4 blocks of [4 x (d,d), (4d,d), (d,4d), 4 x (d,)], d a multiple of 64 giving about ``n_params``."""
    d = max(64, int(round(math.sqrt(n_params / 48) / 64)) * 64)
    block = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 4
    return block * 4


def make_params(n_params: float, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in transformer_shapes(n_params):
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return params


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return (id(t), t.numel() * t.element_size())


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = flatten()
        out = []
        for name in names:
            out.extend(_inner_tensors(getattr(t, name)))
        return out
    return [t]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (subclass inner tensors included, shared storage once)."""
    seen: dict[tuple[int, int], int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            for inner in _inner_tensors(value):
                key = _storage_key(inner)
                seen[key] = key[1]
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for per_param in optimizer.state.values():
        visit(per_param)
    return sum(seen.values())


def _machine_busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _own_jiffies() -> int:
    with open("/proc/self/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime + stime


def time_case(
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    prepare: Callable[[torch.optim.Optimizer], None] | None,
    n_params: float,
    min_steps: int,
    min_seconds: float,
) -> dict[str, Any]:
    params = make_params(n_params)
    opt = build(params)
    t0 = time.perf_counter()
    if prepare:
        prepare(opt)
    opt.step()
    first = time.perf_counter() - t0
    for _ in range(3):
        if prepare:
            prepare(opt)
        opt.step()
    times = []
    busy0, total0 = _machine_busy_jiffies()
    own0 = _own_jiffies()
    start = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < min_seconds:
        if prepare:
            prepare(opt)
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    busy1, total1 = _machine_busy_jiffies()
    own1 = _own_jiffies()
    other = max(0, (busy1 - busy0) - (own1 - own0)) / max(1, total1 - total0)
    return {
        "first_ms": first * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "steps": len(times),
        "state_bytes": state_bytes(opt),
        "n_params": sum(p.numel() for p in params),
        "other_cpu": other,
    }


def add_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """GB/s of ``a.add_(b)`` on two ``nbytes`` fp32 tensors, counting 3 x nbytes moved (median of repeats)."""
    a = torch.ones(nbytes // 4)
    b = torch.ones(nbytes // 4)
    a.add_(b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - t)
    return 3 * nbytes / statistics.median(times) / 1e9


def machine_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown CPU", ""):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
    return (
        f"{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
        f"SIMD: {', '.join(simd) or 'none of avx2/avx512'}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
