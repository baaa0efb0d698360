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
"""

from __future__ import annotations

import functools
import os
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
    import triton
    import triton.language as tl

    @triton.jit
    def _hash32(x):
        # lowbias32 on uint32 (lmopt/quant/rounding.py); products are truncated back to 32 bits
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D).to(tl.uint32)
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B).to(tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _encode(x, lut_ptr, SHIFT: tl.constexpr, BASE: tl.constexpr, NK: tl.constexpr, SIGNED: tl.constexpr):
        # nearest code of x in [-1, 1]: bucket = sign, exponent and top mantissa bits; c0 + (x > bucket midpoint)
        x = tl.minimum(tl.maximum(x, -1.0), 1.0)
        bits = x.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        k = tl.maximum((mag >> SHIFT) - BASE, 0)
        low_mask: tl.constexpr = (1 << SHIFT) - 1
        if SIGNED:
            neg = bits < 0
            idx = k + tl.where(neg, NK, 0)
            key = (mag & low_mask) ^ tl.where(neg, low_mask, 0)
        else:
            idx = k
            key = mag & low_mask
        entry = tl.load(lut_ptr + idx)
        return ((entry >> 24) & 0xFF) + (key > (entry & low_mask)).to(tl.int32)

    @triton.jit
    def _moments_and_delta(
        p,
        g,
        m,
        v,
        beta1,
        beta2,
        omb1,
        omb2,
        eps,
        wd,
        lrwd,
        lr,
        step_size,
        inv_bc2,
        ALGO: tl.constexpr,
        DECOUPLED: tl.constexpr,
        HAS_WD: tl.constexpr,
    ):
        if ALGO == 0:
            if (not DECOUPLED) and HAS_WD:
                g = g + p * wd
            m = m * beta1 + g * omb1
            v = v * beta2 + (g * g) * omb2
            denom = tl.sqrt_rn(v) * inv_bc2 + eps
            delta = -(tl.div_rn(m, denom) * step_size)
            if DECOUPLED and HAS_WD:
                delta = delta - p * lrwd
        else:
            c = m * beta1 + g * omb1
            sg = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
            delta = -(sg * lr)
            if HAS_WD:
                delta = delta - p * lrwd
            m = m * beta2 + g * omb2
        return m, v, delta

    @triton.jit
    def _store_param(p_ptr, comp_ptr, offs, mask, p, delta, key, P_BF16: tl.constexpr, ROUNDING: tl.constexpr):
        if not P_BF16:
            tl.store(p_ptr + offs, p + delta, mask=mask)
        elif ROUNDING == 0:
            tl.store(p_ptr + offs, (p + delta).to(tl.bfloat16), mask=mask)
        elif ROUNDING == 1:
            noise = _hash32(offs.to(tl.uint32) ^ key.to(tl.uint32)) & 0xFFFF
            bits = (p + delta).to(tl.uint32, bitcast=True) + noise
            tl.store(p_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            s = tl.load(comp_ptr + offs, mask=mask, other=0.0).to(tl.float32) + delta
            r = (p + s).to(tl.bfloat16)
            tl.store(comp_ptr + offs, (s - (r.to(tl.float32) - p)).to(tl.bfloat16), mask=mask)
            tl.store(p_ptr + offs, r, mask=mask)

    @triton.jit
    def _load_codes(
        c_ptr, rows, n, mask, BLOCK: tl.constexpr, BP2: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr
    ):
        # codes of a [ROWS, BP2] tile as int32; 4-bit bytes hold (even, odd) elements in (low, high) nibbles
        if BITS == 8:
            return tl.load(c_ptr + rows * BLOCK + tl.arange(0, BP2)[None, :], mask=mask, other=0).to(tl.int32)
        HALF: tl.constexpr = BP2 // 2
        half_cols = tl.arange(0, HALF)[None, :]
        index = rows * (BLOCK // 2) + half_cols
        ok = (half_cols < BLOCK // 2) & (index < (n + 1) // 2)
        byte = tl.load(c_ptr + index, mask=ok, other=0).to(tl.int32)
        return tl.reshape(tl.join(byte & 15, byte >> 4), (ROWS, BP2))

    @triton.jit
    def _store_codes(
        c_ptr, rows, n, mask, codes, BLOCK: tl.constexpr, BP2: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr
    ):
        if BITS == 8:
            tl.store(c_ptr + rows * BLOCK + tl.arange(0, BP2)[None, :], codes.to(tl.uint8), mask=mask)
        else:
            HALF: tl.constexpr = BP2 // 2
            even, odd = tl.split(tl.reshape(tl.where(mask, codes, 0), (ROWS, HALF, 2)))
            half_cols = tl.arange(0, HALF)[None, :]
            index = rows * (BLOCK // 2) + half_cols
            ok = (half_cols < BLOCK // 2) & (index < (n + 1) // 2)
            tl.store(c_ptr + index, (even | (odd << 4)).to(tl.uint8), mask=ok)

    @triton.jit
    def lowbit_kernel(
        table_ptr,
        scalar_ptr,
        program_ptr,
        mval_ptr,
        vval_ptr,
        mlut_ptr,
        vlut_ptr,
        beta1,
        beta2,
        omb1,
        omb2,
        eps,
        wd,
        lrwd,
        lr,
        BLOCK: tl.constexpr,
        BP2: tl.constexpr,
        ROWS: tl.constexpr,
        BITS: tl.constexpr,
        ALGO: tl.constexpr,
        DECOUPLED: tl.constexpr,
        HAS_WD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        P_BF16: tl.constexpr,
        G_BF16: tl.constexpr,
        ROUNDING: tl.constexpr,
        M_SHIFT: tl.constexpr,
        M_BASE: tl.constexpr,
        M_NK: tl.constexpr,
        V_SHIFT: tl.constexpr,
        V_BASE: tl.constexpr,
        V_NK: tl.constexpr,
    ):
        # every tensor of the launch in one grid: program -> (tensor, its program index); per tensor the table
        # holds the data pointers, the element count and the stochastic-rounding key, and scalar_ptr its
        # (step size, 1 / sqrt(bias correction 2))
        pid = tl.program_id(0)
        t = tl.load(program_ptr + 2 * pid).to(tl.int64)
        local = tl.load(program_ptr + 2 * pid + 1).to(tl.int64)
        row = table_ptr + t * 10
        # the addresses come from memory, so the compiler cannot see their alignment: every tensor is checked
        # to be 16-byte aligned before the launch, and saying so lets the loads below be vectorized
        p_addr = tl.multiple_of(tl.load(row + 0), 16)
        g_addr = tl.multiple_of(tl.load(row + 1), 16)
        if P_BF16:
            p_ptr = p_addr.to(tl.pointer_type(tl.bfloat16))
        else:
            p_ptr = p_addr.to(tl.pointer_type(tl.float32))
        if G_BF16:
            g_ptr = g_addr.to(tl.pointer_type(tl.bfloat16))
        else:
            g_ptr = g_addr.to(tl.pointer_type(tl.float32))
        mc_ptr = tl.multiple_of(tl.load(row + 2), 16).to(tl.pointer_type(tl.uint8))
        ms_ptr = tl.multiple_of(tl.load(row + 3), 16).to(tl.pointer_type(tl.float32))
        vc_ptr = tl.multiple_of(tl.load(row + 4), 16).to(tl.pointer_type(tl.uint8))
        vs_ptr = tl.multiple_of(tl.load(row + 5), 16).to(tl.pointer_type(tl.float32))
        comp_ptr = tl.multiple_of(tl.load(row + 6), 16).to(tl.pointer_type(tl.bfloat16))
        n = tl.load(row + 7)
        key = tl.load(row + 8)
        step_size = tl.load(scalar_ptr + 2 * t)
        inv_bc2 = tl.load(scalar_ptr + 2 * t + 1)
        nblocks = (n + BLOCK - 1) // BLOCK
        # one program: ROWS consecutive quantization blocks as a [ROWS, BP2] tile (BP2: BLOCK rounded up to a
        # power of two; the extra columns are masked), contiguous in memory
        rows = local * ROWS + tl.arange(0, ROWS)[:, None]
        cols = tl.arange(0, BP2)[None, :]
        offs = rows * BLOCK + cols
        mask = (cols < BLOCK) & (offs < n)
        row_ok = rows < nblocks
        sm = tl.load(ms_ptr + rows, mask=row_ok, other=0.0)
        sv = tl.load(vs_ptr + rows, mask=row_ok, other=0.0)  # Lion passes the first moment's scales (unused)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(mval_ptr + _load_codes(mc_ptr, rows, n, mask, BLOCK, BP2, BITS, ROWS)) * sm
        v = m
        if ALGO == 0:
            v = tl.load(vval_ptr + _load_codes(vc_ptr, rows, n, mask, BLOCK, BP2, BITS, ROWS)) * sv
        m, v, delta = _moments_and_delta(
            p, g, m, v, beta1, beta2, omb1, omb2, eps, wd, lrwd, lr, step_size, inv_bc2, ALGO, DECOUPLED, HAS_WD
        )
        _store_param(p_ptr, comp_ptr, offs, mask, p, delta, key, P_BF16, ROUNDING)
        am = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)[:, None]
        tl.store(ms_ptr + rows, am, mask=row_ok)
        im = tl.where(am > 0, tl.div_rn(1.0, am), 0.0)
        codes = _encode(m * im, mlut_ptr, M_SHIFT, M_BASE, M_NK, True)
        _store_codes(mc_ptr, rows, n, mask, codes, BLOCK, BP2, BITS, ROWS)
        if ALGO == 0:
            av = tl.max(tl.where(mask, v, 0.0), axis=1)[:, None]
            tl.store(vs_ptr + rows, av, mask=row_ok)
            iv = tl.where(av > 0, tl.div_rn(1.0, av), 0.0)
            codes = _encode(v * iv, vlut_ptr, V_SHIFT, V_BASE, V_NK, False)
            _store_codes(vc_ptr, rows, n, mask, codes, BLOCK, BP2, BITS, ROWS)

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


_PROGRAMS: dict[tuple, Tensor] = {}


def _program_map(numels: tuple[int, ...], block: int, rows: int, device: torch.device) -> Tensor:
    """int32 [programs, 2]: (tensor index, program index within the tensor), cached by the tensors' sizes."""
    key = (numels, block, rows, str(device))
    if key not in _PROGRAMS:
        if len(_PROGRAMS) > 64:
            _PROGRAMS.clear()
        counts = torch.tensor([((n + block - 1) // block + rows - 1) // rows for n in numels], dtype=torch.int64)
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
    table, scalars = [], []
    for it in items:
        v_codes = it.v_codes if it.v_codes is not None else it.m_codes
        v_scales = it.v_scales if it.v_scales is not None else it.m_scales
        table += [
            it.p.data_ptr(),
            it.g.data_ptr(),
            it.m_codes.data_ptr(),
            it.m_scales.data_ptr(),
            v_codes.data_ptr(),
            v_scales.data_ptr(),
            it.comp.data_ptr() if it.comp is not None else 0,
            it.p.numel(),
            it.key,
            0,
        ]
        scalars += [it.step_size, it.inv_bc2]
    table_t = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
    scalars_t = torch.tensor(scalars, dtype=torch.float32).to(device, non_blocking=True)
    bp2 = 1 << (block - 1).bit_length()  # tile width: the block rounded up to a power of two
    rows = int(os.environ.get("LMOPT_TRITON_ROWS", 0)) or max(1, min(16, 2048 // bp2))  # ~2048 elements
    programs = _program_map(tuple(it.p.numel() for it in items), block, rows, device)
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    wd, lr = hyper["weight_decay"], hyper["lr"]
    kernel[(programs.shape[0],)](
        table_t,
        scalars_t,
        programs,
        mval,
        vval,
        mlut,
        vlut,
        beta1,
        beta2,
        1 - beta1,
        1 - beta2,
        hyper.get("eps", 0.0),
        wd,
        lr * wd,
        lr,
        BLOCK=block,
        BP2=bp2,
        ROWS=rows,
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
        num_warps=4,
        enable_fp_fusion=False,
    )
