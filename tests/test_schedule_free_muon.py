"""Issue 4 beyond the generic tests: Schedule-Free modes and checkpoints, Muon routing, Lookahead as a torch
Optimizer, gradient release."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lmopt
from lmopt.optim.lookahead import Lookahead, with_lookahead
from lmopt.optim.muon import Muon, zeropower_via_newton_schulz
from lmopt.optim.release import GradientRelease
from lmopt.optim.schedule_free import ScheduleFreeAdamW, recompute_batchnorm_statistics

from .optim_db import make_batch, make_model


def _train(model, opt, steps, seed=1):
    for k in range(steps):
        x, y = make_batch(seed=seed + k)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------- Schedule-Free
@pytest.mark.parametrize("save_mode", ["train", "eval"])
def test_schedule_free_checkpoint_in_either_mode_resumes_the_trajectory(save_mode):
    kw = {"lr": 1e-2, "weight_decay": 0.05, "warmup_steps": 3}
    straight = make_model()
    opt = ScheduleFreeAdamW(straight.parameters(), **kw)
    _train(straight, opt, 10)

    first = make_model()
    opt_first = ScheduleFreeAdamW(first.parameters(), **kw)
    _train(first, opt_first, 4)
    if save_mode == "eval":
        with opt_first.evaluating(first):
            saved = _save_load({"model": first.state_dict(), "optimizer": opt_first.state_dict()})
    else:
        saved = _save_load({"model": first.state_dict(), "optimizer": opt_first.state_dict()})
    assert saved["optimizer"]["param_groups"][0]["train_mode"] is (save_mode == "train")

    resumed = make_model(seed=7)
    resumed.load_state_dict(saved["model"])
    opt_resumed = ScheduleFreeAdamW(resumed.parameters(), **kw)
    opt_resumed.load_state_dict(saved["optimizer"])
    assert opt_resumed.mode == save_mode
    opt_resumed.train()
    _train(resumed, opt_resumed, 6, seed=5)
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=False):
        if save_mode == "train":
            assert torch.equal(p, q)
        else:  # y -> x -> y rounds once each way
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt.eval()
    opt_resumed.eval()
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_schedule_free_modes_and_evaluating():
    model = make_model()
    opt = ScheduleFreeAdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    y = [p.detach().clone() for p in model.parameters()]
    model.train()
    with opt.evaluating(model):
        assert opt.mode == "eval" and not model.training
        x = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="train"):
            _train(model, opt, 1)
    assert opt.mode == "train" and model.training
    assert not all(torch.equal(a, b) for a, b in zip(x, y, strict=False))
    for p, before in zip(model.parameters(), y, strict=False):
        torch.testing.assert_close(p, before, rtol=1e-6, atol=1e-7)
    # x = (y - (1 - beta1) z) / beta1
    beta1 = opt.param_groups[0]["betas"][0]
    for p, xp in zip(model.parameters(), x, strict=False):
        z = opt.state[p]["z"]
        torch.testing.assert_close(xp, (p - (1 - beta1) * z) / beta1, rtol=1e-5, atol=1e-6)
    opt.eval()
    opt.eval()  # idempotent
    opt.train()
    opt.train()
    for p, before in zip(model.parameters(), y, strict=False):
        torch.testing.assert_close(p, before, rtol=1e-6, atol=1e-7)


def test_recompute_batchnorm_statistics_at_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = ScheduleFreeAdamW(model.parameters(), lr=0.05)
    batches = [torch.randn(16, 4) for _ in range(5)]
    for xb in batches:
        opt.zero_grad()
        model(xb).pow(2).mean().backward()
        opt.step()
    bn = model[1]
    momentum = bn.momentum
    assert recompute_batchnorm_statistics(model, batches, opt) == 5
    assert opt.mode == "train" and bn.momentum == momentum and model.training
    # the statistics are the exact average over the batches of the pre-norm activations at x
    with opt.evaluating():
        pre = torch.stack([model[0](xb).mean(0) for xb in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, pre.detach(), rtol=1e-5, atol=1e-6)
    assert recompute_batchnorm_statistics(nn.Linear(2, 2), batches) == 0


def test_schedule_free_lr_zero_leaves_parameters_unchanged():
    model = make_model()
    opt = ScheduleFreeAdamW(model.parameters(), lr=1e-2)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1)
    for p, b in zip(model.parameters(), before, strict=False):
        assert torch.equal(p, b)


# ---------------------------------------------------------------------------------------------- Muon
class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, tokens):
        h = self.proj(self.embed(tokens))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(self.norm(h))


def test_muon_routes_by_role_with_the_model():
    model = _TinyLM()
    opt = lmopt.create_optimizer("muon", model, lr=1e-2)
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert muon_ids == {id(model.proj.weight), id(model.conv.weight)}
    tokens = torch.randint(0, 11, (2, 5))
    opt.zero_grad()
    model(tokens).logsumexp(-1).mean().backward()
    opt.step()
    assert set(opt.state[model.proj.weight]) == {"momentum_buffer"}
    assert set(opt.state[model.embed.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model.lm_head.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    spec = lmopt.get_spec("muon")
    assert [t.name for t in spec.state_tensors((11, 8), role="embedding")] == [
        "step",
        "exp_avg",
        "exp_avg_sq",
    ]
    assert [t.name for t in spec.state_tensors((8, 8), role="matrix")] == ["momentum_buffer"]
    assert "AdamW" in repr(opt) and "Muon" in repr(opt)


def test_muon_explicit_groups_and_validation():
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    opt = Muon([{"params": [w], "use_muon": False}, {"params": [b]}], lr=1e-2)
    assert [g["use_muon"] for g in opt.param_groups] == [False, False]
    with pytest.raises(ValueError, match="use_muon"):
        Muon([{"params": [b], "use_muon": True}])


@pytest.mark.parametrize(
    "kw", [{"adjust_lr_fn": "match_rms_adamw"}, {"adjust_lr_fn": "original", "nesterov": False, "weight_decay": 0.0}]
)
def test_muon_matches_torch_optim_muon_in_bf16(kw):
    """With ns_dtype="bf16", lmopt's Muon is torch.optim.Muon's algorithm (few steps: bf16 matmuls are slow
    on CPUs without bf16 units)."""
    torch.manual_seed(0)
    ours, theirs = make_model(torch.float64), make_model(torch.float64)
    opt = Muon(ours.parameters(), lr=1e-2, ns_dtype="bf16", **kw)
    matrices = [p for p in theirs.parameters() if p.ndim == 2]
    rest = [p for p in theirs.parameters() if p.ndim != 2]
    peers = [
        torch.optim.Muon(matrices, lr=1e-2, **kw),
        torch.optim.AdamW(rest, lr=1e-2, betas=(0.9, 0.95), weight_decay=kw.get("weight_decay", 0.1)),
    ]
    for k in range(3):
        x, y = make_batch(torch.float64, seed=k)
        opt.zero_grad()
        (ours(x) - y).pow(2).mean().backward()
        opt.step()
        for peer in peers:
            peer.zero_grad()
        (theirs(x) - y).pow(2).mean().backward()
        for peer in peers:
            peer.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    g = torch.randn(64, 32)
    o = zeropower_via_newton_schulz(g, ns_steps=5)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.5 and s.max() < 1.3
    batch = torch.stack([g, 2 * g])
    ob = zeropower_via_newton_schulz(batch, ns_steps=5)
    torch.testing.assert_close(ob[0], o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ob[1], o, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- Lookahead
def test_lookahead_is_a_torch_optimizer_for_schedulers_and_clipping():
    model = make_model()
    opt = with_lookahead("adamw", model, k=2, alpha=0.5, lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(4):
        x, y = make_batch(seed=k)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    assert all("slow_param" in opt.state[p] for p in model.parameters())
    # right after a synchronisation the fast weights are the slow ones
    for p in model.parameters():
        assert torch.equal(p, opt.state[p]["slow_param"])
    loaded = with_lookahead("adamw", make_model(), k=2, lr=1e-2)
    loaded.load_state_dict(_save_load(opt.state_dict()))
    assert loaded.param_groups[0]["lookahead_step"] == 4 and loaded.param_groups is loaded.optimizer.param_groups


def test_lookahead_with_closure():
    model = make_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=1, alpha=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch()

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    for p, s in zip(model.parameters(), start, strict=False):
        grad = p.grad
        torch.testing.assert_close(p, s - 0.05 * grad)


# ---------------------------------------------------------------------------------------------- gradient
# release
def _mlp_step(model, x, y):
    (model(x) - y).pow(2).mean().backward()


@pytest.mark.parametrize("name", ["adamw", "adabound", "muon"])
def test_gradient_release_matches_ordinary_steps(name):
    plain, released = make_model(), make_model()
    opt_plain = lmopt.create_optimizer(name, list(plain.parameters()), lr=1e-2)
    opt_rel = lmopt.create_optimizer(name, list(released.parameters()), lr=1e-2)
    release = GradientRelease(opt_rel)
    for k in range(4):
        x, y = make_batch(seed=k)
        opt_plain.zero_grad()
        _mlp_step(plain, x, y)
        opt_plain.step()
        _mlp_step(released, x, y)
        assert all(p.grad is None for p in released.parameters())  # freed during backward
        release.step()
    for p, q in zip(released.parameters(), plain.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradient_release_accumulation():
    plain, released = make_model(), make_model()
    opt_plain = lmopt.AdamW(plain.parameters(), lr=1e-2)
    release = GradientRelease(lmopt.AdamW(released.parameters(), lr=1e-2), accumulation_steps=3)
    for window in range(2):
        opt_plain.zero_grad()
        for micro in range(3):
            x, y = make_batch(seed=10 * window + micro)
            _mlp_step(plain, x, y)
            _mlp_step(released, x, y)
            assert (micro < 2) == all(p.grad is not None for p in released.parameters())
            release.step()
        opt_plain.step()
    for p, q in zip(released.parameters(), plain.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert release.micro_step == 6
    state = _save_load(release.state_dict())
    assert state["micro_step"] == 6


def test_gradient_release_per_parameter_clipping_and_limits():
    model = make_model()
    plain = make_model()
    w_before = [p.detach().clone() for p in model.parameters()]
    opt = lmopt.AdamW(model.parameters(), lr=1e-2)
    GradientRelease(opt, max_grad_norm_per_parameter=1e-3)
    x, y = make_batch()
    _mlp_step(model, x, y)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), w_before, strict=False))
    with pytest.raises(ValueError, match="per_parameter"):
        GradientRelease(ScheduleFreeAdamW(plain.parameters()))
    with pytest.raises(ValueError, match="accumulation_steps"):
        GradientRelease(lmopt.AdamW(plain.parameters()), accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm_per_parameter"):
        GradientRelease(lmopt.AdamW(plain.parameters()), max_grad_norm_per_parameter=-1.0)


def test_gradient_release_nonfinite_skip_and_raise():
    model = make_model()
    opt = lmopt.AdamW(model.parameters(), lr=1e-2, nonfinite="skip")
    release = GradientRelease(opt)
    first = next(model.parameters())
    handle = first.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = first.detach().clone()
    x, y = make_batch()
    _mlp_step(model, x, y)
    assert torch.equal(first, before) and release.skipped_updates == 1
    handle.remove()
    model2 = make_model()
    GradientRelease(lmopt.AdamW(model2.parameters(), lr=1e-2))
    next(model2.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(lmopt.NonFiniteGradientError, match="gradient release"):
        _mlp_step(model2, x, y)


@pytest.mark.parametrize("name", ["schedule_free_adamw", "adabound", "amsbound"])
def test_blocked_path_on_tensors_larger_than_a_block(name, monkeypatch):
    """The cache-blocked path cuts large tensors into blocks (small ones go through foreach): same result."""
    from lmopt.optim import _dispatch

    monkeypatch.setattr(_dispatch, "BLOCK_ELEMENTS", 64)
    torch.manual_seed(0)
    shapes = [(13, 17), (300,), (5,), (64,)]
    results = []
    for impl in ("for_loop", "blocked"):
        params = [
            nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)
        ]
        opt = lmopt.create_optimizer(name, params, lr=1e-2, weight_decay=0.1, implementation=impl)
        for k in range(5):
            g = torch.Generator().manual_seed(100 + k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append(params)
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
