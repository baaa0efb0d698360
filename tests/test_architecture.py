"""The architecture's promises: floors without import circles, discovered specs, one source per fact, one
implementation vocabulary with its old names as aliases, one state-precision axis, old checkpoints loading."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lmopt
from lmopt.bench.compare import compare_hyperparameters
from lmopt.optim import resolve_implementation
from lmopt.registry import list_optimizers, spec_modules
from lmopt.spec import IMPLEMENTATIONS

PACKAGE = Path(lmopt.__file__).resolve().parent
LEGACY = Path(__file__).with_name("data") / "legacy_state.pt"


# ------------------------------------------------------------------------------------------------- import floors
def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_time_imports(path: Path) -> set[str]:
    """The lmopt modules a module imports when it is imported: top-level statements only (imports inside
    functions run later and may close no circle at import time), ``if TYPE_CHECKING:`` blocks left out."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lmopt"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                if not target.startswith("lmopt"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists():
                        found.add(sub)  # ``from . import x``: the submodule x (its package is importing already)
                    else:
                        found.add(target)  # a name defined by the module itself

    visit(ast.parse(path.read_text()).body)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _import_time_imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_circle_inside_lmopt():
    graph = _graph()
    # a package imports its parents implicitly; only explicit edges can close a circle
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_ground_floor_imports_nothing_of_lmopt():
    graph = _graph()
    assert graph["lmopt.spec"] == set() and graph["lmopt._version"] == set()
    # the quantization and kernel floor does not reach up into optimizers, the registry or services
    for name, imports in graph.items():
        if name.startswith(("lmopt.quant", "lmopt.kernels")):
            upward = {m for m in imports if not m.startswith(("lmopt.quant", "lmopt.kernels", "lmopt.spec"))}
            assert not upward, f"{name} imports {upward}"
    for name in ("lmopt.train.checkpoint", "lmopt.bench.run", "lmopt.cli"):
        assert "lmopt" not in graph[name], f"{name} imports the package root"


# ------------------------------------------------------------------------------------------------- discovery
def test_every_module_declaring_specs_is_discovered():
    declaring = set()
    for path in (PACKAGE / "optim").glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(
            isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SPECS" for t in n.targets)
            for n in tree.body
        ):
            declaring.add(_module_name(path))
    assert declaring == set(spec_modules())
    registered = {s.name for s in list_optimizers()}
    for module in declaring:
        assert {s.name for s in importlib.import_module(module).SPECS} <= registered


def test_lookahead_entries_come_from_the_spec_flag():
    specs = list_optimizers()
    flagged = {s.name for s in specs if s.lookahead}
    made = {s.name.removeprefix("lookahead_") for s in specs if s.name.startswith("lookahead_")}
    assert flagged == made and {"adamw", "sgd", "muon"} <= flagged
    assert lmopt.optim.lookahead.LOOKAHEAD_BASES == tuple(s.name for s in specs if s.lookahead)


# ------------------------------------------------------------------------------------------------- one source
def test_lion_translation_has_one_source():
    lion, adamw = lmopt.get_spec("lion"), lmopt.get_spec("adamw")
    recipe_lion, recipe_adamw = lmopt.recipe("7B", optimizer="lion"), lmopt.recipe("7B")
    compare_lion, compare_adamw = compare_hyperparameters(lion), compare_hyperparameters(adamw)
    t = lion.translation
    assert recipe_lion.lr == pytest.approx(recipe_adamw.lr * t.lr_factor, rel=1e-3)
    # the compare workload's Lion lr is declared from lmopt tune (3x tuned AdamW's, not / 3: docs/compare.md);
    # its weight decay and betas still follow the translation
    assert lion.compare is not None and compare_lion["lr"] == lion.compare["lr"] > compare_adamw["lr"]
    assert compare_lion["weight_decay"] == pytest.approx(compare_adamw["weight_decay"] * t.weight_decay_factor)
    assert compare_lion["betas"] == recipe_lion.betas == t.betas
    assert lmopt.get_spec("lion8bit").translation is t


def test_readers_take_their_tables_from_the_specs():
    from lmopt.bench.compare import DEFAULT_OPTIMIZERS
    from lmopt.memory import OPTIMIZER_LADDER
    from lmopt.memory.planner import PER_TENSOR_STATE_KEYS
    from lmopt.recipes import TRANSLATIONS

    specs = list_optimizers()
    assert DEFAULT_OPTIMIZERS == tuple(
        s.name for s in sorted((s for s in specs if s.compare_default), key=lambda s: s.compare_default)
    )
    assert [n for n, _, _ in OPTIMIZER_LADDER] == [
        s.name for s in sorted((s for s in specs if s.recommend_tier is not None), key=lambda s: s.recommend_tier)
    ]
    assert OPTIMIZER_LADDER[0][:2] == ("adamw", 0)
    assert set(PER_TENSOR_STATE_KEYS) == {s.name for s in specs if s.structure_state} >= {"adam_mini"}
    assert TRANSLATIONS["came"] is lmopt.get_spec("came").translation


# ------------------------------------------------------------------------------------------------- dispatch
def test_resolve_implementation_is_one_rule():
    assert resolve_implementation("auto", ("for_loop", "foreach", "fused")) == "fused"
    assert resolve_implementation("auto", ("for_loop", "foreach", "fused"), {"fused": False}) == "foreach"
    assert resolve_implementation("auto", ("for_loop", "blocked"), preference=("for_loop",)) == "for_loop"
    assert resolve_implementation("auto", ("for_loop",)) == "for_loop"
    with pytest.raises(ValueError, match="implementation='fused' does not apply"):
        resolve_implementation("fused", ("for_loop", "fused"), {"fused": False})
    with pytest.raises(ValueError, match="implementation must be one of"):
        resolve_implementation("magic", ("for_loop",))
    for spec in list_optimizers():
        if isinstance(spec.cls, type) and issubclass(spec.cls, lmopt.LmoptOptimizer):
            assert spec.implementations[0] == "for_loop", spec.name
            assert set(spec.implementations) <= set(IMPLEMENTATIONS), spec.name


@pytest.mark.parametrize(
    "build, old, new",
    [
        (lambda ps, impl: lmopt.Lion(ps, implementation=impl), "fused", "blocked"),
        (lambda ps, impl: lmopt.CAME(ps, implementation=impl), "fused", "blocked"),
        (lambda ps, impl: lmopt.Adafactor(ps, implementation=impl), "fused", "blocked"),
        (lambda ps, impl: lmopt.Sophia(ps, implementation=impl), "fused", "blocked"),
        (lambda ps, impl: lmopt.AdamW8bit(ps, implementation=impl), "fused", "kernel"),
        (lambda ps, impl: lmopt.Lion8bit(ps, implementation=impl), "fused", "kernel"),
        (lambda ps, impl: lmopt.Muon(ps, implementation=impl), "batched", "foreach"),
    ],
)
def test_old_implementation_names_are_aliases(build, old, new):
    params = [nn.Parameter(torch.randn(64, 80)), nn.Parameter(torch.randn(80))]
    opt = build(params, old)
    assert opt.param_groups[0]["implementation"] == new
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


# ------------------------------------------------------------------------------------------------- precision axis
def _train(opt, params, steps=5):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize(
    "thin, generic",
    [
        (lmopt.AdamW8bit, lambda ps: lmopt.AdamW(ps, state_precision="8bit")),
        (lmopt.AdamW4bit, lambda ps: lmopt.AdamW(ps, state_precision="4bit")),
        (lmopt.Adam8bit, lambda ps: lmopt.Adam(ps, state_precision="8bit")),
        (lmopt.Lion8bit, lambda ps: lmopt.Lion(ps, state_precision="8bit")),
    ],
)
def test_low_bit_classes_are_the_generic_ones_at_another_precision(thin, generic):
    runs = []
    for build in (thin, generic):
        params = [
            nn.Parameter(torch.randn(64, 80, generator=torch.Generator().manual_seed(0))),
            nn.Parameter(torch.zeros(7)),
        ]
        opt = build(params)
        _train(opt, params)
        runs.append((params, opt))
    (a, oa), (b, ob) = runs
    assert isinstance(oa, type(ob))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert oa.state_dict()["state"][0].keys() == ob.state_dict()["state"][0].keys()


@pytest.mark.parametrize("precision", ["bf16", "8bit", "4bit"])
@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "came", "adafactor_momentum", "ademamix"])
def test_state_precision_on_every_moment_optimizer(name, precision):
    spec = lmopt.get_spec(name)
    assert precision in spec.state_precisions
    params = [nn.Parameter(torch.randn(64, 80, generator=torch.Generator().manual_seed(1)))]
    opt = lmopt.create_optimizer(name, params, lr=1e-3, state_precision=precision)
    _train(opt, params, steps=3)
    state = opt.state[params[0]]
    declared = {
        t.name: t
        for t in spec.state_tensors((64, 80), torch.float32, **{**_implied(name), "state_precision": precision})
    }
    assert set(state) == set(declared)
    for key, t in declared.items():
        assert state[key].dtype == t.dtype and tuple(state[key].shape) == t.shape
    assert torch.isfinite(params[0]).all()


def _implied(name):
    return lmopt.registry.resolve_name(name)[1]


def test_deprecated_precision_names_warn_and_map():
    p = nn.Parameter(torch.zeros(3))
    with pytest.warns(DeprecationWarning, match="state_precision='bf16'"):
        opt = lmopt.AdamW([p], state_dtype="bf16")
    assert opt.param_groups[0]["state_precision"] == "bf16"
    with pytest.warns(DeprecationWarning, match="state_precision='8bit'"):
        opt = lmopt.CAME([p], momentum_precision="8bit")
    assert opt.param_groups[0]["state_precision"] == "8bit"
    with pytest.raises(ValueError, match="disagree"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            lmopt.AdamW([p], state_dtype="bf16", state_precision="fp32")


def test_wrong_implementation_for_a_precision_names_the_fix():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="state_precision='8bit' steps with implementation='kernel'"):
        lmopt.AdamW([p], state_precision="8bit", implementation="foreach")
    with pytest.raises(ValueError, match="use state_precision='8bit' or '4bit'"):
        lmopt.AdamW([p], implementation="kernel")


# ------------------------------------------------------------------------------------------------- old checkpoints
def _legacy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 4))


_LEGACY_BUILD = {
    "adamw_bf16_state": lambda ps: lmopt.AdamW(ps, lr=1e-2, state_precision="bf16"),
    "adamw8bit": lambda ps: lmopt.AdamW8bit(ps, lr=1e-2, betas=(0.9, 0.95)),
    "adamw8bit_fused": lambda ps: lmopt.AdamW8bit(ps, lr=1e-2),
    "adamw4bit": lambda ps: lmopt.AdamW4bit(ps, lr=1e-2),
    "lion8bit": lambda ps: lmopt.Lion8bit(ps, lr=1e-3, weight_decay=0.1),
    "lion_fused": lambda ps: lmopt.Lion(ps, lr=1e-3),
    "came8bit": lambda ps: lmopt.CAME(ps, lr=1e-3, state_precision="8bit"),
    "adafactor_bf16": lambda ps: lmopt.Adafactor(ps, lr=1e-3, relative_step=False, beta1=0.9, state_precision="bf16"),
    "muon_batched": lambda ps: lmopt.Muon(ps, lr=1e-2),
}


@pytest.mark.parametrize("case", sorted(_LEGACY_BUILD))
def test_checkpoints_from_before_the_redesign_load_and_continue_exactly(case):
    """State dicts written by lmopt before the redesign (tests/data/make_legacy_checkpoints.py, run on the old
    code) load with weights_only=True into today's classes and continue to the same parameters, bit for bit."""
    saved = torch.load(LEGACY, weights_only=True)["cases"][case]
    net = _legacy_model()
    net.load_state_dict(saved["model"])
    opt = _LEGACY_BUILD[case](list(net.parameters()))
    opt.load_state_dict(saved["optimizer"])
    for step in range(4, 7):
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad(set_to_none=True)
        (net(x) - y).pow(2).mean().backward()
        opt.step()
    for key, expected in saved["after"].items():
        assert torch.equal(net.state_dict()[key], expected), key
