"""Structural parameter groups: weight decay only where it belongs, learning-rate multipliers by name.

Which tensors are decayed is decided by what a parameter *is*, found from the module that owns it:

========== ================================================================ =========
role       how it is found                                                  decayed
========== ================================================================ =========
embedding  owned by ``nn.Embedding`` / ``nn.EmbeddingBag`` (a tied output   no
           head shares this tensor and is counted once)
norm       owned by a normalisation layer: torch's LayerNorm, RMSNorm,      no
           GroupNorm, BatchNorm, InstanceNorm, LocalResponseNorm, or any
           class whose name contains "Norm" (``LlamaRMSNorm``, a user's
           ``RMSNorm``, ``T5LayerNorm``)
bias       a 1-D tensor named ``bias``                                      no
vector     any other tensor with fewer than 2 dimensions (scales, gates)    no
head       the output projection (``get_output_embeddings()`` of a Hugging  yes
           Face model, or a Linear named ``lm_head``/``output``/``head``)
matrix     every other tensor with 2 or more dimensions                     yes
========== ================================================================ =========

:func:`classify_parameters` exposes the roles, so optimizers that treat parameters differently (Muon's 2-D
hidden matrices, Adam-mini's partitions) read the same decision.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["ParamGroups", "ParamInfo", "classify_parameters", "param_groups"]

_TORCH_NORMS: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n)
    for n in (
        "LayerNorm",
        "RMSNorm",
        "GroupNorm",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LocalResponseNorm",
    )
    if hasattr(nn, n)
)
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)
_HEAD_NAMES = ("lm_head", "output", "head", "embed_out", "output_projection")
NO_DECAY_ROLES = frozenset({"embedding", "norm", "bias", "vector"})


@dataclass(frozen=True)
class ParamInfo:
    """What a parameter is: its qualified name, the tensor, its role and the owning module's class name."""

    name: str
    param: Tensor
    role: str
    module_type: str

    @property
    def decay(self) -> bool:
        return self.role not in NO_DECAY_ROLES


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_NORMS) or bool(_NORM_NAME.search(type(module).__name__))


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            return head
    return None


def classify_parameters(model: nn.Module, *, trainable_only: bool = True) -> list[ParamInfo]:
    """The role of every parameter of ``model`` (each tensor once, tied weights under their first name)."""
    head = _output_head(model)
    seen: set[int] = set()
    infos: list[ParamInfo] = []
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                role = "embedding"
            elif _is_norm(module):
                role = "norm"
            elif p.ndim < 2:
                role = "bias" if pname == "bias" else "vector"
            elif module is head or (isinstance(module, nn.Linear) and module_name.split(".")[-1] in _HEAD_NAMES):
                role = "head"
            else:
                role = "matrix"
            infos.append(ParamInfo(name, p, role, type(module).__name__))
    return infos


class ParamGroups(list):
    """A list of torch param-group dicts (pass it to any optimizer) that can describe itself."""

    def summary(self) -> str:
        """One line per group: its name, weight decay, lr, tensor and parameter counts, and roles."""
        lines = []
        for g in self:
            n = sum(p.numel() for p in g["params"])
            lr = f", lr={g['lr']:.3g}" if "lr" in g else ""
            mult = f" (x{g['lr_multiplier']:g})" if g.get("lr_multiplier", 1.0) != 1.0 else ""
            roles = ", ".join(f"{r}: {c}" for r, c in sorted(g.get("roles", {}).items()))
            lines.append(
                f"{g['name']}: weight_decay={g['weight_decay']:g}{lr}{mult} - {len(g['params'])} tensors, "
                f"{n:,} parameters ({roles})"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _is_regex(pattern: str) -> bool:
    return pattern.startswith("re:")


def _matches(name: str, pattern: str) -> bool:
    if name == pattern:
        return True
    if _is_regex(pattern):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.1,
    *,
    lr_multipliers: Mapping[str, float] | None = None,
    base_lr: float | None = None,
    decay_only_matrices: bool = True,
) -> ParamGroups:
    """Split ``model``'s trainable parameters into decay / no-decay groups, with optional lr multipliers.

    Args:
        model: the model.
        weight_decay: decay for the "decay" groups (no-decay groups get 0).
        lr_multipliers: ``{pattern: multiplier}``; a pattern is a glob over the qualified parameter name
            (``"lm_head.*"``, ``"*.classifier.*"``) or a regular expression prefixed with ``"re:"``. A key equal
            to a parameter's name wins for that parameter (so exact names with ``[``, ``*`` or ``?`` in them, as
            :func:`lmopt.mup` gives, are never read as globs); otherwise the first matching pattern wins. Needs
            ``base_lr``.
        base_lr: the learning rate multipliers scale (each group's ``lr`` = base_lr x multiplier; LR schedulers
            then scale every group alike).
        decay_only_matrices: False puts every parameter in the decay groups (no structural split).

    Returns:
        :class:`ParamGroups`: dicts with ``params``, ``param_names``, ``weight_decay``, ``name``, ``roles``
        (counts by role), and ``lr``/``lr_multiplier`` when multipliers are used. Empty groups are dropped.

    Example:
        >>> groups = lmopt.param_groups(model, weight_decay=0.1, lr_multipliers={"lm_head.*": 10}, base_lr=3e-4)
        >>> print(groups.summary())
        >>> opt = lmopt.AdamW(groups, lr=3e-4)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}; pass model, not parameters")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    lr_multipliers = dict(lr_multipliers or {})
    for pattern, mult in lr_multipliers.items():
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
            raise ValueError(f"lr_multipliers[{pattern!r}] must be a number > 0, got {mult!r}")
    if lr_multipliers and base_lr is None:
        raise ValueError("lr_multipliers needs base_lr (the learning rate the multipliers scale)")

    infos = classify_parameters(model)
    if lr_multipliers:
        used = {p for p in lr_multipliers if any(_matches(i.name, p) for i in infos)}
        unused = sorted(set(lr_multipliers) - used)
        if unused:
            raise ValueError(
                f"lr_multipliers patterns {unused} match no trainable parameter name; names look "
                f"like {[i.name for i in infos[:3]]}"
            )

    buckets: dict[tuple[bool, float], dict[str, Any]] = {}
    for info in infos:
        if info.name in lr_multipliers:
            mult = float(lr_multipliers[info.name])
        else:
            mult = next((float(m) for p, m in lr_multipliers.items() if _matches(info.name, p)), 1.0)
        decay = info.decay or not decay_only_matrices
        key = (decay, mult)
        if key not in buckets:
            group: dict[str, Any] = {
                "name": ("decay" if decay else "no_decay") + (f"_lr_x{mult:g}" if mult != 1.0 else ""),
                "params": [],
                "param_names": [],
                "weight_decay": float(weight_decay) if decay else 0.0,
                "roles": {},
            }
            if lr_multipliers:
                group["lr"] = float(base_lr) * mult
                group["lr_multiplier"] = mult
            buckets[key] = group
        g = buckets[key]
        g["params"].append(info.param)
        g["param_names"].append(info.name)
        g["roles"][info.role] = g["roles"].get(info.role, 0) + 1
    ordered = sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
    return ParamGroups(g for _k, g in ordered)
