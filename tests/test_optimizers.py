"""Generic tests run over every spec in the test database (tests/optim_db.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lmopt
from lmopt.registry import get_spec, list_optimizers

from .optim_db import OPTIM_DB, OptimSpec, make_batch, make_model

CASES = [(spec, i) for spec in OPTIM_DB for i in range(len(spec.variants))]
CASE_IDS = [f"{spec.name}-{i}" for spec, i in CASES]


def _run(spec: OptimSpec, model, opt, steps: int, dtype=torch.float32, seed: int = 1) -> None:
    for k in range(steps):
        x, y = make_batch(dtype, seed=seed + k)
        spec.step(model, opt, x, y)


def _max_rel_err(a, b) -> float:
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        scale = q.detach().abs().max().clamp_min(1e-12)
        worst = max(worst, ((p.detach() - q.detach()).abs().max() / scale).item())
    return worst


def test_every_registry_optimizer_has_a_spec():
    covered = {get_spec(spec.name).name for spec in OPTIM_DB}
    missing = [s.name for s in list_optimizers() if s.name not in covered]
    assert not missing, f"add an OptimSpec to tests/optim_db.py for: {missing}"


@pytest.mark.parametrize(
    ("spec", "variant"),
    [c for c in CASES if c[0].reference],
    ids=[i for c, i in zip(CASES, CASE_IDS) if c[0].reference],
)
def test_matches_reference(spec: OptimSpec, variant: int):
    kw = spec.variants[variant]
    ours, theirs = make_model(torch.float64), make_model(torch.float64)
    opt_ours, opt_theirs = spec.make(ours, kw), spec.reference(theirs, dict(kw))
    _run(spec, ours, opt_ours, spec.reference_steps, torch.float64)
    _run(spec, theirs, opt_theirs, spec.reference_steps, torch.float64)
    rtol, atol = spec.reference_tol_by_variant.get(variant, spec.reference_tol)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


IMPL_CASES = [(spec, i, impl) for spec, i in CASES for impl in spec.implementations[1:]]


@pytest.mark.parametrize(
    ("spec", "variant", "impl"), IMPL_CASES, ids=[f"{s.name}-{i}-{impl}" for s, i, impl in IMPL_CASES]
)
def test_implementations_agree(spec: OptimSpec, variant: int, impl: str):
    kw = spec.variants[variant]
    plain, other = make_model(), make_model()
    opt_plain = spec.make(plain, {**kw, "implementation": spec.implementations[0]})
    opt_other = spec.make(other, {**kw, "implementation": impl})
    _run(spec, plain, opt_plain, 50)
    _run(spec, other, opt_other, 50)
    rtol, atol = spec.implementation_tol
    for p, q in zip(other.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("spec", "variant"), CASES, ids=CASE_IDS)
def test_resume_is_bit_exact(spec: OptimSpec, variant: int):
    kw = spec.variants[variant]
    straight = make_model()
    opt = spec.make(straight, kw)
    _run(spec, straight, opt, 12)

    first = make_model()
    opt_first = spec.make(first, kw)
    _run(spec, first, opt_first, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=123)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt_resumed = spec.make(resumed, kw)
    opt_resumed.load_state_dict(saved["optimizer"])
    _run(spec, resumed, opt_resumed, 7, seed=6)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)
    for p_r, p_s in zip(resumed.parameters(), straight.parameters()):
        for key, value in opt.state[p_s].items():
            other = opt_resumed.state[p_r][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype, key
                assert torch.equal(value, other), key
            else:
                assert value == other, key


DTYPE_CASES = [(spec, dtype) for spec in OPTIM_DB for dtype in spec.dtypes]


@pytest.mark.parametrize(("spec", "dtype"), DTYPE_CASES, ids=[f"{s.name}-{str(d)[6:]}" for s, d in DTYPE_CASES])
def test_dtypes_and_state_match_registry(spec: OptimSpec, dtype: torch.dtype):
    """Parameter dtypes are kept; the state is exactly what the registry declares (names, shapes, dtypes)."""
    kw = spec.variants[0]
    model = make_model(dtype)
    opt = spec.make(model, kw)
    _run(spec, model, opt, 3, dtype)
    registry_spec, implied = lmopt.registry.resolve_name(spec.name)
    for p in model.parameters():
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        declared = {t.name: t for t in registry_spec.state_tensors(p.shape, p.dtype, **{**implied, **kw})}
        actual = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert set(actual) == set(declared), (set(actual), set(declared))
        for name, t in actual.items():
            assert tuple(t.shape) == declared[name].shape, name
            assert t.dtype == declared[name].dtype, name


@pytest.mark.parametrize("spec", OPTIM_DB, ids=[s.name for s in OPTIM_DB])
def test_params_without_grad_and_frozen_and_empty(spec: OptimSpec):
    torch.manual_seed(0)
    used = torch.nn.Parameter(torch.randn(4, 3))
    unused = torch.nn.Parameter(torch.randn(5))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    empty = torch.nn.Parameter(torch.randn(0, 3))
    holder = torch.nn.Module()
    holder.used, holder.unused, holder.frozen, holder.empty = used, unused, frozen, empty
    opt = (
        spec.make(holder, spec.variants[0])
        if spec.build
        else lmopt.create_optimizer(spec.name, [used, unused, frozen, empty], **spec.variants[0])
    )
    before_unused, before_frozen = unused.detach().clone(), frozen.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (used.sum() ** 2 + (empty.sum() if empty.numel() else empty.sum())).backward()
        opt.step()
    assert torch.equal(unused, before_unused)
    if spec.lmopt_engine:  # torch's Adagrad creates its state eagerly; lmopt creates state on first gradient
        assert not opt.state.get(unused)
    assert torch.equal(frozen, before_frozen)
    assert torch.isfinite(used).all()


INVALID_CASES = [(spec, kw, arg) for spec in OPTIM_DB for kw, arg in spec.invalid]


@pytest.mark.parametrize(
    ("spec", "kw", "arg"), INVALID_CASES, ids=[f"{s.name}-{a}-{i}" for i, (s, _, a) in enumerate(INVALID_CASES)]
)
def test_invalid_hyperparameters_name_the_argument(spec: OptimSpec, kw, arg):
    model = make_model()
    with pytest.raises(ValueError, match=arg.replace("[", r"\[")):
        spec.make(model, {**spec.variants[0], **kw})


@pytest.mark.parametrize("spec", OPTIM_DB, ids=[s.name for s in OPTIM_DB])
def test_sparse_gradients(spec: OptimSpec):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = lmopt.create_optimizer(spec.name, emb.parameters(), **spec.variants[0]) if not spec.build else None
    if opt is None:
        pytest.skip("optimizer is built from a model structure")
    emb(torch.tensor([1, 2])).sum().backward()
    if spec.sparse_supported:
        opt.step()
    else:
        with pytest.raises(RuntimeError, match="sparse"):
            opt.step()


NONFINITE = [s for s in OPTIM_DB if s.lmopt_engine]


@pytest.fixture(params=["kernel", "norm"])
def finiteness_check(request, monkeypatch):
    """Both ways of finding inf/NaN: lmopt's C kernel, and the 2-norm used where the kernel does not apply."""
    if request.param == "norm":
        monkeypatch.setattr("lmopt.optim.base._kernel_first_nonfinite", lambda tensors: None)
    return request.param


@pytest.mark.parametrize("spec", NONFINITE, ids=[s.name for s in NONFINITE])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raise_leaves_everything_unchanged(spec: OptimSpec, bad: float, finiteness_check):
    model = make_model()
    opt = spec.make(model, spec.variants[0])
    _run(spec, model, opt, 2)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    x, y = make_batch()
    (model(x) - y).pow(2).mean().backward()
    last = list(model.parameters())[-1]
    last.grad.view(-1)[0] = bad
    with pytest.raises(lmopt.NonFiniteGradientError, match=r"params'\]\[\d+\]"):
        opt.step()
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p, before)
    _assert_state_equal(opt.state_dict(), state_before)


@pytest.mark.parametrize("spec", NONFINITE, ids=[s.name for s in NONFINITE])
def test_nonfinite_skip_counts_and_resumes(spec: OptimSpec):
    model = make_model()
    opt = spec.make(model, {**spec.variants[0], "nonfinite": "skip"})
    _run(spec, model, opt, 2)
    params_before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    x, y = make_batch()
    (model(x) - y).pow(2).mean().backward()
    list(model.parameters())[0].grad.view(-1)[3] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for p, before in zip(model.parameters(), params_before):
        assert torch.equal(p, before)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other = spec.make(make_model(), {**spec.variants[0], "nonfinite": "skip"})
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.skipped_steps == 1


@pytest.mark.parametrize("spec", NONFINITE, ids=[s.name for s in NONFINITE])
def test_huge_finite_gradients_are_not_reported(spec: OptimSpec, finiteness_check):
    """The fast check's norm overflows for huge finite gradients; that must not be mistaken for inf/NaN."""
    model = make_model()
    opt = spec.make(model, {**spec.variants[0], "nonfinite": "skip"})
    opt.zero_grad()
    x, y = make_batch()
    (model(x) - y).pow(2).mean().backward()
    list(model.parameters())[0].grad.fill_(1e30)
    opt.step()
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("spec", NONFINITE, ids=[s.name for s in NONFINITE])
def test_recorded_finite_norm_replaces_the_check(spec: OptimSpec):
    model = make_model()
    opt = spec.make(model, spec.variants[0])
    opt.zero_grad()
    x, y = make_batch()
    (model(x) - y).pow(2).mean().backward()
    opt.record_grad_norm(torch.tensor(float("inf")))
    with pytest.raises(lmopt.NonFiniteGradientError, match="norm"):
        opt.step()


def _assert_state_equal(a, b) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, value in a["state"][k].items():
            other = b["state"][k][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            else:
                assert value == other, name


@pytest.mark.parametrize(("spec", "variant"), CASES, ids=CASE_IDS)
def test_lr_zero_leaves_parameters_unchanged(spec: OptimSpec, variant: int):
    """torch's convention: ``lr=0`` is valid (a frozen group, or a scheduler that sets the rate later; DCP builds
    optimizers with it to initialise state) and a step then changes no parameter; the state stays finite."""
    kw = dict(spec.variants[variant])
    if kw.get("relative_step"):  # Adafactor's relative step computes its own rate and ignores lr
        pytest.skip("relative_step ignores lr")
    if kw.get("decouple_lr") and kw.get("max_lr") is None:  # max_lr defaults to lr: it needs the peak
        with pytest.raises(ValueError, match="max_lr="):
            spec.make(make_model(), {**kw, "lr": 0.0})
        kw["max_lr"] = kw["lr"]
    model = make_model()
    opt = spec.make(model, {**kw, "lr": 0.0})
    before = [p.detach().clone() for p in model.parameters()]
    _run(spec, model, opt, 3)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all()
    named = {"param_names": ["extra"]} if "param_names" in opt.param_groups[0] else {}
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.0, **named})  # a later group
