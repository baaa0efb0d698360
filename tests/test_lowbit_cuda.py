"""The Triton low-bit kernels on CUDA against lmopt's PyTorch reference path on the same GPU (skipped without a
CUDA device and Triton; run on a GPU machine with ``python -m pytest tests/test_lowbit_cuda.py``).

The kernels use IEEE square root and division and no fused multiply-add, so the parameters, codes and scales
are expected to equal the reference's; the assertions allow what the GPU's elementwise kernels in the
reference path may round differently (one code step, a few ulp), and report the measured difference.
"""

from __future__ import annotations

import pytest
import torch

import lmopt
from lmopt.kernels import lowbit_triton

pytestmark = pytest.mark.skipif(not lowbit_triton.available(), reason="needs a CUDA device and Triton")

SHAPES = [(37, 129), (4096 + 7,), (100,), (256, 1024)]
CASES = [
    (lmopt.AdamW8bit, {"weight_decay": 0.1}),
    (lmopt.AdamW8bit, {"weight_decay": 0.0, "maximize": True, "block_size": 64}),
    (lmopt.Adam8bit, {"weight_decay": 0.1}),
    (lmopt.AdamW4bit, {"weight_decay": 0.1}),
    (lmopt.AdamW4bit, {"weight_decay": 0.1, "block_size": 48}),  # not a power of two: masked tile columns
    (lmopt.AdamW8bit, {"weight_decay": 0.1, "block_size": 4096}),  # one block per program
    (lmopt.Lion8bit, {"weight_decay": 0.5, "lr": 1e-4}),
]
DTYPES = [
    (torch.float32, "nearest"),
    (torch.bfloat16, "nearest"),
    (torch.bfloat16, "stochastic"),
    (torch.bfloat16, "kahan"),
]


def _run(cls, kw, dtype, rounding, implementation, steps=5):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in SHAPES]
    opt = cls(params, implementation=implementation, param_rounding=rounding, **kw)
    g = torch.Generator(device="cuda").manual_seed(1)
    for k in range(steps):
        for p, s in zip(params, SHAPES):
            p.grad = (torch.randn(s, device="cuda", generator=g) * 0.1 * (k + 1)).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("launch", ["table", "direct"])
@pytest.mark.parametrize(("cls", "kw"), CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)])
@pytest.mark.parametrize(("dtype", "rounding"), DTYPES, ids=[f"{str(d)[6:]}-{r}" for d, r in DTYPES])
def test_triton_kernel_matches_reference(cls, kw, dtype, rounding, launch, monkeypatch):
    # "table": all tensors in one launch through the address table; "direct": a launch per tensor
    monkeypatch.setattr(lowbit_triton, "_DIRECT_NUMEL", 0 if launch == "direct" else 1 << 62)
    ref_params, ref_opt = _run(cls, kw, dtype, rounding, "for_loop")
    params, opt = _run(cls, kw, dtype, rounding, "fused")  # the old name of the low-bit kernel path
    assert opt._implementation_used[id(opt.param_groups[0])] == "kernel"
    for a, b in zip(ref_params, params):
        diff = (a.float() - b.float()).abs().max().item()
        scale = a.float().abs().max().item()
        # bf16 parameters: one bf16 ulp where a rounding boundary is crossed; fp32: a few fp32 ulp
        tol = 2**-7 * scale if dtype == torch.bfloat16 else 1e-6 * scale
        assert diff <= tol, (diff, scale)
        for key, value in ref_opt.state[a].items():
            other = opt.state[b][key]
            if key.endswith("_codes"):
                if value.dtype == torch.uint8 and lowbit_triton.available():
                    # codes may differ by one step where a value sits on a midpoint within rounding
                    lo = (value.to(torch.int16) & 15) - (other.to(torch.int16) & 15)
                    hi = (value.to(torch.int16) >> 4) - (other.to(torch.int16) >> 4)
                    whole = value.to(torch.int16) - other.to(torch.int16)
                    worst = (
                        max(lo.abs().max().item(), hi.abs().max().item())
                        if "4bit" in cls.__name__
                        else (whole.abs().max().item())
                    )
                    assert worst <= 1, key
                    assert (value != other).float().mean().item() < 1e-3, key
            elif value.is_floating_point():
                torch.testing.assert_close(
                    other.float(), value.float(), rtol=1e-5, atol=1e-6 * value.float().abs().max().item()
                )


def test_triton_kernel_trains_like_fp32_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).cuda()
    ref.load_state_dict(model.state_dict())
    opts = [lmopt.AdamW8bit(model.parameters(), lr=1e-3), torch.optim.AdamW(ref.parameters(), lr=1e-3)]
    g = torch.Generator(device="cuda").manual_seed(2)
    w = torch.randn(256, 64, device="cuda", generator=g) / 16
    for _ in range(300):
        x = torch.randn(64, 256, device="cuda", generator=g)
        y = x @ w
        losses = []
        for m, o in zip((model, ref), opts):
            o.zero_grad(set_to_none=True)
            loss = (m(x) - y).pow(2).mean()
            loss.backward()
            o.step()
            losses.append(loss.item())
    assert losses[0] < 1.1 * losses[1] + 1e-4, losses
