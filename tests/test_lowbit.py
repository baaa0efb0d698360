"""Low-bit state: code maps, blockwise quantization, the quantized-state view, the moment helpers, the CPU kernel
against the PyTorch reference path, bf16 parameters without a master copy, and memory per step."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import lmopt
from lmopt.kernels import lowbit as kernel_module
from lmopt.quant import (
    MomentFormat,
    QuantizedState,
    code_map,
    dequantize_blockwise,
    init_moment,
    linear_map,
    load_moment,
    moment_state,
    quantize_blockwise,
    store_moment,
)
from lmopt.quant.blockwise import pack_nibbles, unpack_nibbles
from lmopt.quant.rounding import stochastic_round_bf16
from lmopt.quant.sharded import ShardLayout, reshard_quantized

from .tolerances import roundtrip_tol

MAPS = ["de8s", "de8u", "de4s", "lin4u"]
KERNEL = kernel_module.load() is not None


# ---------------------------------------------------------------------------------------------------- code maps
def test_linear_map_is_zero_free():
    assert torch.equal(linear_map(4), torch.arange(1, 17, dtype=torch.float32) / 16)  # no code stands for 0
    assert linear_map(4, zero=True)[0] == 0


@pytest.mark.parametrize("name", MAPS)
def test_lookup_table_finds_the_nearest_code(name):
    cm = code_map(name)
    g = torch.Generator().manual_seed(0)
    inner = cm.midpoints[:-1]
    x = torch.cat(
        [
            torch.rand(20000, generator=g) * 2 - 1,
            torch.randn(20000, generator=g) * 1e-3,
            torch.rand(2000, generator=g) * 1e-6,
            torch.tensor([0.0, -0.0, 1.0, -1.0]),
            inner,
            inner.nextafter(torch.tensor(2.0)),
            inner.nextafter(torch.tensor(-2.0)),
            cm.values,
            -cm.values,
        ]
    ).clamp(-1, 1)
    assert torch.equal(cm.encode(x), cm.encode_with_lut(x))
    # the rule is "nearest value": no other code is closer (up to the rounding of the fp32 midpoints)
    err = (cm.decode(cm.encode(x)) - x).abs()
    best = (x[:, None] - cm.values[None, :]).abs().min(dim=1).values
    assert bool((err <= best + 1e-7).all())


def test_unknown_code_map():
    with pytest.raises(ValueError, match="code map"):
        code_map("de16")


# ------------------------------------------------------------------------------------------- quantize / dequantize
def _data(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "heavy":  # Cauchy-like tails: a few huge values per block
        return torch.randn(n, generator=g) / torch.rand(n, generator=g).clamp_min(1e-4)
    return torch.zeros(n)


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("kind", ["normal", "heavy", "zeros"])
@pytest.mark.parametrize(("n", "block"), [(2048, 256), (1000, 128), (77, 16), (1, 32)])
def test_round_trip_error_bound_per_block(name, kind, n, block):
    cm = code_map(name)
    x = _data(kind, n)
    if not cm.signed:
        x = x.abs()
    codes, scales = quantize_blockwise(x, cm, block)
    assert codes.dtype == torch.uint8 and codes.numel() == (n if cm.bits == 8 else (n + 1) // 2)
    assert scales.dtype == torch.float32 and scales.numel() == -(-n // block)
    y = dequantize_blockwise(codes, scales, cm, block, (n,))
    # each block: scale = absmax, and every element within half the widest gap of the map (times the scale)
    pad = (-n) % block
    xb = torch.cat([x, x.new_zeros(pad)]).view(-1, block)
    yb = torch.cat([y, y.new_zeros(pad)]).view(-1, block)
    torch.testing.assert_close(scales, xb.abs().amax(1), rtol=0, atol=0)
    widest = (cm.values[1:] - cm.values[:-1]).max()
    # a signed DE map has no -1.0: the most negative value is -0.99297, so that end adds its own gap
    edge = (cm.values[0] + 1).abs() if cm.signed else cm.values[0].abs()
    bound = (torch.maximum(widest / 2, edge) + 1e-6) * scales[:, None] + 1e-30  # + fp32 rounding of x / s
    assert bool(((xb - yb).abs() <= bound).all())
    if kind == "zeros":
        assert bool((y == 0).all())


def test_empty_and_non_finite_inputs():
    codes, scales = quantize_blockwise(torch.zeros(0), "de8s", 256)
    assert codes.numel() == 0 and scales.numel() == 0
    assert dequantize_blockwise(codes, scales, "de8s", 256, (0, 3)).shape == (0, 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(300)
        x[17] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize_blockwise(x, "de8s", 256)
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(torch.randn(10), "de8s", 100)


def test_nibble_packing_odd_sizes():
    for n in (0, 1, 2, 7, 128, 129):
        c = torch.randint(0, 16, (n,), dtype=torch.uint8)
        packed = pack_nibbles(c)
        assert packed.numel() == (n + 1) // 2
        assert torch.equal(unpack_nibbles(packed, n), c)


# ---------------------------------------------------------------------------------------------- QuantizedState
def test_quantized_state_zeros_copy_view_narrow():
    q = QuantizedState.zeros((8, 96), "de8s", block_size=64)
    assert bool((q.dequantize() == 0).all())
    x = torch.randn(8, 96)
    q.copy_(x)
    full = q.dequantize()
    # one rounding of each value: at most one code step of its block's absmax (tests/tolerances.py)
    assert full.shape == (8, 96) and (full - x).abs().max() <= roundtrip_tol("8bit", "first") * x.abs().max()
    assert q.view(96, 8).dequantize().shape == (96, 8)
    part = q.narrow(128, 256)  # blocks 2..5: shares storage
    assert torch.equal(part.dequantize(), full.reshape(-1)[128:384])
    assert part.codes.data_ptr() == q.codes.data_ptr() + 128
    tail = q.narrow(704, 64)
    assert torch.equal(tail.dequantize(), full.reshape(-1)[704:])
    with pytest.raises(ValueError, match="whole blocks"):
        q.narrow(10, 64)
    four = QuantizedState.zeros((129,), "lin4u", block_size=32)
    four.copy_(torch.rand(129))
    assert torch.equal(four.narrow(64, 65).dequantize(), four.dequantize()[64:])
    assert "map=de8s" in repr(q)


def test_quantized_state_checks_its_tensors():
    with pytest.raises(ValueError, match="codes"):
        QuantizedState(torch.zeros(10), torch.zeros(1), "de8s", 16, (10,))
    with pytest.raises(ValueError, match="scales"):
        QuantizedState(torch.zeros(10, dtype=torch.uint8), torch.zeros(3), "de8s", 16, (10,))


# ---------------------------------------------------------------------------------- moment helpers (for reuse)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit", "4bit"])
@pytest.mark.parametrize("kind", ["first", "second"])
def test_moment_helpers_match_their_registry_rule(precision, kind):
    param = torch.randn(40, 33)
    fmt = MomentFormat(
        precision, kind, block_size=32 if precision in ("8bit", "4bit") else None, min_quantized_numel=100
    )
    state: dict = {}
    init_moment(state, "exp_avg", param, fmt)
    declared = {t.name: t for t in moment_state("exp_avg", tuple(param.shape), param.dtype, fmt)}
    assert set(state) == set(declared)
    for name, t in state.items():
        assert tuple(t.shape) == declared[name].shape and t.dtype == declared[name].dtype
    value = param.abs() if kind == "second" else param
    m = load_moment(state, "exp_avg", fmt, param.shape)
    m.add_(value)
    store_moment(state, "exp_avg", m, fmt)
    back = load_moment(state, "exp_avg", fmt, param.shape)
    # one rounding: half a bf16 spacing, or one code step of the block's absmax (tests/tolerances.py)
    tol = roundtrip_tol(precision, kind)
    assert (back - value).abs().max() <= tol * value.abs().max() + 1e-12
    small = torch.randn(10)
    state = {}
    init_moment(state, "exp_avg", small, fmt)
    assert "exp_avg" in state  # below min_quantized_numel: full precision


def test_moment_format_validation():
    with pytest.raises(ValueError, match="precision"):
        MomentFormat("int8")
    with pytest.raises(ValueError, match="block_size"):
        MomentFormat("8bit", block_size=20)
    with pytest.raises(ValueError, match="min_quantized_numel"):
        MomentFormat("8bit", min_quantized_numel=-5)


# ------------------------------------------- sharded layouts (DTensor state; torchrun checks: test_distributed.py)
def _slots(x: torch.Tensor, shards: int, qmap: str, block: int, codes=None, scales=None):
    """The global codes / scales of ``x`` quantized per dim-0 shard in the slot layout (as ``shards`` ranks
    holding a DTensor would have them), built from the unsharded quantization (``codes`` / ``scales`` if
    given)."""
    if codes is None:
        codes, scales = quantize_blockwise(x, qmap, block)
    parts = [
        reshard_quantized(codes, scales, 1, ShardLayout(x.shape, shards, k), qmap, block)[:2] for k in range(shards)
    ]
    return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])


@pytest.mark.parametrize("shape", [(5, 3), (1, 7), (8,), (3, 64)])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_shard_layout_splits_like_torch_chunk(shape, shards):
    """Shard k holds torch.chunk's k-th piece (FSDP2's split; trailing shards may be short or empty)."""
    full = torch.arange(math.prod(shape)).reshape(shape)
    chunks = list(full.chunk(shards))
    chunks += [full[:0]] * (shards - len(chunks))
    offset = 0
    for k in range(shards):
        layout = ShardLayout(torch.Size(shape), shards, k)
        assert layout.local_shape == tuple(chunks[k].shape) and layout.local_offset == offset
        assert layout.local_numel == chunks[k].numel() <= layout.capacity
        offset += layout.local_numel
    scalar = ShardLayout(torch.Size(()))
    assert scalar.local_shape == () and scalar.local_numel == scalar.capacity == 1


@pytest.mark.parametrize(("qmap", "block"), [("de8s", 32), ("de8u", 16), ("de4s", 32), ("lin4u", 16)])
def test_reshard_copies_coinciding_blocks_and_requantizes_the_others(qmap, block):
    torch.manual_seed(0)
    signed = not qmap.endswith("u")
    aligned = torch.randn(6, 32) if signed else torch.rand(6, 32)  # 2 or 3 shards of 2-3 rows: whole blocks
    for shards in (2, 3):
        codes, scales = _slots(aligned, shards, qmap, block)
        back_codes, back_scales, requantized = reshard_quantized(
            codes, scales, shards, ShardLayout(aligned.shape), qmap, block
        )
        assert not requantized
        expected = quantize_blockwise(aligned, qmap, block)
        assert torch.equal(back_codes, expected[0]) and torch.equal(back_scales, expected[1])
    odd = torch.randn(7, 9) if signed else torch.rand(7, 9)  # shards of 36 / 27 elements cut blocks
    codes, scales = _slots(odd, 2, qmap, block)
    values = dequantize_blockwise(*quantize_blockwise(odd, qmap, block), qmap, block, odd.shape)
    for target in (ShardLayout(odd.shape), ShardLayout(odd.shape, 3, 1)):
        new_codes, new_scales, requantized = reshard_quantized(codes, scales, 2, target, qmap, block)
        assert requantized
        n, start = target.local_numel, target.local_offset
        got = dequantize_blockwise(
            new_codes[: (n if code_map(qmap).bits == 8 else (n + 1) // 2)],
            new_scales[: -(-n // block)],
            qmap,
            block,
            (n,),
        )
        # two roundings (per old shard, then per new block) from the same values: within two code gaps
        assert (got - values.reshape(-1)[start : start + n]).abs().max() <= 0.5 * odd.abs().max()
    with pytest.raises(ValueError, match="block_size"):
        reshard_quantized(codes, scales, 2, ShardLayout(odd.shape), qmap, block * 2)


def test_registry_rule_on_a_shard_counts_its_slot():
    """The memory planner applies the state rule to device 0's shard (ceil(rows / N) rows): exactly the slot a
    sharded quantized moment allocates on every rank."""
    for precision, kind in (("8bit", "first"), ("4bit", "second")):
        fmt = MomentFormat(precision, kind, block_size=64, min_quantized_numel=16)
        for shape, shards in (((1000, 33), 3), ((7, 129), 2), ((4097,), 4)):
            layout = ShardLayout(torch.Size(shape), shards)
            shard_shape = (layout.chunk_rows, *shape[1:])
            declared = {t.name: t.nbytes for t in moment_state("m", shard_shape, torch.float32, fmt)}
            slot_codes, slot_scales = layout.slot_sizes(fmt.bits, fmt.blocks)
            assert declared == {"m_codes": slot_codes, "m_scales": 4 * slot_scales}


def test_a_plain_optimizer_loads_state_quantized_on_shards():
    """A state dict of 2 shards in plain tensors (``get_optimizer_state_dict(full_state_dict=True)``) loads
    into an unsharded optimizer: copied where blocks coincide, requantized with a warning where not."""
    for cols, warns in ((32, False), (33, True)):  # shard boundary at 32 * cols: a multiple of 64, or not
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, cols))
        opt = lmopt.AdamW8bit([p], lr=1e-2, block_size=64, min_quantized_numel=16)
        p.grad = torch.randn_like(p)
        opt.step()
        sd = opt.state_dict()
        state = sd["state"][0] = dict(sd["state"][0])  # torch's state_dict shares the state's dicts
        for name, kind in (("exp_avg", "first"), ("exp_avg_sq", "second")):
            fmt = MomentFormat("8bit", kind, 64)
            codes, scales = opt.state[p][f"{name}_codes"], opt.state[p][f"{name}_scales"]
            state[f"{name}_codes"], state[f"{name}_scales"] = _slots(p.detach(), 2, fmt.qmap, 64, codes, scales)
            state[f"{name}_shards"] = 2
        q = torch.nn.Parameter(p.detach().clone())
        other = lmopt.AdamW8bit([q], lr=1e-2, block_size=64, min_quantized_numel=16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            other.load_state_dict(sd)
        assert any("requantized" in str(w.message) for w in caught) == warns
        assert set(other.state[q]) == {
            "step",
            "exp_avg_codes",
            "exp_avg_scales",
            "exp_avg_sq_codes",
            "exp_avg_sq_scales",
        }
        assert other.state[q]["exp_avg_codes"].shape == p.shape  # the unsharded layout again
        for name, kind in (("exp_avg", "first"), ("exp_avg_sq", "second")):
            fmt = MomentFormat("8bit", kind, 64)
            a, b = load_moment(other.state[q], name, fmt, q.shape), load_moment(opt.state[p], name, fmt, p.shape)
            if warns:  # two requantizations (to the 2-shard slots above, and back): each within 0.0071 x absmax
                assert (a - b).abs().max() <= 2 * 0.0071 * b.abs().max()
            else:
                assert torch.equal(a, b)


# ----------------------------------------------------------------------------- kernel == reference, bit for bit
SHAPES = [(37, 129), (4096 + 7,), (100,)]


def _pair(cls, dtype, **kw):
    torch.manual_seed(0)
    base = [torch.randn(s).to(dtype) for s in SHAPES]
    params = [[torch.nn.Parameter(t.clone()) for t in base] for _ in range(2)]
    opts = [cls(params[0], implementation="for_loop", **kw), cls(params[1], implementation="fused", **kw)]
    return params, opts


def _steps(params, opts, dtype, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        grads = [(torch.randn(s, generator=g) * 0.1 * (k + 1)).to(dtype) for s in SHAPES]
        for ps, opt in zip(params, opts):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            opt.step()


CLASSES = [
    (lmopt.AdamW8bit, {}),
    (lmopt.AdamW4bit, {"weight_decay": 0.1}),
    (lmopt.Adam8bit, {"weight_decay": 0.1}),
    (lmopt.Lion8bit, {"weight_decay": 0.5}),
    (lmopt.AdamW8bit, {"maximize": True, "block_size": 64}),
    # no weight decay: the kernel's compile-time specializations without the decay term
    (lmopt.AdamW8bit, {"weight_decay": 0.0}),
    (lmopt.AdamW4bit, {"weight_decay": 0.0, "block_size": 256}),
    (lmopt.Lion8bit, {"weight_decay": 0.0}),
]
KERNEL_CASES = [
    (c, kw, dt, r)
    for c, kw in CLASSES
    for dt, rs in ((torch.float32, ["nearest"]), (torch.bfloat16, ["nearest", "stochastic", "kahan"]))
    for r in rs
]


@pytest.mark.skipif(not KERNEL, reason="CPU kernel unavailable")
@pytest.mark.parametrize(
    ("cls", "kw", "dtype", "rounding"),
    KERNEL_CASES,
    ids=[f"{c.__name__}-{i}-{str(d)[6:]}-{r}" for i, (c, kw, d, r) in enumerate(KERNEL_CASES)],
)
def test_kernel_matches_reference_bit_for_bit(cls, kw, dtype, rounding):
    params, opts = _pair(cls, dtype, param_rounding=rounding, **kw)
    _steps(params, opts, dtype)
    for a, b in zip(*params):
        assert torch.equal(a, b)
        for key, value in opts[0].state[a].items():
            assert torch.equal(value, opts[1].state[b][key]), key


@pytest.mark.skipif(not KERNEL, reason="CPU kernel unavailable")
def test_kernel_mixed_grad_dtype_and_threads():
    # fp32 parameters with bf16 gradients, and a split across threads of many blocks
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(300, 1000))
    p2 = torch.nn.Parameter(p1.detach().clone())
    p1.grad_dtype = p2.grad_dtype = None  # allow bf16 gradients on fp32 parameters
    o1 = lmopt.AdamW8bit([p1], implementation="for_loop")
    o2 = lmopt.AdamW8bit([p2], implementation="fused")
    for _ in range(3):
        grad = torch.randn(300, 1000).to(torch.bfloat16)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)


def test_kernel_build_failure_falls_back_with_a_warning(monkeypatch):
    saved = dict(kernel_module._STATE)
    try:
        kernel_module._STATE.clear()
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setattr(kernel_module.shutil, "which", lambda name: None)
        with pytest.warns(RuntimeWarning, match="PyTorch path"):
            assert kernel_module.load() is None
        p = torch.nn.Parameter(torch.randn(5000))
        opt = lmopt.AdamW8bit([p])
        p.grad = torch.randn(5000)
        opt.step()
        assert "unavailable" in opt.state_summary()
    finally:
        kernel_module._STATE.clear()
        kernel_module._STATE.update(saved)


# ------------------------------------------------------------------------------------------ state, summary, memory
def test_summary_shows_small_tensors_kept_in_fp32():
    big, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(100))
    opt = lmopt.AdamW4bit([big, small])
    (big.sum() + small.sum()).backward()
    opt.step()
    assert set(opt.state[big]) == {"step", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"}
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    summary = opt.state_summary()
    assert "1 tensors with 4bit state" in summary and "1 small tensors (< 4096 elements)" in summary
    assert summary in repr(opt)
    assert lmopt.get_spec("adamw4bit").bytes_per_parameter() < 1.1
    assert lmopt.get_spec("adamw8bit").bytes_per_parameter() < 2.05


@pytest.mark.parametrize("cls", [lmopt.AdamW8bit, lmopt.AdamW])
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_bf16_resume_is_bit_exact(rounding, cls):
    def make():
        torch.manual_seed(0)
        return torch.nn.Parameter(torch.randn(70, 80).to(torch.bfloat16))

    def run(p, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            p.grad = torch.randn(70, 80, generator=g).to(torch.bfloat16)
            opt.step()

    straight = make()
    opt = cls([straight], lr=1e-3, param_rounding=rounding)
    run(straight, opt, 4, 1)
    run(straight, opt, 4, 2)
    first = make()
    opt_first = cls([first], lr=1e-3, param_rounding=rounding)
    run(first, opt_first, 4, 1)
    buffer = io.BytesIO()
    torch.save({"p": first.detach(), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for name, value in saved["opt"]["state"][0].items():  # dtypes survive torch.load(weights_only=True)
        assert value.dtype == opt_first.state[first][name].dtype, name
    resumed = torch.nn.Parameter(saved["p"].clone())
    opt_resumed = cls([resumed], lr=1e-3, param_rounding=rounding)
    opt_resumed.load_state_dict(saved["opt"])
    run(resumed, opt_resumed, 4, 2)
    assert torch.equal(resumed, straight)
    for key, value in opt.state[straight].items():
        assert value.dtype == opt_resumed.state[resumed][key].dtype
        assert torch.equal(value, opt_resumed.state[resumed][key]), key


@pytest.mark.skipif(not KERNEL, reason="CPU kernel unavailable")
def test_a_kernel_step_allocates_no_full_model_temporaries():
    params = [torch.nn.Parameter(torch.randn(512, 512)) for _ in range(4)]
    opt = lmopt.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    allocated = sum(max(0, e.cpu_memory_usage) for e in prof.events())
    # far below one parameter's fp32 moment (1 MiB): only the step counters' bookkeeping
    assert allocated < 512 * 512 * 4 // 16, allocated


# ------------------------------------------------------------------------------ bf16 without a master copy
OPTIMIZERS = {
    "AdamW8bit": lambda p, r: lmopt.AdamW8bit([p], lr=2e-4, weight_decay=0.0, param_rounding=r),
    "AdamW4bit": lambda p, r: lmopt.AdamW4bit([p], lr=2e-4, weight_decay=0.0, param_rounding=r),
    "Lion8bit": lambda p, r: lmopt.Lion8bit([p], lr=2e-4, param_rounding=r),
    "AdamW fp32 state": lambda p, r: lmopt.AdamW([p], lr=2e-4, weight_decay=0.0, state_dtype="fp32", param_rounding=r),
    "AdamW bf16 state": lambda p, r: lmopt.AdamW([p], lr=2e-4, weight_decay=0.0, state_dtype="bf16", param_rounding=r),
}


def _bf16_drift(name: str, rounding: str | None, steps: int = 200) -> float:
    """Mean parameter after ``steps`` of a bf16 run (no master copy), or of the fp32 run when rounding is None."""
    torch.manual_seed(0)
    target = torch.full((8192,), 1.05)
    start = 1.0 + torch.rand(8192) * 0.01
    p = torch.nn.Parameter(start.clone().to(torch.bfloat16 if rounding else torch.float32))
    opt = OPTIMIZERS[name](p, rounding or "nearest")
    for _ in range(steps):
        p.grad = (p.detach().float() - target).to(p.dtype)
        opt.step()
    return p.detach().float().mean().item()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_plain_bf16_rounding_stalls_where_stochastic_and_kahan_track_fp32(name):
    fp32 = _bf16_drift(name, None)
    moved = fp32 - 1.005  # Adam and Lion move ~lr per step: 0.02-0.04 in 200 steps
    assert moved > 0.015
    nearest, stochastic, kahan = (_bf16_drift(name, r) for r in ("nearest", "stochastic", "kahan"))
    assert abs(nearest - 1.005) < 0.01  # lr * update is below half a bf16 ulp at 1.0 (2**-8): no movement
    assert abs(stochastic - fp32) < 0.1 * moved
    assert abs(kahan - fp32) < 0.1 * moved


def test_stochastic_rounding_is_unbiased_and_keyed():
    x = torch.full((20000,), 1.0 + 2**-10)  # a quarter of the way from 1.0 to the next bf16 value
    r = stochastic_round_bf16(x, key=123).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - x[0].item()) < 2e-4
    assert torch.equal(r, stochastic_round_bf16(x, key=123).float())
    assert not torch.equal(r, stochastic_round_bf16(x, key=124).float())


def test_fp16_stochastic_rounding_is_refused():
    p = torch.nn.Parameter(torch.randn(10).half())
    opt = lmopt.AdamW8bit([p], param_rounding="stochastic")
    p.grad = torch.randn(10).half()
    with warnings.catch_warnings(), pytest.raises(ValueError, match="kahan"):
        opt.step()
