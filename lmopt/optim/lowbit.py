"""AdamW / Adam / Lion with 8-bit and 4-bit blockwise-quantized state, and bf16 parameters without a master copy.

Update rules (the math of :mod:`lmopt.optim.adamw` and of Lion), with the moments stored quantized between
steps: each step dequantizes them, updates them in fp32, updates the parameter from the *unquantized* new
moments, and quantizes them back (Dettmers et al. 2022):

.. code-block:: text

    AdamW8bit / AdamW4bit (decoupled decay), Adam8bit (coupled L2: g <- g + weight_decay * p):
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr * weight_decay * p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    Lion8bit (Chen et al. 2023):
        p <- p - lr * weight_decay * p - lr * sign(beta1 * m + (1 - beta1) * g)
        m <- beta2 * m + (1 - beta2) * g

State per parameter (see :mod:`lmopt.quant.moments`): ``step`` (fp32 scalar); each moment as
``<name>_codes`` (uint8: parameter-shaped for 8 bits, flat ``ceil(n / 2)`` for 4 bits) and ``<name>_scales``
(fp32, one absmax per block); tensors with fewer than ``min_quantized_numel`` elements (default 4096) keep fp32
moments under the plain names (``exp_avg``, ``exp_avg_sq``); ``kahan_comp`` (parameter dtype) for bf16/fp16
parameters with ``param_rounding="kahan"``. Maps: 8-bit = signed / unsigned dynamic exponent (blocks of 256);
4-bit = signed 4-bit dynamic exponent for ``m`` and zero-point-free linear for ``v`` (Li et al. 2023; blocks
of 128). ``optimizer.state_summary()`` (also in ``repr``) says which tensors are quantized.

Implementations: ``fused`` -- the C kernel of :mod:`lmopt.kernels.lowbit` (one pass over memory, AVX2,
threads), used for contiguous fp32/bf16 CPU tensors; ``for_loop`` -- the PyTorch reference path (any device,
dtype); ``auto`` (default) picks ``fused`` where it applies and the kernel built, else ``for_loop``.
The two compute the same bits (tested).

DTensor (FSDP2) parameters: the state is quantized per local shard (blocks never straddle a shard boundary)
and kept as DTensors on the parameter's mesh (:mod:`lmopt.quant.sharded`: codes and scales as 1-D ``Shard(0)``
DTensors of equal per-shard slots, ``<name>_shards`` = the number of shards). A step works on local tensors
(``param.to_local()``, ``grad.to_local()``, the state's local pieces) with no communication, through the kernel
or the PyTorch path; empty local shards are skipped. Where shard boundaries are not multiples of
``block_size``, the blocks differ from the unsharded tensor's, so a sharded run is not bit-identical to an
unsharded one (it is where they are). Stochastic rounding hashes the *global* element index, so it draws the
same bits sharded or not; the kernel has no shard offset, so bf16 shards after the first with
``param_rounding="stochastic"`` take the PyTorch path (same bits). ``state_dict`` keeps the DTensors (it
round-trips through ``torch.save`` / ``torch.load(weights_only=True)``, ``torch.distributed.checkpoint`` and
``get_optimizer_state_dict``); ``load_state_dict`` requantizes state saved with another number of shards
(another world size, or unsharded <-> sharded) into the current blocks, with a warning. Placements other than
``Shard(0)`` / ``Replicate()`` cannot hold quantized state and raise :class:`NotImplementedError`.

bf16 parameters without an fp32 master copy: ``param_rounding="stochastic"`` or ``"kahan"`` (see
:mod:`lmopt.quant.rounding`); ``"nearest"`` (default) is plain rounding, which stalls once updates fall
under half a bf16 ulp.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..kernels import lowbit as kernel_module
from ..kernels import lowbit_triton as triton_module
from ..quant.maps import code_map
from ..quant.moments import (
    MomentFormat,
    check_block_size_option,
    check_min_quantized_numel,
    codes_shape,
    init_moment,
    is_quantized_entry,
    load_moment,
    local_nbytes,
    moment_state,
    store_moment,
)
from ..quant.rounding import PARAM_ROUNDINGS, apply_update_, stochastic_key
from ..quant.sharded import ShardLayout, local_state, reshard_quantized, to_layout_of
from ..registry import OptimizerSpec, StateTensor
from .base import LmoptOptimizer, check_betas, check_choice, check_nonnegative, check_positive, is_dtensor

__all__ = ["Adam8bit", "AdamW4bit", "AdamW8bit", "Lion8bit", "LowBitOptimizer"]

_ROUNDING_CODE = {"nearest": 0, "stochastic": 1, "kahan": 2}


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root. torch's vectorized fp32 sqrt on CPU is not (it differs from IEEE sqrt
    in the last bit for ~17% of inputs); the fp64 square root rounded to fp32 is, and matches the kernel."""
    return x.sqrt() if x.dtype == torch.float64 else x.double().sqrt_().to(x.dtype)


def _qmap_struct(name: str) -> kernel_module.QmapStruct:
    cm = code_map(name)
    return kernel_module.QmapStruct(
        cm.lut.data_ptr(),
        cm.midpoints.data_ptr(),
        cm.values.data_ptr(),
        23 - cm.lut_mantissa_bits,
        (127 - cm.lut_exponents) << cm.lut_mantissa_bits,
        cm.lut_buckets,
        cm.bits,
    )


class LowBitOptimizer(LmoptOptimizer):
    """Shared machinery of the low-bit optimizers: moment formats, the kernel / reference dispatch, summaries.

    Subclasses set ``precision`` ("8bit" / "4bit"), ``moments`` (state names and kinds) and ``algorithm``
    ("adam" / "lion"), and ``_decoupled``.
    """

    implementations = ("for_loop", "fused")
    precision = "8bit"
    algorithm = "adam"
    moments: tuple[tuple[str, str], ...] = (("exp_avg", "first"), ("exp_avg_sq", "second"))
    _decoupled = True

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_positive("lr", group["lr"])
        check_betas("betas", group["betas"])
        if "eps" in group:
            check_positive("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_choice("maximize", group["maximize"], (True, False))
        check_block_size_option(group["block_size"])
        check_min_quantized_numel(group["min_quantized_numel"])
        check_choice("param_rounding", group["param_rounding"], PARAM_ROUNDINGS)
        check_choice("implementation", group["implementation"], ("auto", *self.implementations))

    def _format(self, group: dict[str, Any], kind: str) -> MomentFormat:
        return MomentFormat(self.precision, kind, group["block_size"], group["min_quantized_numel"])  # type: ignore[arg-type]

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        if is_dtensor(param) and any(self._format(group, kind).quantizes(param.numel()) for _, kind in self.moments):
            reason = ShardLayout.unsupported_reason(param)
            if reason is not None:
                raise NotImplementedError(
                    f"{type(self).__name__} cannot quantize the state of a DTensor parameter of shape "
                    f"{tuple(param.shape)}: {reason}. Shard it on dim 0 (fully_shard's default), or keep its "
                    f"state in fp32 with min_quantized_numel > {param.numel()} (a param group of its own)"
                )
        if group["param_rounding"] == "stochastic" and param.dtype == torch.float16:
            raise ValueError("param_rounding='stochastic' supports bf16 parameters, not float16; use 'kahan'")
        # the step counter lives on the CPU (as in torch.optim's non-capturable optimizers): reading it for the
        # bias corrections and the stochastic-rounding key then never waits for the GPU
        state["step"] = torch.zeros((), dtype=torch.float32)
        for name, kind in self.moments:
            init_moment(state, name, param, self._format(group, kind))
        if group["param_rounding"] == "kahan" and param.dtype in (torch.bfloat16, torch.float16):
            state["kahan_comp"] = torch.zeros_like(param, memory_format=torch.contiguous_format)

    # -- dispatch ------------------------------------------------------------------------------------------------
    def _kernel_applies(self, p: Tensor, g: Tensor, state: dict[str, Any], device_type: str) -> bool:
        """Whether a kernel (C on ``"cpu"``, Triton on ``"cuda"``) can update ``p``: quantized state, a plain
        fp32/bf16 tensor on that device, contiguous tensors (on CUDA also 16-byte aligned, which the Triton
        kernel assumes for the addresses it reads from its table)."""
        if (
            f"{self.moments[0][0]}_codes" not in state
            or p.device.type != device_type
            or is_dtensor(p)
            or p.dtype not in (torch.float32, torch.bfloat16)
            or g.dtype not in (torch.float32, torch.bfloat16)
        ):
            return False
        tensors = [p, g, *(v for k, v in state.items() if is_quantized_entry(k) or k == "kahan_comp")]
        aligned = device_type != "cuda" or all(t.data_ptr() % 16 == 0 for t in tensors)
        return aligned and all(t.is_contiguous() for t in tensors)

    def _plain_batch_applies(self, p: Tensor, g: Tensor, state: dict[str, Any]) -> bool:
        # fp32 CUDA parameters whose moments stayed fp32 (below min_quantized_numel): on a GPU, per-tensor
        # PyTorch ops for dozens of small tensors cost more launch time than the whole quantized step
        return (
            p.is_cuda
            and not is_dtensor(p)
            and p.dtype == torch.float32
            and g.dtype == torch.float32
            and all(state.get(name) is not None and state[name].dtype == torch.float32 for name, _ in self.moments)
        )

    def _plain_batch_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        """The reference update of full-precision fp32 moments on CUDA, batched with foreach kernels: the same
        operations in the same order as :meth:`_reference_step` (CUDA's fp32 square root is IEEE, like the
        reference's fp64 one rounded to fp32), so the results are the same bits."""
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        gs = torch._foreach_neg(grads) if group["maximize"] else grads
        ms = [s[self.moments[0][0]] for s in states]
        if self.algorithm == "adam":
            vs = [s[self.moments[-1][0]] for s in states]
            if not self._decoupled and wd != 0:
                gs = torch._foreach_add(gs, torch._foreach_mul(params, wd))
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, torch._foreach_mul(gs, 1 - beta1))
            torch._foreach_mul_(vs, beta2)
            torch._foreach_add_(vs, torch._foreach_mul(torch._foreach_mul(gs, gs), 1 - beta2))
            scalars = [self._scalars(group, float(s["step"])) for s in states]  # CPU counters: no GPU sync
            denom = torch._foreach_sqrt(vs)
            torch._foreach_mul_(denom, [inv_bc2 for _, inv_bc2 in scalars])
            torch._foreach_add_(denom, float(group["eps"]))
            delta = torch._foreach_div(ms, denom)
            torch._foreach_mul_(delta, [step_size for step_size, _ in scalars])
            torch._foreach_neg_(delta)
            if self._decoupled and wd != 0:
                torch._foreach_sub_(delta, torch._foreach_mul(params, lr * wd))
        else:
            c = torch._foreach_mul(ms, beta1)
            torch._foreach_add_(c, torch._foreach_mul(gs, 1 - beta1))
            delta = torch._foreach_sign(c)
            torch._foreach_mul_(delta, lr)
            torch._foreach_neg_(delta)
            if wd != 0:
                torch._foreach_sub_(delta, torch._foreach_mul(params, lr * wd))
            torch._foreach_mul_(ms, beta2)
            torch._foreach_add_(ms, torch._foreach_mul(gs, 1 - beta2))
        torch._foreach_add_(params, delta)

    def _triton_step(self, group: dict[str, Any], items: list[tuple]) -> None:
        """One Triton launch for ``items`` (parameter, gradient, state, stochastic-rounding seed, shard offset):
        CUDA tensors of one device with one parameter dtype and one gradient dtype."""
        first = self._format(group, self.moments[0][1])
        second = self._format(group, self.moments[-1][1])
        beta1, beta2 = group["betas"]
        hyper = dict(
            beta1=beta1,
            beta2=beta2,
            eps=float(group.get("eps", 0.0)),
            weight_decay=float(group["weight_decay"]),
            lr=float(group["lr"]),
            decoupled=self._decoupled,
            maximize=group["maximize"],
            rounding=_ROUNDING_CODE[group["param_rounding"]],
        )
        m_name, v_name = self.moments[0][0], self.moments[-1][0]
        adam = self.algorithm == "adam"
        cuda_items = []
        for p, g, state, seed, offset in items:
            step = float(state["step"])  # a CPU counter: no GPU sync
            step_size, inv_bc2 = self._scalars(group, step) if adam else (0.0, 1.0)
            cuda_items.append(
                triton_module.CudaItem(
                    p,
                    g,
                    state[f"{m_name}_codes"],
                    state[f"{m_name}_scales"],
                    state[f"{v_name}_codes"] if adam else None,
                    state[f"{v_name}_scales"] if adam else None,
                    state.get("kahan_comp"),
                    step_size,
                    inv_bc2,
                    stochastic_key(seed, int(step)),
                    offset,
                )
            )
        triton_module.lowbit_step_cuda(
            cuda_items,
            m_map=first.qmap,
            v_map=second.qmap if adam else None,
            block=first.blocks,
            bits=8 if self.precision == "8bit" else 4,
            algorithm=self.algorithm,
            hyper=hyper,
        )

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        torch._foreach_add_([s["step"] for s in states], 1)
        all_seeds = self._param_seeds()
        seeds = [all_seeds.get(id(p), 0) for p in params]
        params, grads, states, offsets = self._local_views(group, params, grads, states)
        lib = kernel_module.load() if group["implementation"] in ("auto", "fused") else None
        fused: dict[tuple[bool, bool], list[int]] = defaultdict(list)
        use_triton = group["implementation"] in ("auto", "fused") and any(p.is_cuda for p in params)
        use_triton = use_triton and triton_module.available()
        launches: dict[tuple, list] = defaultdict(list)  # Triton: one launch per device and dtypes
        plain: list[int] = []  # full-precision (small) fp32 CUDA tensors: one batch of foreach kernels
        for i, (p, g, s) in enumerate(zip(params, grads, states)):
            if p.numel() == 0:  # also an empty local shard
                continue
            if use_triton and self._kernel_applies(p, g, s, "cuda"):
                launches[(p.device, p.dtype, g.dtype)].append((p, g, s, seeds[i], offsets[i]))
            elif use_triton and self._plain_batch_applies(p, g, s):
                plain.append(i)
            elif lib is not None and self._kernel_applies(p, g, s, "cpu"):
                fused[(p.dtype == torch.bfloat16, g.dtype == torch.bfloat16)].append(i)
            else:
                self._reference_step(group, p, g, s, seeds[i], offsets[i])
        if plain:
            self._plain_batch_step(
                group,
                [params[i] for i in plain],
                [grads[i] for i in plain],
                [states[i] for i in plain],
            )
        for items in launches.values():
            self._triton_step(group, items)
        self._implementation_used[id(group)] = "fused" if fused or launches else "for_loop"
        for (p_bf16, g_bf16), idx in fused.items():
            self._kernel_step(
                lib,
                group,
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [states[i] for i in idx],
                [seeds[i] for i in idx],
                [offsets[i] for i in idx],
                p_bf16,
                g_bf16,
            )

    def _local_views(self, group, params, grads, states):
        """DTensor parameters as plain local tensors: (params, grads, states, offsets), where each state is a
        view of the local pieces (:func:`lmopt.quant.sharded.local_state`) and the offset is the flat index of
        the shard's first element (for stochastic rounding). Plain parameters pass through."""
        formats = {name: self._format(group, kind) for name, kind in self.moments}
        out_p, out_g, out_s, offsets = [], [], [], []
        for p, g, s in zip(params, grads, states):
            offset = 0
            layout = None
            if is_dtensor(p):
                try:
                    layout = ShardLayout.of(p)
                except NotImplementedError:
                    if any(is_dtensor(s.get(f"{name}_codes")) for name in formats):
                        raise
            if layout is not None:
                if not is_dtensor(g):
                    raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} has a plain-tensor gradient")
                if tuple(g.placements) != tuple(p.placements):
                    g = g.redistribute(p.device_mesh, p.placements)
                p, g, s, offset = p.to_local(), g.to_local(), local_state(s, layout, formats), layout.local_offset
            # else: a plain parameter, or a DTensor placed otherwise with full-precision state: DTensor math
            out_p.append(p)
            out_g.append(g)
            out_s.append(s)
            offsets.append(offset)
        return out_p, out_g, out_s, offsets

    def _param_seeds(self) -> dict[int, int]:
        # a parameter's stochastic-rounding seed is its position in the optimizer: stable across a resume
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _scalars(self, group: dict[str, Any], step: float) -> tuple[float, float]:
        """Per-tensor (lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)) for Adam; unused by Lion.

        The kernel multiplies by the inverse (torch's division by a Python scalar does too, but rounds the
        reciprocal its own way): both paths get this one fp32 number."""
        beta1, beta2 = group["betas"]
        return group["lr"] / (1 - beta1**step), 1.0 / math.sqrt(1 - beta2**step)

    def _kernel_step(self, lib, group, params, grads, states, seeds, offsets, p_bf16: bool, g_bf16: bool) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        first = self._format(group, self.moments[0][1])
        second = self._format(group, self.moments[-1][1])
        qm = _qmap_struct(first.qmap)
        cfg = kernel_module.ConfigStruct(
            algo=0 if self.algorithm == "adam" else 1,
            p_bf16=int(p_bf16),
            g_bf16=int(g_bf16),
            block=first.blocks,
            decoupled=int(self._decoupled),
            maximize=int(group["maximize"]),
            rounding=_ROUNDING_CODE[group["param_rounding"]],
            has_wd=int(wd != 0.0),
            beta1=beta1,
            beta2=beta2,
            omb1=1 - beta1,
            omb2=1 - beta2,
            eps=float(group.get("eps", 0.0)),
            wd=wd,
            lrwd=lr * wd,
            lr=lr,
            qm=qm,
            qv=_qmap_struct(second.qmap) if self.algorithm == "adam" else qm,
        )
        jobs = (kernel_module.JobStruct * len(params))()
        m_name = self.moments[0][0]
        v_name = self.moments[-1][0]
        for j, (p, g, s) in enumerate(zip(params, grads, states)):
            step = float(s["step"])
            job = jobs[j]
            job.p, job.g, job.n = p.data_ptr(), g.data_ptr(), p.numel()
            job.m_codes, job.m_scales = s[f"{m_name}_codes"].data_ptr(), s[f"{m_name}_scales"].data_ptr()
            if self.algorithm == "adam":
                job.v_codes, job.v_scales = s[f"{v_name}_codes"].data_ptr(), s[f"{v_name}_scales"].data_ptr()
                job.step_size, job.inv_bc2 = self._scalars(group, step)
            comp = s.get("kahan_comp")
            job.comp = comp.data_ptr() if comp is not None else None
            job.key = stochastic_key(seeds[j], int(step))
            job.offset = offsets[j] & 0xFFFFFFFF
        status = lib.lmopt_lowbit_step(ctypes.byref(cfg), jobs, len(params), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"lmopt low-bit kernel failed with status {status}")

    def _reference_step(self, group, p: Tensor, g: Tensor, state: dict[str, Any], seed: int, offset: int = 0) -> None:
        raise NotImplementedError

    # -- state dicts: quantized entries bypass torch's cast to the parameter dtype ---------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; quantized moments go back without torch's cast to the parameter dtype.

        Sharded state: DTensor entries stay DTensors. Quantized moments saved with another number of shards
        than the parameter now has (another world size, or unsharded <-> FSDP2) are requantized into the
        current per-shard blocks (a warning says so: one more rounding of those moments); full-precision
        entries are sliced or gathered to the parameter's form, so plain and DTensor state never mix.
        """
        super().load_state_dict(state_dict)  # codes and scales come back as saved (the base skips torch's cast)
        groups = {id(p): group for group in self.param_groups for p in group["params"]}
        requantized = []
        for p in (p for group in self.param_groups for p in group["params"] if p in self.state):
            state = self.state[p]
            for name, value in list(state.items()):  # full-precision entries: in the parameter's form
                if isinstance(value, Tensor) and not is_quantized_entry(name):
                    state[name] = to_layout_of(value, p)
            for name, kind in self.moments:
                if f"{name}_codes" not in state:
                    continue
                codes, scales = state[f"{name}_codes"], state[f"{name}_scales"]
                shards = int(state.get(f"{name}_shards", 1))
                if not is_dtensor(p):  # plain parameters keep no shard count
                    state.pop(f"{name}_shards", None)
                fmt = self._format(groups[id(p)], kind)
                shape = codes_shape(tuple(p.shape), fmt.bits)
                if not is_dtensor(p) and not is_dtensor(codes) and shards == 1 and tuple(codes.shape) == shape:
                    continue  # saved as the parameter now needs it
                if is_dtensor(p) and ShardLayout.unsupported_reason(p) is not None:
                    raise NotImplementedError(
                        f"{type(self).__name__}: cannot load quantized state into a DTensor parameter of shape "
                        f"{tuple(p.shape)}: {ShardLayout.unsupported_reason(p)}"
                    )
                layout = ShardLayout.of(p)
                codes, scales, requant = reshard_quantized(codes, scales, shards, layout, fmt.qmap, fmt.blocks)
                if not is_dtensor(p):
                    codes = codes.view(shape)
                state[f"{name}_codes"], state[f"{name}_scales"] = codes, scales
                if is_dtensor(p):
                    state[f"{name}_shards"] = layout.shards
                if requant:
                    requantized.append(f"{tuple(p.shape)} {name} ({shards} -> {layout.shards} shards)")
        if requantized:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: requantized {len(requantized)} moment(s) saved with "
                f"another sharding into the current blocks ({', '.join(requantized[:4])}"
                f"{', ...' if len(requantized) > 4 else ''}): one more rounding of those moments; see "
                "docs/low-bit-state.md",
                stacklevel=2,
            )

    # -- what happened, visibly --------------------------------------------------------------------------------
    def state_summary(self) -> str:
        """One line: how many tensors keep quantized state, how many full precision (small), bytes, kernel."""
        quantized = full = qbytes = fbytes = 0
        for s in self.state.values():
            nbytes = sum(local_nbytes(t) for k, t in s.items() if isinstance(t, Tensor) and k != "step")
            if f"{self.moments[0][0]}_codes" in s:
                quantized, qbytes = quantized + 1, qbytes + nbytes
            elif s:
                full, fbytes = full + 1, fbytes + nbytes
        thresholds = sorted({g["min_quantized_numel"] for g in self.param_groups})
        blocks = sorted({self._format(g, "first").blocks for g in self.param_groups})
        on_cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        if all(g["implementation"] == "for_loop" for g in self.param_groups):
            kernel = "reference path (for_loop)"
        elif on_cuda:
            kernel = "Triton kernels (CUDA)" if triton_module.available() else "CUDA without Triton: reference path"
        else:
            kernel = kernel_module.kernel_status()
        return (
            f"{quantized} tensors with {self.precision} state ({qbytes:,} B, blocks of "
            f"{'/'.join(map(str, blocks))}), {full} small tensors (< {'/'.join(map(str, thresholds))} "
            f"elements) with fp32 state ({fbytes:,} B); {kernel}"
        )

    def __repr__(self) -> str:
        return f"{super().__repr__()}\n  state: {self.state_summary()}"


class AdamW8bit(LowBitOptimizer):
    """AdamW with 8-bit blockwise-quantized moments (Dettmers et al. 2022): ~2 bytes of state per parameter.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)`` (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled decay coefficient, multiplied by lr (default 0.01).
        maximize: ascend instead of descend.
        block_size: elements per absmax block (default None: 256 for 8-bit, 128 for 4-bit).
        min_quantized_numel: tensors with fewer elements keep fp32 moments (default 4096).
        param_rounding: how bf16 parameters take the update: ``"nearest"`` (default), ``"stochastic"`` or
            ``"kahan"`` (no effect on fp32 parameters).
        implementation: ``"auto"`` (default), ``"fused"`` (the C kernel on CPU, the Triton kernel on CUDA) or
            ``"for_loop"`` (PyTorch).
        nonfinite, check_finite: see :class:`lmopt.optim.base.LmoptOptimizer`.

    Example:
        >>> opt = lmopt.AdamW8bit(lmopt.param_groups(model, weight_decay=0.1), lr=3e-4, betas=(0.9, 0.95))
        >>> print(opt.state_summary())    # after the first step: which tensors are quantized

    Reference: Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
    ICLR 2022.
    """

    precision = "8bit"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        param_rounding: str = "nearest",
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            block_size=block_size,
            min_quantized_numel=min_quantized_numel,
            param_rounding=param_rounding,
            implementation=implementation,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _reference_step(self, group, p: Tensor, g: Tensor, state: dict[str, Any], seed: int, offset: int = 0) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        step = float(state["step"])
        g32 = g.to(dtype)
        if group["maximize"]:
            g32 = -g32
        p32 = p if p.dtype == dtype else p.to(dtype)
        if not self._decoupled and wd != 0:
            g32 = g32 + p32 * wd
        fm, fv = self._format(group, "first"), self._format(group, "second")
        m = load_moment(state, "exp_avg", fm, p.shape, dtype)
        v = load_moment(state, "exp_avg_sq", fv, p.shape, dtype)
        m.mul_(beta1).add_(g32 * (1 - beta1))
        v.mul_(beta2).add_((g32 * g32) * (1 - beta2))
        step_size, inv_bc2 = self._scalars(group, step)
        delta = (m / _sqrt(v).mul_(inv_bc2).add_(eps)).mul_(step_size).neg_()
        if self._decoupled and wd != 0:
            delta.sub_(p32 * (lr * wd))
        store_moment(state, "exp_avg", m, fm)
        store_moment(state, "exp_avg_sq", v, fv)
        apply_update_(
            p,
            p32,
            delta,
            group["param_rounding"],
            comp=state.get("kahan_comp"),
            key=stochastic_key(seed, int(step)),
            offset=offset,
        )


class Adam8bit(AdamW8bit):
    """Adam (coupled L2: ``g <- g + weight_decay * p``) with 8-bit moments; ``weight_decay`` defaults to 0.

    Same arguments and state as :class:`AdamW8bit`.

    Reference: Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022; Kingma & Ba 2015.
    """

    _decoupled = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        param_rounding: str = "nearest",
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            maximize=maximize,
            block_size=block_size,
            min_quantized_numel=min_quantized_numel,
            param_rounding=param_rounding,
            implementation=implementation,
            nonfinite=nonfinite,
            check_finite=check_finite,
        )


class AdamW4bit(AdamW8bit):
    """AdamW with 4-bit moments (Li et al. 2023): ~1 byte of state per parameter.

    First moment: signed 4-bit dynamic-exponent map; second moment: zero-point-free linear map
    (``(k + 1) / 16``), so no second moment rounds to zero; blocks of 128 by default. Same arguments and state
    names as :class:`AdamW8bit` (codes are flat, two per byte).

    Reference: Li, Chen & Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023.
    """

    precision = "4bit"


class Lion8bit(LowBitOptimizer):
    """Lion with an 8-bit blockwise-quantized momentum: ~1 byte of state per parameter.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-4; Lion wants 3-10x less than AdamW).
        betas: ``(beta1, beta2)``: interpolation for the update and momentum decay (default (0.9, 0.99)).
        weight_decay: decoupled decay, multiplied by lr (default 0.0; use 3-10x AdamW's).
        maximize, block_size, min_quantized_numel, param_rounding, implementation, nonfinite, check_finite:
            as for :class:`AdamW8bit`.

    Example:
        >>> opt = lmopt.Lion8bit(model.parameters(), lr=1e-4, weight_decay=1.0)

    Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023; state quantization
    after Dettmers et al. 2022.
    """

    precision = "8bit"
    algorithm = "lion"
    moments = (("exp_avg", "first"),)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        param_rounding: str = "nearest",
        implementation: str = "auto",
        nonfinite: str = "raise",
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            maximize=maximize,
            block_size=block_size,
            min_quantized_numel=min_quantized_numel,
            param_rounding=param_rounding,
            implementation=implementation,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, check_finite=check_finite)

    def _reference_step(self, group, p: Tensor, g: Tensor, state: dict[str, Any], seed: int, offset: int = 0) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        g32 = g.to(dtype)
        if group["maximize"]:
            g32 = -g32
        p32 = p if p.dtype == dtype else p.to(dtype)
        fm = self._format(group, "first")
        m = load_moment(state, "exp_avg", fm, p.shape, dtype)
        c = m * beta1 + g32 * (1 - beta1)
        delta = c.sign_().mul_(lr).neg_()
        if wd != 0:
            delta.sub_(p32 * (lr * wd))
        m.mul_(beta2).add_(g32 * (1 - beta2))
        store_moment(state, "exp_avg", m, fm)
        apply_update_(
            p,
            p32,
            delta,
            group["param_rounding"],
            comp=state.get("kahan_comp"),
            key=stochastic_key(seed, int(float(state["step"]))),
            offset=offset,
        )


# ---------------------------------------------------------------------------------------------------------------
# registry entries: exact state (codes + scales for tensors >= min_quantized_numel, fp32 moments below)
def _lowbit_state(precision: str, moments: tuple[tuple[str, str], ...]):
    def rule(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
        out = [StateTensor("step", (), torch.float32)]
        for name, kind in moments:
            fmt = MomentFormat(precision, kind, hyper.get("block_size"), hyper.get("min_quantized_numel", 4096))  # type: ignore[arg-type]
            out += moment_state(name, shape, dtype, fmt)
        if hyper.get("param_rounding") == "kahan" and dtype in (torch.bfloat16, torch.float16):
            out.append(StateTensor("kahan_comp", shape, dtype))
        return out

    return rule


_DETTMERS = "Dettmers, Lewis, Shleifer & Zettlemoyer, 8-bit Optimizers via Block-wise Quantization, ICLR 2022"
_ADAM_MOMENTS = (("exp_avg", "first"), ("exp_avg_sq", "second"))

SPECS = [
    OptimizerSpec(
        name="adamw8bit",
        cls=AdamW8bit,
        summary="AdamW with 8-bit blockwise-quantized moments (2 B/param); fused CPU kernel",
        paper=_DETTMERS,
        state=_lowbit_state("8bit", _ADAM_MOMENTS),
        family="adam",
        aliases={
            "adamw_bnb_8bit": {},
            "adamw_8bit": {},
            "adamw_torch_8bit": {},
            "paged_adamw_8bit": {},
            "adamw_8bit_sr": {"param_rounding": "stochastic"},
            "adamw_8bit_kahan": {"param_rounding": "kahan"},
        },
    ),
    OptimizerSpec(
        name="adam8bit",
        cls=Adam8bit,
        summary="Adam (coupled L2) with 8-bit blockwise-quantized moments",
        paper=_DETTMERS,
        state=_lowbit_state("8bit", _ADAM_MOMENTS),
        family="adam",
        aliases={"adam_8bit": {}, "adam_bnb_8bit": {}, "paged_adam_8bit": {}},
    ),
    OptimizerSpec(
        name="adamw4bit",
        cls=AdamW4bit,
        summary="AdamW with 4-bit moments (1 B/param): DE map for m, zero-free linear map for v",
        paper="Li, Chen & Zhu, Memory Efficient Optimizers with 4-bit States, NeurIPS 2023",
        state=_lowbit_state("4bit", _ADAM_MOMENTS),
        family="adam",
        aliases={"adamw_torch_4bit": {}, "adamw_4bit": {}},
    ),
    OptimizerSpec(
        name="lion8bit",
        cls=Lion8bit,
        summary="Lion with an 8-bit blockwise-quantized momentum (1 B/param)",
        paper="Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023; " + _DETTMERS,
        state=_lowbit_state("8bit", (("exp_avg", "first"),)),
        family="lion",
        aliases={"lion_8bit": {}, "paged_lion_8bit": {}},
    ),
]
