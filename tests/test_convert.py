"""lmopt.convert_state: optimizer state between torch.optim, lmopt precisions, bitsandbytes and torchao."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lmopt
from lmopt.quant.blockwise import QuantizedState
from lmopt.quant.moments import MomentFormat


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 80), nn.Linear(80, 3))  # a 5120-element matrix: quantized by default


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _pair(model: nn.Module) -> nn.Module:
    twin = _model()
    twin.load_state_dict(model.state_dict())
    return twin


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_a_torch_adamw_run_continues_in_lmopt():
    """Switch a torch.optim.AdamW run to lmopt's AdamW: the next steps are torch's (fp32 rounding apart: the two
    compute the same expression in another order)."""
    ours_model, theirs_model = _model(), _model()
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(theirs_model, theirs, 3, seed=0)
    ours_model.load_state_dict(theirs_model.state_dict())
    ours = lmopt.create_optimizer("adamw", list(ours_model.parameters()), lr=1e-2, weight_decay=0.1)
    ours.load_state_dict(lmopt.convert_state(theirs.state_dict(), ours))
    _train(theirs_model, theirs, 3, seed=1)
    _train(ours_model, ours, 3, seed=1)
    assert _max_diff(ours_model, theirs_model) < 1e-6
    # and back: lmopt's state loads into torch's AdamW as it is
    again = torch.optim.AdamW(_pair(ours_model).parameters(), lr=1e-2, weight_decay=0.1)
    again.load_state_dict(lmopt.convert_state(ours, again))
    assert torch.equal(
        again.state[again.param_groups[0]["params"][0]]["exp_avg"], ours.state[ours_model[0].weight]["exp_avg"]
    )


@pytest.mark.parametrize("precision", ["bf16", "8bit", "4bit"])
def test_precision_round_trip_rounds_once(precision):
    """fp32 -> low precision -> fp32 gives the moments rounded once to that precision, exactly; converting the
    low-precision state to itself changes nothing."""
    model = _model()
    fp32 = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
    _train(model, fp32, 3, seed=0)
    low = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2, state_precision=precision)
    low.load_state_dict(lmopt.convert_state(fp32, low))
    back = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
    back.load_state_dict(lmopt.convert_state(low, back))
    w = model[0].weight
    for name, kind in (("exp_avg", "first"), ("exp_avg_sq", "second")):
        original = fp32.state[w][name]
        if precision == "bf16":
            expected = original.bfloat16().float()
        else:
            fmt = MomentFormat(precision, kind)
            q = QuantizedState.zeros(w.shape, fmt.qmap, fmt.blocks)
            q.copy_(original)
            expected = q.dequantize(torch.float32).reshape(w.shape)
        assert torch.equal(back.state[w][name], expected), name
    same = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2, state_precision=precision)
    same.load_state_dict(lmopt.convert_state(low, same))
    for key, value in low.state[w].items():
        assert torch.equal(same.state[w][key], value), key
    # the converted optimizer trains on
    _train(model, low, 2, seed=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_from_bitsandbytes_8bit_equals_its_dequantization():
    bnb = pytest.importorskip("bitsandbytes")
    functional = pytest.importorskip("bitsandbytes.functional")
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)
        _train(model, theirs, 3, seed=0)
    ours = lmopt.create_optimizer("adamw8bit", list(model.parameters()), lr=1e-2)
    ours.load_state_dict(lmopt.convert_state(theirs.state_dict(), ours))
    w = model[0].weight
    quant = theirs.state_dict()["state"][0]["__bnb_optimizer_quant_state__"]
    for which, name in (("1", "exp_avg"), ("2", "exp_avg_sq")):
        oracle = functional.dequantize_blockwise(
            quant[f"state{which}"], absmax=quant[f"absmax{which}"], code=quant[f"qmap{which}"], blocksize=256
        ).reshape(w.shape)
        fmt = MomentFormat("8bit", "first" if which == "1" else "second")
        got = QuantizedState(
            ours.state[w][f"{name}_codes"].view(-1), ours.state[w][f"{name}_scales"], fmt.qmap, fmt.blocks, w.shape
        ).dequantize(torch.float32)
        # lmopt re-rounds bitsandbytes' values to its own map: at most half a code step of the block's absmax
        assert (got.reshape(w.shape) - oracle).abs().max() <= 0.05 * oracle.abs().max()
    small = model[1].bias  # below bitsandbytes' min_8bit_size: fp32 on both sides, exactly
    assert torch.equal(ours.state[small]["exp_avg"], quant_small(theirs, 3)["state1"])
    assert float(ours.state[w]["step"]) == 3


def quant_small(opt, index):
    return opt.state_dict()["state"][index]["__bnb_optimizer_quant_state__"]


def test_from_torchao_low_bit_equals_its_dequantization():
    optim = pytest.importorskip("torchao.optim")
    for cls in ("AdamW8bit", "AdamW4bit"):
        model = _model()
        theirs = getattr(optim, cls)(model.parameters(), lr=1e-2)
        _train(model, theirs, 3, seed=0)
        ours = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
        ours.load_state_dict(lmopt.convert_state(theirs, ours))
        w = model[0].weight
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[w][name], theirs.state[w][name].dequantize().float()), (cls, name)


def test_lion_momentum_converts_between_precisions():
    model = _model()
    fp32 = lmopt.create_optimizer("lion", list(model.parameters()), lr=1e-3)
    _train(model, fp32, 3, seed=0)
    low = lmopt.create_optimizer("lion8bit", list(model.parameters()), lr=1e-3)
    with pytest.raises(ValueError, match="step="):
        lmopt.convert_state(fp32, low)
    low.load_state_dict(lmopt.convert_state(fp32, low, step=3))
    assert "exp_avg_codes" in low.state[model[0].weight] and float(low.state[model[0].weight]["step"]) == 3
    _train(model, low, 2, seed=1)


def test_mismatches_are_clear_errors():
    model = _model()
    ams = lmopt.create_optimizer("amsgrad", list(model.parameters()), lr=1e-2)
    _train(model, ams, 1, seed=0)
    plain = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        lmopt.convert_state(ams, plain)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, 1, seed=0)
    with pytest.raises(ValueError, match="exp_avg"):
        lmopt.convert_state(sgd, plain)
    fewer = lmopt.create_optimizer("adamw", list(model.parameters())[:2], lr=1e-2)
    with pytest.raises(ValueError, match="4 parameters, the target 2"):
        lmopt.convert_state(ams, fewer)
    with pytest.raises(ValueError, match="state dict"):
        lmopt.convert_state([1, 2], plain)


def test_a_torch_adamw_state_dict_loads_directly_and_another_precision_points_to_convert_state():
    """torch.optim.AdamW's state dict (an HF Trainer ``optim="adamw_torch"`` resume) loads into lmopt's AdamW as it
    is: lmopt's group keys come from the current groups. Into 8-bit state the error names convert_state."""
    model = _model()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, theirs, 2, seed=0)
    ours = lmopt.create_optimizer("adamw", list(model.parameters()), lr=1e-2, implementation="foreach")
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["implementation"] == "foreach" and "state_precision" in ours.param_groups[0]
    _train(model, ours, 1, seed=1)
    low = lmopt.create_optimizer("adamw8bit", list(model.parameters()), lr=1e-2)
    with pytest.raises(ValueError, match="convert_state"):
        low.load_state_dict(theirs.state_dict())
