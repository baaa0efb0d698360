"""Issue 15 item 3 (and Muon's part of item 2) beyond the generic tests: Polar Express against the authors'
function, 3-D expert weights per matrix against a per-matrix loop (Muon and NorMuon), convolutions flattened, the
cautious mask and cautious weight decay against C-Optim's definition, NorMuon's planned state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lmopt
from lmopt.optim.muon import (
    NS_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    Muon,
    NorMuon,
    coefficient_schedule,
    zeropower_via_newton_schulz,
)

from .reference.polar_express import polar_express


def _matrix_with_spectrum(rows: int, cols: int, low: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    k = min(rows, cols)
    s = torch.logspace(math.log10(low), 0, k, dtype=torch.float64)
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (3, 9, 7), (2, 7, 9)])
@pytest.mark.parametrize("steps", [3, 5, 10])
def test_polar_express_matches_the_authors_function(shape, steps):
    """fp64 on both sides: the table, the safety factor, the 1.01 ||X||_F normalisation, the repeated last
    polynomial (10 steps > 8 published) and the orientation agree to rounding."""
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    ours = zeropower_via_newton_schulz(x, ns_coefficients="polar_express", ns_steps=steps, dtype=torch.float64)
    theirs = polar_express(x, steps, torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_polar_express_converges_where_the_quintic_does_not():
    """The quintic leaves singular values in about [0.7, 1.2]; Polar Express (optimal per iteration) drives them
    to 1 from the normalised spectrum's lower end 1e-3 in a few more iterations (Amsel et al. 2025, Fig. 1)."""
    x = _matrix_with_spectrum(64, 96, 1e-2)

    def spread(coefficients, steps):
        o = zeropower_via_newton_schulz(x, ns_coefficients=coefficients, ns_steps=steps, dtype=torch.float64)
        s = torch.linalg.svdvals(o)
        return (s - 1).abs().max().item()

    assert spread(NS_COEFFICIENTS, 5) > 0.15
    assert spread("polar_express", 8) < 0.05
    assert spread("polar_express", 5) < spread(NS_COEFFICIENTS, 5)


def test_coefficient_schedule_forms():
    schedule, scale = coefficient_schedule("polar_express", 10)
    assert scale == 1.01 and len(schedule) == 10
    a, b, c = POLAR_EXPRESS_COEFFICIENTS[0]
    assert schedule[0] == pytest.approx((a / 1.01, b / 1.01**3, c / 1.01**5), rel=1e-15)
    assert schedule[7:] == [POLAR_EXPRESS_COEFFICIENTS[-1]] * 3  # the last is not divided, and repeats
    assert coefficient_schedule(NS_COEFFICIENTS, 3) == ([NS_COEFFICIENTS] * 3, 1.0)
    two = [(3.0, -3.2, 1.2), (1.875, -1.25, 0.375)]
    assert coefficient_schedule(two, 3) == ([two[0], two[1], two[1]], 1.0)
    opt = Muon([nn.Parameter(torch.randn(4, 5))], ns_coefficients=[list(t) for t in two])  # lists -> tuples
    assert opt.param_groups[0]["ns_coefficients"] == tuple(two)


def _step_pair(cls, kw, expert_shape, implementation, steps=3):
    """A (E, A, B) weight and E separate (A, B) weights with the same gradients; returns both after ``steps``."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(expert_shape))
    parts = [nn.Parameter(w.detach()[e].clone()) for e in range(expert_shape[0])]
    opt_w = cls([w], implementation=implementation, **kw)
    opt_parts = cls(parts, implementation=implementation, **kw)
    for k in range(steps):
        grad = torch.randn(expert_shape, generator=torch.Generator().manual_seed(k))
        w.grad = grad.clone()
        for e, p in enumerate(parts):
            p.grad = grad[e].clone()
        opt_w.step()
        opt_parts.step()
    return w, parts, opt_w, opt_parts


@pytest.mark.parametrize("implementation", ["for_loop", "foreach"])
@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (Muon, {"lr": 1e-2}),
        (Muon, {"lr": 1e-2, "ns_coefficients": "polar_express", "adjust_lr_fn": "original"}),
        (NorMuon, {"lr": 1e-2}),
        (NorMuon, {"lr": 1e-2, "beta2": 0.9, "nesterov": False}),
    ],
    ids=["muon", "muon_polar_express", "normuon", "normuon_beta2"],
)
@pytest.mark.parametrize("expert_shape", [(4, 6, 10), (3, 10, 6)])
def test_3d_expert_weights_orthogonalise_per_matrix(cls, kw, implementation, expert_shape):
    """Each expert's matrix gets its own Newton-Schulz, NorMuon row statistics and lr scale (its (A, B)): the
    batched weight equals a loop over separate matrices (float32, batched vs single matmuls: rounding only)."""
    w, parts, opt_w, opt_parts = _step_pair(cls, kw, expert_shape, implementation)
    torch.testing.assert_close(w.detach(), torch.stack([p.detach() for p in parts]), rtol=1e-5, atol=1e-6)
    if cls is NorMuon:
        v = opt_w.state[w]["second_momentum_buffer"]
        assert v.shape == (*expert_shape[:2], 1)
        stacked = torch.stack([opt_parts.state[p]["second_momentum_buffer"] for p in parts])
        torch.testing.assert_close(v, stacked, rtol=1e-5, atol=1e-9)


def test_3d_flatten_is_one_matrix_and_differs_from_per_matrix():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4, 5))
    flat = nn.Parameter(w.detach().reshape(3, 20).clone())
    grad = torch.randn(3, 4, 5)
    w.grad, flat.grad = grad.clone(), grad.reshape(3, 20).clone()
    Muon([w], lr=1e-2, matrix_3d="flatten").step()
    Muon([flat], lr=1e-2).step()
    torch.testing.assert_close(w.detach().reshape(3, 20), flat.detach(), rtol=1e-6, atol=1e-7)
    per = nn.Parameter(w.detach().clone())
    per.grad = grad.clone()
    before = per.detach().clone()
    Muon([per], lr=1e-2).step()
    assert not torch.allclose(per.detach() - before, w.detach() - before)


def test_conv1d_weights_are_flattened_given_the_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3)
            self.experts = nn.Parameter(torch.randn(2, 6, 6))
            self.proj = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

    net = Net()
    opt = lmopt.create_optimizer("muon", net, lr=1e-2)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(net.conv.weight)]["matrix_3d"] == "flatten" and by_id[id(net.conv.weight)]["use_muon"]
    assert by_id[id(net.experts)]["matrix_3d"] == "per_matrix" and by_id[id(net.experts)]["use_muon"]
    spec = lmopt.get_spec("normuon")
    assert [t.shape for t in spec.state_tensors((2, 6, 6))] == [(2, 6, 6), (2, 6, 1)]
    assert [t.shape for t in spec.state_tensors((6, 4, 3), matrix_3d="flatten")] == [(6, 4, 3), (6, 1)]
    assert [t.shape for t in spec.state_tensors((8, 4, 3, 3))] == [(8, 4, 3, 3), (8, 1)]


def _orthogonalised(g: torch.Tensor, buf: torch.Tensor, momentum=0.95) -> torch.Tensor:
    buf.lerp_(g, 1 - momentum)
    return zeropower_via_newton_schulz(g.lerp(buf, momentum))


def test_cautious_mask_is_c_optims_on_the_orthogonalised_update():
    """One step against the formula written out: C-Optim's mask (``(u * g > 0)``, divided by its mean clamped
    at 1e-3) on the orthogonalised update ``u`` that is added to the weights, and cautious weight decay
    ``p -= lr * wd * 1[u * p >= 0] * p`` (Chen et al. 2025). (C-Optim's ``c_muon.py`` masks the Nesterov momentum
    against the gradient before Newton-Schulz, which does not keep the applied update's signs: lmopt masks the
    update itself, as C-Optim does for AdamW and Lion.)"""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 12))
    g = torch.randn(8, 12)
    expected = p.detach().clone()
    u = _orthogonalised(g, torch.zeros(8, 12))
    mask = (u * g > 0).float()
    mask = mask / mask.mean().clamp(min=1e-3)
    u = u * mask
    lr, wd = 1e-2, 0.1
    scale = 0.2 * math.sqrt(12)
    expected -= lr * wd * (u * expected >= 0).float() * expected
    expected -= lr * scale * u
    p.grad = g.clone()
    Muon([p], lr=lr, weight_decay=wd, cautious=True, cautious_weight_decay=True).step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert 0.2 < (mask > 0).float().mean() < 0.95  # the mask did remove coordinates


def test_cautious_with_every_sign_agreeing_is_plain_muon():
    """A positive rank-one gradient ``a b^T``: its orthogonalisation is a positive multiple of it, every sign
    agrees, the mask is all ones (mean 1) and the step is Muon's."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(6, 9))
    q = nn.Parameter(p.detach().clone())
    g = torch.outer(torch.rand(6) + 0.1, torch.rand(9) + 0.1)
    p.grad, q.grad = g.clone(), g.clone()
    Muon([p], lr=1e-2, momentum=0.0, nesterov=False, cautious=True).step()
    Muon([q], lr=1e-2, momentum=0.0, nesterov=False).step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_normuon_rows_have_equal_rms_after_normalisation_and_the_norm_is_kept():
    """After one step from zero state V = (1 - beta2) mean_j O_ij^2, so O / sqrt(V) has every row's RMS equal
    (1 / sqrt(1 - beta2)); the norm restoration brings the Frobenius norm back to O's."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(16, 24))
    g = _matrix_with_spectrum(16, 24, 1e-2).float() * torch.linspace(0.1, 3, 16)[:, None]
    p.grad = g.clone()
    NorMuon([p], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr_fn="none").step()
    update = -p.detach()
    rms = update.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, rms.mean().expand_as(rms), rtol=1e-4, atol=0)
    ortho = zeropower_via_newton_schulz(g)
    torch.testing.assert_close(update.norm(), ortho.norm(), rtol=1e-5, atol=0)


def test_normuon_state_is_planned_exactly_and_resumes():
    spec = lmopt.get_spec("normuon")
    assert spec.state_bytes((4096, 1024)) == 4096 * 1024 * 4 + 4096 * 4
    assert spec.state_bytes((4096,)) == 4096 * 8 + 4  # a vector: AdamW's
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    opt = lmopt.create_optimizer("normuon", model, lr=1e-2)
    x = torch.randn(5, 6)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    clone = copy.deepcopy(model)
    other = lmopt.create_optimizer("normuon", clone, lr=1e-2)
    other.load_state_dict(opt.state_dict())
    for a, b in zip(opt.state.values(), other.state.values(), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype, key
    assert "NorMuon" in repr(opt)
