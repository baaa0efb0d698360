"""The shared test database: one :class:`OptimSpec` per registry optimizer.

Adding an optimizer to lmopt means adding one entry to ``OPTIM_DB``; the generic tests in
``test_optimizers.py`` then check it (reference match, implementations agree, bit-exact resume through
``torch.load(weights_only=True)``, dtypes, state exactly as the registry declares, no-grad/frozen/zero-size
parameters, invalid hyperparameters, sparse gradients, the non-finite policy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lmopt

from .fuzz import LAYOUTS, MUTATIONS

Builder = Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]
StepFn = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], None]


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A small model with the tensor kinds optimizers meet: matrices, biases, a norm, an embedding-free MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    ).to(dtype)


def make_batch(dtype: torch.dtype = torch.float32, seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g).to(dtype)
    y = torch.randn(n, 3, generator=g).to(dtype)
    return x, y


def default_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss = (model(x).float() - y.float()).pow(2).mean()
    loss.backward()
    opt.step()


@dataclass
class OptimSpec:
    """How to test one registry optimizer.

    Attributes:
        name: registry name.
        variants: hyperparameter sets; every generic test runs on each.
        reference: builds the oracle optimizer (a peer library or tests/reference/) for a model and a variant;
            None when the registry entry is itself the peer (torch.optim entries).
        reference_steps: steps compared against the reference (float64).
        reference_tol: (rtol, atol) for the reference comparison.
        reference_tol_by_variant: variant index -> (rtol, atol) where one variant needs another tolerance (a
            quantized-state variant of an entry whose other variants match the peer to rounding).
        implementations: the ``implementation=`` values that must agree with the first one (the plain path).
        implementation_tol: (rtol, atol) for that agreement, in float32.
        invalid: ``(hyperparameters, argument name the error must mention)`` pairs.
        lmopt_engine: an :class:`lmopt.LmoptOptimizer` (non-finite policy, dtype-safe state dicts).
        sparse_supported: the optimizer accepts sparse gradients (torch's SGD / Adagrad).
        dtypes: parameter dtypes the optimizer supports.
        build: builds the optimizer for a model and a variant (default: ``create_optimizer(name, params)``).
        step: one training step (default: zero_grad, MSE backward, step); Sophia-style optimizers override.
        distributed: checked on FSDP2 (DTensor) parameters against an unsharded run (tests/test_distributed.py).
        distributed_tol: ignored; the FSDP2 tolerance is derived from the precision (tests/tolerances.py). Kept
            only so that entries written before that still load; remove once no branch sets it.
        distributed_step: the training step used there when it differs from ``step``.
        distributed_unsupported: the optimizer refuses DTensor parameters with this message (a known gap, checked
            so that it stays a clear error).
        layouts: the memory layouts (tests/fuzz.py's LAYOUTS) whose runs must equal the plain contiguous run
            (tests/test_fuzz.py); every layout unless an entry documents why not.
        mutations: the state-dict corruptions (tests/fuzz.py's MUTATIONS) that ``load_state_dict`` must refuse,
            leaving the optimizer unchanged; every mutation unless an entry documents why not.
        fuzz_skip: hyperparameters the generated-input test leaves out (torch features that need a context the
            test does not build, e.g. torch.optim's ``differentiable``).
    """

    name: str
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    reference: Builder | None = None
    reference_steps: int = 200
    reference_tol: tuple[float, float] = (1e-6, 1e-9)
    reference_tol_by_variant: dict[int, tuple[float, float]] = field(default_factory=dict)
    implementations: tuple[str, ...] = ()
    implementation_tol: tuple[float, float] = (1e-5, 1e-6)
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    lmopt_engine: bool = True
    sparse_supported: bool = False
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    build: Builder | None = None
    step: StepFn = default_step
    distributed: bool = True
    distributed_tol: float | None = None
    distributed_step: StepFn | None = None
    distributed_unsupported: str | None = None
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    mutations: tuple[str, ...] = tuple(MUTATIONS)
    fuzz_skip: frozenset[str] = frozenset()

    def make(self, model: nn.Module, variant: dict[str, Any]) -> torch.optim.Optimizer:
        if self.build is not None:
            return self.build(model, dict(variant))
        return lmopt.create_optimizer(self.name, list(model.parameters()), **variant)

    def ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(len(self.variants))]


#: torch.optim's ``differentiable=True`` needs a step inside an autograd graph (non-leaf parameters), which the
#: generated-input test does not build; lmopt checks it is a bool
_TORCH_FEATURES = frozenset({"differentiable"})


_TORCH_INVALID = [
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"lr": float("nan")}, "lr must be finite"),
    ({"weight_decay": float("inf")}, "weight_decay must be finite"),
]


def _torch_ref(cls: type[torch.optim.Optimizer]) -> Builder:
    return lambda model, kw: cls(model.parameters(), **kw)


def _adamw_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    kw = {k: v for k, v in kw.items() if k not in ("implementation", "state_dtype")}
    return torch.optim.AdamW(model.parameters(), **kw)


def _adam_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    kw = {k: v for k, v in kw.items() if k not in ("implementation", "state_dtype")}
    return torch.optim.Adam(model.parameters(), **kw)


_ADAM_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (0.9,)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"state_dtype": "int8"}, "state_dtype"),
    ({"implementation": "cuda_magic"}, "implementation"),
]


# -------------------------------------------------------------- memory-efficient / sign / curvature (issue 3)
def _full(name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """The effective hyperparameters of a registry entry for a variant (class defaults + entry + variant)."""
    spec, implied = lmopt.registry.resolve_name(name)
    return spec.hyperparameters(**{**implied, **kw})


def _rounded_first_moment(peer: Any, h: dict[str, Any]) -> Any:
    """The peer itself for a full-precision first moment; else the peer with its stored first moment rounded to
    ``momentum_precision`` after every step (tests/reference/rounded_moment.py)."""
    precision = h.get("state_precision") or h.get("momentum_precision")
    if precision in (None, "fp32"):
        return peer
    from .reference.rounded_moment import RoundedFirstMoment

    return RoundedFirstMoment(peer, precision, h["block_size"], h["min_quantized_numel"])


def _adafactor_ref_for(name: str) -> Builder:
    def build(model: nn.Module, kw: dict[str, Any]) -> Any:
        from transformers.optimization import Adafactor as HFAdafactor

        h = _full(name, kw)
        peer = HFAdafactor(
            model.parameters(),
            lr=None if h["relative_step"] else h["lr"],
            eps=h["eps"],
            clip_threshold=h["clip_threshold"],
            decay_rate=h["decay_rate"],
            beta1=h["beta1"],
            weight_decay=h["weight_decay"],
            scale_parameter=h["scale_parameter"],
            relative_step=h["relative_step"],
            warmup_init=h["warmup_init"],
        )
        return _rounded_first_moment(peer, h)

    return build


def _came_ref_for(name: str) -> Builder:
    def build(model: nn.Module, kw: dict[str, Any]) -> Any:
        from came_pytorch import CAME as PeerCAME

        h = _full(name, kw)
        peer = PeerCAME(
            model.parameters(),
            lr=h["lr"],
            eps=h["eps"],
            clip_threshold=h["clip_threshold"],
            betas=h["betas"],
            weight_decay=h["weight_decay"],
        )
        return _rounded_first_moment(peer, h)

    return build


_adafactor_ref = _adafactor_ref_for("adafactor")
_came_ref = _came_ref_for("came")


def _adam_mini_build(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    return lmopt.create_optimizer("adam_mini", model, **kw)


def _adam_mini_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    """The adam-mini package, with names that make its name rules pick the partition lmopt finds on a plain
    model: per output neuron for matrices ("mlp"), one block and no decay for vectors ("norm")."""
    from adam_mini import Adam_mini

    h = _full("adam_mini", kw)
    named = [(f"mlp.{i}.weight" if p.ndim >= 2 else f"norm.{i}", p) for i, p in enumerate(model.parameters())]
    return Adam_mini(named, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"], verbose=False)


def _lion_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    from lion_pytorch import Lion as PeerLion

    h = _full("lion", kw)
    return PeerLion(model.parameters(), lr=h["lr"], betas=h["betas"], weight_decay=h["weight_decay"])


def _sophia_ref(model: nn.Module, kw: dict[str, Any]) -> Any:
    from .reference.sophia import ReferenceSophia

    h = _full("sophia", kw)
    keys = (
        "lr",
        "betas",
        "rho",
        "eps",
        "weight_decay",
        "update_period",
        "estimator",
        "hessian_distribution",
        "maximize",
    )
    return ReferenceSophia(model.parameters(), **{k: h[k] for k in keys})


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).float() - y.float()).pow(2).mean()


def _sampled_mse(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MSE against targets sampled from the model's Gaussian predictive (Sophia's GNB estimator)."""
    out = model(x).float()
    return (out - (out.detach() + torch.randn_like(out))).pow(2).mean() / 2


def sophia_step(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    """A Sophia training step: backward, refresh the Hessian when due (probes seeded from the batch, so an
    optimizer and its oracle draw the same ones), step."""
    opt.zero_grad(set_to_none=True)
    _mse(model, x, y).backward()
    if opt.hessian_due():
        torch.manual_seed(int(x.double().abs().sum().item() * 1e6) % (2**31))
        if opt.estimator == "hutchinson":
            opt.update_hessian(lambda: _mse(model, x, y))
        else:
            opt.update_hessian(lambda: _sampled_mse(model, x), batch_size=x.shape[0])
    opt.step()


_FACTORED_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"eps": (1e-30,)}, "eps"),
    ({"eps": (-1.0, 1e-3)}, "eps"),
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"implementation": "cuda_magic"}, "implementation"),
    ({"momentum_precision": "int8"}, "momentum_precision"),
    ({"momentum_precision": "fp16"}, "momentum_precision"),
    ({"block_size": 100}, "block_size"),
    ({"min_quantized_numel": -1}, "min_quantized_numel"),
]
_ADAFACTOR_INVALID = [
    *_FACTORED_INVALID,
    ({"decay_rate": 0.5}, "decay_rate"),
    ({"beta1": 1.0}, "beta1"),
    ({"warmup_init": True, "relative_step": False}, "warmup_init"),
]
_CAME_INVALID = [*_FACTORED_INVALID, ({"betas": (0.9, 0.999)}, "betas"), ({"betas": (0.9, 0.999, 1.0)}, "betas")]


def _momentum_specs() -> list[OptimSpec]:
    """CAME and Adafactor with a bf16 / 8-bit / 4-bit first moment (``momentum_precision``).

    Reference: the full-precision peer with its stored first moment rounded to that precision after every step
    (tests/reference/rounded_moment.py), in float64. The variants use small thresholds and blocks so that the test
    model's tiny tensors are quantized (with partial blocks; the 3- and 12-element biases stay fp32 at threshold
    16). Quantized first moments of DTensor (FSDP2) parameters are refused with a clear error; bf16 ones work.
    """
    came_variants = [
        {"lr": 1e-3, "min_quantized_numel": 16, "block_size": 32},
        {
            "lr": 2e-3,
            "weight_decay": 0.1,
            "betas": (0.8, 0.99, 0.999),
            "clip_threshold": 0.5,
            "min_quantized_numel": 0,
            "block_size": 16,
        },
    ]
    adafactor_variants = [
        {"min_quantized_numel": 16, "block_size": 32},
        {
            "lr": 1e-2,
            "relative_step": True,
            "scale_parameter": True,
            "weight_decay": 0.1,
            "min_quantized_numel": 0,
            "block_size": 16,
        },
    ]
    specs = []
    for bits in ("8bit", "4bit", "bf16"):
        quantized = bits != "bf16"
        came, adafactor = (
            ("came8bit", "adafactor8bit")
            if bits == "8bit"
            else (("came4bit", "adafactor4bit") if bits == "4bit" else ("came_bf16", "adafactor_bf16"))
        )
        # bf16 rounding of m turns the implementations' last-bit differences into bf16 ulps (as adamw_bf16)
        common: dict[str, Any] = dict(
            implementations=("for_loop", "blocked"),
            implementation_tol=(1e-5, 1e-6) if quantized else (1e-2, 1e-3),
            # FSDP2: blocks cut at shard boundaries round m differently (tolerance: tests/tolerances.py)
        )
        specs += [
            OptimSpec(
                name=came,
                variants=came_variants if quantized else [{"lr": 1e-3}],
                reference=_came_ref_for(came),
                invalid=_CAME_INVALID,
                **common,
            ),
            OptimSpec(
                name=adafactor,
                variants=adafactor_variants if quantized else [{}],
                reference=_adafactor_ref_for(adafactor),
                invalid=[*_ADAFACTOR_INVALID, ({"beta1": None}, "beta1")],
                **common,
            ),
        ]
    return specs


# -------------------------------------------------------- issue 4: Schedule-Free, Muon, AdaBound, Lookahead
def _schedule_free_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    import schedulefree

    kw = {k: v for k, v in kw.items() if k != "implementation"}
    opt = schedulefree.AdamWScheduleFree(model.parameters(), **kw)
    opt.train()
    return opt


class _MuonReference:
    """Muon (tests/reference/muon.py: torch.optim.Muon's operations, here in fp32) on the 2-D tensors and
    torch.optim.AdamW on the rest, stepped together."""

    def __init__(self, model: nn.Module, kw: dict[str, Any]):
        from .reference.muon import ReferenceMuon

        kw = {k: v for k, v in kw.items() if k not in ("implementation", "ns_dtype", "distributed", "matrix_3d")}
        betas, eps = kw.pop("adamw_betas", (0.9, 0.95)), kw.pop("adamw_eps", 1e-8)
        kw.setdefault("adjust_lr_fn", "match_rms_adamw")
        if kw.get("ns_coefficients") == "polar_express":  # the authors' function (tests/reference/polar_express.py)
            kw["polar"] = True
            del kw["ns_coefficients"]
        matrices = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        self.optimizers = [
            ReferenceMuon(matrices, ns_dtype=torch.float32, **kw),
            torch.optim.AdamW(
                rest, lr=kw.get("lr", 1e-3), betas=betas, eps=eps, weight_decay=kw.get("weight_decay", 0.1)
            ),
        ]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


class _NorMuonReference(_MuonReference):
    """NorMuon (tests/reference/normuon.py: the authors' code, Newton-Schulz in fp32) on the 2-D tensors and
    torch.optim.AdamW on the rest, stepped together."""

    def __init__(self, model: nn.Module, kw: dict[str, Any]):
        from .reference.normuon import ReferenceNorMuon

        kw = {k: v for k, v in kw.items() if k not in ("implementation", "ns_dtype", "distributed", "matrix_3d")}
        betas, eps = kw.pop("adamw_betas", (0.9, 0.95)), kw.pop("adamw_eps", 1e-8)
        kw.setdefault("adjust_lr_fn", "match_rms_adamw")
        kw.setdefault("lr", 1e-3)
        kw.setdefault("weight_decay", 0.1)
        kw["polar"] = kw.pop("ns_coefficients", None) == "polar_express"
        matrices = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        self.optimizers = [
            ReferenceNorMuon(matrices, ns_dtype=torch.float32, **kw),
            torch.optim.AdamW(rest, lr=kw["lr"], betas=betas, eps=eps, weight_decay=kw["weight_decay"]),
        ]


def _adabound_ref(amsbound: bool) -> Builder:
    def build(model: nn.Module, kw: dict[str, Any]) -> Any:
        from .reference.adabound import ReferenceAdaBound

        kw = {k: v for k, v in kw.items() if k != "implementation"}
        kw["decoupled"] = kw.pop("decoupled_weight_decay", False)
        kw["amsbound"] = kw.get("amsbound", amsbound)
        return ReferenceAdaBound(model.parameters(), **kw)

    return build


def _lookahead_ref(inner: Builder) -> Builder:
    def build(model: nn.Module, kw: dict[str, Any]) -> Any:
        from .reference.lookahead import ReferenceLookahead

        kw = dict(kw)
        k, alpha = kw.pop("lookahead_k", 5), kw.pop("lookahead_alpha", 0.5)
        return ReferenceLookahead(inner(model, kw), k=k, alpha=alpha)

    return build


_SF_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (0.0, 0.999)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"r": -1.0}, "r"),
    ({"weight_lr_power": -1.0}, "weight_lr_power"),
    ({"implementation": "fused"}, "implementation"),
]
_MUON_INVALID = [
    ({"lr": -1e-3}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"ns_steps": 0}, "ns_steps"),
    ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
    ({"eps": 0.0}, "eps"),
    ({"adjust_lr_fn": "sqrt"}, "adjust_lr_fn"),
    ({"adamw_betas": (0.9, 1.5)}, "adamw_betas"),
    ({"adamw_eps": -1.0}, "adamw_eps"),
    ({"ns_dtype": "fp8"}, "ns_dtype"),
    ({"nesterov": 1}, "nesterov"),
    ({"ns_coefficients": "cubic"}, "ns_coefficients"),
    ({"ns_coefficients": [(1.0, 2.0, 3.0), (1.0, 2.0)]}, "ns_coefficients"),
    ({"cautious": 1}, "cautious"),
    ({"cautious_weight_decay": "yes"}, "cautious_weight_decay"),
    ({"matrix_3d": "stack"}, "matrix_3d"),
    ({"distributed": "allgather"}, "distributed"),
]
_ADABOUND_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"final_lr": 0.0}, "final_lr"),
    ({"gamma": 0.0}, "gamma"),
    ({"betas": (1.0, 0.9)}, "betas"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"implementation": "fused"}, "implementation"),
]
_LOOKAHEAD_INVALID = [
    ({"lookahead_k": 0}, "lookahead_k"),
    ({"lookahead_alpha": 1.5}, "lookahead_alpha"),
    ({"lookahead_alpha": 0.0}, "lookahead_alpha"),
]


def _lookahead_specs() -> list[OptimSpec]:
    low = (torch.float32, torch.bfloat16)
    return [
        OptimSpec(
            name="lookahead_adamw",
            variants=[{"lr": 1e-2, "lookahead_k": 3}, {"lr": 1e-2, "weight_decay": 0.1, "lookahead_alpha": 0.8}],
            reference=_lookahead_ref(_adamw_ref),
            invalid=_LOOKAHEAD_INVALID + [({"lr": -1.0}, "lr")],
        ),
        OptimSpec(
            name="lookahead_adam",
            variants=[{"lr": 1e-2, "lookahead_k": 4}],
            reference=_lookahead_ref(_adam_ref),
            invalid=_LOOKAHEAD_INVALID,
        ),
        OptimSpec(
            name="lookahead_sgd",
            variants=[{"lr": 0.05, "momentum": 0.9, "lookahead_k": 2}],
            reference=_lookahead_ref(_torch_ref(torch.optim.SGD)),
            lmopt_engine=False,
            fuzz_skip=_TORCH_FEATURES,
            sparse_supported=True,
            invalid=_LOOKAHEAD_INVALID,
        ),
        OptimSpec(
            name="lookahead_radam",
            variants=[{"lr": 1e-2, "lookahead_k": 3}],
            reference=_lookahead_ref(_torch_ref(torch.optim.RAdam)),
            lmopt_engine=False,
            fuzz_skip=_TORCH_FEATURES,
            dtypes=low,
            invalid=_LOOKAHEAD_INVALID,
        ),
        OptimSpec(
            name="lookahead_adabound",
            variants=[{"lr": 1e-2, "lookahead_k": 3}],
            reference=_lookahead_ref(_adabound_ref(False)),
            invalid=_LOOKAHEAD_INVALID,
        ),
        OptimSpec(
            name="lookahead_muon",
            variants=[{"lr": 1e-2, "lookahead_k": 3}],
            reference=_lookahead_ref(lambda model, kw: _MuonReference(model, kw)),
            reference_steps=50,
            reference_tol=(1e-5, 1e-8),
            invalid=_LOOKAHEAD_INVALID,
        ),
    ]


def _lion_explicit_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    kw = {k: v for k, v in kw.items() if k not in ("implementation", "param_rounding")}
    return Lion(model.parameters(), **kw)


def _stable_adamw_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    from optimi import StableAdamW as PeerStableAdamW

    h = _full("stable_adamw", kw)
    keys = ("lr", "betas", "weight_decay", "eps", "decouple_lr", "max_lr")
    return PeerStableAdamW(model.parameters(), **{k: h[k] for k in keys}, kahan_sum=False, foreach=False)


def _ademamix_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    """bitsandbytes' AdEMAMix (fp32 state), or AdEMAMix8bit for an 8-bit variant (its blocks are always 256)."""
    from bitsandbytes.optim import AdEMAMix as PeerAdEMAMix
    from bitsandbytes.optim import AdEMAMix8bit as PeerAdEMAMix8bit

    h = _full("ademamix", kw)
    if h["cautious"] or h["cautious_weight_decay"]:  # bitsandbytes has no cautious AdEMAMix: the transcription
        from .reference.cautious import ReferenceCautiousAdEMAMix

        assert not (h["t_alpha"] or h["t_beta3"]) and h["state_precision"] in (None, "fp32")
        keys = ("lr", "betas", "alpha", "eps", "weight_decay", "cautious", "cautious_weight_decay")
        return ReferenceCautiousAdEMAMix(model.parameters(), **{k: h[k] for k in keys})
    keys = ("lr", "betas", "alpha", "t_alpha", "t_beta3", "eps", "weight_decay")
    if h["state_precision"] in (None, "fp32"):
        return PeerAdEMAMix(model.parameters(), **{k: h[k] for k in keys})
    assert h["state_precision"] == "8bit" and h["block_size"] in (None, 256), "bitsandbytes: 8-bit, blocks of 256"
    return PeerAdEMAMix8bit(model.parameters(), **{k: h[k] for k in keys}, min_8bit_size=h["min_quantized_numel"])


# ------------------------------------------------------------------------------------------- SOAP (issue 15)
def _soap_ref(model: nn.Module, kw: dict[str, Any]) -> Any:
    """The authors' SOAP (tests/reference/soap.py), with lmopt's defaults and this variant."""
    from .reference.soap import ReferenceSOAP

    h = _full("soap", kw)
    keys = (
        "lr",
        "betas",
        "shampoo_beta",
        "eps",
        "weight_decay",
        "precondition_frequency",
        "max_precond_dim",
        "merge_dims",
        "precondition_1d",
        "normalize_grads",
        "correct_bias",
        "cautious",
        "maximize",
        "cautious_weight_decay",
    )
    return ReferenceSOAP(model.parameters(), **{k: h[k] for k in keys})


_LOWBIT_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"block_size": 100}, "block_size"),
    ({"block_size": 8192}, "block_size"),
    ({"min_quantized_numel": -1}, "min_quantized_numel"),
    ({"param_rounding": "up"}, "param_rounding"),
    ({"implementation": "foreach"}, "implementation"),
]
# variants use small thresholds and blocks so the test model's tiny tensors are quantized (with partial blocks)
_LOWBIT_VARIANTS = [
    {"lr": 1e-2, "min_quantized_numel": 16, "block_size": 32},
    {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-6, "min_quantized_numel": 16, "block_size": 16},
    {"lr": 1e-3, "maximize": True, "min_quantized_numel": 0, "block_size": 64},
]


# ------------------------------------------------------------------- Prodigy and APOLLO (issue 15 items 4, 5)
def _prodigy_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    """The authors' prodigyopt package, with the same hyperparameters."""
    from prodigyopt import Prodigy as PeerProdigy

    h = _full("prodigy", kw)
    keys = ("lr", "betas", "beta3", "eps", "weight_decay", "decouple", "use_bias_correction", "safeguard_warmup")
    keys += ("d0", "d_coef", "growth_rate", "slice_p")
    return PeerProdigy(model.parameters(), **{k: h[k] for k in keys})


_PRODIGY_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"beta3": 1.0}, "beta3"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"d0": 0.0}, "d0"),
    ({"d_coef": -1.0}, "d_coef"),
    ({"growth_rate": 0.5}, "growth_rate"),
    ({"slice_p": 0}, "slice_p"),
    ({"decouple": 1}, "decouple"),
    ({"implementation": "fused"}, "implementation"),
]
#: prodigyopt in float64, same operations: measured max relative difference ~1e-14 after 200 steps (the sums over
#: parameters are added in another order); the default (1e-6, 1e-9) is ample
_PRODIGY_SPECS = [
    OptimSpec(
        name="prodigy",
        variants=[
            {},
            {"weight_decay": 0.1, "betas": (0.9, 0.95)},
            {"weight_decay": 0.05, "decouple": False, "use_bias_correction": True, "safeguard_warmup": True},
            {"growth_rate": 1.02, "d_coef": 0.5, "beta3": 0.9, "d0": 1e-4, "lr": 0.5},
            {"betas": (0.0, 0.99), "eps": 1e-6},
            {"slice_p": 3},
        ],
        reference=_prodigy_ref,
        implementations=("for_loop", "blocked"),
        invalid=_PRODIGY_INVALID,
    ),
]


def _apollo_ref_for(name: str) -> Builder:
    """The authors' apollo-torch package (``APOLLOAdamW``), with the 2-D tensors in a projected group first and
    the rest in a plain one without decay: lmopt's groups, so the parameters' positions (the projections' seeds)
    agree."""

    def build(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
        from apollo_torch import APOLLOAdamW

        h = _full(name, kw)
        projected = {k: h[k] for k in ("rank", "proj", "scale_type", "scale", "update_proj_gap", "proj_type")}
        matrices = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        flags = {k: h[k] for k in ("lr", "betas", "eps", "weight_decay", "correct_bias", "scale_front", "disable_nl")}
        # lmopt's structural groups decay only matrices (create_optimizer with the model)
        return APOLLOAdamW([{"params": matrices, **projected}, {"params": rest, "weight_decay": 0.0}], **flags)

    return build


def _apollo_build(name: str) -> Builder:
    """With the model, as ``create_optimizer`` is meant to be called: the hidden matrices (role "matrix") are
    projected; on the test model every Linear weight is one, the reference's 2-D tensors."""
    return lambda model, kw: lmopt.create_optimizer(name, model, **kw)


_APOLLO_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"update_proj_gap": 0}, "update_proj_gap"),
    ({"scale": 0.0}, "scale"),
    ({"scale_type": "row"}, "scale_type"),
    ({"proj_type": "full"}, "proj_type"),
    ({"proj": "svd"}, "proj"),
    ({"scale_front": 1}, "scale_front"),
    ({"implementation": "foreach"}, "implementation"),
]
#: apollo-torch in float64, the same projections (fp32 draws from the same seeds): the for_loop path runs the
#: package's operations in its order (measured bit-identical over 200 steps); auto (blocked) reorders the update
#: (norm from row norms, one pass), a few ulps; the default tolerance is ample for both
_APOLLO_SPECS = [
    OptimSpec(
        name="apollo_adamw",
        variants=[
            {"rank": 4, "update_proj_gap": 7},
            {"rank": 2, "update_proj_gap": 5, "weight_decay": 0.1, "lr": 3e-3, "scale": 2.0, "scale_front": True},
            {"rank": 3, "disable_nl": True, "correct_bias": False, "betas": (0.8, 0.95)},
            {"rank": 3, "cache_projection": True, "update_proj_gap": 10},
            {"rank": 2, "scale_type": "tensor", "proj_type": "reverse_std"},
        ],
        reference=_apollo_ref_for("apollo_adamw"),
        implementations=("for_loop", "blocked"),
        invalid=_APOLLO_INVALID,
        build=_apollo_build("apollo_adamw"),
    ),
    OptimSpec(
        name="apollo_mini",
        variants=[{"update_proj_gap": 10}, {"lr": 3e-3, "weight_decay": 0.1, "update_proj_gap": 3}],
        reference=_apollo_ref_for("apollo_mini"),
        implementations=("for_loop", "blocked"),
        invalid=_APOLLO_INVALID,
        build=_apollo_build("apollo_mini"),
    ),
]

OPTIM_DB: list[OptimSpec] = [
    # ---------------------------------------------------------------------------------------- Adam family
    OptimSpec(
        name="adamw",
        variants=[
            {"lr": 1e-2},
            {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-6},
            {"lr": 1e-3, "maximize": True, "weight_decay": 0.0},
            {"lr": 1e-2, "amsgrad": True},
        ],
        reference=_adamw_ref,
        implementations=("for_loop", "foreach", "fused"),
        invalid=_ADAM_INVALID,
    ),
    OptimSpec(
        name="adam",
        variants=[{"lr": 1e-2}, {"lr": 1e-2, "weight_decay": 0.05}, {"lr": 1e-3, "maximize": True}],
        reference=_adam_ref,
        implementations=("for_loop", "foreach", "fused"),
        invalid=_ADAM_INVALID,
    ),
    OptimSpec(
        name="amsgrad",
        variants=[{"lr": 1e-2}, {"lr": 5e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}],
        reference=lambda model, kw: _adamw_ref(model, {**kw, "amsgrad": True}),
        implementations=("for_loop", "foreach", "fused"),
        invalid=_ADAM_INVALID,
    ),
    OptimSpec(
        name="adamw_bf16",
        variants=[{"lr": 1e-2}],
        implementations=("for_loop", "foreach"),
        implementation_tol=(1e-2, 1e-3),
        invalid=_ADAM_INVALID,
    ),
    # ------------------------------------------------------------------------- torch.optim, registered as is
    OptimSpec(
        name="sgd",
        variants=[{"lr": 0.05}, {"lr": 0.05, "momentum": 0.9, "nesterov": True}],
        lmopt_engine=False,
        fuzz_skip=_TORCH_FEATURES,
        sparse_supported=True,
        invalid=_TORCH_INVALID,
    ),
    OptimSpec(
        name="adagrad",
        variants=[{"lr": 0.05}],
        lmopt_engine=False,
        fuzz_skip=_TORCH_FEATURES,
        sparse_supported=True,
        dtypes=(torch.float32, torch.bfloat16),
        invalid=_TORCH_INVALID,
    ),
    # torch's eps=1e-8 underflows in fp16 (0/0 = NaN): torch's own limitation, so fp16 is not claimed
    OptimSpec(
        name="rmsprop",
        variants=[{"lr": 1e-3}, {"lr": 1e-3, "momentum": 0.9, "centered": True}],
        lmopt_engine=False,
        fuzz_skip=_TORCH_FEATURES,
        dtypes=(torch.float32, torch.bfloat16),
        invalid=_TORCH_INVALID,
    ),
    OptimSpec(
        name="radam",
        variants=[{"lr": 1e-2}],
        lmopt_engine=False,
        fuzz_skip=_TORCH_FEATURES,
        dtypes=(torch.float32, torch.bfloat16),
        invalid=_TORCH_INVALID,
    ),
    OptimSpec(
        name="nadam",
        variants=[{"lr": 1e-2}],
        lmopt_engine=False,
        fuzz_skip=_TORCH_FEATURES,
        dtypes=(torch.float32, torch.bfloat16),
        invalid=_TORCH_INVALID,
    ),
    # ------------------------------------------------- memory-efficient / sign / curvature optimizers (issue 3)
    OptimSpec(
        name="adafactor",
        variants=[
            {},
            {"lr": 1e-2, "relative_step": True, "scale_parameter": True},
            {"lr": 3e-3, "beta1": 0.9, "weight_decay": 0.1, "clip_threshold": 0.5},
            {"lr": 1e-2, "relative_step": True, "scale_parameter": True, "warmup_init": True, "decay_rate": -0.7},
        ],
        reference=_adafactor_ref,
        reference_tol=(1e-6, 1e-9),
        implementations=("for_loop", "blocked"),
        invalid=_ADAFACTOR_INVALID,
    ),
    OptimSpec(
        name="came",
        variants=[
            {"lr": 1e-3},
            {"lr": 2e-3, "weight_decay": 0.1, "betas": (0.8, 0.99, 0.999), "clip_threshold": 0.5},
        ],
        reference=_came_ref,
        implementations=("for_loop", "blocked"),
        invalid=_CAME_INVALID,
    ),
    *_momentum_specs(),
    OptimSpec(
        name="adam_mini",
        variants=[{"lr": 1e-2}, {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "eps": 1e-6}],
        reference=_adam_mini_ref,
        implementations=("for_loop", "blocked"),
        invalid=[*_ADAM_INVALID[:6], ({"n_heads": 0}, "n_heads"), ({"implementation": "cuda_magic"}, "implementation")],
        build=_adam_mini_build,
    ),
    OptimSpec(
        name="lion",
        variants=[{"lr": 1e-3}, {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.5}],
        reference=_lion_ref,
        implementations=("for_loop", "foreach", "blocked"),
        invalid=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (0.9, 1.0)}, "betas"),
            ({"weight_decay": -1.0}, "weight_decay"),
            ({"implementation": "cuda_magic"}, "implementation"),
        ],
    ),
    OptimSpec(
        name="sophia",
        variants=[
            {"lr": 1e-3, "estimator": "hutchinson", "update_period": 3},
            {"lr": 2e-3, "estimator": "gnb", "update_period": 2, "rho": 0.05, "weight_decay": 0.0},
            {
                "lr": 1e-3,
                "estimator": "hutchinson",
                "update_period": 1,
                "hessian_distribution": "rademacher",
                "betas": (0.9, 0.95),
                "maximize": True,
            },
        ],
        reference=_sophia_ref,
        implementations=("for_loop", "foreach", "blocked"),
        invalid=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (0.9, 1.0)}, "betas"),
            ({"rho": 0.0}, "rho"),
            ({"eps": 0.0}, "eps"),
            ({"weight_decay": -1.0}, "weight_decay"),
            ({"update_period": 0}, "update_period"),
            ({"estimator": "exact"}, "estimator"),
            ({"hessian_distribution": "uniform"}, "hessian_distribution"),
            ({"implementation": "cuda_magic"}, "implementation"),
        ],
        step=sophia_step,
        # FSDP2 reduces gradients outside autograd, so torch.autograd.grad cannot reach sharded parameters: the
        # Hessian refresh is unsupported there (documented); the step's math on DTensors is still checked.
        distributed_step=default_step,
    ),
    # ------------------------------------------------ issue 4: Schedule-Free AdamW, Muon, AdaBound, Lookahead
    OptimSpec(
        name="schedule_free_adamw",
        variants=[
            {"lr": 1e-2},
            {"lr": 5e-3, "weight_decay": 0.1, "warmup_steps": 10, "betas": (0.95, 0.99), "eps": 1e-6},
            {"lr": 1e-2, "r": 1.0, "weight_lr_power": 1.0, "warmup_steps": 3},
        ],
        reference=_schedule_free_ref,
        implementations=("for_loop", "foreach", "blocked"),
        invalid=_SF_INVALID,
    ),
    # Newton-Schulz in fp32 (the CPU default) against torch.optim.Muon's operations in fp32; the bf16 match with
    # torch.optim.Muon itself is in tests/test_schedule_free_muon.py (bf16 matmuls are very slow on AVX2 CPUs)
    OptimSpec(
        name="muon",
        variants=[
            {"lr": 1e-2},
            {"lr": 1e-2, "adjust_lr_fn": "original", "nesterov": False, "weight_decay": 0.0},
            {"lr": 5e-3, "ns_dtype": "fp32", "momentum": 0.9, "ns_steps": 3, "adamw_betas": (0.8, 0.99)},
            {"lr": 1e-2, "ns_coefficients": "polar_express", "ns_steps": 6},  # Polar Express (issue 15)
            {"lr": 1e-2, "cautious": True, "cautious_weight_decay": True},  # cautious masking and decay
        ],
        reference=lambda model, kw: _MuonReference(model, kw),
        reference_steps=50,
        reference_tol=(1e-5, 1e-8),
        implementations=("for_loop", "foreach"),
        invalid=_MUON_INVALID,
    ),
    # NorMuon (issue 15) against the authors' code (tests/reference/normuon.py), Newton-Schulz in fp32
    OptimSpec(
        name="normuon",
        variants=[
            {"lr": 1e-2},
            {"lr": 1e-2, "adjust_lr_fn": "original", "beta2": 0.9, "weight_decay": 0.0, "nesterov": False},
            {"lr": 5e-3, "ns_coefficients": "polar_express", "momentum": 0.9},
        ],
        reference=lambda model, kw: _NorMuonReference(model, kw),
        reference_steps=50,
        reference_tol=(1e-5, 1e-8),
        implementations=("for_loop", "foreach"),
        invalid=[*_MUON_INVALID, ({"beta2": 1.0}, "beta2"), ({"beta2": -0.1}, "beta2")],
    ),
    OptimSpec(
        name="adabound",
        variants=[
            {"lr": 1e-2},
            {"lr": 1e-2, "weight_decay": 0.1, "final_lr": 0.05, "gamma": 1e-2, "betas": (0.8, 0.99)},
            {"lr": 5e-3, "weight_decay": 0.1, "decoupled_weight_decay": True, "eps": 1e-6},
        ],
        reference=_adabound_ref(False),
        implementations=("for_loop", "foreach", "blocked"),
        invalid=_ADABOUND_INVALID,
    ),
    OptimSpec(
        name="amsbound",
        variants=[{"lr": 1e-2}, {"lr": 1e-2, "weight_decay": 0.05, "gamma": 1e-2}],
        reference=_adabound_ref(True),
        implementations=("for_loop", "foreach", "blocked"),
        invalid=_ADABOUND_INVALID,
    ),
    *_lookahead_specs(),
    # ------------------------------------------------------- low-bit state: 8-bit / 4-bit moments (issue 5)
    # FSDP2: the state is quantized per local shard, so where a shard boundary falls inside a block (on the
    # test model, split 2 ways: the 16-element vectors into 8 + 8, the 3x12 weight into 24 + 12, ...) the blocks,
    # hence the rounding of the moments, differ from the unsharded run's, by up to one code step of the block's
    # scale per step (the tolerance: tests/tolerances.py, from the code maps); where blocks align the sharded
    # state is bit-identical to unsharded (tests/fsdp_lowbit_worker.py).
    # the quantized trajectories are checked against bitsandbytes / torchao in tests/test_lowbit_peers.py;
    # the alias entries run with the default threshold (every test tensor is small -> fp32 moments), which
    # checks the algorithm itself against torch / lion-pytorch in float64.
    OptimSpec(
        name="adamw8bit",
        variants=_LOWBIT_VARIANTS,
        implementations=("for_loop", "kernel"),
        implementation_tol=(0.0, 0.0),
        invalid=[*_LOWBIT_INVALID, ({"eps": 0.0}, "eps")],
    ),
    OptimSpec(
        name="adam8bit",
        variants=[{**_LOWBIT_VARIANTS[1], "weight_decay": 0.05}],
        implementations=("for_loop", "kernel"),
        implementation_tol=(0.0, 0.0),
        invalid=_LOWBIT_INVALID,
    ),
    OptimSpec(
        name="adamw4bit",
        variants=_LOWBIT_VARIANTS[:2],
        implementations=("for_loop", "kernel"),
        implementation_tol=(0.0, 0.0),
        invalid=_LOWBIT_INVALID,
    ),
    OptimSpec(
        name="lion8bit",
        variants=[
            {"lr": 1e-3, "min_quantized_numel": 16, "block_size": 32},
            {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.5, "min_quantized_numel": 0, "block_size": 16},
        ],
        implementations=("for_loop", "kernel"),
        implementation_tol=(0.0, 0.0),
        invalid=_LOWBIT_INVALID,
    ),
    OptimSpec(
        name="adamw_8bit",
        variants=[{"lr": 3e-3, "weight_decay": 0.1, "eps": 1e-6}],
        reference=_adamw_ref,
        implementations=("for_loop", "kernel"),
        invalid=_LOWBIT_INVALID,
    ),
    OptimSpec(
        name="adam_8bit",
        variants=[{"lr": 1e-2, "weight_decay": 0.05}],
        reference=_adam_ref,
        implementations=("for_loop", "kernel"),
        invalid=_LOWBIT_INVALID,
    ),
    OptimSpec(
        name="lion_8bit",
        variants=[{"lr": 1e-3, "weight_decay": 0.5}],
        reference=_lion_explicit_ref,
        implementations=("for_loop", "kernel"),
        invalid=_LOWBIT_INVALID,
    ),
    # --------------------------------------------------------------- StableAdamW and AdEMAMix (new optimizers)
    # torch-optimi's for-loop path in float64 (it supports float64; Kahan summation off: it only applies to
    # bf16/fp16). Same operations in the same order (debiased betas, RMS by .mean(), decay by the clipped lr):
    # measured bit-identical over 200 steps, so the default float64 tolerance is ample. Both implementations
    # are bit-identical too (the foreach path reads the per-tensor RMS values back in one stack).
    OptimSpec(
        name="stable_adamw",
        variants=[
            {"lr": 1e-2},
            {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-8},
            {"lr": 1e-2, "decouple_lr": True, "weight_decay": 1e-4},
            {"lr": 1e-2, "decouple_lr": True, "max_lr": 2e-2, "weight_decay": 1e-4},
        ],
        reference=_stable_adamw_ref,
        implementations=("for_loop", "foreach"),
        implementation_tol=(0.0, 0.0),
        invalid=[
            ({"lr": -1.0}, "lr"),
            ({"lr": float("nan")}, "lr"),
            ({"betas": (0.9, 1.0)}, "betas"),
            ({"betas": (0.9, 0.99, 0.999)}, "betas"),
            ({"eps": 0.0}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"decouple_lr": "yes"}, "decouple_lr"),
            ({"max_lr": 0.0}, "max_lr"),
            ({"implementation": "fused"}, "implementation"),
        ],
    ),
    # bitsandbytes' AdEMAMix on CPU (bitsandbytes/backends/cpu/ops.py). It keeps fp32 state and rounds the
    # parameter to fp32 at every step even for float64 parameters, so the comparison is float64 (ours) against
    # fp32 arithmetic: measured max |diff| 3.7e-6 over 200 steps (parameters ~1; ~sqrt(200) fp32 roundings of
    # 6e-8 each, amplified by the training dynamics); tolerance 2e-5, ~5x that.
    # The 8-bit variant (variant 1) runs against AdEMAMix8bit (also on CPU) with the same maps (bitsandbytes'
    # dynamic / udynamic), blocks of 256 and threshold: the trajectories still part where a code rounds the
    # other way (fp32 vs fp64 math, operation order), as lmopt's AdamW8bit and bitsandbytes' do
    # (tests/test_lowbit_peers.py). Measured max |diff| after 200 steps: 1.9e-3 (variant 1), where the 8-bit
    # state itself moves the trajectory by 2.6e-3 from the fp32 run: tolerance 5e-3, ~2x the 8-bit effect.
    # The 8-bit agreement step by step is much closer (4e-8 after 1 step, 2e-5 after 5, 8e-5 after 20).
    OptimSpec(
        name="ademamix",
        variants=[
            {"lr": 1e-3},
            {"lr": 1e-3, "state_precision": "8bit", "min_quantized_numel": 16, "block_size": 256},
            {"lr": 3e-3, "betas": (0.8, 0.95, 0.999), "alpha": 3.0, "weight_decay": 0.1, "eps": 1e-6},
            {"lr": 1e-3, "t_alpha": 50, "t_beta3": 80},
            {
                "lr": 1e-3,
                "t_alpha": 50,
                "t_beta3": 80,
                "state_precision": "8bit",
                "min_quantized_numel": 16,
                "block_size": 256,
            },
            {"lr": 1e-3, "cautious": True},
            {"lr": 3e-3, "weight_decay": 0.1, "cautious": True, "cautious_weight_decay": True},
        ],
        reference=_ademamix_ref,
        reference_tol=(2e-5, 2e-5),
        reference_tol_by_variant={1: (0.0, 5e-3), 4: (0.0, 5e-3)},
        implementations=("for_loop", "foreach"),
        implementation_tol=(1e-5, 1e-6),  # foreach runs the rule in another operation order
        invalid=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (0.9, 0.999)}, "betas"),
            ({"betas": (0.9, 0.999, 1.0)}, "betas"),
            ({"betas": (0.0, 0.999, 0.9999), "t_beta3": 10}, "betas"),
            ({"alpha": -1.0}, "alpha"),
            ({"t_alpha": -1}, "t_alpha"),
            ({"t_beta3": 1.5}, "t_beta3"),
            ({"eps": 0.0}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"state_precision": "int8"}, "state_precision"),
            ({"block_size": 100}, "block_size"),
            ({"min_quantized_numel": -1}, "min_quantized_numel"),
            ({"implementation": "fused"}, "implementation"),
        ],
    ),
    # ------------------------------------------------------------------------------------------- SOAP (issue 15)
    # The authors' code (tests/reference/soap.py) in float64: lmopt rotates the first moment only when the basis
    # changes, the authors at every step (the identity up to rounding), so the runs differ by rounding only
    # (measured <= 2e-13 relative over 200 steps). A basis refreshed while its statistic is rank-deficient is
    # arbitrary in the null space (set by rounding), so the variants refresh merged / 1-D bases only once the
    # statistics have full rank (variant 2: precondition_frequency 40 > the 36-element merged dimension).
    OptimSpec(
        name="soap",
        variants=[
            {"lr": 1e-2},
            {
                "lr": 3e-3,
                "betas": (0.9, 0.99),
                "weight_decay": 0.1,
                "precondition_frequency": 3,
                "shampoo_beta": 0.9,
                "eps": 1e-6,
                "maximize": True,
            },
            {
                "lr": 3e-3,
                "merge_dims": True,
                "max_precond_dim": 40,
                "precondition_1d": True,
                "precondition_frequency": 40,
            },
            {
                "lr": 3e-3,
                "max_precond_dim": 12,
                "normalize_grads": True,
                "correct_bias": False,
                "precondition_frequency": 4,
            },
            {"lr": 3e-3, "cautious": True, "precondition_frequency": 5},
            {"lr": 3e-3, "cautious_weight_decay": True, "weight_decay": 0.3, "precondition_frequency": 5},
        ],
        reference=_soap_ref,
        reference_tol=(1e-9, 1e-12),
        implementations=("for_loop", "foreach"),
        invalid=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (0.9, 1.0)}, "betas"),
            ({"shampoo_beta": 1.0}, "shampoo_beta"),
            ({"eps": 0.0}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"precondition_frequency": 0}, "precondition_frequency"),
            ({"max_precond_dim": 0}, "max_precond_dim"),
            ({"merge_dims": 1}, "merge_dims"),
            ({"cautious": "yes"}, "cautious"),
            ({"cautious_weight_decay": 1}, "cautious_weight_decay"),
            ({"state_precision": "8bit"}, "state_precision"),
            ({"preconditioner_precision": "fp16"}, "preconditioner_precision"),
            ({"implementation": "fused"}, "implementation"),
        ],
    ),
]


# ------------------------------------------------------------------ cautious masking (issue 15 item 2)
def _cautious_ref(reference: str, keys: tuple[str, ...]) -> Builder:
    """C-Optim's cautious AdamW / Lion, transcribed in tests/reference/cautious.py (fp64 here)."""

    def build(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
        from .reference import cautious

        h = _full(f"cautious_{reference.lower()}", kw)
        return getattr(cautious, f"ReferenceCautious{reference}")(model.parameters(), **{k: h[k] for k in keys})

    return build


_CAUTIOUS_KEYS = ("lr", "betas", "weight_decay", "cautious", "cautious_weight_decay")
_CAUTIOUS_INVALID = [
    ({"cautious": 1}, "cautious"),
    ({"cautious_weight_decay": "yes"}, "cautious_weight_decay"),
]
# no state of their own: the generic tests check that the planner's state (the plain optimizer's) is exact
OPTIM_DB += [
    OptimSpec(
        name="cautious_adamw",
        variants=[
            {"lr": 1e-2},
            {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-6, "cautious_weight_decay": True},
            {"lr": 1e-2, "weight_decay": 0.0},
            {"lr": 1e-2, "cautious": False, "cautious_weight_decay": True, "weight_decay": 0.2},
        ],
        reference=_cautious_ref("AdamW", (*_CAUTIOUS_KEYS, "eps")),
        implementations=("for_loop", "foreach", "blocked"),
        invalid=[
            *_ADAM_INVALID,
            *_CAUTIOUS_INVALID,
            ({"implementation": "fused"}, "implementation"),
            ({"implementation": "kernel", "state_precision": "8bit"}, "implementation"),
        ],
    ),
    OptimSpec(
        name="cautious_lion",
        variants=[
            {"lr": 1e-3},
            {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.5, "cautious_weight_decay": True},
        ],
        reference=_cautious_ref("Lion", _CAUTIOUS_KEYS),
        implementations=("for_loop", "foreach", "blocked"),
        invalid=[
            ({"lr": -1.0}, "lr"),
            ({"betas": (0.9, 1.0)}, "betas"),
            ({"weight_decay": -1.0}, "weight_decay"),
            ({"implementation": "kernel"}, "implementation"),
            *_CAUTIOUS_INVALID,
        ],
    ),
    *_PRODIGY_SPECS,
    *_APOLLO_SPECS,
]

BY_NAME = {spec.name: spec for spec in OPTIM_DB}


# --------------------------------------------------- Schedule-Free SGD and RAdam (issue 15 item 6)
def _schedule_free_package_ref(cls_name: str, name: str, keys: tuple[str, ...]) -> Builder:
    """The schedulefree package's ``SGDScheduleFree`` / ``RAdamScheduleFree`` (its foreach path), in train mode."""

    def build(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
        import schedulefree

        h = _full(name, kw)
        opt = getattr(schedulefree, cls_name)(model.parameters(), **{k: h[k] for k in keys})
        opt.train()
        return opt

    return build


_SF_SGD_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"momentum": 0.0}, "momentum"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"r": -1.0}, "r"),
    ({"weight_lr_power": 17.0}, "weight_lr_power"),
    ({"implementation": "fused"}, "implementation"),
]
_SF_RADAM_INVALID = [
    ({"lr": -1.0}, "lr"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (0.0, 0.999)}, "betas"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"silent_sgd_phase": 1}, "silent_sgd_phase"),
    ({"r": -1.0}, "r"),
    ({"implementation": "fused"}, "implementation"),
]
# the package's foreach path in float64 runs the same operations in the same order: bit-identical (tolerance 0)
OPTIM_DB += [
    OptimSpec(
        name="schedule_free_sgd",
        variants=[
            {"lr": 0.05},
            {"lr": 0.02, "momentum": 0.8, "weight_decay": 0.01, "warmup_steps": 10},
            {"lr": 0.05, "r": 1.0, "weight_lr_power": 1.0, "warmup_steps": 3},
        ],
        reference=_schedule_free_package_ref(
            "SGDScheduleFree",
            "schedule_free_sgd",
            ("lr", "momentum", "weight_decay", "warmup_steps", "r", "weight_lr_power"),
        ),
        reference_tol=(0.0, 0.0),
        implementations=("for_loop", "foreach", "blocked"),
        invalid=_SF_SGD_INVALID,
    ),
    OptimSpec(
        name="schedule_free_radam",
        variants=[
            {"lr": 1e-2},
            {"lr": 5e-3, "weight_decay": 0.1, "betas": (0.95, 0.99), "eps": 1e-6},
            {"lr": 1e-2, "r": 1.0, "weight_lr_power": 1.0, "silent_sgd_phase": False},
        ],
        reference=_schedule_free_package_ref(
            "RAdamScheduleFree",
            "schedule_free_radam",
            ("lr", "betas", "eps", "weight_decay", "r", "weight_lr_power", "silent_sgd_phase"),
        ),
        reference_tol=(0.0, 0.0),
        implementations=("for_loop", "foreach", "blocked"),
        invalid=_SF_RADAM_INVALID,
    ),
]
BY_NAME = {spec.name: spec for spec in OPTIM_DB}
