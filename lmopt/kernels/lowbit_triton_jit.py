"""The ``@triton.jit`` functions of :mod:`lmopt.kernels.lowbit_triton` (its module doc describes the arithmetic).

They live in a module of their own, which ``lowbit_triton._kernel()`` imports at the first CUDA step: importing
lmopt never imports Triton, and the jitted functions are module-level names, as Triton's interpreter
(``TRITON_INTERPRET=1``, tests/test_lowbit_triton_interpreter.py) needs: it runs each function's source again
with the module's globals, where the names of a closure are not found.
"""

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
def _ld(ptr, mask):
    return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _st(ptr, value, mask):
    tl.store(ptr, value, mask=mask)


@triton.jit
def _absmax(x, mask):
    return tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)


@triton.jit
def _store_param(
    p_ptr,
    comp_ptr,
    offs,
    mask,
    p,
    delta,
    key,
    offset,
    P_BF16: tl.constexpr,
    ROUNDING: tl.constexpr,
):
    if not P_BF16:
        _st(p_ptr + offs, p + delta, mask)
    elif ROUNDING == 0:
        _st(p_ptr + offs, (p + delta).to(tl.bfloat16), mask)
    elif ROUNDING == 1:
        noise = _hash32((offs + offset).to(tl.uint32) ^ key.to(tl.uint32)) & 0xFFFF
        bits = (p + delta).to(tl.uint32, bitcast=True) + noise
        _st(p_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask)
    else:
        s = _ld(comp_ptr + offs, mask).to(tl.float32) + delta
        r = (p + s).to(tl.bfloat16)
        _st(comp_ptr + offs, (s - (r.to(tl.float32) - p)).to(tl.bfloat16), mask)
        _st(p_ptr + offs, r, mask)


@triton.jit
def lowbit_kernel(
    table_ptr,
    scalar_ptr,
    program_ptr,
    p_ptr,
    g_ptr,
    mc_ptr,
    ms_ptr,
    vc_ptr,
    vs_ptr,
    comp_ptr,
    n,
    key,
    offset,
    step_size,
    inv_bc2,
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
    TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
    BP2: tl.constexpr,
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
    """One quantization block of one tensor per program. Two launches (``TABLE``, a compile-time switch):

    - ``TABLE=False``: one large tensor per launch; its addresses and size are the arguments ``p_ptr`` ..
      ``inv_bc2``, whose alignment and divisibility the compiler specializes on (no dependent loads of a table
      before the data streams); ``table_ptr``, ``scalar_ptr`` and ``program_ptr`` are unused.
    - ``TABLE=True``: every tensor of the launch in one grid; ``p_ptr`` .. ``inv_bc2`` are unused placeholders,
      replaced by the values read from the table below.
    """
    if TABLE:
        # every tensor of the launch in one grid: program -> (tensor, block of that tensor); per tensor the table
        # holds the data addresses, the element count, the stochastic-rounding key and the shard offset, and
        # scalar_ptr its (step size, 1 / sqrt(bias correction 2))
        pid = tl.program_id(0)
        t = tl.load(program_ptr + 2 * pid).to(tl.int64)
        b = tl.load(program_ptr + 2 * pid + 1).to(tl.int64)
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
        offset = tl.load(row + 9)
        step_size = tl.load(scalar_ptr + 2 * t)
        inv_bc2 = tl.load(scalar_ptr + 2 * t + 1)
    else:
        b = tl.program_id(0).to(tl.int64)
    sm = tl.load(ms_ptr + b)
    sv = tl.load(vs_ptr + b)  # Lion passes the first moment's scales (unused)
    if BITS == 8:
        # one quantization block per program (BP2: BLOCK rounded up to a power of two, extra lanes masked)
        cols = tl.arange(0, BP2)
        offs = b * BLOCK + cols
        mask = (cols < BLOCK) & (offs < n)
        g = _ld(g_ptr + offs, mask).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = _ld(p_ptr + offs, mask).to(tl.float32)
        m = tl.load(mval_ptr + _ld(mc_ptr + offs, mask).to(tl.int32)) * sm
        v = m
        if ALGO == 0:
            v = tl.load(vval_ptr + _ld(vc_ptr + offs, mask).to(tl.int32)) * sv
        m, v, delta = _moments_and_delta(
            p, g, m, v, beta1, beta2, omb1, omb2, eps, wd, lrwd, lr, step_size, inv_bc2, ALGO, DECOUPLED, HAS_WD
        )
        _store_param(p_ptr, comp_ptr, offs, mask, p, delta, key, offset, P_BF16, ROUNDING)
        am = _absmax(m, mask)
        tl.store(ms_ptr + b, am)
        im = tl.where(am > 0, tl.div_rn(1.0, am), 0.0)
        _st(mc_ptr + offs, _encode(m * im, mlut_ptr, M_SHIFT, M_BASE, M_NK, True).to(tl.uint8), mask)
        if ALGO == 0:
            av = _absmax(v, mask)
            tl.store(vs_ptr + b, av)
            iv = tl.where(av > 0, tl.div_rn(1.0, av), 0.0)
            codes = _encode(v * iv, vlut_ptr, V_SHIFT, V_BASE, V_NK, False)
            _st(vc_ptr + offs, codes.to(tl.uint8), mask)
    else:
        # 4-bit: byte k of the block holds elements 2k (low nibble) and 2k + 1 (high nibble); the program
        # works on the even and the odd elements as two half vectors
        HALF: tl.constexpr = BP2 // 2
        k = tl.arange(0, HALF)
        pair = b * (BLOCK // 2) + k
        even = 2 * pair
        odd = even + 1
        me = (k < BLOCK // 2) & (even < n)
        mo = (k < BLOCK // 2) & (odd < n)
        mbyte = _ld(mc_ptr + pair, me).to(tl.int32)
        g0 = _ld(g_ptr + even, me).to(tl.float32)
        g1 = _ld(g_ptr + odd, mo).to(tl.float32)
        if MAXIMIZE:
            g0 = -g0
            g1 = -g1
        p0 = _ld(p_ptr + even, me).to(tl.float32)
        p1 = _ld(p_ptr + odd, mo).to(tl.float32)
        m0 = tl.load(mval_ptr + (mbyte & 15)) * sm
        m1 = tl.load(mval_ptr + (mbyte >> 4)) * sm
        v0 = m0
        v1 = m1
        if ALGO == 0:
            vbyte = _ld(vc_ptr + pair, me).to(tl.int32)
            v0 = tl.load(vval_ptr + (vbyte & 15)) * sv
            v1 = tl.load(vval_ptr + (vbyte >> 4)) * sv
        m0, v0, d0 = _moments_and_delta(
            p0, g0, m0, v0, beta1, beta2, omb1, omb2, eps, wd, lrwd, lr, step_size, inv_bc2, ALGO, DECOUPLED, HAS_WD
        )
        m1, v1, d1 = _moments_and_delta(
            p1, g1, m1, v1, beta1, beta2, omb1, omb2, eps, wd, lrwd, lr, step_size, inv_bc2, ALGO, DECOUPLED, HAS_WD
        )
        _store_param(p_ptr, comp_ptr, even, me, p0, d0, key, offset, P_BF16, ROUNDING)
        _store_param(p_ptr, comp_ptr, odd, mo, p1, d1, key, offset, P_BF16, ROUNDING)
        am = tl.maximum(_absmax(m0, me), _absmax(m1, mo))
        tl.store(ms_ptr + b, am)
        im = tl.where(am > 0, tl.div_rn(1.0, am), 0.0)
        c0 = _encode(m0 * im, mlut_ptr, M_SHIFT, M_BASE, M_NK, True)
        c1 = tl.where(mo, _encode(m1 * im, mlut_ptr, M_SHIFT, M_BASE, M_NK, True), 0)
        _st(mc_ptr + pair, (c0 | (c1 << 4)).to(tl.uint8), me)
        if ALGO == 0:
            av = tl.maximum(_absmax(v0, me), _absmax(v1, mo))
            tl.store(vs_ptr + b, av)
            iv = tl.where(av > 0, tl.div_rn(1.0, av), 0.0)
            c0 = _encode(v0 * iv, vlut_ptr, V_SHIFT, V_BASE, V_NK, False)
            c1 = tl.where(mo, _encode(v1 * iv, vlut_ptr, V_SHIFT, V_BASE, V_NK, False), 0)
            _st(vc_ptr + pair, (c0 | (c1 << 4)).to(tl.uint8), me)
