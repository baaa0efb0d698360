"""The shared optimizer engine: validation, lazy state, non-finite policy, dtype-safe state dicts.

Every lmopt optimizer subclasses :class:`LmoptOptimizer`. A subclass provides

* ``_init_state(group, param, state)`` -- create the state of one parameter the first time it has a gradient,
  using torch's key names (``step``, ``exp_avg``, ``exp_avg_sq``, ...);
* ``_step_group(group, params, grads)`` -- apply one update to the parameters of one group that have a
  gradient (already checked: dense, and finite unless the policy says otherwise), usually by calling the
  algorithm's functional entry point.

The base class does the rest, the same way for every algorithm:

* ``step(closure)`` evaluates the closure, collects parameters with gradients, rejects sparse gradients,
  applies the non-finite policy (``nonfinite="raise"`` names the parameter and changes nothing;
  ``"skip"`` skips the whole step and counts it in ``skipped_steps``), then calls ``_step_group``.
* ``state_dict`` / ``load_state_dict`` keep every state tensor's dtype (torch's loader casts floating state to
  the parameter's dtype, which would corrupt bf16 or quantized state) and round-trip through
  ``torch.load(weights_only=True)``.
* ``record_grad_norm(norm)`` lets a global-norm computation done anyway (gradient clipping) stand in for the
  finiteness check, so a step does not read every gradient twice.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..quant.moments import is_quantized_entry
from ..quant.rounding import PARAM_ROUNDINGS
from ..quant.sharded import is_dtensor
from ..spec import IMPLEMENTATIONS, Implementation

__all__ = [
    "LmoptOptimizer",
    "constructor_defaults",
    "NonFiniteGradientError",
    "check_betas",
    "check_common_hyperparameters",
    "LR_MAX",
    "signature_defaults",
    "check_choice",
    "check_eps",
    "check_flag",
    "check_nonnegative",
    "check_positive",
    "check_range",
    "Implementation",
    "is_dtensor",
]

NonFinitePolicy = Literal["raise", "skip"]

_FP32_MAX = float(torch.finfo(torch.float32).max)
_FP32_TINY = float(torch.finfo(torch.float32).tiny)
#: the largest learning rate any optimizer accepts (see :func:`check_common_hyperparameters`)
LR_MAX = 1e6
#: the largest ``eps`` accepted (some algorithms square it; float32 holds up to ~1.8e19 squared)
EPS_MAX = 1e4

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: boolean hyperparameters checked for every optimizer that has them
_FLAGS = (
    "maximize",
    "amsgrad",
    "amsbound",
    "nesterov",
    "decoupled_weight_decay",
    "decouple_lr",
    "scale_parameter",
    "relative_step",
    "warmup_init",
)


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or NaN; the step was not applied (parameters and state are unchanged)."""


# --------------------------------------------------------------------------------------------------------------
# validation helpers: every message names the argument and says what would be valid
# --------------------------------------------------------------------------------------------------------------
def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float64 (2**1100)
        raise ValueError(f"{name} is too large: {value!r} is beyond float32's range ({_FP32_MAX:.3g})") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if abs(value) > _FP32_MAX:  # the update math runs in float32: such a value is inf there
        raise ValueError(f"{name}={value!r} is beyond float32's range ({_FP32_MAX:.3g}); use a smaller value")
    return value


def check_positive(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0."""
    if _as_float(name, value) <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_eps(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a finite number in [1.18e-38, :data:`EPS_MAX`]: a float32 normal number
    a smaller ``eps`` is 0 (or a denormal flushed to 0) in the update math, and ``0 / (0 + eps)`` is NaN for every
    element whose gradient is zero."""
    v = _as_float(name, value)
    if v <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if v > EPS_MAX:
        raise ValueError(f"{name}={value!r} is beyond {EPS_MAX:g}; eps is a small constant (typical: 1e-8 .. 1e-3)")
    if v < _FP32_TINY:
        raise ValueError(
            f"{name}={value!r} is below float32's smallest normal number ({_FP32_TINY:.3g}) and is 0 in the update "
            "math (zero-gradient elements would become NaN); use e.g. 1e-8, or 1e-30 at the smallest"
        )


def check_flag(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is True or False (``0`` / ``1`` are refused: torch's kernels take bools)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0."""
    if _as_float(name, value) < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_range(name: str, value: Any, low: float, high: float, *, high_inclusive: bool = False) -> None:
    """Raise ValueError unless ``low <= value < high`` (or ``<= high``)."""
    v = _as_float(name, value)
    ok = low <= v <= high if high_inclusive else low <= v < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def check_betas(name: str, betas: Any, count: int = 2) -> None:
    """Raise ValueError unless ``betas`` is a tuple of ``count`` numbers in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"{name} must be a tuple of {count} numbers in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (compared by type too: ``0`` is not ``False``)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {type(value).__name__} {value!r}")


@functools.cache
def signature_defaults(cls: type) -> Mapping[str, Any]:
    """The keyword defaults of ``cls.__init__`` (what each hyperparameter's type is when the caller omits it)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def check_common_hyperparameters(group: dict[str, Any], defaults: Mapping[str, Any], *, betas_count: int = 2) -> None:
    """Check the hyperparameters most algorithms share, for every optimizer whose groups have them (lmopt's own
    and the torch.optim classes the registry builds): ``lr`` >= 0 (torch's convention: ``lr=0`` freezes a group,
    or lets a scheduler set it), ``betas`` (``betas_count`` of them) in [0, 1), a numeric ``eps`` a float32 holds
    (pairs such as Adafactor's are the algorithm's to check), ``weight_decay`` >= 0 with ``lr * weight_decay <= 1``
    (beyond that the decay multiplier ``1 - lr * weight_decay`` is negative and the parameters grow without
    bound), and the boolean flags (``True`` / ``False``, not ``0`` / ``1``). Integer values of float
    hyperparameters (``defaults``: the constructor's signature defaults, :func:`signature_defaults`) become floats
    in ``group`` (an int such as ``2**70`` would overflow inside torch's kernels). ``lr`` is at most
    :data:`LR_MAX` (1e6): an update of ~lr per element beyond that leaves float32's useful range within steps.

    Raises:
        ValueError: naming the hyperparameter and what would be valid.
    """
    if "lr" in group:
        check_nonnegative("lr", group["lr"])
        if _as_float("lr", group["lr"]) > LR_MAX:
            raise ValueError(
                f"lr={group['lr']!r} is beyond {LR_MAX:g}: every update would move weights by ~lr and overflow "
                "float32 within a few steps; use a learning rate below 1e6 (typical: 1e-5 .. 1)"
            )
    if "betas" in group:
        check_betas("betas", group["betas"], betas_count)
    if "eps" in group and not isinstance(defaults.get("eps"), (tuple, list)):  # pairs: the algorithm checks them
        check_eps("eps", group["eps"])
    if "weight_decay" in group:
        check_nonnegative("weight_decay", group["weight_decay"])
        if "lr" in group and _as_float("lr", group["lr"]) * _as_float("weight_decay", group["weight_decay"]) > 1:
            raise ValueError(
                f"lr * weight_decay must be <= 1, got lr={group['lr']} and weight_decay={group['weight_decay']}: "
                "the decay multiplier 1 - lr * weight_decay would be negative; lower one of them"
            )
    for flag in _FLAGS:
        if flag in group:
            check_flag(flag, group[flag])
    for key, value in group.items():
        if type(value) is int and type(defaults.get(key)) is float:
            group[key] = float(value)


# --------------------------------------------------------------------------------------------------------------
# the base class
# --------------------------------------------------------------------------------------------------------------
#: torch.compile modes a compiled step takes (:attr:`LmoptOptimizer.compile_mode`)
COMPILE_MODES: tuple[str | None, ...] = (
    None,
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)
#: whether ``implementation="auto"`` compiles steps on CUDA (:meth:`LmoptOptimizer._auto_compiles`)
AUTO_COMPILE = os.environ.get("LMOPT_AUTO_COMPILE", "1") not in ("0", "false", "False")


def _on_cuda(params: Sequence[Tensor]) -> bool:
    """All on a CUDA device, none a DTensor (FSDP2 shards keep their eager paths)."""
    return bool(params) and all(p.device.type == "cuda" and not is_dtensor(p) for p in params)


class LmoptOptimizer(Optimizer):
    """Base class of lmopt's optimizers (see the module docstring for the contract).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        defaults: the algorithm's hyperparameters (already validated by the subclass).
        nonfinite: ``"raise"`` (default) raises :class:`NonFiniteGradientError` naming the first parameter
            whose gradient holds inf/NaN, before anything is changed; ``"skip"`` leaves parameters and state
            untouched for that step and increments :attr:`skipped_steps`.
        check_finite: set False to skip the finiteness check entirely (the caller guarantees finite
            gradients, e.g. with a GradScaler that already skips such steps).
    """

    #: implementations this optimizer has (:data:`lmopt.spec.IMPLEMENTATIONS`); the first is the plain reference
    implementations: tuple[str, ...] = ("for_loop",)
    #: old implementation names still accepted, and what they mean now (e.g. ``{"fused": "blocked"}`` where
    #: "fused" used to name lmopt's cache-blocked pass)
    implementation_aliases: ClassVar[Mapping[str, str]] = {}
    #: the order ``implementation="auto"`` tries this optimizer's paths in (measured; see
    #: :func:`lmopt.optim.resolve_implementation`)
    auto_preference: ClassVar[tuple[str, ...]] = IMPLEMENTATIONS
    #: how many decay rates ``betas`` holds (CAME and AdEMAMix: 3)
    betas_count: ClassVar[int] = 2
    #: whether ``implementation="compiled"`` is offered (the group's step traced by torch.compile; docs/compile.md)
    compilable: ClassVar[bool] = True
    #: the torch.compile backend of ``implementation="compiled"`` (Inductor: C++ on CPU, Triton on CUDA)
    compile_backend: ClassVar[str] = "inductor"
    #: torch.compile's ``mode`` for compiled steps: None (Inductor's default), ``"reduce-overhead"`` (CUDA graphs:
    #: the whole step replays as one graph launch, for small models that are launch-bound), ``"max-autotune"``,
    #: ``"max-autotune-no-cudagraphs"``; set per optimizer (``opt.compile_mode = ...``, or
    #: ``create_optimizer(..., compile_mode=...)``) before its first step
    compile_mode: str | None = None

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: Mapping[str, Any],
        *,
        nonfinite: NonFinitePolicy = "raise",
        check_finite: bool = True,
    ) -> None:
        check_choice("nonfinite", nonfinite, ("raise", "skip"))
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
        self._check_implementation(defaults)
        self.nonfinite = nonfinite
        self.check_finite = check_finite
        self.skipped_steps = 0
        self._recorded_grad_norm: Tensor | None = None
        self._implementation_used: dict[int, str] = {}  # id(group) -> what "auto" chose at the last step
        super().__init__(params, dict(defaults))
        for group in self.param_groups:
            self._check_group(group)

    # -- hooks for subclasses ------------------------------------------------------------------------------------
    def _check_implementation(self, group: dict[str, Any]) -> None:
        """Check the group's ``implementation`` (and the shared ``param_rounding``), mapping old names to the
        current vocabulary (:attr:`implementation_aliases`)."""
        impl = group.get("implementation", "auto")
        impl = self.implementation_aliases.get(impl, impl) if isinstance(impl, str) else impl
        check_choice("implementation", impl, ("auto", *self.implementations, *self._engine_implementations()))
        if "implementation" in group:
            group["implementation"] = impl
        if "param_rounding" in group:
            check_choice("param_rounding", group["param_rounding"], PARAM_ROUNDINGS)

    @classmethod
    def _engine_implementations(cls) -> tuple[str, ...]:
        """What the engine adds to :attr:`implementations`: ``compiled`` (:meth:`step` runs the group through
        ``torch.compile``), unless the class has its own ``compiled`` or cannot be compiled (:attr:`compilable`)."""
        return ("compiled",) if cls.compilable and "compiled" not in cls.implementations else ()

    def _check_common(self, group: dict[str, Any]) -> None:
        """The hyperparameters most algorithms share (:func:`check_common_hyperparameters`)."""
        check_common_hyperparameters(group, signature_defaults(type(self)), betas_count=self.betas_count)

    def _check_params(self, group: dict[str, Any]) -> None:
        """The group's parameters: each a floating tensor of a supported dtype, none listed twice."""
        seen: set[int] = set()
        for i, p in enumerate(group["params"]):
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor (an nn.Parameter), got {type(p).__name__}")
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters (params[{i}], {p.dtype}); optimize "
                    "torch.view_as_real(p) as a real parameter instead"
                )
            if p.dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"params[{i}] has dtype {p.dtype}, which {type(self).__name__} does not support; use one of "
                    f"{list(_FLOAT_DTYPES)}"
                )
            if id(p) in seen:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) appears twice in one param group; list each parameter once"
                )
            seen.add(id(p))

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Validate one group's algorithm-specific hyperparameters (groups may override the defaults); the shared
        ones are checked by :meth:`_check_common` first."""

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    def _check_group(self, group: dict[str, Any]) -> None:
        """Every check of one param group (parameters, implementation, shared and algorithm hyperparameters)."""
        self._check_params(group)
        self._check_implementation(group)
        self._check_common(group)
        self._validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "skipped_steps"):  # during __init__: the constructor checks every group after
            super().add_param_group(param_group)
            return
        # a group added later is checked before it joins: a bad one leaves the optimizer as it was
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    # -- helpers -------------------------------------------------------------------------------------------------
    def _param_name(self, group_index: int, index_in_group: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        p = group["params"][index_in_group]
        where = f"param_groups[{group_index}]['params'][{index_in_group}] (shape {tuple(p.shape)})"
        if names is not None and index_in_group < len(names):
            return f"'{names[index_in_group]}' {where}"
        return where

    def record_grad_norm(self, norm: Tensor | float) -> None:
        """Record the global gradient norm computed for the coming step (e.g. by lmopt's clipping).

        A finite norm proves every gradient is finite, so the next ``step()`` skips its own check; a non-finite
        norm makes it apply the non-finite policy. The record is consumed by that one step.
        """
        self._recorded_grad_norm = torch.as_tensor(norm).detach()

    def _collect(self) -> list[tuple[int, dict[str, Any], list[Tensor], list[Tensor], list[int]]]:
        collected = []
        for gi, group in enumerate(self.param_groups):
            params, grads, indices = [], [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"({self._param_name(gi, i)}); use nn.Embedding(sparse=False) or torch.optim.SparseAdam"
                    )
                # a gradient of another dtype only where the parameter opts in (torch's ``grad_dtype = None``)
                # (dynamo cannot read ``grad_dtype``: compiled steps take the parameter's dtype)
                grad_dtype = p.dtype if torch.compiler.is_compiling() else getattr(p, "grad_dtype", p.dtype)
                dtype_ok = p.grad.dtype == p.dtype if grad_dtype is not None else p.grad.dtype in _FLOAT_DTYPES
                if p.grad.shape != p.shape or not dtype_ok or p.grad.device != p.device:
                    raise ValueError(
                        f"the gradient of {self._param_name(gi, i)} has shape {tuple(p.grad.shape)}, dtype "
                        f"{p.grad.dtype} on {p.grad.device}; it must match the parameter ({tuple(p.shape)}, {p.dtype} "
                        f"on {p.device}); nothing was changed"
                    )
                params.append(p)
                grads.append(p.grad)
                indices.append(i)
            collected.append((gi, group, params, grads, indices))
        return collected

    def _first_nonfinite(self, collected) -> str | None:
        """Name of the first parameter with a non-finite gradient, or None. One read of the gradients."""
        for gi, _group, _params, grads, indices in collected:
            dense = [g for g in grads if g.numel() > 0]
            if not dense:
                continue
            nonempty = [i for i, g in zip(indices, grads) if g.numel() > 0]
            # Contiguous fp32/bf16 CPU gradients: one exact pass of lmopt's C kernel at memory bandwidth.
            bad_index = _kernel_first_nonfinite(dense)
            if bad_index is not None:
                if bad_index < 0:
                    continue
                return self._param_name(gi, nonempty[bad_index])
            # Elsewhere the 2-norm propagates NaN and inf and is the fastest vectorised reduction (the inf-norm is
            # ~30x slower on CPU). It can overflow for huge finite gradients, so a non-finite norm is confirmed
            # element-wise before anything is reported: the slow path runs only when something looks wrong.
            if any(map(is_dtensor, dense)):  # a DTensor norm is a pending partial value: reduce it fully
                norms = [torch.linalg.vector_norm(g).full_tensor() for g in dense]
            else:
                norms = torch._foreach_norm(dense, 2)
            flags = torch.stack([n.float() for n in norms]).isfinite()
            if bool(flags.all()):
                continue
            for k in (~flags).nonzero().flatten().tolist():
                g = dense[k].full_tensor() if is_dtensor(dense[k]) else dense[k]
                if not bool(torch.isfinite(g).all()):
                    return self._param_name(gi, nonempty[k])
        return None

    def _grads_nonfinite(self, collected) -> str | None:
        recorded, self._recorded_grad_norm = self._recorded_grad_norm, None
        if not self.check_finite or torch.compiler.is_compiling():
            # under torch.compile the check (a host read of the gradients' finiteness) would break the graph:
            # compiled steps apply the update as torch.optim does (docs/compile.md)
            return None
        if recorded is not None and bool(torch.isfinite(recorded)):
            return None
        name = self._first_nonfinite(collected)
        if name is None and recorded is not None:
            return "the recorded global gradient norm (not finite)"
        return name

    # -- the step ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected = self._collect()
        bad = self._grads_nonfinite(collected)
        if bad is not None:
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"non-finite gradient in {bad}; the step was not applied. Lower the learning rate, check the "
                    f"batch, or construct the optimizer with nonfinite='skip' to skip such steps"
                )
            self.skipped_steps += 1
            return loss
        self._step_groups(collected)
        return loss

    def _step_groups(self, collected) -> None:
        """Create missing state and step every group (after the non-finite check). An algorithm whose update
        couples the groups (Prodigy's one step size estimated from every parameter) overrides this."""
        for _gi, group, params, grads, _indices in collected:
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(group, p, state)
            if (group.get("implementation") == "compiled" and not torch.compiler.is_compiling()) or self._auto_compiles(
                group, params
            ):
                self._compiled_step_group(group, params, grads)
            else:
                self._step_group(group, params, grads)

    def _native_accelerator_path(self, group: dict[str, Any]) -> bool:
        """Whether the group has a hand-written GPU path that ``auto`` keeps on CUDA instead of compiling the step:
        torch's fused kernel (full-precision state, where the class has ``fused``) or lmopt's Triton kernel (8/4-bit
        state, where the class has ``kernel`` and it applies to the group)."""
        quantized = getattr(self, "_quantized_group", None)
        if quantized is not None and quantized(group):
            applies = getattr(self, "_kernel_applies_to_group", None)
            return "kernel" in self.implementations and (applies is None or bool(applies(group)))
        return "fused" in self.implementations

    def _auto_compiles(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """``implementation="auto"`` on CUDA compiles the group's step (Inductor writes Triton kernels: one or a few
        launches instead of one per torch op) unless the group has a native GPU path
        (:meth:`_native_accelerator_path`) or the class cannot be compiled. On CPU ``auto`` keeps the eager paths
        (the C kernel, torch's fused and the cache-blocked passes; benchmarks/compiled_vs_eager.py).
        ``LMOPT_AUTO_COMPILE=0`` turns it off."""
        return (
            group.get("implementation") == "auto"
            and type(self).compilable
            and AUTO_COMPILE
            and not torch.compiler.is_compiling()
            and _on_cuda(params)
            and not self._native_accelerator_path(group)
        )

    def _compiled_step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """``implementation="compiled"``: the group's step through ``torch.compile`` (one graph per group, compiled
        at its first step). The non-finite check above stays eager, so the policy holds; a float lr is handed to
        the graph as a 0-d tensor (filled each step), so LR schedules never recompile it."""
        compiled = self.__dict__.get("_compiled_step")
        mode = self.compile_mode
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}, got {mode!r}")
        if compiled is None:
            options = {"mode": mode} if mode is not None and self.compile_backend == "inductor" else {}
            compiled = self._compiled_step = torch.compile(
                type(self)._step_group, backend=self.compile_backend, **options
            )
        lr = group["lr"]
        holders: dict[int, Tensor] = self.__dict__.setdefault("_compiled_lr", {})
        if not isinstance(lr, Tensor):
            holder = holders.get(id(group))
            if holder is None:
                # CUDA graphs replay device memory only: their lr lives on the parameters' device
                graphs = mode in ("reduce-overhead", "max-autotune") and _on_cuda(params)
                device = params[0].device if graphs else "cpu"
                holder = holders[id(group)] = torch.zeros((), dtype=torch.float64, device=device)
            holder.fill_(lr)
            group["lr"] = holder
        try:
            compiled(self, group, params, grads)
        finally:
            group["lr"] = lr
        used = self._implementation_used.get(id(group))
        label = "compiled" if group.get("implementation") == "compiled" else "compiled (auto on CUDA)"
        self._implementation_used[id(group)] = f"{label} ({used})" if used else label

    # -- state dicts that keep dtypes ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["lmopt"] = {"skipped_steps": self.skipped_steps, "nonfinite": self.nonfinite}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this optimizer (or by torch.optim's class of the same algorithm: the keys
        lmopt's groups add are taken from the current groups).

        All or nothing: the state dict is checked first (:mod:`lmopt.optim._state_check`: structure, the groups'
        hyperparameters, every parameter's state against the state this optimizer keeps for it, values finite,
        second moments >= 0), and a failure later in loading restores the optimizer as it was.

        Raises:
            ValueError: the state dict does not fit this optimizer or is corrupted, naming the parameter and entry.
        """
        from ._state_check import check_optimizer_state_dict, declared_by_init

        extra = state_dict.get("lmopt", {}) if isinstance(state_dict, Mapping) else {}
        skipped = extra.get("skipped_steps", 0) if isinstance(extra, Mapping) else None
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: 'lmopt' must be a dict whose skipped_steps is an int >= 0, "
                f"got {extra!r}"[:200]
            )
        checked = check_optimizer_state_dict(
            self,
            state_dict,
            declared_by_init(self),
            self._check_loaded_group,
            reblockable=hasattr(self, "_reshard_loaded_state"),
        )
        before = {k: self.__dict__[k] for k in ("state", "param_groups", "skipped_steps")}
        try:
            self._load_checked_state_dict(checked)
        except Exception:
            self.__dict__.update(before)
            raise

    def _check_loaded_group(self, group: dict[str, Any]) -> None:
        self._check_implementation(group)
        self._check_common(group)
        self._validate_group(group)

    def _load_checked_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("lmopt", {})
        saved_state = state_dict.get("state", {})
        params = self._saved_params(state_dict)
        # quantized moments (``<name>_codes`` uint8, ``<name>_scales`` fp32; lmopt.quant.moments) bypass torch's
        # loader, which would first cast them to the parameter's dtype (4x the codes' memory, all at once)
        held: dict[tuple[Any, str], Tensor] = {}
        stripped: dict[Any, Any] = {}
        for key, values in saved_state.items():
            if isinstance(values, dict) and any(is_quantized_entry(n) for n in values):
                values = dict(values)
                for name in [n for n in values if is_quantized_entry(n)]:
                    held[(key, name)] = values.pop(name)
            stripped[key] = values
        if held:
            state_dict["state"] = stripped
        super().load_state_dict(state_dict)
        for (key, name), value in held.items():
            p = params.get(key)
            if p is not None:
                self.state[p][name] = value.to(device=p.device)
        # torch casts floating state to the parameter's dtype: put each saved tensor back as it was saved
        for key, values in saved_state.items():
            p = params.get(key)
            if p is None or p not in self.state:
                continue
            restored = self.state[p]
            for name, value in values.items():
                if isinstance(value, Tensor) and not is_quantized_entry(name) and value.dtype != restored[name].dtype:
                    restored[name] = value.to(device=p.device, copy=True)
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._after_load_state_dict()

    def _after_load_state_dict(self) -> None:
        """Groups saved before a hyperparameter existed get its default; every group is validated again (old
        names, e.g. deprecated aliases, are normalized)."""
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._check_loaded_group(group)

    def _saved_params(self, state_dict: dict[str, Any]) -> dict[Any, Tensor]:
        """Saved state key -> parameter, as torch's loader pairs them: the saved groups' ``params`` entries
        (indices, or fully qualified names in ``get_optimizer_state_dict`` flows) in order."""
        saved = (key for group in state_dict.get("param_groups", []) for key in group["params"])
        return dict(zip(saved, (p for group in self.param_groups for p in group["params"])))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("check_finite", True)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_recorded_grad_norm", None)
        self.__dict__.setdefault("_implementation_used", {})

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (nonfinite={self.nonfinite!r}, skipped_steps={self.skipped_steps})"]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            keys = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            used = self._implementation_used.get(id(group))
            ran = f", last step ran {used!r}" if used else ""
            lines.append(f"  group {i}: {len(group['params'])} tensors, {n:,} parameters{ran}, {keys}")
        return "\n".join(lines)


def constructor_defaults(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A subclass constructor's hyperparameters from its ``locals()``: every argument but ``self``, ``params`` and
    the engine's own (``nonfinite``, ``check_finite``), so each hyperparameter is named once, in the signature."""
    skip = {"self", "params", "nonfinite", "check_finite"}
    return {k: v for k, v in arguments.items() if k not in skip and not k.startswith("__")}


def _kernel_first_nonfinite(tensors: list[Tensor]) -> int | None:
    """Index of the first tensor with inf/NaN (-1: none) from the C kernel, or None where it does not apply
    (not CPU fp32/bf16 contiguous plain tensors, no C compiler, or ``LMOPT_DISABLE_KERNELS=1``)."""
    from ..kernels.lowbit import first_nonfinite

    return first_nonfinite(tensors)


def fp32_view(t: Tensor) -> Tensor:
    """``t`` itself when it is fp32/fp64, else an fp32 copy (the math of low-precision tensors runs in fp32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
