"""Lookahead: k fast steps of any optimizer, then a step of the slow weights towards them.

Update rule (Zhang et al. 2019, Algorithm 1), per parameter group, with slow weights ``phi`` (initialised to
the
parameters before their first update) and the inner optimizer's fast weights ``theta``:

.. code-block:: text

    theta <- inner_step(theta)                 every step
    every k-th step of the group:
        phi   <- phi + alpha * (theta - phi)
        theta <- phi

:class:`Lookahead` is itself a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` *are* the inner
optimizer's (the same objects), so LR schedulers, gradient clipping helpers, ``accelerate`` and Lightning
accept
it and see the inner hyperparameters. The slow weights live in the inner state under ``slow_param``; ``k``,
``alpha`` and the group's step counter are group keys (``lookahead_k``, ``lookahead_alpha``,
``lookahead_step``),
so ``state_dict`` holds all of it and resumes exactly.

Registry: ``lmopt.create_optimizer("lookahead_adamw", model, lr=3e-4, lookahead_k=5, lookahead_alpha=0.5)``
for
each optimizer whose spec says ``lookahead=True`` (:data:`LOOKAHEAD_BASES`; any of the inner
optimizer's hyperparameters are accepted), or
:func:`with_lookahead` to build any registry optimizer wrapped: ``with_lookahead("lion", model, k=6,
lr=1e-4)``.

Reference: Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..spec import OptimizerSpec, StateTensor
from .base import check_range, is_dtensor

__all__ = ["LOOKAHEAD_BASES", "Lookahead", "with_lookahead"]  # noqa: F822 (LOOKAHEAD_BASES: read on access)


_LOOKAHEAD_KEYS = ("lookahead_k", "lookahead_alpha", "lookahead_step")


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (lookahead_k) must be an integer >= 1, got {k!r}")


def _check_alpha(alpha: Any) -> None:
    check_range("alpha (lookahead_alpha)", alpha, 0.0, 1.0, high_inclusive=True)
    if alpha == 0:
        raise ValueError("alpha (lookahead_alpha) must be in (0, 1], got 0")


def _check_saved(state_dict: Any) -> None:
    """Lookahead's own part of a state dict, before the inner optimizer checks the rest: each group's k, alpha
    and step, and a slow weight for every parameter the inner optimizer has stepped once the group has."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), (list, tuple)):
        return  # the inner optimizer's checks name what is wrong
    state = state_dict.get("state", {}) if isinstance(state_dict.get("state"), dict) else {}
    for gi, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict):
            return
        where = f"Lookahead.load_state_dict: param_groups[{gi}]"
        try:
            _check_k(group.get("lookahead_k", 5))
            _check_alpha(group.get("lookahead_alpha", 0.5))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        step = group.get("lookahead_step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: lookahead_step must be an integer >= 0, got {step!r}")
        for key in group.get("params", ()) if step > 0 else ():
            saved = state.get(key) if isinstance(key, (int, str)) else None
            if not isinstance(saved, dict) or not saved or "slow_param" in saved:
                continue
            inner_step = saved.get("step", 1)
            if not isinstance(inner_step, (int, float, Tensor)) or float(inner_step) > 0:
                raise ValueError(
                    f"{where}: parameter {key!r} has inner state but no slow weights ('slow_param') after "
                    f"{step} Lookahead steps; the state dict lost entries"
                )


class Lookahead(Optimizer):
    """Wrap ``optimizer`` with Lookahead (see the module docstring for the rule).

    Args:
        optimizer: the inner (fast) optimizer, any ``torch.optim.Optimizer``.
        k: fast steps per slow step (default 5; the paper's 5 or 10).
        alpha: slow step size in (0, 1] (default 0.5, the paper's value).

    ``param_groups`` and ``state`` are the inner optimizer's objects; schedulers may change
    ``lookahead_alpha``
    per group like any hyperparameter. ``skipped_steps`` and ``record_grad_norm`` of an lmopt inner optimizer
    are
    forwarded; a step the inner optimizer skips (non-finite gradients) does not count towards ``k``.

    Example:
        >>> opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-3), k=5, alpha=0.5)
        >>> scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)

    Reference: Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019.
    """

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_k(k)
        _check_alpha(alpha)
        self.optimizer = optimizer
        # torch's __init__ adds our defaults to the inner group dicts in place; then share the inner objects
        super().__init__(
            optimizer.param_groups, {"lookahead_k": k, "lookahead_alpha": float(alpha), "lookahead_step": 0}
        )
        # the inner hyperparameters too: schedulers read defaults (OneCycleLR(cycle_momentum=True) looks for
        # ``betas`` / ``momentum`` there)
        self.defaults = {**optimizer.defaults, **self.defaults}
        self._link()

    def _link(self) -> None:
        self.optimizer.wrapper_state = ("slow_param",)  # the inner state-dict check accepts the slow weights
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        for group in self.param_groups:
            for key in _LOOKAHEAD_KEYS:
                group.setdefault(key, self.defaults[key])

    # torch's __getstate__ keeps only defaults / state / param_groups: the inner optimizer must travel too
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "optimizer": self.optimizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._link()

    def _inner_step(self, closure: Callable[[], float] | None) -> float | None:
        """The inner step with its own hooks but not the global ones: those fire once, for this step."""
        inner = self.optimizer
        step = type(inner).step
        raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
        if raw is None or "step" in vars(inner):  # not torch's hooked step, or patched on the instance
            return inner.step(closure) if closure is not None else inner.step()
        args = (inner,) if closure is None else (inner, closure)
        for pre_hook in inner._optimizer_step_pre_hooks.values():
            result = pre_hook(inner, args, {})
            if result is not None:
                args = result[0]
        loss = raw(*args)
        inner._optimizer_step_code()
        for post_hook in inner._optimizer_step_post_hooks.values():
            post_hook(inner, args, {})
        return loss

    # -- forwarding
    # ----------------------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Steps the inner optimizer skipped for non-finite gradients (0 without the policy)."""
        return int(getattr(self.optimizer, "skipped_steps", 0))

    def record_grad_norm(self, norm: Tensor | float) -> None:
        """Forwarded to an lmopt inner optimizer (see :meth:`lmopt.LmoptOptimizer.record_grad_norm`)."""
        record = getattr(self.optimizer, "record_grad_norm", None)
        if record is not None:
            record(norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if any(param_group is g for g in self.optimizer.param_groups):
            # torch's __init__ registering the inner groups: fill our defaults into them, nothing else
            for key in _LOOKAHEAD_KEYS:
                param_group.setdefault(key, self.defaults[key])
            if not any(param_group is g for g in self.param_groups):
                self.param_groups.append(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._link()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, which holds the slow weights and the lookahead group keys."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner optimizer's state dict (with its checks), after checking Lookahead's own entries (k,
        alpha, step, slow weights); all or nothing."""
        _check_saved(state_dict)
        self.optimizer.load_state_dict(state_dict)
        self._link()  # torch's loader replaces the inner group list and state dict

    def __repr__(self) -> str:
        g = self.param_groups[0]
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return f"Lookahead (k={g['lookahead_k']}, alpha={g['lookahead_alpha']}) around\n{inner}"

    # -- the step
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One inner step; every ``k``-th step of a group, the slow weights step and the fast ones reset."""
        state = self.optimizer.state
        # slow weights start at the parameters before their first update (inserted after the inner step, which
        # creates its own state lazily and must find it empty)
        pending = {
            p: p.detach().clone()
            for group in self.param_groups
            for p in group["params"]
            if "slow_param" not in state.get(p, ())
            and (p.grad is not None or (closure is not None and p.requires_grad))
        }
        skipped_before = self.skipped_steps
        loss = self._inner_step(closure)
        if self.skipped_steps != skipped_before:
            return loss
        for p, initial in pending.items():
            if p.grad is not None:
                self.state[p]["slow_param"] = initial
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"]:
                continue
            fast = [p for p in group["params"] if "slow_param" in self.state.get(p, ())]
            if not fast:
                continue
            slow = [self.state[p]["slow_param"] for p in fast]
            torch._foreach_lerp_(slow, fast, group["lookahead_alpha"])
            if any(map(is_dtensor, fast)):  # DTensor has no sharding rule for _foreach_copy_
                for p, s in zip(fast, slow, strict=True):
                    p.copy_(s)
            else:
                torch._foreach_copy_(fast, slow)
        return loss


def with_lookahead(
    name: str,
    model_or_params: nn.Module | Any,
    *,
    k: int = 5,
    alpha: float = 0.5,
    **hyperparameters: Any,
) -> Lookahead:
    """Build any registry optimizer with :func:`lmopt.create_optimizer` and wrap it with Lookahead.

    Example:
        >>> opt = with_lookahead("lion", model, k=6, alpha=0.5, lr=1e-4, weight_decay=0.1)
    """
    from ..registry import create_optimizer

    return Lookahead(create_optimizer(name, model_or_params, **hyperparameters), k=k, alpha=alpha)


# -----------------------------------------------------------------------------------------------------------
# registry entries: one generated class per base, whose signature is the inner class's plus lookahead_k /
# _alpha
def _lookahead_class(base: OptimizerSpec) -> type[Lookahead]:
    inner_cls = base.cls

    def __init__(self, params, **hyperparameters):
        k = hyperparameters.pop("lookahead_k", 5)
        alpha = hyperparameters.pop("lookahead_alpha", 0.5)
        _check_k(k)
        Lookahead.__init__(self, inner_cls(params, **{**base.defaults, **hyperparameters}), k=k, alpha=alpha)

    inner_sig = inspect.signature(inner_cls.__init__)
    params = [p for p in inner_sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter("lookahead_k", inspect.Parameter.KEYWORD_ONLY, default=5, annotation=int),
        inspect.Parameter("lookahead_alpha", inspect.Parameter.KEYWORD_ONLY, default=0.5, annotation=float),
    ]
    __init__.__signature__ = inner_sig.replace(parameters=params)  # create_optimizer validates names with it
    name = f"Lookahead{inner_cls.__name__}"
    doc = (
        f"Lookahead around :class:`{inner_cls.__module__}.{inner_cls.__name__}` (registry entry "
        f"``lookahead_{base.name}``): the inner class's arguments plus ``lookahead_k`` and "
        "``lookahead_alpha``."
    )
    cls = type(name, (Lookahead,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})
    cls.__qualname__ = name
    __init__.__qualname__ = f"{name}.__init__"
    globals()[name] = cls  # bound in the module, so pickle / torch.save find the class by name
    return cls


def _lookahead_state(base: OptimizerSpec):
    def rule(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
        return [*base.state(shape, dtype, hyper), StateTensor("slow_param", shape, dtype)]

    return rule


def lookahead_spec(base: OptimizerSpec) -> OptimizerSpec:
    """The ``lookahead_<name>`` registry entry around ``base`` (made by the registry for specs with
    ``lookahead=True``)."""
    return OptimizerSpec(
        name=f"lookahead_{base.name}",
        cls=_lookahead_class(base),
        summary=f"Lookahead (k fast steps, one slow step) around {base.name}",
        paper="Zhang et al., Lookahead Optimizer: k steps forward, 1 step back, NeurIPS 2019",
        state=_lookahead_state(base),
        family=base.family,
        per_parameter=False,
        accepts_model=base.accepts_model,
        structure_state=base.structure_state,
        state_precisions=base.state_precisions,
    )


def __getattr__(name: str) -> Any:
    # LOOKAHEAD_BASES: the registry optimizers that get a ``lookahead_<name>`` entry (their spec says
    # ``lookahead=True``); read from the registry on access, so it cannot disagree with it
    if name == "LOOKAHEAD_BASES":
        from ..registry import list_optimizers

        return tuple(s.name for s in list_optimizers() if s.lookahead)
    if name.startswith("Lookahead"):  # a generated class asked for (unpickling) before the registry was built
        from ..registry import list_optimizers

        list_optimizers()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
