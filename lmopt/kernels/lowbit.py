"""Build and call the CPU low-bit step kernel (lowbit_cpu.c).

The kernel is plain C (AVX2 when the CPU has it, a scalar path otherwise) with no dependency on torch's
headers, so it compiles in about a second with the system's C compiler at first use, and is cached under
``$LMOPT_CACHE_DIR`` (default ``~/.cache/lmopt``) by a hash of its source, flags and compiler. It is called
through ``ctypes`` (which releases the GIL) with raw data pointers of contiguous CPU tensors.

Why not ``torch.utils.cpp_extension.load_inline``: including torch's headers makes a build take ~30-60 s on
two cores and needs ninja; this kernel needs nothing from torch but pointers. Why not ``torch.compile``: it
cannot express the per-block absmax -> quantize dependency in one pass, and it is ~2x slower than the fused
kernel even for fp32 AdamW on this CPU (benchmarks/results).

If no compiler is found or the build fails, :func:`load` returns None once with a warning, and the
optimizers use the PyTorch reference path. ``LMOPT_DISABLE_KERNELS=1`` forces that path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from ..quant.maps import code_map

__all__ = [
    "ConfigStruct",
    "JobStruct",
    "QmapStruct",
    "first_nonfinite",
    "kernel_status",
    "load",
    "lowbit_step_cpu",
    "qmap_struct",
]

_SOURCE = Path(__file__).with_name("lowbit_cpu.c")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _fields(*groups: tuple[str, Any]) -> list[tuple[str, Any]]:
    """A ``_fields_`` list from (space-separated names, C type) groups, in declaration order (lowbit_cpu.c's
    structs, member for member)."""
    return [(name, ctype) for names, ctype in groups for name in names.split()]


class QmapStruct(ctypes.Structure):
    _fields_ = _fields(("lut mid val", ctypes.c_void_p), ("shift base nk bits", ctypes.c_int32))


class JobStruct(ctypes.Structure):
    _fields_ = _fields(
        ("p g m_codes m_scales v_codes v_scales comp", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("step_size inv_bc2", ctypes.c_float),
        ("key offset", ctypes.c_uint32),
    )


class ConfigStruct(ctypes.Structure):
    _fields_ = _fields(
        ("algo p_bf16 g_bf16 block decoupled maximize rounding has_wd", ctypes.c_int32),
        ("beta1 beta2 omb1 omb2 eps wd lrwd lr", ctypes.c_float),
        ("qm qv", QmapStruct),
    )


def _flags() -> list[str]:
    flags = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]  # FMA is available to the compiler but contraction is off
    return flags + os.environ.get("LMOPT_KERNEL_CFLAGS", "").split()  # for experiments (e.g. -march=native)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = _SOURCE.read_bytes()
    flags = _flags()
    stat = os.stat(cc)  # the compiler's identity without running it (its path, size and mtime)
    version = f"{os.path.realpath(cc)}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(source + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LMOPT_CACHE_DIR", Path.home() / ".cache" / "lmopt")) / "kernels"
    target = cache / f"lowbit_cpu_{digest}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run(
                [cc, *flags, str(_SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(f"building {_SOURCE.name} failed:\n{proc.stderr[-2000:]}")
            os.replace(out, target)  # atomic: concurrent builders never see a half-written library
    lib = ctypes.CDLL(str(target))
    lib.lmopt_lowbit_step.argtypes = [
        ctypes.POINTER(ConfigStruct),
        ctypes.POINTER(JobStruct),
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.lmopt_lowbit_step.restype = ctypes.c_int
    lib.lmopt_lowbit_abi.restype = ctypes.c_int
    lib.lmopt_first_nonfinite.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.POINTER(ctypes.c_int32),
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.lmopt_first_nonfinite.restype = ctypes.c_int
    expected = ctypes.sizeof(ConfigStruct) * 1000 + ctypes.sizeof(JobStruct)
    if lib.lmopt_lowbit_abi() != expected:
        raise RuntimeError("kernel structure layout does not match its Python declaration")
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning) when it cannot be built; None while
    torch.compile traces (a ctypes call is a graph break: the PyTorch path is traced instead)."""
    if torch.compiler.is_compiling():
        return None
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        lib = None
        if os.environ.get("LMOPT_DISABLE_KERNELS", "") not in ("", "0"):
            _STATE["error"] = "disabled by LMOPT_DISABLE_KERNELS"
        else:
            try:
                lib = _build()
            except Exception as exc:  # any build problem: fall back, loudly, once
                _STATE["error"] = str(exc)
                warnings.warn(
                    f"lmopt: the CPU low-bit kernel is unavailable ({exc}); using the slower PyTorch path",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _STATE["lib"] = lib
        return lib


def first_nonfinite(tensors: list[torch.Tensor]) -> int | None:
    """Index of the first tensor holding inf/NaN, -1 when all are finite, or None when the kernel cannot
    check them (not built, or a tensor that is not a contiguous fp32/bf16 CPU tensor)."""
    lib = load()
    if lib is None or not tensors:
        return None
    for t in tensors:
        if (
            t.device.type != "cpu"
            or t.dtype not in (torch.float32, torch.bfloat16)
            or not t.is_contiguous()
            or (type(t).__name__ == "DTensor")
        ):
            return None
    count = len(tensors)
    ptrs = (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])
    ns = (ctypes.c_int64 * count)(*[t.numel() for t in tensors])
    bf16 = (ctypes.c_int32 * count)(*[int(t.dtype == torch.bfloat16) for t in tensors])
    return int(lib.lmopt_first_nonfinite(ptrs, ns, bf16, count, torch.get_num_threads()))


def kernel_status() -> str:
    """One line: whether the kernel is loaded, and why not."""
    lib = load()
    if lib is not None:
        return f"cpu kernel loaded ({torch.backends.cpu.get_cpu_capability()})"
    return f"cpu kernel unavailable: {_STATE.get('error')}"


def qmap_struct(name: str) -> QmapStruct:
    """The kernel's view of code map ``name`` (its tables stay alive in :func:`lmopt.quant.maps.code_map`'s
    cache, so the pointers remain valid)."""
    cm = code_map(name)
    return QmapStruct(
        cm.lut.data_ptr(),
        cm.midpoints.data_ptr(),
        cm.values.data_ptr(),
        23 - cm.lut_mantissa_bits,
        (127 - cm.lut_exponents) << cm.lut_mantissa_bits,
        cm.lut_buckets,
        cm.bits,
    )


def lowbit_step_cpu(
    lib: ctypes.CDLL,
    items: list[Any],
    *,
    m_map: str,
    v_map: str | None,
    block: int,
    algorithm: str,
    hyper: dict[str, Any],
) -> None:
    """Update contiguous CPU tensors and their quantized moments in place with one call of the C kernel
    (the CPU twin of :func:`lmopt.kernels.lowbit_triton.lowbit_step_cuda`: the same items and ``hyper``).

    ``items`` have ``p``, ``g``, ``m_codes``, ``m_scales``, ``v_codes``, ``v_scales`` (None for Lion),
    ``comp`` (Kahan buffer or None), ``step_size``, ``inv_bc2``, ``key`` and ``offset``; parameters of one dtype
    and gradients of one dtype (fp32 or bf16). ``hyper`` holds beta1, beta2, eps, weight_decay, lr, decoupled,
    maximize and rounding (0 nearest, 1 stochastic, 2 kahan).
    """
    if not items:
        return
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    lr, wd = float(hyper["lr"]), float(hyper["weight_decay"])
    adam = algorithm == "adam"
    qm = qmap_struct(m_map)
    cfg = ConfigStruct(
        algo=0 if adam else 1,
        p_bf16=int(items[0].p.dtype == torch.bfloat16),
        g_bf16=int(items[0].g.dtype == torch.bfloat16),
        block=block,
        decoupled=int(bool(hyper["decoupled"])),
        maximize=int(bool(hyper["maximize"])),
        rounding=int(hyper["rounding"]),
        has_wd=int(wd != 0.0),
        beta1=beta1,
        beta2=beta2,
        omb1=1 - beta1,
        omb2=1 - beta2,
        eps=float(hyper.get("eps", 0.0)),
        wd=wd,
        lrwd=lr * wd,
        lr=lr,
        qm=qm,
        qv=qmap_struct(v_map) if adam and v_map is not None else qm,
    )
    jobs = (JobStruct * len(items))()
    for job, it in zip(jobs, items):
        job.p, job.g, job.n = it.p.data_ptr(), it.g.data_ptr(), it.p.numel()
        job.m_codes, job.m_scales = it.m_codes.data_ptr(), it.m_scales.data_ptr()
        if adam:
            job.v_codes, job.v_scales = it.v_codes.data_ptr(), it.v_scales.data_ptr()
            job.step_size, job.inv_bc2 = it.step_size, it.inv_bc2
        job.comp = it.comp.data_ptr() if it.comp is not None else None
        job.key = it.key
        job.offset = it.offset & 0xFFFFFFFF
    status = lib.lmopt_lowbit_step(ctypes.byref(cfg), jobs, len(items), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"lmopt low-bit kernel failed with status {status}")
