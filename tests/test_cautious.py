"""Cautious masking (Liang et al. 2024) and cautious weight decay (Chen et al. 2025) on AdamW, Lion, AdEMAMix.

The trajectories against C-Optim's definition (tests/reference/cautious.py) and the generic checks (implementations
agree, resume, FSDP2, planner state) run from tests/optim_db.py's ``cautious_adamw`` / ``cautious_lion`` entries
and AdEMAMix's cautious variants; this file checks what those do not: the routing away from paths that cannot
mask (torch's fused kernel, lmopt's 8/4-bit kernel, Lion's blocked pass), the 8/4-bit per-tensor rule, errors,
aliases, the planner, and pytorch_optimizer's ``cautious=True`` Lion where it is equivalent.
"""

from __future__ import annotations

import pytest
import torch

import lmopt
from lmopt.optim._cautious import cautious_mask

from .optim_db import make_batch, make_model


def _train(opt, model, steps: int, dtype=torch.float32) -> None:
    for k in range(steps):
        x, y = make_batch(dtype, seed=1 + k)
        opt.zero_grad(set_to_none=True)
        (model(x).float() - y.float()).pow(2).mean().backward()
        opt.step()


def _used(opt) -> str:
    return opt._implementation_used[id(opt.param_groups[0])]


def test_one_step_is_the_masked_adamw_step():
    """One AdamW step by hand: m = (1 - beta1) g, v = (1 - beta2) g^2; u = m / (sqrt(v / bc2) + eps), masked."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.float64))
    grad = torch.randn(64, dtype=torch.float64)
    start = p.detach().clone()
    opt = lmopt.create_optimizer("cautious_adamw", [p], lr=0.1, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    p.grad = grad.clone()
    opt.step()
    m, v = 0.1 * grad, 0.001 * grad * grad
    u = (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)
    # on the first step m and g agree everywhere: the mask keeps all, the rescaling is 1
    torch.testing.assert_close(p.detach(), start - 0.1 * u, rtol=1e-12, atol=1e-12)
    assert torch.equal(cautious_mask(m, grad), torch.ones_like(m))


def test_mask_keeps_agreeing_coordinates_rescaled_by_the_kept_fraction():
    update = torch.tensor([1.0, -2.0, 3.0, -4.0])
    grad = torch.tensor([1.0, 1.0, 1.0, -1.0])
    assert torch.equal(cautious_mask(update, grad), torch.tensor([4 / 3, 0.0, 4 / 3, 4 / 3]))
    assert torch.equal(cautious_mask(update, -grad), torch.tensor([0.0, 4.0, 0.0, 0.0]))
    nothing = cautious_mask(torch.ones(4), -torch.ones(4))  # none kept: the floor 1e-3 avoids 0 / 0
    assert torch.equal(nothing, torch.zeros(4))


def test_auto_avoids_torchs_fused_kernel_and_explicit_fused_is_refused():
    model = make_model()
    plain = lmopt.create_optimizer("adamw", model.parameters(), lr=1e-2)
    _train(plain, model, 1)
    assert _used(plain) == "fused"  # what auto takes without the mask
    model = make_model()
    opt = lmopt.create_optimizer("cautious_adamw", model.parameters(), lr=1e-2)
    _train(opt, model, 1)
    assert _used(opt) == "blocked" and "blocked" in repr(opt)  # two passes over each masked tensor (CPU)
    model = make_model()
    opt = lmopt.create_optimizer("cautious_adamw", model.parameters(), lr=1e-2, state_precision="bf16")
    _train(opt, model, 1)
    assert _used(opt) == "foreach"  # bf16 moments: neither fused nor blocked applies
    with pytest.raises(ValueError, match="implementation='fused'.*cannot mask"):
        lmopt.create_optimizer("cautious_adamw", make_model().parameters(), implementation="fused")
    with pytest.raises(ValueError, match="cannot mask"):  # the HF name implies fused
        lmopt.create_optimizer("adamw_torch_fused", make_model().parameters(), cautious=True)
    with pytest.raises(ValueError, match="cautious_weight_decay"):
        lmopt.Adam(make_model().parameters(), weight_decay=0.1, cautious_weight_decay=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("cautious_adamw", {"lr": 1e-2}),
        ("cautious_adamw", {"lr": 3e-3, "weight_decay": 0.1, "cautious_weight_decay": True, "maximize": True}),
        ("cautious_adamw", {"lr": 1e-2, "amsgrad": True}),
        ("adam", {"lr": 1e-2, "weight_decay": 0.05, "cautious": True}),  # coupled L2 in the masked gradient
        ("adamw", {"lr": 1e-2, "weight_decay": 0.1}),  # blocked without masks: one pass
        ("cautious_lion", {"lr": 1e-3}),
        ("cautious_lion", {"lr": 3e-4, "weight_decay": 0.5, "cautious_weight_decay": True, "maximize": True}),
    ],
)
def test_blocked_two_passes_equal_foreach(monkeypatch, name, kw, dtype):
    """Blocks of 40 elements (the test model's tensors are smaller than a real block): several blocks per tensor,
    partial blocks, the count over all of them; the same operations as foreach, so the same bits (bf16
    parameters step through foreach inside the blocked path)."""
    monkeypatch.setattr("lmopt.optim._dispatch.BLOCK_ELEMENTS", 40)
    runs = []
    for impl in ("foreach", "blocked"):
        model = make_model(dtype)
        opt = lmopt.create_optimizer(name, model.parameters(), **kw, implementation=impl)
        _train(opt, model, 12, dtype)
        assert _used(opt) == impl
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


LOW_BIT = [
    ("adamw8bit", {"lr": 1e-2}),
    ("adamw4bit", {"lr": 1e-2}),
    ("adam8bit", {"lr": 1e-2, "weight_decay": 0.05}),
    ("lion8bit", {"lr": 1e-3, "weight_decay": 0.5}),
]


@pytest.mark.parametrize(("name", "kw"), LOW_BIT, ids=[n for n, _ in LOW_BIT])
def test_low_bit_state_takes_the_per_tensor_rule_and_says_so(name, kw):
    kw = {**kw, "cautious": True, "min_quantized_numel": 16, "block_size": 32}
    if name != "adam8bit":
        kw["cautious_weight_decay"] = True
    auto_model, loop_model = make_model(), make_model()
    auto = lmopt.create_optimizer(name, auto_model.parameters(), **kw)
    loop = lmopt.create_optimizer(name, loop_model.parameters(), **kw, implementation="for_loop")
    _train(auto, auto_model, 20)
    _train(loop, loop_model, 20)
    assert "per-tensor rule ran" in _used(auto) and "kernel cannot mask" in repr(auto)
    for p, q in zip(auto_model.parameters(), loop_model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="implementation='kernel'.*cannot mask"):
        lmopt.create_optimizer(name, make_model().parameters(), **kw, implementation="kernel")


@pytest.mark.parametrize("bits", ["8bit", "bf16"])
def test_quantized_cautious_adamw_follows_the_full_precision_one(bits):
    """The masks are the same rule at every precision: 8-bit / bf16 moments only round the state."""
    kw = {"lr": 1e-2, "weight_decay": 0.1, "cautious_weight_decay": True, "min_quantized_numel": 16}
    ref_model, model = make_model(), make_model()
    _train(lmopt.create_optimizer("cautious_adamw", ref_model.parameters(), **kw), ref_model, 30)
    _train(lmopt.create_optimizer("cautious_adamw", model.parameters(), **kw, state_precision=bits), model, 30)
    plain_model = make_model()
    plain = dict(kw, cautious_weight_decay=False)
    _train(lmopt.create_optimizer("adamw", plain_model.parameters(), **plain), plain_model, 30)
    # measured after 30 steps: 8-bit 8.4e-3 and bf16 7.4e-3 from the fp32 cautious run (max |diff|), which is
    # 4.5e-2 from plain AdamW's: the tolerance (~2.5x the rounding effect) still tells the masks apart
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert (p - q).abs().max() < 0.02
    moved = max((q - r).abs().max().item() for q, r in zip(ref_model.parameters(), plain_model.parameters()))
    assert moved > 0.03  # the cautious run is not plain AdamW


def test_aliases_imply_cautious_and_the_planner_keeps_the_plain_state():
    for name in ("cautious_adamw", "c_adamw", "adamw_cautious", "cautious_lion", "c_lion", "cautious_ademamix"):
        opt = lmopt.create_optimizer(name, make_model().parameters())
        assert opt.param_groups[0]["cautious"] is True, name
    cwd = lmopt.create_optimizer("cautious_adamw_cwd", make_model().parameters())
    assert cwd.param_groups[0]["cautious_weight_decay"] is True
    names = {s.name for s in lmopt.list_optimizers()}
    assert {"cautious_adamw", "cautious_lion"} <= names
    for cautious, plain in (
        ("cautious_adamw", "adamw"),
        ("cautious_lion", "lion"),
        ("cautious_adamw8bit", "adamw8bit"),
    ):
        spec, implied = lmopt.registry.resolve_name(cautious)
        base, base_implied = lmopt.registry.resolve_name(plain)
        assert spec.state_bytes((256, 64), **implied) == base.state_bytes((256, 64), **base_implied)


def test_planner_resolves_the_paths_that_mask():
    from lmopt.memory.planner import _step_implementation

    for name, fused_ok, device, expected in (
        ("cautious_adamw", True, "cuda", "foreach"),
        ("cautious_adamw", True, "cpu", "blocked"),
        ("cautious_adamw", False, "cpu", "foreach"),  # bf16 moments
        ("adamw", True, "cuda", "fused"),
        ("adamw", True, "cpu", "fused"),
        ("cautious_adamw8bit", True, "cpu", "for_loop"),
        ("adamw8bit", True, "cpu", "kernel"),
        ("cautious_lion", True, "cpu", "blocked"),
        ("cautious_lion", True, "cuda", "foreach"),
        ("lion", True, "cpu", "blocked"),
    ):
        spec, implied = lmopt.registry.resolve_name(name)
        assert _step_implementation(spec, spec.hyperparameters(**implied), fused_ok, device) == expected, name


def test_pytorch_optimizer_cautious_lion_with_c_optims_normalisation(monkeypatch):
    """pytorch_optimizer's ``Lion(cautious=True)`` rescales by ``numel / (sum + 1)`` (the paper's first form);
    with C-Optim's ``1 / max(mean, 1e-3)`` swapped in it is lmopt's cautious Lion, in float64."""
    from pytorch_optimizer.base.optimizer import BaseOptimizer
    from pytorch_optimizer.optimizer.lion import Lion as PeerLion

    def c_optim(update, grad):
        mask = (update * grad > 0).to(grad.dtype)
        update.mul_(mask.div_(mask.mean().clamp(min=1e-3)))

    monkeypatch.setattr(BaseOptimizer, "apply_cautious", staticmethod(c_optim))
    ours, theirs = make_model(torch.float64), make_model(torch.float64)
    kw = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.3}
    _train(lmopt.create_optimizer("cautious_lion", ours.parameters(), **kw), ours, 100, torch.float64)
    _train(PeerLion(theirs.parameters(), **kw, cautious=True, foreach=False), theirs, 100, torch.float64)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_quantized_cautious_state_on_dtensors_is_refused_clearly():
    """8/4-bit state steps each local shard alone (the kept fraction would be a shard's): refused at construction,
    naming the fix. A one-process gloo mesh in a subprocess (no process group in the test process)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    code = """
import os, torch, torch.distributed as dist
from torch.distributed.tensor import distribute_tensor, Shard
from torch.distributed.device_mesh import init_device_mesh
import lmopt
os.environ["MASTER_ADDR"] = "127.0.0.1"
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)]))
for name in ("cautious_adamw8bit", "lion8bit"):
    try:
        lmopt.create_optimizer(name, [p], cautious=True)
        print("accepted", name)
    except NotImplementedError as err:
        print("refused", name, "bf16" in str(err))
lmopt.create_optimizer("cautious_adamw", [p])  # full precision: the DTensor mean covers every shard
print("full precision ok")
dist.destroy_process_group()
"""
    with socket.socket() as sock:  # a free port for the one-process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == [
        "refused cautious_adamw8bit True",
        "refused lion8bit True",
        "full precision ok",
    ]
