"""AdamW specifics beyond the generic tests: fp32 math for low-precision parameters, bf16 state, dispatch."""

from __future__ import annotations

import pytest
import torch

import lmopt
from lmopt.optim.adamw import fused_applies


@pytest.mark.parametrize("impl", ["for_loop", "foreach", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_fp32_math(impl, dtype):
    torch.manual_seed(0)
    p32 = torch.randn(64, 32)
    g32 = torch.randn(64, 32) * 1e-2
    low = torch.nn.Parameter(p32.to(dtype))
    ref = torch.nn.Parameter(low.detach().float())  # the same starting point, in fp32
    low.grad, ref.grad = g32.to(dtype), g32.to(dtype).float()
    opt_low = lmopt.AdamW([low], lr=1e-2, weight_decay=0.1, implementation=impl)
    opt_ref = lmopt.AdamW([ref], lr=1e-2, weight_decay=0.1, implementation="for_loop")
    opt_low.step()
    opt_ref.step()
    # one step in fp32 then rounded once: exactly what the fp32 reference gives, rounded
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref.detach().to(dtype).float(), rtol=0, atol=0)


def test_bf16_state_halves_memory_and_tracks_fp32():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(256, 64))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = lmopt.AdamW([a], lr=1e-3)
    opt_b = lmopt.AdamW([b], lr=1e-3, state_dtype="bf16")
    for k in range(20):
        g = torch.randn(256, 64, generator=torch.Generator().manual_seed(k))
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert opt_b.state[b]["exp_avg"].dtype == torch.bfloat16
    assert opt_b.state[b]["exp_avg"].nbytes * 2 == opt_a.state[a]["exp_avg"].nbytes
    drift = (a - b).abs().max() / (a.detach() - a.detach().mean()).abs().max()
    assert drift < 1e-2


def test_auto_picks_fused_only_where_it_applies():
    p = torch.zeros(3)
    assert fused_applies([p], [torch.zeros(3)])
    assert not fused_applies([p], [torch.zeros(3, dtype=torch.bfloat16)])
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="implementation='fused'"):
        opt = lmopt.AdamW([param], state_dtype="bf16", implementation="fused")
        param.grad = torch.ones(3)
        opt.step()


def test_param_group_overrides_are_validated():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="betas"):
        lmopt.AdamW([{"params": [a]}, {"params": [b], "betas": (0.9, 1.5)}])
    opt = lmopt.AdamW([a])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [b], "lr": -1})


def test_per_group_hyperparameters_match_torch():
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).double()
    model_b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).double()
    model_b.load_state_dict(model_a.state_dict())

    def groups(m):
        return [
            {"params": m[0].parameters(), "lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.0},
            {"params": m[1].parameters(), "lr": 3e-3, "weight_decay": 0.2},
        ]

    ours = lmopt.AdamW(groups(model_a), lr=1e-3)
    theirs = torch.optim.AdamW(groups(model_b), lr=1e-3)
    x = torch.randn(16, 4, dtype=torch.float64)
    for _ in range(200):
        for m, o in ((model_a, ours), (model_b, theirs)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)


def test_repr_shows_groups_and_policy():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = lmopt.AdamW([p], nonfinite="skip")
    p.grad = torch.ones(4, 4)
    opt.step()
    text = repr(opt)
    assert "nonfinite='skip'" in text and "16 parameters" in text and "last step ran 'fused'" in text
