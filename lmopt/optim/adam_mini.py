"""Adam-mini: Adam with one second-moment value per block of parameters.

Update rule (Zhang et al. 2024, Algorithm 1), for gradient ``g`` at step ``t`` and each block ``B`` of a
parameter's partition:

.. code-block:: text

    m   <- beta1 * m + (1 - beta1) * g                              (exp_avg, parameter shape)
    v_B <- beta2 * v_B + (1 - beta2) * mean_{i in B}(g_i^2)           (exp_avg_sq: one value per block)
    p   <- p * (1 - lr * weight_decay)                                (decoupled decay)
    p_B <- p_B - lr / (1 - beta1^t) * m_B / (sqrt(v_B / (1 - beta2^t)) + eps)

The partition is the paper's for transformers (Section 3 and Algorithm 3), found from the model's modules:

============================== ======================================================= =============
tensor                         found as                                                blocks
============================== ======================================================= =============
query and key projections      Linear named ``q_proj``/``k_proj``/``query``/``key``/      one per head
                               ``wq``/``wk``/``q``/``k``; the Q and K thirds of GPT-2's
                               ``c_attn`` and of ``nn.MultiheadAttention.in_proj_weight``
embeddings and output head     ``nn.Embedding``; the model's output embeddings /           one per token
                               a Linear named ``lm_head``/``output``/``head``
every other matrix (value,     the rest of every tensor with >= 2 dims, per output          one per output
attention output, MLP, plain   neuron (rows of ``nn.Linear``, columns of GPT-2's            neuron
``nn.Linear`` models)          ``Conv1D``)
vectors (norms, biases)        tensors with < 2 dims                                       one per tensor
============================== ======================================================= =============

The head count comes from ``n_heads``/``n_kv_heads`` when given, else from the model's config
(``num_attention_heads``/``n_head``, ``num_key_value_heads``, ``head_dim``) or the attention module itself
(``nn.MultiheadAttention.num_heads``). Without a model, every tensor with >= 2 dims is partitioned per output
neuron (dim 0) and every smaller tensor is one block. The partition of each parameter is kept in its param
group (``group["partitions"]``) so checkpoints restore it; :meth:`AdamMini.partition_summary` describes it.

Differences from the ``adam-mini`` package (1.1.1): the partition is found from module types and the config
rather than from substrings of parameter names, GPT-2's fused ``c_attn``/``Conv1D`` weights are partitioned by
output neuron (the package treats their rows, i.e. input neurons, as blocks), and biases are one block each
(the package keeps full Adam for them). Where the partitions agree the updates match the package's.

State per parameter: ``step`` (fp32 scalar), ``exp_avg`` (parameter shape and dtype), ``exp_avg_sq``
(``(number of blocks,)``, fp32 -- fp64 for fp64 parameters): about 4.0 bytes per fp32 parameter.

Implementations: ``for_loop`` (plain per-tensor path: four whole-tensor ops per tensor; reductions over dims,
right on DTensor) and ``blocked`` (plain CPU tensors: one cache-blocked pass for the first moment and the
per-neuron sums, then the parameter update); ``auto`` picks ``for_loop``, measured as fast or faster on CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..param_groups import classify_parameters
from ..spec import SAME_AS_ADAMW, OptimizerSpec, StateTensor
from ._dispatch import blockable, math_dtype, resolve_implementation, row_blocks
from ._impl import scalar_sqrt, traced_lr, traced_step
from .base import Implementation, LmoptOptimizer

__all__ = ["AdamMini", "Partition", "adam_mini", "find_partitions"]

#: ``(axis, ((count, size), ...))``: blocks along ``axis`` -- ``count`` blocks of ``size`` consecutive output
#: neurons each, segments in order -- or ``(None, ())`` for one block holding the whole tensor. Plain tuples,
#: so
#: param groups holding them load with ``torch.load(weights_only=True)``.
Partition = tuple[int | None, tuple[tuple[int, int], ...]]

WHOLE: Partition = (None, ())
_QK_NAMES = frozenset({"q_proj", "k_proj", "query", "key", "wq", "wk", "q", "k", "q_lin", "k_lin"})


def default_partition(shape: tuple[int, ...]) -> Partition:
    """Per output neuron (dim 0) for tensors with >= 2 dims; one block for smaller ones."""
    return (0, ((shape[0], 1),)) if len(shape) >= 2 else WHOLE


def block_count(partition: Partition) -> int:
    axis, segments = partition
    return 1 if axis is None else sum(count for count, _size in segments)


def _heads_of(config: Any) -> tuple[int | None, int | None, int | None]:
    """``(n_heads, n_kv_heads, head_dim)`` read from one Hugging Face style config (None where absent)."""
    heads = next(
        (
            getattr(config, k)
            for k in ("num_attention_heads", "n_head", "n_heads", "num_heads")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )
    kv = getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None)
    return heads, kv if isinstance(kv, int) else None, head_dim if isinstance(head_dim, int) else None


def _config_heads(model: nn.Module, strict: bool = True) -> tuple[int | None, int | None, int | None]:
    """``(n_heads, n_kv_heads, head_dim)`` from a Hugging Face config, when the model or a submodule has one.

    The model's own ``config`` wins when it names the heads; otherwise every submodule's ``config`` is read (a
    LightningModule, a PEFT wrapper or any module holding a Hugging Face model). Configs that disagree are an
    error when ``strict`` (the caller gave no head count) and otherwise ignored.
    """
    own = getattr(model, "config", None)
    if own is not None and _heads_of(own)[0] is not None:
        return _heads_of(own)
    found: dict[tuple[int | None, int | None, int | None], str] = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        heads = _heads_of(config)
        if heads[0] is not None:
            found.setdefault(heads, name or "<model>")
    if len(found) > 1:
        if not strict:
            return None, None, None
        listed = "; ".join(
            f"{where}: n_heads={h}, n_kv_heads={kv}, head_dim={hd}" for (h, kv, hd), where in found.items()
        )
        raise ValueError(f"submodules' configs disagree on the head count ({listed}); pass n_heads= (and n_kv_heads=)")
    return next(iter(found), (None, None, None))


def find_partitions(
    model: nn.Module, *, n_heads: int | None = None, n_kv_heads: int | None = None
) -> dict[str, Partition]:
    """The Adam-mini partition of every trainable parameter of ``model``, by qualified name.

    Raises:
        ValueError: the model has query/key projections but no head count (pass ``n_heads``), or a head count
            that does not divide a projection.
    """
    cfg_heads, cfg_kv, cfg_head_dim = _config_heads(model, strict=n_heads is None)
    heads = n_heads if n_heads is not None else cfg_heads
    kv_heads = n_kv_heads if n_kv_heads is not None else (cfg_kv if n_heads is None else None)
    kv_heads = kv_heads if kv_heads is not None else heads
    roles = {id(info.param): info.role for info in classify_parameters(model)}
    out: dict[str, Partition] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        leaf = module_name.split(".")[-1]
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if id(p) not in roles or id(p) in seen:
                continue
            seen.add(id(p))
            shape = tuple(p.shape)
            role = roles[id(p)]
            if p.ndim < 2:
                part = WHOLE
            elif role in ("embedding", "head"):
                part = (0, ((shape[0], 1),))
            elif isinstance(module, nn.MultiheadAttention) and pname == "in_proj_weight":
                h = n_heads if n_heads is not None else module.num_heads
                e = module.embed_dim
                part = (0, ((h, e // h), (h, e // h), (e, 1)))
            elif type(module).__name__ == "Conv1D" and p.ndim == 2:  # GPT-2: weight is (in, out)
                out_dim = shape[1]
                if leaf == "c_attn" and heads is not None and out_dim % 3 == 0:
                    e = out_dim // 3
                    hd = cfg_head_dim or e // heads
                    part = (1, ((e // hd, hd), (e // hd, hd), (e, 1)))
                elif leaf == "c_attn":
                    raise ValueError(
                        f"{name}: a fused query/key/value projection needs the head count; pass "
                        f"n_heads= (the model has no config with num_attention_heads)"
                    )
                else:
                    part = (1, ((out_dim, 1),))
            elif leaf in _QK_NAMES and isinstance(module, nn.Linear):
                count = kv_heads if leaf in ("k_proj", "key", "wk", "k", "k_lin") else heads
                if count is None:
                    raise ValueError(
                        f"{name} is a query/key projection: Adam-mini partitions it per head and "
                        f"needs the head count; pass n_heads= (and n_kv_heads= for grouped-query "
                        f"attention)"
                    )
                if cfg_head_dim is not None and n_heads is None and shape[0] % cfg_head_dim == 0:
                    count = shape[0] // cfg_head_dim
                if shape[0] % count:
                    raise ValueError(f"n_heads={count} does not divide the {shape[0]} outputs of {name}")
                part = (0, ((count, shape[0] // count),))
            else:
                part = (0, ((shape[0], 1),))
            out[name] = part
    return out


# ------------------------------------------------------------------------------------------------------------
# the math
def _neuron_square_means(g: Tensor, axis: int) -> Tensor:
    """Mean of ``g^2`` over every dim except ``axis`` (a reduction over dims; DTensor keeps it
    distributed)."""
    dims = tuple(d for d in range(g.ndim) if d != axis)
    return torch.linalg.vector_norm(g, dim=dims).square_().div_(g.numel() // g.shape[axis])


def _to_blocks(neuron: Tensor, segments: tuple[tuple[int, int], ...]) -> Tensor:
    if all(size == 1 for _c, size in segments):
        return neuron
    parts, start = [], 0
    for count, size in segments:
        parts.append(neuron[start : start + count * size].view(count, size).mean(dim=1))
        start += count * size
    return torch.cat(parts)


def _to_neurons(block: Tensor, segments: tuple[tuple[int, int], ...]) -> Tensor:
    if all(size == 1 for _c, size in segments):
        return block
    parts, start = [], 0
    for count, size in segments:
        parts.append(block[start : start + count].repeat_interleave(size))
        start += count
    return torch.cat(parts)


def _coefficients(v: Tensor, step: float | Tensor, *, lr, beta1, beta2, eps) -> Tensor:
    """``lr / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps)`` per block (``step``, ``lr``: 0-d tensors in a
    traced step)."""
    bias_correction2_sqrt = scalar_sqrt(1 - beta2**step)
    return (v.sqrt() / bias_correction2_sqrt).add_(eps).reciprocal_().mul_(lr / (1 - beta1**step))


def _broadcast(coef: Tensor, ndim: int, axis: int) -> Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return coef.view(shape)


def _single_tensor_adam_mini(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, partitions, *, lr, beta1, beta2, eps, weight_decay
):
    for p, g, m, v, step_t, (axis, segments) in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, partitions, strict=False
    ):
        step_t += 1
        if p.numel() == 0:
            continue
        step = traced_step(step_t)
        dtype = math_dtype(p.dtype)
        p32 = p if p.dtype == dtype else p.to(dtype)
        m32 = m if m.dtype == dtype else m.to(dtype)
        g32 = g.to(dtype)
        if axis is None:
            v.lerp_(g32.square().mean().view(1), 1 - beta2)
        else:
            v.lerp_(_to_blocks(_neuron_square_means(g32, axis), segments), 1 - beta2)
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        m32.lerp_(g32, 1 - beta1)
        coef = _coefficients(v, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        if axis is None:  # one block: a 0-d coefficient broadcasts to any shape, a 0-d parameter included
            p32.add_(m32 * coef.view(()), alpha=-1.0)
        else:
            p32.addcmul_(m32, _broadcast(_to_neurons(coef, segments), p.ndim, axis), value=-1.0)
        if m32 is not m:
            m.copy_(m32)
        if p32 is not p:
            p.copy_(p32)


def _blocked_adam_mini(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, partitions, *, lr, beta1, beta2, eps, weight_decay
):
    rest = []
    for i, (p, g, m, v, step_t, (axis, segments)) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, partitions, strict=False)
    ):
        if axis is None or p.numel() == 0 or not blockable(p, g, m) or not (axis == 0 or (axis == 1 and p.ndim == 2)):
            rest.append(i)
            continue
        step_t += 1
        dtype = math_dtype(p.dtype)
        low = p.dtype != dtype
        rows = p.shape[0]
        p2, g2, m2 = p.view(rows, -1), g.view(rows, -1), m.view(rows, -1)
        cols = p2.shape[1]
        # pass 1: the first moment, and each output neuron's sum of g^2, while the gradient block is in cache
        sums = torch.zeros(p.shape[axis], dtype=dtype, device=p.device)
        block_rows = next(row_blocks(rows, cols))[1]
        buf = torch.empty(block_rows * cols, dtype=dtype, device=p.device)
        ones = torch.ones(block_rows, dtype=dtype, device=p.device)
        for r0, r1 in row_blocks(rows, cols):
            gc, mc = g2[r0:r1], m2[r0:r1]
            g32 = gc if not low else gc.to(dtype)
            m32 = mc if not low else mc.to(dtype)
            if axis == 0:
                torch.linalg.vector_norm(g32, dim=1, out=sums[r0:r1])
                sums[r0:r1].square_()
            else:  # column sums as a matrix-vector product (a dim-0 reduction is slow on CPU)
                sq = torch.mul(g32, g32, out=buf[: (r1 - r0) * cols].view(r1 - r0, cols))
                sums.addmv_(sq.t(), ones[: r1 - r0])
            m32.lerp_(g32, 1 - beta1)
            if low:
                mc.copy_(m32)
        sums.div_(p.numel() // p.shape[axis])
        v.lerp_(_to_blocks(sums, segments), 1 - beta2)
        coef = _to_neurons(_coefficients(v, float(step_t), lr=lr, beta1=beta1, beta2=beta2, eps=eps), segments)
        # pass 2, whole-tensor: two ops, each a single streaming pass (measured faster on CPU than a blocked
        # pass
        # that materialises the per-row coefficients)
        p32 = p2 if not low else p2.to(dtype)
        if weight_decay != 0:
            p32.mul_(1 - lr * weight_decay)
        p32.addcmul_(m2 if not low else m2.to(dtype), coef[:, None] if axis == 0 else coef[None, :], value=-1.0)
        if low:
            p2.copy_(p32)
    if rest:
        pick = lambda xs: [xs[i] for i in rest]  # noqa: E731
        _single_tensor_adam_mini(
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(state_steps),
            pick(partitions),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
        )


_IMPLEMENTATIONS = {"for_loop": _single_tensor_adam_mini, "blocked": _blocked_adam_mini}


def adam_mini(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    partitions: list[Partition],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    implementation: Implementation = "auto",
) -> str:
    """Functional Adam-mini step (see the module docstring); ``partitions[i]`` is ``params[i]``'s
    partition."""
    # measured: the whole-tensor path is as fast or faster on CPU (few ops per tensor), so "auto" takes it
    implementation = resolve_implementation(
        {"fused": "blocked"}.get(implementation, implementation),
        tuple(_IMPLEMENTATIONS),
        preference=AdamMini.auto_preference,
        owner="Adam-mini",
    )
    _IMPLEMENTATIONS[implementation](
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        partitions,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )
    return implementation


class AdamMini(LmoptOptimizer):
    """Adam-mini: Adam's update with one second-moment value per block (per head, neuron, token or tensor).

    Args:
        params: parameters or param groups (``create_optimizer("adam_mini", model)`` passes both the groups
            and
            the model).
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)`` (default (0.9, 0.999); LLM pre-training uses (0.9, 0.95)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled decay, multiplied by lr (default 0.0).
        model: the model the parameters belong to, to find the paper's partition (query/key per head,
            embeddings
            and output head per token, other matrices per output neuron). Without it: per output neuron for
            tensors with >= 2 dims, one block for smaller ones.
        n_heads: attention heads (default: from ``model.config`` or the attention modules).
        n_kv_heads: key/value heads for grouped-query attention (default: from the config, else ``n_heads``).
        implementation: ``"auto"`` (default), ``"for_loop"`` or ``"blocked"`` (old name ``"fused"``).
        nonfinite: ``"raise"`` (default) or ``"skip"``; see :class:`lmopt.optim.base.LmoptOptimizer`.

    State: ``step``, ``exp_avg`` (parameter shape), ``exp_avg_sq`` (one value per block).

    Example:
        >>> model = transformers.LlamaForCausalLM(config)
        >>> groups = lmopt.param_groups(model, weight_decay=0.1)
        >>> opt = AdamMini(groups, lr=3e-4, betas=(0.9, 0.95), model=model)
        >>> print(opt.partition_summary())

    Reference: Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", ICLR 2025 (arXiv:2406.16793).
    """

    implementations = ("for_loop", "blocked")
    implementation_aliases = {"fused": "blocked"}  # the name before lmopt's one vocabulary
    auto_preference = ("for_loop",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        implementation: Implementation = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        for name, value in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self._found: dict[int, tuple[str, Partition]] = {}
        if model is not None:
            params_by_name = dict(model.named_parameters())
            for name, part in find_partitions(model, n_heads=n_heads, n_kv_heads=n_kv_heads).items():
                self._found[id(params_by_name[name])] = (name, part)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, implementation=implementation)
        super().__init__(params, defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if "partitions" not in group:
            found = getattr(self, "_found", {})
            group["partitions"] = [
                found[id(p)][1] if id(p) in found else default_partition(tuple(p.shape)) for p in group["params"]
            ]
        if len(group["partitions"]) != len(group["params"]):
            raise ValueError("partitions must hold one partition per parameter of the group")
        for p, (axis, segments) in zip(group["params"], group["partitions"], strict=False):
            if axis is not None and sum(c * s for c, s in segments) != p.shape[axis]:
                raise ValueError(
                    f"partition {(axis, segments)} does not cover dim {axis} of a tensor of shape {tuple(p.shape)}"
                )

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        index = next(i for i, q in enumerate(group["params"]) if q is param)
        partition = group["partitions"][index]
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = param.new_zeros((block_count(partition),), dtype=math_dtype(param.dtype))

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        ids = {id(p): i for i, p in enumerate(group["params"])}
        partitions = [tuple(group["partitions"][ids[id(p)]]) for p in params]
        partitions = [(axis, tuple(tuple(s) for s in segments)) for axis, segments in partitions]
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        self._implementation_used[id(group)] = adam_mini(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            partitions,
            lr=traced_lr(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            implementation=group["implementation"],
        )

    def partition_summary(self) -> str:
        """Per parameter: its name (when known), shape and blocks, e.g.
        ``model.layers.0.self_attn.q_proj.weight
        (64, 64): 4 blocks (per head)``."""
        lines = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, (p, part) in enumerate(zip(group["params"], group["partitions"], strict=False)):
                name = names[i] if names else self._found.get(id(p), (f"param_groups[{gi}][{i}]",))[0]
                lines.append(f"{name} {tuple(p.shape)}: {block_count(part)} blocks ({_describe(part)})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (nonfinite={self.nonfinite!r}, skipped_steps={self.skipped_steps})"]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            keys = {k: v for k, v in group.items() if k not in ("params", "param_names", "partitions")}
            kinds = Counter(_describe(part) for part in group["partitions"])
            used = self._implementation_used.get(id(group))
            ran = f", last step ran {used!r}" if used else ""
            lines.append(f"  group {i}: {len(group['params'])} tensors, {n:,} parameters{ran}, {keys}")
            lines.append("    partitions: " + ", ".join(f"{k}: {c}" for k, c in kinds.items()))
        return "\n".join(lines)


def _describe(partition: Partition) -> str:
    axis, segments = partition
    if axis is None:
        return "whole tensor"
    if all(size == 1 for _c, size in segments):
        return f"per output neuron, dim {axis}"
    return "per head (query/key) and per neuron"


# ------------------------------------------------------------------------------------------------------------
# registry entries
def adam_mini_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """Exact state; ``blocks=`` (hyperparameter-like key) gives a tensor's block count when it is not the
    per-output-neuron default (query/key projections: one per head)."""
    blocks = hyper.get("blocks") or block_count(default_partition(shape))
    return [
        StateTensor("step", (), torch.float32),
        StateTensor("exp_avg", shape, dtype),
        StateTensor("exp_avg_sq", (int(blocks),), math_dtype(dtype)),
    ]


def planned_blocks(param: Any, architecture: Any) -> Mapping[str, Any]:
    """The planner's view of Adam-mini's partition (the spec's ``structure_state``): one second moment per head
    for query and key projections, per output neuron elsewhere (transformers' GPT-2 Conv1D stores weights
    (in, out); its fused QKV has per-head Q and K and per-neuron V), per token for embeddings. Returned as
    ``blocks`` for :func:`adam_mini_state`; ``param`` has ``shape``, ``role`` and ``module``, ``architecture``
    ``family``, ``num_heads`` and ``num_kv_heads`` (None: structure unknown)."""
    if architecture is None or len(param.shape) != 2 or param.role not in ("matrix", "head"):
        return {}
    module = param.module
    if architecture.family == "gpt2":
        if module == "c_attn":
            return {"blocks": 2 * architecture.num_heads + param.shape[1] // 3}
        return {"blocks": param.shape[1]}
    if module in ("q_proj", "q"):
        return {"blocks": architecture.num_heads}
    if module in ("k_proj", "k"):
        return {"blocks": architecture.num_kv_heads}
    return {}


SPECS = [
    OptimizerSpec(
        name="adam_mini",
        cls=AdamMini,
        summary="Adam with one second-moment value per head / neuron / token block: half of AdamW's state",
        paper="Zhang et al., Adam-mini: Use Fewer Learning Rates To Gain More, ICLR 2025",
        state=adam_mini_state,
        family="adam",
        accepts_model=True,
        aliases={"adam_mini_torch": {}, "adammini": {}},
        structure_state=planned_blocks,
        translation=SAME_AS_ADAMW,  # Zhang et al. 2024: the same hyperparameters as AdamW
        # lmopt tune's full grid on this workload (docs/compare.md, "What tuning says about the recipes")
        compare={"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.1},
        compare_default=6,
        recommend_tier=2,
        recommend_reason="Adam-mini: 1/2 of the state (Zhang et al. 2024)",
    ),
]
