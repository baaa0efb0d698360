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
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "lowbit_step_cuda"]


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
        p_ptr,
        g_ptr,
        mc_ptr,
        ms_ptr,
        vc_ptr,
        vs_ptr,
        comp_ptr,
        mval_ptr,
        vval_ptr,
        mlut_ptr,
        vlut_ptr,
        n,
        nblocks,
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
        key,
        BLOCK: tl.constexpr,
        BP2: tl.constexpr,
        ROWS: tl.constexpr,
        BITS: tl.constexpr,
        ALGO: tl.constexpr,
        DECOUPLED: tl.constexpr,
        HAS_WD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        P_BF16: tl.constexpr,
        ROUNDING: tl.constexpr,
        M_SHIFT: tl.constexpr,
        M_BASE: tl.constexpr,
        M_NK: tl.constexpr,
        V_SHIFT: tl.constexpr,
        V_BASE: tl.constexpr,
        V_NK: tl.constexpr,
    ):
        # one program: ROWS consecutive quantization blocks as a [ROWS, BP2] tile (BP2: BLOCK rounded up to a
        # power of two; the extra columns are masked), contiguous in memory
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
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


def lowbit_step_cuda(
    p: Tensor,
    g: Tensor,
    m_codes: Tensor,
    m_scales: Tensor,
    v_codes: Tensor | None,
    v_scales: Tensor | None,
    comp: Tensor | None,
    *,
    m_map: str,
    v_map: str | None,
    block: int,
    bits: int,
    algorithm: str,
    hyper: dict[str, Any],
) -> None:
    """Update one CUDA tensor and its quantized moments in place (contiguous tensors; see the module doc).

    ``hyper`` holds beta1, beta2, eps, weight_decay, lr, step_size, inv_bc2, key, decoupled, maximize,
    rounding (0 nearest, 1 stochastic, 2 kahan).
    """
    kernel = _kernel()
    n = p.numel()
    mval, mlut, ms, mb, mk = _tables(m_map, p.device)
    if algorithm == "adam":
        vval, vlut, vs_, vb, vk = _tables(v_map, p.device)  # type: ignore[arg-type]
    else:
        vval, vlut, vs_, vb, vk = mval, mlut, ms, mb, mk
        v_codes, v_scales = m_codes, m_scales
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    wd, lr = hyper["weight_decay"], hyper["lr"]
    nblocks = (n + block - 1) // block
    bp2 = 1 << (block - 1).bit_length()  # tile width: the block rounded up to a power of two
    rows = max(1, min(16, 2048 // bp2))  # ~2048 elements per program
    grid = ((nblocks + rows - 1) // rows,)
    kernel[grid](
        p,
        g,
        m_codes,
        m_scales,
        v_codes,
        v_scales,
        comp if comp is not None else p,
        mval,
        vval,
        mlut,
        vlut,
        n,
        nblocks,
        beta1,
        beta2,
        1 - beta1,
        1 - beta2,
        hyper.get("eps", 0.0),
        wd,
        lr * wd,
        lr,
        hyper.get("step_size", 0.0),
        hyper.get("inv_bc2", 1.0),
        hyper.get("key", 0),
        BLOCK=block,
        BP2=bp2,
        ROWS=rows,
        BITS=bits,
        ALGO=0 if algorithm == "adam" else 1,
        DECOUPLED=bool(hyper["decoupled"]),
        HAS_WD=wd != 0.0,
        MAXIMIZE=bool(hyper["maximize"]),
        P_BF16=p.dtype == torch.bfloat16,
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
