"""The ground floor: what an optimizer *is*, as data. Imports nothing of lmopt.

Every optimizer declares one :class:`OptimizerSpec` beside its algorithm (a module-level ``SPECS`` list in
``lmopt/optim/<family>.py``). Everything else reads specs: :func:`lmopt.create_optimizer`, ``lmopt list``, the
memory planner and recommender, recipes, ``lmopt compare``, the benchmarks and the test database. A spec holds

* how to build the optimizer (``cls``, ``defaults``, ``aliases`` with the hyperparameters each alias implies,
  including Hugging Face ``TrainingArguments(optim=...)`` names);
* the exact state it keeps per parameter (``state``: :class:`StateTensor` shapes and dtypes for a parameter of a
  shape and dtype under given hyperparameters), so memory is planned to the byte; ``structure_state`` when that
  state depends on the model's structure (Adam-mini's heads), and the ``state_precisions`` it offers;
* how published recipes translate to it (``translation``), its hyperparameters on ``lmopt compare``'s workload
  (``compare``) and whether it is in compare's default set (``compare_default``), its rung on the
  recommender's ladder (``recommend_tier``) and whether a ``lookahead_<name>`` entry is made (``lookahead``).

The implementation vocabulary (one meaning per word, shared by every optimizer, the planner and the docs):

``for_loop``  the plain per-tensor path: the reference every faster path is tested against
``foreach``   torch's multi-tensor (``torch._foreach_*``) ops
``fused``     torch's own fused kernel (``torch._fused_adamw_`` ...)
``blocked``   lmopt's cache-blocked single pass: the plain math on blocks that stay in cache
``kernel``    lmopt's C (CPU) or Triton (CUDA) kernel of the same algorithm
``compiled``  ``torch.compile`` of the functional step
``auto``      :func:`lmopt.optim.resolve_implementation`: the one rule, also used by the planner
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.optim import Optimizer

__all__ = [
    "IMPLEMENTATIONS",
    "IMPLEMENTATION_MEANINGS",
    "Implementation",
    "OptimizerSpec",
    "REFERENCE_SHAPE",
    "STATE_PRECISIONS",
    "StatePrecision",
    "StateRule",
    "StateTensor",
    "StructureRule",
    "Translation",
]

Implementation = Literal["auto", "for_loop", "foreach", "fused", "blocked", "kernel", "compiled"]
#: every implementation name, in the order ``auto`` prefers them (fastest first; the reference last)
IMPLEMENTATIONS: tuple[str, ...] = ("kernel", "fused", "blocked", "compiled", "foreach", "for_loop")
IMPLEMENTATION_MEANINGS: Mapping[str, str] = {
    "for_loop": "the plain per-tensor path, the reference",
    "foreach": "torch's multi-tensor ops",
    "fused": "torch's own fused kernel",
    "blocked": "lmopt's cache-blocked single pass (torch ops on blocks that stay in cache)",
    "kernel": "lmopt's C (CPU) or Triton (CUDA) kernel",
    "compiled": "torch.compile of the functional step",
    "auto": "resolve_implementation(): the fastest that applies",
}

StatePrecision = Literal["fp32", "bf16", "8bit", "4bit"]
#: how a moment can be stored (None, where an optimizer takes it, means "the parameter's dtype")
STATE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "8bit", "4bit")

#: the shape used to quote "state bytes per parameter" (a large hidden matrix; small tensors differ)
REFERENCE_SHAPE: tuple[int, ...] = (4096, 4096)


@dataclass(frozen=True)
class StateTensor:
    """One tensor an optimizer keeps for one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


StateRule = Callable[[tuple[int, ...], torch.dtype, Mapping[str, Any]], list[StateTensor]]
#: ``rule(param, architecture) -> extra hyperparameters`` for one tensor of a planned model, for state that
#: depends on more than the tensor's shape. ``param`` has ``shape``, ``role`` ("matrix", "head", ...) and
#: ``module`` (the owning module's attribute name); ``architecture`` has ``family``, ``num_heads`` and
#: ``num_kv_heads`` (or is None when the model's structure is unknown).
StructureRule = Callable[[Any, Any], Mapping[str, Any]]


@dataclass(frozen=True)
class Translation:
    """How an AdamW recipe becomes a recipe for another optimizer (applied by :func:`lmopt.recipe`).

    Attributes:
        lr_factor: multiplies the learning rate.
        weight_decay_factor: multiplies the weight decay (Lion keeps ``lr x weight_decay`` fixed).
        betas: replaces the betas (None keeps the recipe's; ``"drop"`` leaves betas out; ``"came"`` gives
            CAME's three, (beta1, 0.999, 0.9999); ``"optional"`` passes them only where the constructor takes
            ``betas``).
        schedule: "recipe" keeps the recipe's decay; "constant" has none (warmup only); "inverse_sqrt" uses
            Adafactor's relative step as a schedule (peak ``lr``, timescale 10 000); or a dict by phase.
        lr: overrides the learning rate per phase (e.g. Adafactor's relative step 1e-2).
        required: extra constructor arguments the optimizer must accept.
        optional: extra constructor arguments passed only when the optimizer's constructor has them.
        weight_decay: overrides the weight decay.
        pass_eps: pass the recipe's ``eps``.
        source: where the translation comes from, and its reasoning.
        label: a short form of ``source`` for tables (a key of ``lmopt.recipes.REFERENCES`` and what changes).
    """

    lr_factor: float = 1.0
    weight_decay_factor: float = 1.0
    betas: Any = None
    schedule: str | Mapping[str, str] = "recipe"
    lr: Mapping[str, float] = field(default_factory=dict)
    required: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    optional: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    weight_decay: Mapping[str, float] = field(default_factory=dict)
    pass_eps: bool = True
    source: str = ""
    label: str = ""


#: AdamW's hyperparameters, unchanged (the translation of AdamW itself and of its close variants)
SAME_AS_ADAMW = Translation(source="same hyperparameters as AdamW", label="as AdamW")


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry, declared beside its algorithm.

    Attributes:
        name: canonical registry name (lower case).
        cls: the optimizer class (a torch.optim.Optimizer).
        summary: one line on what it is for.
        paper: reference (authors, title, venue/year).
        state: rule giving the exact state tensors for a parameter of a shape and dtype under the effective
            hyperparameters (class defaults, overridden by ``defaults``, overridden by the user's).
        defaults: hyperparameters this entry sets on top of the class's own defaults.
        aliases: other names, each with the hyperparameters it implies (e.g. ``"adamw_torch_fused"`` ->
            ``{"implementation": "fused"}``).
        family: "adam", "sgd", ... for grouping in listings.
        per_parameter: the update of a parameter needs only its own gradient (so gradient release works).
        accepts_model: the constructor wants the model itself (e.g. partitions found from module structure).
        translation: how published AdamW recipes translate (None: AdamW's lr and weight decay, betas/eps where
            the constructor takes them).
        compare: hyperparameters on ``lmopt compare``'s small workload (None: AdamW's, translated with
            ``translation``).
        compare_default: position in compare's default set (None: run only when asked for).
        recommend_tier: rung on the recommender's ladder (0 = the reference, higher = more memory saved,
            tried later; None: not on the ladder); ``recommend_reason`` says why.
        lookahead: the registry also builds ``lookahead_<name>`` (Lookahead around this optimizer).
        structure_state: extra per-tensor hyperparameters from the model's structure (see :data:`StructureRule`).
        state_precisions: the ``state_precision`` values the optimizer takes (empty: none).
    """

    name: str
    cls: type[Optimizer]
    summary: str
    paper: str
    state: StateRule
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    family: str = "other"
    per_parameter: bool = True
    accepts_model: bool = False
    translation: Translation | None = None
    compare: Mapping[str, Any] | None = None
    compare_default: int | None = None
    recommend_tier: int | None = None
    recommend_reason: str = ""
    lookahead: bool = False
    structure_state: StructureRule | None = None
    state_precisions: tuple[str, ...] = ()

    def hyperparameters(self, **overrides: Any) -> dict[str, Any]:
        """Effective hyperparameters: the class's defaults, then this entry's, then ``overrides``."""
        out = {
            k: p.default
            for k, p in inspect.signature(self.cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in ("self",)
        }
        out.update(self.defaults)
        out.update(overrides)
        return out

    def state_tensors(
        self, shape: Iterable[int], dtype: torch.dtype = torch.float32, **hyperparameters: Any
    ) -> list[StateTensor]:
        """The exact state tensors for one parameter of ``shape`` and ``dtype``."""
        return self.state(tuple(int(s) for s in shape), dtype, self.hyperparameters(**hyperparameters))

    def state_bytes(self, shape: Iterable[int], dtype: torch.dtype = torch.float32, **hyperparameters: Any) -> int:
        """Bytes of state for one parameter of ``shape`` and ``dtype``."""
        return sum(t.nbytes for t in self.state_tensors(shape, dtype, **hyperparameters))

    def bytes_per_parameter(
        self, shape: Iterable[int] = REFERENCE_SHAPE, dtype: torch.dtype = torch.float32, **hyperparameters: Any
    ) -> float:
        """State bytes divided by parameter count for one tensor of ``shape`` (default a 4096 x 4096 matrix)."""
        shape = tuple(shape)
        return self.state_bytes(shape, dtype, **hyperparameters) / max(1, math.prod(shape))

    @property
    def implementations(self) -> tuple[str, ...]:
        """The ``implementation=`` values the class takes (the first is the plain reference path)."""
        return tuple(getattr(self.cls, "implementations", ()))
