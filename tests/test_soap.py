"""SOAP beyond the generic database tests: the preconditioner layout, exact state at every precision and
option, the bf16 eigenbasis, the registry aliases, and heavyball's SOAP beside it."""

from __future__ import annotations

import math

import pytest
import torch

import lmopt
from lmopt.optim.soap import SOAP, soap_layout

from .optim_db import make_batch, make_model


@pytest.mark.parametrize(
    ("shape", "merge", "max_dim", "one_d", "expected"),
    [
        ((16, 6), False, 10000, False, ((16, 6), (True, True))),
        ((16, 6), True, 10000, False, ((96,), (True,))),
        ((16, 6), True, 64, False, ((16, 6), (True, True))),
        ((16, 6), False, 12, False, ((16, 6), (False, True))),
        ((4, 3, 2, 5), True, 12, False, ((12, 10), (True, True))),
        ((4, 3, 2, 5), False, 10000, False, ((4, 3, 2, 5), (True,) * 4)),
        ((2, 100, 3), True, 50, False, ((2, 100, 3), (True, False, True))),
        ((1, 5), True, 10000, False, ((5,), (True,))),
        ((16,), False, 10000, False, ((16,), (False,))),
        ((16,), True, 10000, True, ((16,), (True,))),
        ((16,), False, 8, True, ((16,), (False,))),
        ((), True, 10000, True, ((), ())),
        ((0, 5), False, 10000, False, ((0, 5), (False, False))),
    ],
)
def test_layout_merges_and_skips_dimensions_as_the_authors(shape, merge, max_dim, one_d, expected):
    assert soap_layout(shape, merge, max_dim, one_d) == expected


def test_merge_matches_the_reference_merge():
    from .reference.soap import ReferenceSOAP

    for shape in [(16, 6), (4, 3, 2, 5), (2, 100, 3), (7, 1, 9), (300, 2, 2), (5, 5, 5, 5)]:
        for max_dim in (8, 12, 50, 10000):
            merged = ReferenceSOAP.merge_dims(torch.zeros(shape), max_dim).shape
            assert soap_layout(shape, True, max_dim, False)[0] == tuple(merged), (shape, max_dim)


VARIANTS = [
    {},
    {"merge_dims": True, "max_precond_dim": 40, "precondition_1d": True},
    {"max_precond_dim": 12},
    {"preconditioner_precision": "bf16"},
    {"state_precision": "bf16", "preconditioner_precision": "fp32"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) for v in VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_state_is_exactly_what_the_planner_counts(variant, dtype):
    model = make_model(dtype)
    opt = SOAP(model.parameters(), lr=1e-3, **variant)
    for k in range(3):
        x, y = make_batch(dtype, seed=k)
        opt.zero_grad()
        (model(x).float() - y.float()).pow(2).mean().backward()
        opt.step()
    spec = lmopt.get_spec("soap")
    for p in model.parameters():
        declared = {t.name: (t.shape, t.dtype) for t in spec.state_tensors(p.shape, p.dtype, **variant)}
        actual = {k: (tuple(v.shape), v.dtype) for k, v in opt.state[p].items()}
        assert actual == declared
        assert sum(v.nbytes for v in opt.state[p].values()) == spec.state_bytes(p.shape, p.dtype, **variant)


def test_bytes_per_parameter_of_a_large_matrix():
    spec = lmopt.get_spec("soap")
    m, n = 4096, 1024
    # step + two fp32 moments + L, R, Q_L, Q_R in fp32
    assert spec.state_bytes((m, n)) == 4 + 8 * m * n + 8 * (m * m + n * n)
    assert spec.state_bytes((m, n), preconditioner_precision="bf16") == 4 + 8 * m * n + 4 * (m * m + n * n)
    # a vocabulary dimension above max_precond_dim: only R (and Q_R) are kept
    assert spec.state_bytes((50304, 1024)) == 4 + 8 * 50304 * 1024 + 8 * 1024 * 1024
    assert spec.state_bytes((1024,)) == 4 + 8 * 1024  # 1-D: Adam's state
    assert spec.state_bytes((1024,), precondition_1d=True) == 4 + 8 * 1024 + 8 * 1024 * 1024
    assert spec.state_bytes((16, 6), merge_dims=True) == 4 + 8 * 96 + 8 * 96 * 96


def _train(opt_factory, steps=40, dtype=torch.float32):
    model = make_model(dtype)
    opt = opt_factory(model)
    losses = []
    x, y = make_batch(dtype, seed=0)  # one batch: a loss that can fall
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x).float() - y.float()).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_bf16_eigenbasis_stays_close_to_fp32():
    """bf16 statistics and bases (8 significant bits) move the trajectory, not the training: the loss curve
    stays within a few percent of the fp32 one over 40 steps."""
    _, fp32 = _train(lambda m: SOAP(m.parameters(), lr=3e-3))
    model, bf16 = _train(lambda m: SOAP(m.parameters(), lr=3e-3, preconditioner_precision="bf16"))
    assert all(math.isfinite(v) for v in bf16)
    assert bf16[-1] < 0.8 * bf16[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.05 * fp32[-1]


def test_cautious_alias_implies_cautious():
    spec, implied = lmopt.registry.resolve_name("cautious_soap")
    assert spec.name == "soap" and implied == {"cautious": True}
    opt = lmopt.create_optimizer("cautious_soap", make_model().parameters())
    assert all(g["cautious"] for g in opt.param_groups)


def test_cautious_masks_disagreeing_coordinates():
    """With cautious=True no coordinate moves against its gradient's descent direction."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = SOAP([w], lr=1e-2, cautious=True, weight_decay=0.0)
    target = torch.randn(6, 4)
    for _ in range(5):
        opt.zero_grad()
        (w - target).pow(2).sum().backward()
        before = w.detach().clone()
        opt.step()
        moved = w.detach() - before
        assert bool((moved * w.grad <= 0).all())


def test_heavyball_soap_trains_alike(monkeypatch):
    """heavyball's SOAP (3.2.1) differs from the authors' by design (docs/optimizers-soap.md: a lifted null space
    in the QR refresh, sign-fixed bases, debiased betas, its own Adam), so the trajectories are not equal even
    with matched settings; on the same problem both reduce the loss alike (within 10% after 40 steps)."""
    heavyball = pytest.importorskip("heavyball")
    utils = pytest.importorskip("heavyball.utils")

    monkeypatch.setattr(utils, "compile_mode", None)  # eager: torch.compile on CPU takes minutes
    monkeypatch.setattr(utils, "compile_mode_recommended_to_none", None)
    settings = dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01)
    _, ours = _train(lambda m: SOAP(m.parameters(), precondition_frequency=10, **settings))
    _, theirs = _train(
        lambda m: heavyball.SOAP(
            m.parameters(),
            precondition_frequency=10,
            use_precond_schedule=False,
            merge_dims=False,
            precondition_1d=False,
            max_precond_dim=10000,
            **settings,
        )
    )
    assert ours[0] == theirs[0]
    assert ours[-1] < 0.8 * ours[0] and theirs[-1] < 0.8 * theirs[0]
    assert abs(ours[-1] - theirs[-1]) < 0.1 * theirs[-1]


def test_foreach_batches_in_chunks_bit_identically(monkeypatch):
    """Same-shape matrices are stacked in runs of at most BATCH_ELEMENTS elements (bounded temporaries); the
    split does not change the result."""
    import importlib

    soap_module = importlib.import_module("lmopt.optim.soap")  # the attribute lmopt.optim.soap is the function

    def run(cap: int) -> list[torch.Tensor]:
        monkeypatch.setattr(soap_module, "BATCH_ELEMENTS", cap)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(5)]
        opt = SOAP(params, lr=1e-2, precondition_frequency=2)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach() for p in params]

    for a, b in zip(run(1 << 24), run(64), strict=True):
        assert torch.equal(a, b)
