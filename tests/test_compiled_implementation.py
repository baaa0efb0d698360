"""``implementation="compiled"`` over the test database: the group's step traced by torch.compile (Inductor's C++
backend on CPU) agrees with the plain path, resumes bit-exactly, keeps the declared state and the non-finite policy,
and does not recompile when a scheduler changes the LR (issue #16 item 5; docs/compile.md).

The default run compiles a few entries; ``pytest -m slow`` every lmopt-engine entry (Inductor's code generation takes
tens of seconds per optimizer on 2 cores).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch._dynamo

import lmopt
from lmopt.optim.base import LmoptOptimizer

from .optim_db import OPTIM_DB, OptimSpec, make_batch, make_model

pytestmark = pytest.mark.filterwarnings("ignore")


def _compilable(spec: OptimSpec) -> bool:
    if not spec.lmopt_engine:
        return False
    opt = spec.make(make_model(), spec.variants[0])
    return isinstance(opt, LmoptOptimizer) and "compiled" in type(opt)._engine_implementations()


COMPILABLE = [s for s in OPTIM_DB if _compilable(s)]
DEFAULT = ("adamw",)


def _cases(default: bool):
    return [
        pytest.param(s, id=s.name, marks=[] if default else [pytest.mark.slow])
        for s in COMPILABLE
        if (s.name in DEFAULT) == default
    ]


class _Counting:
    """A torch.compile backend that counts the graphs it is handed and hands them to Inductor."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)


def _make(spec: OptimSpec, model, implementation: str | None, counting=None):
    kw = dict(spec.variants[0])
    if implementation is not None:
        kw["implementation"] = implementation
    opt = spec.make(model, kw)
    if counting is not None:
        opt.compile_backend = counting
    return opt


def _run(spec: OptimSpec, model, opt, steps: int, seed: int = 1, scheduler=None) -> None:
    for k in range(steps):
        x, y = make_batch(seed=seed + k)
        spec.step(model, opt, x, y)
        if scheduler is not None:
            scheduler.step()


def _check(spec: OptimSpec) -> None:
    torch._dynamo.reset()
    plain, compiled = make_model(), make_model()
    counting = _Counting()
    opt_plain = _make(spec, plain, spec.implementations[0] if spec.implementations else None)
    opt_compiled = _make(spec, compiled, "compiled", counting)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + 0.1 * s)) for o in (opt_plain, opt_compiled)]
    graphs = []
    for k in range(8):
        x, y = make_batch(seed=1 + k)
        spec.step(plain, opt_plain, x, y)
        spec.step(compiled, opt_compiled, x, y)
        for s in schedules:
            s.step()
        graphs.append(counting.graphs)
    # one graph per param group at the first step (more where a group's step breaks the graph), none after
    assert graphs[1] == graphs[-1], f"recompiled as the lr changed: graphs per step {graphs}"
    assert "compiled" in repr(opt_compiled)
    rtol, atol = spec.implementation_tol
    for p, q in zip(compiled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=max(rtol, 1e-5), atol=max(atol, 1e-6))
    # the state is the declared one: the plain path's entries, shapes and dtypes
    for p, q in zip(compiled.parameters(), plain.parameters(), strict=True):
        a, b = opt_compiled.state[p], opt_plain.state[q]
        assert sorted(a) == sorted(b)
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert (value.shape, value.dtype) == (b[key].shape, b[key].dtype), key


def _check_resume(spec: OptimSpec, backend: str = "inductor") -> None:
    torch._dynamo.reset()
    straight = make_model()
    opt = _make(spec, straight, "compiled", backend)
    _run(spec, straight, opt, 6)
    first = make_model()
    opt_first = _make(spec, first, "compiled", backend)
    _run(spec, first, opt_first, 3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt_resumed = _make(spec, resumed, "compiled", backend)
    opt_resumed.load_state_dict(saved["optimizer"])
    _run(spec, resumed, opt_resumed, 3, seed=4)
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("spec", _cases(default=True))
def test_compiled_matches_plain(spec):
    _check(spec)


@pytest.mark.parametrize("spec", _cases(default=False))
def test_compiled_matches_plain_every_entry(spec):
    _check(spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in COMPILABLE])
def test_compiled_resume_is_bit_exact(spec):
    _check_resume(spec)


def test_compiled_resume_is_bit_exact_adamw():
    # aot_eager: the same traced graph without Inductor's code generation (the slow run uses Inductor)
    _check_resume(next(s for s in COMPILABLE if s.name == "adamw"), backend="aot_eager")


def test_compiled_keeps_the_nonfinite_policy():
    """The finiteness check runs eagerly before the compiled group step: "raise" leaves everything unchanged,
    "skip" counts the step (a torch.compile of the whole step skips the check, as torch.optim does)."""
    torch._dynamo.reset()
    model = make_model()
    opt = lmopt.AdamW(model.parameters(), lr=1e-2, implementation="compiled")
    opt.compile_backend = "aot_eager"  # the policy is the engine's, not the backend's
    x, y = make_batch()
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(lmopt.NonFiniteGradientError):
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert str(opt.state_dict()["state"]) == str(state["state"])


def test_compiled_functional_call_is_refused_outside_the_step():
    """The functional entry points take implementation='compiled' only inside the optimizer's compiled step."""
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="runs through the optimizer's step"):
        lmopt.optim.lion([p], [torch.ones(3)], [torch.zeros(3)], lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0,
                         maximize=False, implementation="compiled")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# ``auto`` on CUDA compiles the steps that have no native GPU kernel; compile_mode (CUDA graphs) passes through.
# No GPU here: the device test (base._on_cuda) is patched to say "CUDA" for CPU tensors, and the compile backend is
# aot_eager (the same ops as eager, without Inductor's code generation), so the selection rule itself is checked.
def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _steps(opt, model, n=3):
    for i in range(n):
        torch.manual_seed(100 + i)
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    ("name", "kw", "compiles"),
    [
        ("lion", {}, True),  # no native GPU path for fp32 Lion: compiled
        ("adafactor", {}, True),
        ("came", {}, True),
        ("adamw", {}, False),  # torch's fused CUDA kernel
        ("adamw8bit", {}, False),  # lmopt's Triton kernel
        ("prodigy", {}, False),  # not compilable
    ],
)
def test_auto_compiles_on_cuda_unless_a_native_kernel_applies(monkeypatch, name, kw, compiles):
    from lmopt.optim import base

    model = _tiny_model()
    reference_model = copy.deepcopy(model)
    opt = lmopt.create_optimizer(name, model.parameters(), lr=1e-2, **kw)
    reference = lmopt.create_optimizer(name, reference_model.parameters(), lr=1e-2, **kw)
    monkeypatch.setattr(type(opt), "compile_backend", "aot_eager", raising=False)
    monkeypatch.setattr(base, "_on_cuda", lambda params: True)
    calls = []
    real_compile = torch.compile

    def spy(fn, **options):
        calls.append(options)
        return real_compile(fn, **options)

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    _steps(opt, model)
    assert bool(calls) == compiles, name
    used = " ".join(getattr(opt, "_implementation_used", {}).values())
    assert ("compiled (auto on CUDA)" in used) == compiles, used
    monkeypatch.setattr(base, "_on_cuda", lambda params: False)
    _steps(reference, reference_model)
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        # aot_eager runs the eager ops after functionalization: fp32 results agree to a few ulps
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_auto_compile_switch_and_cpu(monkeypatch):
    from lmopt.optim import base

    model = _tiny_model()
    opt = lmopt.create_optimizer("lion", model.parameters(), lr=1e-2)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled on CPU under auto"))
    _steps(opt, model, 1)  # CPU: auto keeps the eager paths
    monkeypatch.setattr(base, "_on_cuda", lambda params: True)
    monkeypatch.setattr(base, "AUTO_COMPILE", False)
    _steps(opt, model, 1)  # LMOPT_AUTO_COMPILE=0


def test_compile_mode_reaches_torch_compile(monkeypatch):
    model = _tiny_model()
    opt = lmopt.create_optimizer(
        "lion", model.parameters(), lr=1e-2, implementation="compiled", compile_mode="reduce-overhead"
    )
    assert opt.compile_mode == "reduce-overhead"
    seen = []
    real_compile = torch.compile

    def spy(fn, **options):
        seen.append(options)
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    _steps(opt, model, 2)
    assert seen == [{"backend": "inductor", "mode": "reduce-overhead"}]
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        lmopt.create_optimizer("lion", model.parameters(), compile_mode="fast")
    with pytest.raises(ValueError, match="compile_mode applies"):
        lmopt.create_optimizer("sgd", model.parameters(), compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="compile_mode applies"):
        lmopt.create_optimizer("prodigy", model.parameters(), compile_mode="reduce-overhead")
