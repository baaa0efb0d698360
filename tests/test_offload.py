"""lmopt.offload over the test database: with the host as the device (CPU CI), an offloaded optimizer equals the
plain one bit for bit, through LR schedules, accumulation, clipping, closures, checkpoints and Schedule-Free's
train/eval switch; the paged_* aliases build it (issue #16 items 1-2; docs/offload.md)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lmopt
from lmopt.optim.offload import OffloadOptimizer

from .optim_db import OPTIM_DB, OptimSpec, make_batch, make_model

pytestmark = pytest.mark.filterwarnings("ignore")


def _offloaded(spec: OptimSpec, model: nn.Module, variant: dict) -> OffloadOptimizer:
    if spec.build is None:  # by name, as users call it
        return lmopt.offload(spec.name, list(model.parameters()), **variant)
    return lmopt.offload(spec.make(model, dict(variant)))  # an instance, re-homed on the host


def _steps(spec: OptimSpec, model, opt, steps: int, seed: int = 1, scheduler=None) -> None:
    for k in range(steps):
        x, y = make_batch(seed=seed + k)
        spec.step(model, opt, x, y)
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in OPTIM_DB])
def test_offload_equals_plain_bit_for_bit(spec):
    variant = spec.variants[0]
    plain_model, off_model = make_model(), make_model()
    plain = spec.make(plain_model, dict(variant))
    try:
        off = _offloaded(spec, off_model, variant)
    except ValueError as error:  # the re-homing refusal names the way out
        assert "build it by name" in str(error) or "cannot be offloaded" in str(error)
        return
    assert "OffloadOptimizer" in repr(off)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + 0.1 * s)) for o in (plain, off)]
    for k in range(6):
        x, y = make_batch(seed=1 + k)
        spec.step(plain_model, plain, x, y)
        spec.step(off_model, off, x, y)
        for s in schedules:
            s.step()
    for p, q in zip(off_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q)
    # the state lives with the host copies, never with the (here: CPU) device parameters
    device_ids = {id(p) for p in off_model.parameters()}
    assert not any(id(p) in device_ids for p in off.state)


def test_offload_resume_is_bit_exact_through_a_checkpoint():
    spec = next(s for s in OPTIM_DB if s.name == "adamw8bit")
    straight = make_model()
    opt = lmopt.offload("adamw8bit", straight, lr=1e-2)
    _steps(spec, straight, opt, 8)
    first = make_model()
    opt_first = lmopt.offload("adamw8bit", first, lr=1e-2)
    _steps(spec, first, opt_first, 4)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=7)
    resumed.load_state_dict(saved["model"])  # the device parameters: the host copies follow at construction
    opt_resumed = lmopt.offload("adamw8bit", resumed, lr=1e-2)
    opt_resumed.load_state_dict(saved["optimizer"])
    _steps(spec, resumed, opt_resumed, 4, seed=5)
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)


def test_offload_accumulation_clipping_and_closure():
    """Two micro-batches per step (the hook copies the accumulated gradient), global-norm clipping of the host
    gradients, and step(closure): all equal to the plain optimizer doing the same."""
    plain_model, off_model = make_model(), make_model()
    plain = lmopt.create_optimizer("adamw", plain_model, lr=1e-2)
    off = lmopt.offload("adamw", off_model, lr=1e-2)
    for k in range(4):
        for model, opt in ((plain_model, plain), (off_model, off)):
            opt.zero_grad(set_to_none=True)
            for micro in range(2):
                x, y = make_batch(seed=10 * k + micro)
                ((model(x) - y).pow(2).mean() / 2).backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 0.05)
        norm = off.clip_grad_norm_(0.05)
        assert norm > 0.05  # the clip was active
        plain.step()
        off.step()
    x, y = make_batch(seed=99)
    for model, opt in ((plain_model, plain), (off_model, off)):

        def closure(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
    for p, q in zip(off_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_offload_without_overlap_and_lmopt_train_clipping():
    """overlap=False copies the gradients at step time; lmopt.train.clip_grad_norm(optimizer) clips the host
    gradients the step uses."""
    from lmopt.train import clip_grad_norm

    plain_model, off_model = make_model(), make_model()
    plain = lmopt.create_optimizer("came", plain_model, lr=1e-2)
    off = lmopt.offload("came", off_model, lr=1e-2, overlap=False)
    for k in range(3):
        x, y = make_batch(seed=k)
        for model, opt in ((plain_model, plain), (off_model, off)):
            opt.zero_grad(set_to_none=True)
            (model(x) - y).pow(2).mean().backward()
            clip_grad_norm(opt, 0.05)
            opt.step()
    for p, q in zip(off_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_offload_schedule_free_eval_reaches_the_device_parameters():
    """eval() / train() switch the host copies and copy them to the device parameters: the model evaluates at the
    averaged point, as with the plain optimizer."""
    spec = next(s for s in OPTIM_DB if s.name == "schedule_free_adamw")
    plain_model, off_model = make_model(), make_model()
    plain = lmopt.create_optimizer("schedule_free_adamw", plain_model, lr=1e-2)
    off = lmopt.offload("schedule_free_adamw", off_model, lr=1e-2)
    for opt in (plain, off):
        opt.train()
    _steps(spec, plain_model, plain, 5)
    _steps(spec, off_model, off, 5)
    training_point = [p.detach().clone() for p in off_model.parameters()]
    for opt in (plain, off):
        opt.eval()
    assert any(not torch.equal(p, t) for p, t in zip(off_model.parameters(), training_point))
    assert all(torch.equal(p, q) for p, q in zip(off_model.parameters(), plain_model.parameters()))
    for opt in (plain, off):
        opt.train()
    assert all(torch.equal(p, q) for p, q in zip(off_model.parameters(), plain_model.parameters()))


def test_offload_nonfinite_raise_leaves_the_device_parameters():
    model = make_model()
    opt = lmopt.offload("adamw", model, lr=1e-2)
    x, y = make_batch()
    x[0, 0] = float("nan")  # a non-finite gradient, moved to the host by the hooks during backward
    (model(x) - y).pow(2).mean().backward()
    before = copy.deepcopy(model.state_dict())
    assert all(p.grad is None for p in model.parameters())  # released from the device as they were moved
    with pytest.raises(lmopt.NonFiniteGradientError):
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("alias", ["paged_adamw_8bit", "paged_adam_8bit", "paged_lion_8bit", "paged_adamw_32bit"])
def test_paged_aliases_build_the_offloaded_optimizer(alias):
    opt = lmopt.create_optimizer(alias, make_model(), lr=1e-3)
    assert isinstance(opt, OffloadOptimizer)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("adamw",), {}, "needs the model or parameters"),
        ((42, [torch.zeros(1)]), {}, "registry name or a torch Optimizer"),
        (("adamw", [nn.Parameter(torch.zeros(2))]), {"pin_memory": "yes"}, "pin_memory must be"),
        (("adamw", [nn.Parameter(torch.zeros(2))]), {"overlap": 1}, "overlap must be"),
    ],
)
def test_offload_bad_arguments_name_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lmopt.offload(*args, **kwargs)


@pytest.mark.parametrize("build", ["name", "params", "instance"])
def test_offload_keeps_frozen_parameters_on_the_device_only(build):
    """LoRA: the frozen base weights get a shape-only meta placeholder on the host, are never copied, and the
    result equals the plain optimizer bit for bit; a gradient on a frozen parameter is refused before any change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    model[0].weight.requires_grad_(False)
    reference = copy.deepcopy(model)
    plain = lmopt.create_optimizer("adamw", reference, lr=1e-2)
    if build == "name":
        opt = lmopt.offload("adamw", model, lr=1e-2)
    elif build == "params":
        opt = lmopt.offload("adamw", list(model.parameters()), lr=1e-2)
        plain = lmopt.create_optimizer("adamw", list(reference.parameters()), lr=1e-2)  # one group, as given
    else:
        opt = lmopt.offload(torch.optim.AdamW(model.parameters(), lr=1e-2))
        plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    assert [tuple(p.shape) for p in opt.frozen_params] == [(32, 16)]
    assert all(not h.is_meta for h in opt.host_params) and len(opt.host_params) == 3
    # given groups that list it, the inner optimizer holds the placeholder (never stepped); from a model,
    # create_optimizer leaves frozen parameters out of the groups
    assert any(p.is_meta for g in opt.param_groups for p in g["params"]) == (build != "name")
    x = torch.randn(4, 16)
    for _ in range(3):
        for m, o in ((model, opt), (reference, plain)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    model[0].weight.requires_grad_(True)  # unfrozen after the optimizer was built
    model(x).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="was frozen .* when lmopt.offload built"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
