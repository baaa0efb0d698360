"""CAME and Adafactor with a bf16 / 8-bit / 4-bit first moment (``momentum_precision``).

The generic tests (tests/optim_db.py: came8bit, came4bit, came_bf16, adafactor8bit, ...) check these against the
full-precision peers with the stored moment rounded after every step, resume, dtypes, declared state, the
non-finite policy and FSDP2. Here: the trajectory against fp32 state, the exact state bytes, validation,
checkpoints from before the option, and the pieces of the implementation.
"""

from __future__ import annotations

import importlib
import io

import pytest
import torch
from torch import nn

import lmopt
from lmopt.cli import main
from lmopt.optim._momentum import MOMENTUM_PRECISIONS

STEPS = 100
# Largest ||p - p_fp32|| / ||p_fp32 - p_init|| over the parameters after 100 steps, and the final training loss
# (mean of the last 10 steps) relative to the fp32-state run. Measured on this problem (lr 3e-3): 8-bit CAME
# 0.016 / +0.01%, 8-bit Adafactor 0.006 / +0.25%; 4-bit CAME 0.20 / +8%, 4-bit Adafactor 0.11 / +23% (AdamW4bit
# against AdamW on the same problem: 0.14 / +21%: four bits cost the same early in training); bf16 < 0.01.
TOLERANCE = {"bf16": (0.02, 0.01), "8bit": (0.05, 0.01), "4bit": (0.3, 0.3)}
OPTIMIZERS = ["came", "adafactor_momentum"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    # a noisy least-squares problem: the 8192-element weight is quantized (default threshold 4096, blocks of
    # 256 / 128), the 64-element bias keeps an fp32 moment
    return nn.Linear(128, 64)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS) -> float:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(128, 64, generator=g) / 8
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 128, generator=g)
        y = x @ w + 0.1 * torch.randn(32, 64, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("precision", ["8bit", "4bit", "bf16"])
def test_tracks_the_fp32_state_trajectory(name, precision):
    init, fp32, low = _model(), _model(), _model()
    loss_fp32 = _train(fp32, lmopt.create_optimizer(name, list(fp32.parameters()), lr=3e-3))
    opt = lmopt.create_optimizer(name, list(low.parameters()), lr=3e-3, momentum_precision=precision)
    loss_low = _train(low, opt)
    if precision != "bf16":
        assert "exp_avg_codes" in opt.state[low.weight] and "exp_avg" in opt.state[low.bias]
    bound, loss_bound = TOLERANCE[precision]
    for p, q, p0 in zip(low.parameters(), fp32.parameters(), init.parameters()):
        travelled = (q - p0).norm()
        assert travelled > 0
        gap = ((p - q).norm() / travelled).item()
        assert gap < bound, (p.shape, gap)
    assert abs(loss_low / loss_fp32 - 1) < loss_bound, (loss_low, loss_fp32)


# ------------------------------------------------------------------------------------------- exact state bytes
EXPECTED_CODES = {"8bit": lambda n: n, "4bit": lambda n: (n + 1) // 2}
DEFAULT_BLOCK = {"8bit": 256, "4bit": 128}


@pytest.mark.parametrize("name", ["came8bit", "came4bit", "adafactor8bit", "adafactor4bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_match_the_declaration(name, dtype):
    bits = name[-4:]
    torch.manual_seed(0)
    # odd sizes (partial last block, odd 4-bit count), a 3-d tensor, and small tensors below the threshold
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in [(65, 67), (3, 40, 50), (4096,), (4095,), (7, 9)]]
    opt = lmopt.create_optimizer(name, params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    spec, implied = lmopt.registry.resolve_name(name)
    for p in params:
        state = opt.state[p]
        declared = spec.state_tensors(p.shape, p.dtype, **implied)
        assert {t.name: (t.shape, t.dtype) for t in declared} == {
            k: (tuple(v.shape), v.dtype) for k, v in state.items()
        }
        assert sum(v.nbytes for v in state.values()) == spec.state_bytes(p.shape, p.dtype, **implied)
        n = p.numel()
        if n >= 4096:
            assert state["exp_avg_codes"].dtype == torch.uint8
            assert state["exp_avg_codes"].numel() == EXPECTED_CODES[bits](n)
            assert state["exp_avg_scales"].dtype == torch.float32
            assert state["exp_avg_scales"].numel() == -(-n // DEFAULT_BLOCK[bits])
            assert "exp_avg" not in state
        else:  # small tensors keep an fp32 moment whatever the parameter dtype
            assert state["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in state


def test_bytes_per_parameter():
    get = lmopt.get_spec
    factors = {"came": 4 * 4096 * 4, "adafactor": 2 * 4096 * 4}  # fp32 row/column statistics of 4096 x 4096
    n = 4096 * 4096
    for base in ("came", "adafactor"):
        extra = {"beta1": 0.9} if base == "adafactor" else {}
        for precision, per_param in (("8bit", 1 + 4 / 256), ("4bit", 0.5 + 4 / 128), ("bf16", 2.0), ("fp32", 4.0)):
            expected = per_param + (factors[base] + 4) / n
            got = get(base).bytes_per_parameter(momentum_precision=precision, **extra)
            assert got == pytest.approx(expected, rel=1e-12), (base, precision)
    spec, implied = lmopt.registry.resolve_name("came8bit")
    assert spec.state_bytes((4096, 4096), **implied) == 4 + 4096 * 4096 + 4096 * 4096 // 256 * 4 + factors["came"]


def test_aliases_and_listing(capsys, monkeypatch):
    for name, base, implied in [
        ("came8bit", "came", {"momentum_precision": "8bit"}),
        ("came4bit", "came", {"momentum_precision": "4bit"}),
        ("came_bf16", "came", {"momentum_precision": "bf16"}),
        ("adafactor8bit", "adafactor", {"beta1": 0.9, "momentum_precision": "8bit"}),
        ("adafactor4bit", "adafactor", {"beta1": 0.9, "momentum_precision": "4bit"}),
        ("adafactor_bf16", "adafactor", {"beta1": 0.9, "momentum_precision": "bf16"}),
    ]:
        spec, got = lmopt.registry.resolve_name(name)
        # the aliases imply the one precision axis (``state_precision``; momentum_precision is its deprecated name)
        implied = {("state_precision" if k == "momentum_precision" else k): v for k, v in implied.items()}
        assert spec.name == base and got == implied
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["list", "--family", "factored"]) == 0
    out = capsys.readouterr().out
    assert "came8bit (1.020)" in out and "came4bit (0.535)" in out and "adafactor8bit (1.018)" in out


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ["came", "adafactor_momentum"])
@pytest.mark.parametrize("bad", ["int8", "fp16", "8-bit", 8, torch.float16])
def test_bad_precision_names_the_argument_and_the_choices(name, bad):
    with pytest.raises(ValueError, match=r"momentum_precision must be one of \[None, 'fp32', 'bf16', '8bit', '4bit'\]"):
        lmopt.create_optimizer(name, [nn.Parameter(torch.zeros(3))], momentum_precision=bad)


def test_dtypes_are_named_and_groups_validated():
    p = nn.Parameter(torch.zeros(3))
    assert lmopt.CAME([p], momentum_precision=torch.bfloat16).param_groups[0]["momentum_precision"] == "bf16"
    assert MOMENTUM_PRECISIONS == (None, "fp32", "bf16", "8bit", "4bit")
    opt = lmopt.CAME([p])
    with pytest.raises(ValueError, match="momentum_precision"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "momentum_precision": "2bit"})


def test_adafactor_precision_needs_beta1():
    with pytest.raises(ValueError, match="needs beta1"):
        lmopt.Adafactor([nn.Parameter(torch.zeros(3))], momentum_precision="8bit")
    lmopt.Adafactor([nn.Parameter(torch.zeros(3))], beta1=0.9, momentum_precision="8bit")


# ---------------------------------------------------------------------------------------------- implementation
@pytest.mark.parametrize("name", ["came8bit", "adafactor4bit"])
def test_bf16_parameters_resume_bit_exactly(name):
    def make():
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(70, 80).to(torch.bfloat16)), nn.Parameter(torch.randn(80).bfloat16())]

    def run(params, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()

    straight = make()
    opt = lmopt.create_optimizer(name, straight, lr=1e-2)
    run(straight, opt, 3, 1)
    run(straight, opt, 3, 2)
    first = make()
    opt_first = lmopt.create_optimizer(name, first, lr=1e-2)
    run(first, opt_first, 3, 1)
    buffer = io.BytesIO()
    torch.save(opt_first.state_dict(), buffer)
    buffer.seek(0)
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    opt_resumed = lmopt.create_optimizer(name, resumed, lr=1e-2)
    opt_resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt_resumed.state[resumed[0]]["exp_avg_codes"].dtype == torch.uint8
    assert opt_resumed.state[resumed[0]]["exp_avg_scales"].dtype == torch.float32
    run(resumed, opt_resumed, 3, 2)
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["came", "adafactor_momentum"])
def test_checkpoints_from_before_the_option_still_load(name):
    """A state dict written before ``momentum_precision`` existed has param groups without its keys: it loads,
    steps, and keeps the first moment in the parameter's dtype, as then."""
    params = [nn.Parameter(torch.randn(20, 30).bfloat16())]
    opt = lmopt.create_optimizer(name, params, lr=1e-3)
    params[0].grad = torch.randn(20, 30).bfloat16()
    opt.step()
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("momentum_precision", "block_size", "min_quantized_numel"):
            del group[key]
    other = lmopt.create_optimizer(name, params, lr=1e-3)
    other.load_state_dict(sd)
    other.step()
    assert other.state[params[0]]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["came", "adafactor_momentum"])
def test_fused_and_for_loop_move_p_by_the_unrounded_moment(name):
    """With a bf16 moment both paths update the parameter from the new moment before it is rounded for storage
    (fp64 parameters: the two paths then agree to rounding, a bf16 ulp of m would show as ~1e-3)."""
    out = []
    for impl in ("for_loop", "fused"):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(40, 50, dtype=torch.float64))
        opt = lmopt.create_optimizer(name, [p], lr=1e-2, momentum_precision="bf16", implementation=impl)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            p.grad = torch.randn(40, 50, generator=g, dtype=torch.float64)
            opt.step()
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def test_quantized_tensors_step_one_at_a_time(monkeypatch):
    """Quantized moments are dequantized one tensor at a time (fp32 temporaries of one tensor, never the model's);
    full-precision ones go through the functional step together, as before."""
    came_module = importlib.import_module("lmopt.optim.came")  # the package re-exports the function `came`
    calls = []
    real = came_module.came

    def spy(params, *args, **kwargs):
        calls.append([p.numel() for p in params])
        return real(params, *args, **kwargs)

    monkeypatch.setattr(came_module, "came", spy)
    params = [nn.Parameter(torch.randn(s)) for s in [(64, 80), (100,), (90, 70), (10, 3)]]
    opt = lmopt.CAME(params, momentum_precision="4bit")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [[100, 30], [5120], [6300]]
    assert "2 tensors quantized" in repr(opt) and "2 small tensors in full precision" in repr(opt)


@pytest.mark.parametrize("name", ["came8bit", "adafactor8bit"])
def test_an_overflowed_update_leaves_the_moment_non_finite_like_fp32(name):
    """Finite gradients too large for fp32 math overflow the update (g^2 = inf): an fp32 moment becomes NaN, and
    so does a quantized one (NaN block scales) -- the step completes instead of failing after p has moved."""
    results = {}
    for precision in ("fp32", "8bit"):
        p = nn.Parameter(torch.randn(64, 80))
        opt = lmopt.create_optimizer(name, [p], lr=1e-3, momentum_precision=precision)
        p.grad = torch.full_like(p, 1e30)
        opt.step()
        state = opt.state[p]
        m = state["exp_avg"] if "exp_avg" in state else state["exp_avg_scales"]
        results[precision] = bool(torch.isfinite(m).all())
    assert results == {"fp32": False, "8bit": False}
