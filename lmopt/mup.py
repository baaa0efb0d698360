"""muP, the maximal update parametrization: hyperparameters tuned at one width that stay good at every width.

Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer"
(arXiv 2203.03466), Table 3. With width multiplier ``m = width / base_width``, relative to the standard
parametrization (SP: every weight drawn with one width-independent std, one global learning rate):

========== ================================ ==================== =========== ===========
role       what it is (lmopt roles)         init std             Adam LR     SGD LR
========== ================================ ==================== =========== ===========
matrix     hidden weights (both dims scale) x 1/sqrt(m)          x 1/m       x 1
head       output weights (fan_in scales)   x 1/m (or zero)      x 1/m       x 1/m
embedding  input weights (fan_out scales)   x 1                  x 1         x m
norm,      all biases and gains             x 1                  x 1         x m
bias,
vector
========== ================================ ==================== =========== ===========

and attention logits scaled by ``1/d`` instead of ``1/sqrt(d)`` (``d`` the head dimension). At ``width ==
base_width`` every factor is 1: muP and SP coincide there, so hyperparameters tuned on the base model are the
muP ones. See ``docs/mup.md``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .param_groups import ParamGroups, _output_head, classify_parameters, param_groups

__all__ = ["MupPlan", "mup"]

OptimizerFamily = Literal["adam", "sgd"]
InitMode = Literal["rescale", "redraw", "keep"]
_FAMILIES = ("adam", "sgd")
_INIT_MODES = ("rescale", "redraw", "keep")
_ROLES = ("embedding", "matrix", "head", "norm", "bias", "vector")
_APPLIED = "_lmopt_mup_width_mult"  # set on the model so a second call cannot rescale twice


def _role_factors(role: str, width_mult: float, family: str, zero_readout: bool) -> tuple[float, float]:
    """(learning-rate multiplier, init-std factor) of a role, Table 3 of Tensor Programs V."""
    if role == "matrix":
        return (1.0 / width_mult if family == "adam" else 1.0), 1.0 / math.sqrt(width_mult)
    if role == "head":
        return 1.0 / width_mult, 0.0 if zero_readout else 1.0 / width_mult
    # input weights and every bias / gain: fan_out scales with width, fan_in does not
    return (1.0 if family == "adam" else width_mult), 1.0


@dataclass(frozen=True)
class MupPlan:
    """What :func:`mup` did to a model, and the per-parameter learning-rate multipliers to train it with.

    Attributes:
        width: the model's width.
        base_width: the width at which muP and the standard parametrization coincide.
        width_mult: ``width / base_width``.
        optimizer_family: ``"adam"`` or ``"sgd"``, the column of the table the multipliers come from.
        roles: ``{parameter name: role}`` (the roles of :func:`lmopt.classify_parameters`).
        lr_multipliers: ``{exact parameter name: multiplier}`` for every trainable parameter; pass it as
            ``lmopt.create_optimizer(name, model, lr=..., lr_multipliers=plan.lr_multipliers)``.
        init_scales: ``{parameter name: factor}`` the initial std was multiplied by (0 for a zero readout).
        attention_scaling: ``{module name: new scaling}`` of each attention module whose logit scale was set.
        init: how the initialisation was changed (``"rescale"``, ``"redraw"`` or ``"keep"``).
        init_std: the standard-parametrization std (``config.initializer_range`` or ``init_std=``), if known.
    """

    width: int
    base_width: int
    width_mult: float
    optimizer_family: str
    roles: dict[str, str]
    lr_multipliers: dict[str, float]
    init_scales: dict[str, float]
    attention_scaling: dict[str, float]
    init: str
    init_std: float | None
    model: nn.Module = field(repr=False, compare=False)

    def param_groups(self, base_lr: float, weight_decay: float = 0.1) -> ParamGroups:
        """:func:`lmopt.param_groups` of the model with this plan's multipliers (each group's lr = base_lr x mult)."""
        return param_groups(self.model, weight_decay, lr_multipliers=self.lr_multipliers, base_lr=base_lr)

    def table(self) -> str:
        """One row per role present: role, tensor count, learning-rate multiplier, init scale."""
        rows = [("role", "tensors", "lr x", "init std x")]
        for role in _ROLES:
            names = [n for n, r in self.roles.items() if r == role]
            if names:
                lrs = sorted({self.lr_multipliers[n] for n in names})
                inits = sorted({self.init_scales[n] for n in names})
                rows.append((role, str(len(names)), _join(lrs), _join(inits)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            f"muP ({self.optimizer_family}): width {self.width}, base width {self.base_width}, "
            f"width_mult {self.width_mult:.4g}, init {self.init}"
        ]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        if self.attention_scaling:
            values = sorted(set(self.attention_scaling.values()))
            lines.append(
                f"attention scaling: {len(self.attention_scaling)} modules -> {', '.join(f'{v:.4g}' for v in values)}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _join(values: list[float]) -> str:
    return "/".join(f"{v:.4g}" for v in values)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (a hidden size such as 64), got {value!r}")
    return value


def _model_width(model: nn.Module, matrices: list[torch.Tensor]) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0:
        return hidden
    fan_ins = Counter(int(p.shape[1]) for p in matrices)
    if not fan_ins:
        raise ValueError(
            "width could not be read from the model (no config.hidden_size, no hidden matrix): pass width="
        )
    return fan_ins.most_common(1)[0][0]


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def mup(
    model: nn.Module,
    *,
    base_width: int,
    width: int | None = None,
    optimizer_family: OptimizerFamily = "adam",
    init: InitMode = "rescale",
    init_std: float | None = None,
    attention: bool = True,
    zero_readout: bool = False,
    seed: int = 0,
) -> MupPlan:
    """Put ``model`` in muP relative to ``base_width`` (in place) and return the learning-rate multipliers.

    Roles come from :func:`lmopt.classify_parameters`; the factors are those of the module docstring (Table 3
    of Tensor Programs V). Call it right after building the model, before the optimizer and before any training.

    Args:
        model: the model, initialised in the standard parametrization (every weight drawn with one std that does
            not depend on width, as Hugging Face models do with ``config.initializer_range``).
        base_width: the width at which muP equals the standard parametrization (where hyperparameters are tuned).
        width: the model's width; default ``model.config.hidden_size``, else the most common fan-in of the hidden
            matrices.
        optimizer_family: ``"adam"`` for entrywise-normalised updates (AdamW, Adam, Lion, Adafactor, ...),
            ``"sgd"`` for SGD with or without momentum.
        init: ``"rescale"`` multiplies the existing hidden and output weights by their init factor (keeps the
            seed's draw, deterministic); ``"redraw"`` draws them again from ``normal(0, init_std x factor)`` with a
            generator seeded by ``seed``; ``"keep"`` leaves the weights alone (a model already initialised in muP,
            or one rebuilt to resume training: only the attention scaling and the multipliers are needed then).
        init_std: the standard-parametrization std for ``init="redraw"``; default ``config.initializer_range``.
        attention: set the logit scale of every attention module with ``scaling`` and ``head_dim`` attributes
            (Hugging Face's ``LlamaAttention`` and its relatives) from ``1/sqrt(head_dim)`` to
            ``sqrt(base_head_dim)/head_dim`` with ``base_head_dim = head_dim x base_width/width``: the two agree at
            the base width and the scale goes as ``1/head_dim`` beyond it. This assumes the head count is fixed and
            ``head_dim`` grows with width; when heads grow and ``head_dim`` is fixed, pass ``attention=False``.
        zero_readout: initialise the output head at zero (the paper finds this works well; init scale 0).
        seed: the generator seed for ``init="redraw"``.

    Returns:
        :class:`MupPlan`: ``lr_multipliers`` (exact parameter names), ``init_scales``, ``attention_scaling`` and a
        ``table()`` with one row per role.

    Raises:
        ValueError: a bad argument (named, with the fix); a model already put in muP; an output head tied to the
            input embedding (muP gives them different rules: untie them); ``attention=True`` on a model whose
            attention modules have no ``scaling``/``head_dim`` attributes.

    Example:
        >>> model = build_model(ModelSize(hidden=256, layers=4, heads=4, intermediate=768), ...)
        >>> plan = lmopt.mup(model, base_width=64)
        >>> print(plan.table())
        >>> opt = lmopt.create_optimizer("adamw", model, lr=3e-3, lr_multipliers=plan.lr_multipliers)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    base_width = _positive_int("base_width", base_width)
    if width is not None:
        width = _positive_int("width", width)
    if optimizer_family not in _FAMILIES:
        raise ValueError(
            f"optimizer_family must be one of {_FAMILIES} ('adam' for AdamW, Adam, Lion, Adafactor and other "
            f"entrywise-normalised updates; 'sgd' for SGD), got {optimizer_family!r}"
        )
    if init not in _INIT_MODES:
        raise ValueError(f"init must be one of {_INIT_MODES}, got {init!r}")
    for name, flag in (("attention", attention), ("zero_readout", zero_readout)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if zero_readout and init == "keep":
        raise ValueError("zero_readout=True changes the initialisation; it cannot be combined with init='keep'")
    if hasattr(model, _APPLIED):
        raise ValueError(
            f"the model is already in muP (width_mult {getattr(model, _APPLIED):g}); build a fresh model, or keep "
            "the first plan (applying muP twice would rescale twice)"
        )
    if init == "redraw":
        if init_std is None:
            init_std = getattr(getattr(model, "config", None), "initializer_range", None)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
            raise ValueError(
                f"init='redraw' needs init_std > 0 (the standard-parametrization std, e.g. 0.02), got {init_std!r}"
            )
    elif init_std is not None:
        raise ValueError(f"init_std is used only by init='redraw' (got init={init!r}); drop init_std or redraw")
    known_std = init_std if init_std is not None else getattr(getattr(model, "config", None), "initializer_range", None)

    infos = classify_parameters(model)
    head = _output_head(model)
    head_weight = getattr(head, "weight", None)
    if isinstance(head_weight, torch.Tensor) and any(i.param is head_weight and i.role == "embedding" for i in infos):
        raise ValueError(
            "the output head is tied to the input embedding; muP gives them different init and learning-rate rules "
            "(untie them: tie_word_embeddings=False for Hugging Face models)"
        )
    width = width if width is not None else _model_width(model, [i.param for i in infos if i.role == "matrix"])
    width_mult = width / base_width
    if not any(i.role == "head" for i in infos):
        warnings.warn(
            "lmopt.mup found no output head (no get_output_embeddings(), no Linear named lm_head/head/output), so no "
            "parameter gets the output rules; rename the readout or check plan.table()",
            UserWarning,
            stacklevel=2,
        )

    scaled_modules: list[tuple[str, nn.Module]] = []
    if attention:
        attention_modules = [(n, m) for n, m in model.named_modules() if _is_attention(m)]
        scaled_modules = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(getattr(m, "scaling", None), float) and isinstance(getattr(m, "head_dim", None), int)
        ]
        if attention_modules and not scaled_modules:
            raise ValueError(
                f"attention=True, but no attention module ({type(attention_modules[0][1]).__name__} at "
                f"{attention_modules[0][0]!r}) has the float 'scaling' and int 'head_dim' attributes lmopt.mup sets; "
                "pass attention=False and scale the attention logits by 1/head_dim in the model yourself"
            )

    roles: dict[str, str] = {}
    lr_multipliers: dict[str, float] = {}
    init_scales: dict[str, float] = {}
    generator: torch.Generator | None = None
    with torch.no_grad():
        for info in infos:
            lr_mult, init_scale = _role_factors(info.role, width_mult, optimizer_family, zero_readout)
            roles[info.name] = info.role
            lr_multipliers[info.name] = lr_mult
            init_scales[info.name] = init_scale
            if info.role not in ("matrix", "head") or init == "keep":
                continue
            if init_scale == 0.0:
                info.param.zero_()
            elif init == "redraw":
                if generator is None:
                    generator = torch.Generator(device=info.param.device).manual_seed(seed)
                info.param.normal_(0.0, float(init_std) * init_scale, generator=generator)
            elif init_scale != 1.0:  # at the base width nothing is touched: bit-identical weights
                info.param.mul_(init_scale)
        attention_scaling: dict[str, float] = {}
        for name, module in scaled_modules:
            if width_mult != 1.0:
                # sqrt(base_head_dim)/head_dim for the standard 1/sqrt(head_dim); keeps any other base scale
                module.scaling = module.scaling * math.sqrt(base_width / width)
            attention_scaling[name] = module.scaling
    setattr(model, _APPLIED, width_mult)
    return MupPlan(
        width=width,
        base_width=base_width,
        width_mult=width_mult,
        optimizer_family=optimizer_family,
        roles=roles,
        lr_multipliers=lr_multipliers,
        init_scales=init_scales,
        attention_scaling=attention_scaling,
        init=init,
        init_std=float(known_std) if isinstance(known_std, (int, float)) else None,
        model=model,
    )
