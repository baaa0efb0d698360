"""Triton kernels for the low-bit optimizers on CUDA: one pass over memory per parameter tensor.

One program updates one quantization block: it reads the gradient, the parameter and the old codes, decodes the
moments (``value[code] * scale``; the 256- or 16-entry map stays in L1), updates them in fp32, writes the
parameter, takes the new block absmax, and writes the new codes and scale. 4-bit codes are packed two per byte,
the even element in the low nibble, so a program handles the even and the odd elements as two half vectors.

The arithmetic follows lmopt's PyTorch reference path operation by operation, with IEEE square root and division
(``sqrt_rn`` / ``div_rn``) and no fused multiply-add (``enable_fp_fusion=False``), and the nearest code is the
same bucket-table rule as the CPU kernel (``lmopt/quant/maps.py``): one table read per element instead of a
binary search.

Traffic per element with fp32 parameters: 4 + 4 + 4 bytes of parameter and gradient plus 2 x (1 + 1) bytes of
8-bit codes (4-bit: 2 x 2 x 0.5), i.e. 16 (14) bytes against fp32 AdamW's 28: the step is memory-bound on GPUs,
so an 8-bit step can beat fp32 AdamW's (benchmarks/step_speed_cuda.py).

The jitted code is ``lowbit_triton_jit.py``, imported at the first step (this module never imports Triton):
one entry kernel for both launches, all tensors of a call through an address table (``TABLE=True``) or one
large tensor whose addresses are the kernel's arguments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["CudaItem", "available", "lowbit_step_cuda"]


@functools.cache
def available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


@functools.cache
def _kernel():
    """The jitted entry kernel (imports Triton: only at the first CUDA step)."""
    from .lowbit_triton_jit import lowbit_kernel

    return lowbit_kernel


def _tables(name: str, device: torch.device) -> tuple[Tensor, Tensor, int, int, int]:
    """(values, lut) of a code map on ``device`` (cached) and its table constants (shift, base, buckets)."""
    from ..quant.maps import code_map

    cm = code_map(name)
    values, _, lut = cm.on(device)
    shift = 23 - cm.lut_mantissa_bits
    base = (127 - cm.lut_exponents) << cm.lut_mantissa_bits
    return values, lut, shift, base, cm.lut_buckets


@dataclass
class CudaItem:
    """One tensor of a launch: the parameter, its gradient, the moments' codes and scales (Lion: no second
    moment), the Kahan buffer or None, and its per-tensor scalars."""

    p: Tensor
    g: Tensor
    m_codes: Tensor
    m_scales: Tensor
    v_codes: Tensor | None
    v_scales: Tensor | None
    comp: Tensor | None
    step_size: float = 0.0
    inv_bc2: float = 1.0
    key: int = 0
    offset: int = 0  # index of the tensor's first element in the whole parameter (a shard's offset)

    def __post_init__(self) -> None:
        if self.v_codes is None:  # Lion: the kernel reads (and ignores) the first moment's in their place
            self.v_codes, self.v_scales = self.m_codes, self.m_scales


_PROGRAMS: dict[tuple, Tensor] = {}
_DIRECT_NUMEL = 1 << 23  # tensors this large get a launch of their own


def _program_map(numels: tuple[int, ...], block: int, device: torch.device) -> Tensor:
    """int32 [programs, 2]: (tensor index, program index within the tensor), cached by the tensors' sizes."""
    key = (numels, block, str(device))
    if key not in _PROGRAMS:
        if len(_PROGRAMS) > 64:
            _PROGRAMS.clear()
        counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)
        _PROGRAMS[key] = torch.stack([tensor, local], 1).to(torch.int32).to(device)
    return _PROGRAMS[key]


def lowbit_step_cuda(
    items: list[CudaItem],
    *,
    m_map: str,
    v_map: str | None,
    block: int,
    bits: int,
    algorithm: str,
    hyper: dict[str, Any],
) -> None:
    """Update CUDA tensors and their quantized moments in place with one kernel launch (contiguous tensors of
    one device, parameters of one dtype, gradients of one dtype; see the module doc).

    ``hyper`` holds beta1, beta2, eps, weight_decay, lr, decoupled, maximize, rounding (0 nearest,
    1 stochastic, 2 kahan).
    """
    if not items:
        return
    kernel = _kernel()
    device = items[0].p.device
    mval, mlut, ms, mb, mk = _tables(m_map, device)
    if algorithm == "adam":
        vval, vlut, vs_, vb, vk = _tables(v_map, device)  # type: ignore[arg-type]
    else:
        vval, vlut, vs_, vb, vk = mval, mlut, ms, mb, mk
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    wd, lr = hyper["weight_decay"], hyper["lr"]
    bp2 = 1 << (block - 1).bit_length()  # tile width: the block rounded up to a power of two
    consts = dict(
        BLOCK=block,
        BP2=bp2,
        BITS=bits,
        ALGO=0 if algorithm == "adam" else 1,
        DECOUPLED=bool(hyper["decoupled"]),
        HAS_WD=wd != 0.0,
        MAXIMIZE=bool(hyper["maximize"]),
        P_BF16=items[0].p.dtype == torch.bfloat16,
        G_BF16=items[0].g.dtype == torch.bfloat16,
        ROUNDING=int(hyper["rounding"]),
        M_SHIFT=ms,
        M_BASE=mb,
        M_NK=mk,
        V_SHIFT=vs_,
        V_BASE=vb,
        V_NK=vk,
        num_warps=4 if bp2 >= 256 else 2,
        enable_fp_fusion=False,
    )
    # after the per-launch arguments (the table's, then one tensor's): the maps and the hyperparameters
    shared = (mval, vval, mlut, vlut, beta1, beta2, 1 - beta1, 1 - beta2, hyper.get("eps", 0.0), wd, lr * wd, lr)
    small = []
    for it in items:
        if it.p.numel() < _DIRECT_NUMEL:
            small.append(it)
            continue
        # large tensors: one launch each, their addresses as kernel arguments (measured faster than the table
        # launch on an H100); the table's three arguments are unused placeholders
        kernel[((it.p.numel() + block - 1) // block,)](
            mval,
            mval,
            mval,
            it.p,
            it.g,
            it.m_codes,
            it.m_scales,
            it.v_codes,
            it.v_scales,
            it.comp if it.comp is not None else it.p,
            it.p.numel(),
            it.key,
            it.offset,
            it.step_size,
            it.inv_bc2,
            *shared,
            TABLE=False,
            **consts,
        )
    items = small
    if not items:
        return
    table, scalars = [], []
    for it in items:
        table += [
            it.p.data_ptr(),
            it.g.data_ptr(),
            it.m_codes.data_ptr(),
            it.m_scales.data_ptr(),
            it.v_codes.data_ptr(),  # type: ignore[union-attr]
            it.v_scales.data_ptr(),  # type: ignore[union-attr]
            it.comp.data_ptr() if it.comp is not None else 0,
            it.p.numel(),
            it.key,
            it.offset,
        ]
        scalars += [it.step_size, it.inv_bc2]
    table_t = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
    scalars_t = torch.tensor(scalars, dtype=torch.float32).to(device, non_blocking=True)
    # small tensors: one launch for all, one quantization block per program (measured fastest on an H100:
    # several blocks per program as a 2-D tile was 1.3-1.7x slower at 1e9 parameters); the kernel reads each
    # tensor's addresses and scalars from the table, and the one-tensor arguments are unused placeholders
    # (constants, so they add no specializations)
    programs = _program_map(tuple(it.p.numel() for it in items), block, device)
    unused = (table_t,) * 7 + (0, 0, 0, 0.0, 1.0)
    kernel[(programs.shape[0],)](table_t, scalars_t, programs, *unused, *shared, TABLE=True, **consts)
