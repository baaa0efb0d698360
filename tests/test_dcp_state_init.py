"""torch.distributed.checkpoint's state initialisation on every registry optimizer.

``get_state_dict`` / ``set_state_dict`` (torch.distributed.checkpoint.state_dict) fill an empty optimizer state
by one step with zero gradients at ``lr = 0`` (torch's ``_init_optim_state``). Every optimizer must leave its
parameters bit-identical and its state finite through that step, and the state dict DCP then returns must load
into a fresh optimizer so that both continue identically.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .optim_db import OPTIM_DB, make_batch, make_model

CASES = [(spec, i) for spec in OPTIM_DB for i in range(len(spec.variants))]


def _finite(state: dict) -> list[str]:
    bad = []
    for key, entry in state.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(f"{key}.{name}")
    return bad


@pytest.mark.parametrize(("spec", "variant"), CASES, ids=[f"{s.name}-{i}" for s, i in CASES])
def test_dcp_initialises_state_without_moving_parameters(spec, variant):
    kw = spec.variants[variant]
    model = make_model()
    opt = spec.make(model, kw)
    before = [p.detach().clone() for p in model.parameters()]
    lrs = [g.get("lr") for g in opt.param_groups]

    model_sd, optim_sd = get_state_dict(model, opt)

    moved = [n for (n, p), b in zip(model.named_parameters(), before, strict=True) if not torch.equal(p.detach(), b)]
    assert not moved, f"the lr=0 zero-gradient step moved {moved}"
    assert all(p.grad is None for p in model.parameters()), "DCP's step leaves no gradients behind"
    assert [g.get("lr") for g in opt.param_groups] == lrs
    assert not _finite(optim_sd["state"]), f"non-finite state after the lr=0 step: {_finite(optim_sd['state'])}"
    assert set(optim_sd["state"]) <= {n for n, _ in model.named_parameters()}, "DCP keys state by parameter name"

    # the state round-trips: a fresh model and optimizer loaded from it continue as the original does (the dicts
    # alias the live tensors, hence the copies)
    model_sd, optim_sd = copy.deepcopy(model_sd), copy.deepcopy(optim_sd)
    other = make_model(seed=5)
    other_opt = spec.make(other, kw)
    set_state_dict(other, other_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for k in range(2):
        x, y = make_batch(seed=40 + k)
        spec.step(model, opt, x, y)
        spec.step(other, other_opt, x, y)
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), f"{name} differs after resuming from DCP's state dict"
