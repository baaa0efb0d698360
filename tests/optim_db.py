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
        implementations: the ``implementation=`` values that must agree with the first one (the plain path).
        implementation_tol: (rtol, atol) for that agreement, in float32.
        invalid: ``(hyperparameters, argument name the error must mention)`` pairs.
        lmopt_engine: an :class:`lmopt.LmoptOptimizer` (non-finite policy, dtype-safe state dicts).
        sparse_supported: the optimizer accepts sparse gradients (torch's SGD / Adagrad).
        dtypes: parameter dtypes the optimizer supports.
        build: builds the optimizer for a model and a variant (default: ``create_optimizer(name, params)``).
        step: one training step (default: zero_grad, MSE backward, step); Sophia-style optimizers override.
        distributed: checked on FSDP2 (DTensor) parameters against an unsharded run (tests/test_distributed.py).
        distributed_tol: largest relative difference allowed there (reductions run in another order).
    """

    name: str
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    reference: Builder | None = None
    reference_steps: int = 200
    reference_tol: tuple[float, float] = (1e-6, 1e-9)
    implementations: tuple[str, ...] = ()
    implementation_tol: tuple[float, float] = (1e-5, 1e-6)
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    lmopt_engine: bool = True
    sparse_supported: bool = False
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    build: Builder | None = None
    step: StepFn = default_step
    distributed: bool = True
    distributed_tol: float = 1e-5

    def make(self, model: nn.Module, variant: dict[str, Any]) -> torch.optim.Optimizer:
        if self.build is not None:
            return self.build(model, dict(variant))
        return lmopt.create_optimizer(self.name, list(model.parameters()), **variant)

    def ids(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(len(self.variants))]


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

def _lion_ref(model: nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    kw = {k: v for k, v in kw.items() if k not in ("implementation", "param_rounding")}
    return Lion(model.parameters(), **kw)


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
    {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-6, "min_quantized_numel": 16,
     "block_size": 16},
    {"lr": 1e-3, "maximize": True, "min_quantized_numel": 0, "block_size": 64},
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
    OptimSpec(name="sgd", variants=[{"lr": 0.05}, {"lr": 0.05, "momentum": 0.9, "nesterov": True}],
              lmopt_engine=False, sparse_supported=True, invalid=[({"lr": -1.0}, "learning rate")]),
    OptimSpec(name="adagrad", variants=[{"lr": 0.05}], lmopt_engine=False, sparse_supported=True,
              dtypes=(torch.float32, torch.bfloat16), invalid=[({"lr": -1.0}, "learning rate")]),
    # torch's eps=1e-8 underflows in fp16 (0/0 = NaN): torch's own limitation, so fp16 is not claimed
    OptimSpec(name="rmsprop", variants=[{"lr": 1e-3}, {"lr": 1e-3, "momentum": 0.9, "centered": True}],
              lmopt_engine=False, dtypes=(torch.float32, torch.bfloat16), invalid=[({"lr": -1.0}, "learning rate")]),
    OptimSpec(name="radam", variants=[{"lr": 1e-2}], lmopt_engine=False, dtypes=(torch.float32, torch.bfloat16),
              invalid=[({"lr": -1.0}, "learning rate")]),
    OptimSpec(name="nadam", variants=[{"lr": 1e-2}], lmopt_engine=False, dtypes=(torch.float32, torch.bfloat16),
              invalid=[({"lr": -1.0}, "learning rate")]),
    # ------------------------------------------------------- low-bit state: 8-bit / 4-bit moments (issue 5)
    # the quantized trajectories are checked against bitsandbytes / torchao in tests/test_lowbit_peers.py;
    # the alias entries run with the default threshold (every test tensor is small -> fp32 moments), which
    # checks the algorithm itself against torch / lion-pytorch in float64.
    OptimSpec(name="adamw8bit", variants=_LOWBIT_VARIANTS, implementations=("for_loop", "fused"),
              implementation_tol=(0.0, 0.0), invalid=[*_LOWBIT_INVALID, ({"eps": 0.0}, "eps")]),
    OptimSpec(name="adam8bit", variants=[{**_LOWBIT_VARIANTS[1], "weight_decay": 0.05}],
              implementations=("for_loop", "fused"), implementation_tol=(0.0, 0.0), invalid=_LOWBIT_INVALID),
    OptimSpec(name="adamw4bit", variants=_LOWBIT_VARIANTS[:2], implementations=("for_loop", "fused"),
              implementation_tol=(0.0, 0.0), invalid=_LOWBIT_INVALID),
    OptimSpec(name="lion8bit",
              variants=[{"lr": 1e-3, "min_quantized_numel": 16, "block_size": 32},
                        {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.5, "min_quantized_numel": 0,
                         "block_size": 16}],
              implementations=("for_loop", "fused"), implementation_tol=(0.0, 0.0), invalid=_LOWBIT_INVALID),
    OptimSpec(name="adamw_8bit", variants=[{"lr": 3e-3, "weight_decay": 0.1, "eps": 1e-6}],
              reference=_adamw_ref, implementations=("for_loop", "fused"), invalid=_LOWBIT_INVALID),
    OptimSpec(name="adam_8bit", variants=[{"lr": 1e-2, "weight_decay": 0.05}], reference=_adam_ref,
              implementations=("for_loop", "fused"), invalid=_LOWBIT_INVALID),
    OptimSpec(name="lion_8bit", variants=[{"lr": 1e-3, "weight_decay": 0.5}], reference=_lion_ref,
              implementations=("for_loop", "fused"), invalid=_LOWBIT_INVALID),
]

BY_NAME = {spec.name: spec for spec in OPTIM_DB}
