"""One state-precision axis for every optimizer that keeps moments: ``state_precision``.

An optimizer that keeps exponential moving averages (Adam's ``exp_avg`` / ``exp_avg_sq``, Lion's momentum,
CAME's and Adafactor's first moment, AdEMAMix's three moments) declares them once as ``moments`` --
``(state name, kind)`` pairs, kind ``"first"`` (signed) or ``"second"`` (non-negative) -- and takes

* ``state_precision=None`` (default): the parameter's dtype, what torch.optim does;
* ``"fp32"`` (fp64 for fp64 parameters) or ``"bf16"`` (half the memory; the math still runs in fp32);
* ``"8bit"`` / ``"4bit"``: blockwise-quantized (Dettmers et al. 2022; Li et al. 2023; see
  :mod:`lmopt.quant.moments`): ``<name>_codes`` (uint8) and ``<name>_scales`` (fp32, one per block), with
  ``block_size`` (default 256 / 128) and ``min_quantized_numel`` (default 4096: smaller tensors keep fp32
  moments under the plain names).

:class:`MomentPrecision` (a mixin for :class:`~lmopt.optim.base.LmoptOptimizer`) builds the state, the
registry's exact state rule and -- for quantized groups -- the step: each tensor's moments are dequantized, the
algorithm's one per-tensor rule (:meth:`MomentPrecision._update`, the same function the ``for_loop`` path runs at
every precision) updates them in fp32 and returns the parameter's update, the moments are quantized back and the
update is written with the group's ``param_rounding``. Where the algorithm has one (``kernel_algorithm``), the
``kernel`` implementation runs lmopt's C (CPU) or Triton (CUDA) kernel of the same rule instead, bit for bit
the same result (tested). The old per-optimizer names ``state_dtype`` (AdamW) and ``momentum_precision``
(CAME, Adafactor) remain as deprecated aliases.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..kernels import lowbit as cpu_kernel
from ..kernels import lowbit_triton as triton_kernel
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
from ..quant.rounding import apply_update_, stochastic_key
from ..quant.sharded import ShardLayout, is_dtensor, local_state, reshard_quantized, to_layout_of
from ..spec import STATE_PRECISIONS, StateTensor
from ._impl import scalar_sqrt, traced_step
from .base import check_choice

__all__ = [
    "MomentPrecision",
    "moment_format",
    "moments_state",
    "normalize_state_precision",
    "validate_state_precision",
]

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
#: ``param_rounding`` as the kernels number it
ROUNDING_CODES = {"nearest": 0, "stochastic": 1, "kahan": 2}
QUANTIZED = ("8bit", "4bit")


def normalize_state_precision(value: Any, name: str = "state_precision") -> str | None:
    """``None``, ``"fp32"``, ``"bf16"``, ``"8bit"`` or ``"4bit"`` (torch.float32 / torch.bfloat16 are named).

    Raises:
        ValueError: any other value, naming the argument and the allowed values.
    """
    if isinstance(value, torch.dtype):
        value = _DTYPE_NAMES.get(value, value)
    check_choice(name, value, (None, *STATE_PRECISIONS))
    return value


def warn_deprecated_precision(name: str, value: Any) -> None:
    """Warn once per call site that ``name`` (``state_dtype`` / ``momentum_precision``) is now
    ``state_precision``."""
    if value is not None:
        warnings.warn(
            f"{name}={value!r} is deprecated; use state_precision={normalize_state_precision(value, name)!r}",
            DeprecationWarning,
            stacklevel=3,
        )


def validate_state_precision(group: dict[str, Any], legacy: str | None = None) -> None:
    """Check and normalize a param group's ``state_precision``, ``block_size`` and ``min_quantized_numel``.

    ``legacy`` names the deprecated alias the class used to take (``"state_dtype"``, ``"momentum_precision"``):
    a value there becomes ``state_precision`` (conflicting values raise), and the alias key mirrors the result so
    code reading it keeps working. Groups restored from checkpoints written before an option get its default.
    """
    value = normalize_state_precision(group.get("state_precision"))
    if legacy is not None:
        old = normalize_state_precision(group.get(legacy), legacy)
        if old is not None and value is not None and old != value:
            raise ValueError(
                f"state_precision={value!r} and its deprecated alias {legacy}={old!r} disagree; pass only "
                "state_precision"
            )
        value = value if value is not None else old
        group[legacy] = value
    group["state_precision"] = value
    group.setdefault("block_size", None)
    group.setdefault("min_quantized_numel", 4096)
    check_block_size_option(group["block_size"])
    check_min_quantized_numel(group["min_quantized_numel"])
    for kind in ("first", "second"):  # builds the code maps now, eagerly (a traced step reads them as constants)
        moment_format(group, kind)


def moment_format(hyper: Mapping[str, Any], kind: str) -> MomentFormat | None:
    """The :class:`MomentFormat` of a ``kind`` moment under ``hyper`` (a param group or a spec's effective
    hyperparameters), or None for the parameter's dtype. Reads the deprecated aliases too."""
    precision = hyper.get("state_precision")
    for legacy in ("state_dtype", "momentum_precision"):
        if precision is None:
            precision = hyper.get(legacy)
    precision = normalize_state_precision(precision)
    if precision is None:
        return None
    return MomentFormat(precision, kind, hyper.get("block_size"), hyper.get("min_quantized_numel", 4096))  # type: ignore[arg-type]


def moments_state(
    moments: Iterable[tuple[str, str]], shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]
) -> list[StateTensor]:
    """The exact state entries of ``moments`` for one parameter (for a registry ``state`` rule)."""
    out: list[StateTensor] = []
    for name, kind in moments:
        fmt = moment_format(hyper, kind)
        out += [StateTensor(name, shape, dtype)] if fmt is None else moment_state(name, shape, dtype, fmt)
    return out


def kahan_state(shape: tuple[int, ...], dtype: torch.dtype, hyper: Mapping[str, Any]) -> list[StateTensor]:
    """``kahan_comp`` for bf16/fp16 parameters with ``param_rounding="kahan"`` (none otherwise)."""
    if hyper.get("param_rounding") == "kahan" and dtype in (torch.bfloat16, torch.float16):
        return [StateTensor("kahan_comp", shape, dtype)]
    return []


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root. torch's vectorized fp32 sqrt on CPU is not (it differs from IEEE sqrt
    in the last bit for ~17% of inputs); the fp64 square root rounded to fp32 is, and matches the kernels."""
    return x.sqrt() if x.dtype == torch.float64 else x.double().sqrt_().to(x.dtype)


class MomentPrecision:
    """Mixin for :class:`~lmopt.optim.base.LmoptOptimizer` subclasses whose moments follow ``state_precision``.

    Subclasses set ``moments`` and, where lmopt has a C/Triton kernel of their rule, ``kernel_algorithm``
    (``"adam"`` or ``"lion"``), and implement :meth:`_update` (the per-tensor rule) and, for kernels,
    :meth:`_kernel_hyper` / :meth:`_kernel_scalars`.
    """

    moments: tuple[tuple[str, str], ...] = ()
    kernel_algorithm: str | None = None

    # -- the algorithm's hooks -------------------------------------------------------------------------------
    def _moments(self, group: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """The moments a group keeps (AMSGrad adds its running maximum)."""
        return self.moments

    def _update(
        self, group: dict[str, Any], p32: Tensor, g32: Tensor, values: dict[str, Tensor], step: float
    ) -> Tensor:
        """Update the moments ``values`` (math dtype, in place) and return the parameter's update ``delta``."""
        raise NotImplementedError

    def _kernel_applies_to_group(self, group: dict[str, Any]) -> bool:
        return self.kernel_algorithm is not None

    def _kernel_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _kernel_scalars(self, group: dict[str, Any], step: float) -> tuple[float, float]:
        return 0.0, 1.0

    # -- state ------------------------------------------------------------------------------------------------
    def _format(self, group: dict[str, Any], kind: str) -> MomentFormat:
        return moment_format(group, kind) or MomentFormat("fp32", kind)  # type: ignore[arg-type]

    @staticmethod
    def _quantized_group(group: Mapping[str, Any]) -> bool:
        fmt = moment_format(group, "first")
        return fmt is not None and fmt.quantized

    def _init_moments(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        formats = [(name, moment_format(group, kind)) for name, kind in self._moments(group)]
        if is_dtensor(param) and any(f is not None and f.quantizes(param.numel()) for _, f in formats):
            reason = ShardLayout.unsupported_reason(param)
            if reason is not None:
                raise NotImplementedError(
                    f"{type(self).__name__} cannot quantize the state of a DTensor parameter of shape "
                    f"{tuple(param.shape)}: {reason}. Shard it on dim 0 (fully_shard's default), use "
                    f"state_precision='bf16' or 'fp32', or keep its state in fp32 with min_quantized_numel > "
                    f"{param.numel()} (a param group of its own)"
                )
        for name, fmt in formats:
            if fmt is None:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
            else:
                init_moment(state, name, param, fmt)

    def _init_rounding(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        rounding = group.get("param_rounding", "nearest")
        if rounding == "stochastic" and param.dtype == torch.float16:
            raise ValueError("param_rounding='stochastic' supports bf16 parameters, not float16; use 'kahan'")
        if rounding == "kahan" and param.dtype in (torch.bfloat16, torch.float16):
            state["kahan_comp"] = torch.zeros_like(param, memory_format=torch.contiguous_format)

    # -- the per-tensor path (for_loop): the one rule at every precision ----------------------------------------
    def _param_seeds(self) -> dict[int, int]:
        # a parameter's stochastic-rounding seed is its position in the optimizer: stable across a resume
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}  # type: ignore[attr-defined]

    def _reference_tensor(
        self, group: dict[str, Any], p: Tensor, g: Tensor, state: dict[str, Any], seed: int, offset: int = 0
    ) -> None:
        """One tensor: load its moments in the math dtype, apply :meth:`_update`, store them back, write the
        update with the group's rounding. The step counter (if any) was already advanced."""
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        step = traced_step(state["step"]) if "step" in state else 0.0
        g32 = g.to(dtype)
        if group.get("maximize", False):
            g32 = -g32
        p32 = p if p.dtype == dtype else p.to(dtype)
        formats = {name: self._format(group, kind) for name, kind in self._moments(group)}
        values = {name: load_moment(state, name, fmt, p.shape, dtype) for name, fmt in formats.items()}
        delta = self._update(group, p32, g32, values, step)
        for name, fmt in formats.items():
            store_moment(state, name, values[name], fmt)
        rounding = group.get("param_rounding", "nearest")
        apply_update_(
            p,
            p32,
            delta,
            rounding,
            comp=state.get("kahan_comp"),
            key=stochastic_key(seed, int(step)) if rounding == "stochastic" else 0,
            offset=offset,
        )

    def _step_per_tensor(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> str:
        states = [self.state[p] for p in params]  # type: ignore[attr-defined]
        _advance_steps(states)
        seeds = self._param_seeds()
        for p, g, s in zip(params, grads, states):
            self._reference_tensor(group, p, g, s, seeds.get(id(p), 0))
        return "for_loop"

    # -- quantized groups: kernel where it applies, the per-tensor rule elsewhere -------------------------------
    def _step_quantized(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], kernel: bool) -> str:
        """Step a group whose moments are quantized (or may be: small tensors keep fp32 moments). Returns the
        implementation that ran: ``"kernel"`` when any tensor took the C/Triton kernel, else ``"for_loop"``."""
        states = [self.state[p] for p in params]  # type: ignore[attr-defined]
        _advance_steps(states)
        all_seeds = self._param_seeds()
        seeds = [all_seeds.get(id(p), 0) for p in params]
        params, grads, states, offsets = self._local_views(group, params, grads, states)
        # a traced step (implementation="compiled", or torch.compile of the step) cannot call the C/Triton kernel
        kernel = kernel and not torch.compiler.is_compiling() and self._kernel_applies_to_group(group)
        lib = cpu_kernel.load() if kernel and any(p.device.type == "cpu" for p in params) else None
        use_triton = kernel and any(p.is_cuda for p in params) and triton_kernel.available()
        on_cpu: dict[tuple, list[int]] = defaultdict(list)
        launches: dict[tuple, list[int]] = defaultdict(list)  # Triton: one launch per device and dtypes
        for i, (p, g, s) in enumerate(zip(params, grads, states)):
            if p.numel() == 0:  # also an empty local shard
                continue
            if use_triton and self._kernel_applies(p, g, s, "cuda"):
                launches[(p.device, p.dtype, g.dtype)].append(i)
            elif lib is not None and self._kernel_applies(p, g, s, "cpu"):
                on_cpu[(p.dtype, g.dtype)].append(i)
            else:
                self._reference_tensor(group, p, g, s, seeds[i], offsets[i])
        hyper = self._kernel_hyper(group) if (launches or on_cpu) else {}
        first, second = self._format(group, self.moments[0][1]), self._format(group, self.moments[-1][1])
        maps = dict(m_map=first.qmap, v_map=second.qmap if self.kernel_algorithm == "adam" else None)
        for idx in launches.values():
            items = self._kernel_items(group, params, grads, states, seeds, offsets, idx)
            triton_kernel.lowbit_step_cuda(
                items, **maps, block=first.blocks, bits=first.bits, algorithm=self.kernel_algorithm, hyper=hyper
            )
        for idx in on_cpu.values():
            items = self._kernel_items(group, params, grads, states, seeds, offsets, idx)
            cpu_kernel.lowbit_step_cpu(
                lib, items, **maps, block=first.blocks, algorithm=self.kernel_algorithm, hyper=hyper
            )
        return "kernel" if on_cpu or launches else "for_loop"

    def _kernel_items(self, group, params, grads, states, seeds, offsets, idx) -> list[triton_kernel.CudaItem]:
        m_name, v_name = self.moments[0][0], self.moments[-1][0]
        adam = self.kernel_algorithm == "adam"
        items = []
        for i in idx:
            s = states[i]
            step = float(s["step"])  # a CPU counter: no GPU sync
            step_size, inv_bc2 = self._kernel_scalars(group, step)
            items.append(
                triton_kernel.CudaItem(
                    params[i],
                    grads[i],
                    s[f"{m_name}_codes"],
                    s[f"{m_name}_scales"],
                    s[f"{v_name}_codes"] if adam else None,
                    s[f"{v_name}_scales"] if adam else None,
                    s.get("kahan_comp"),
                    step_size,
                    inv_bc2,
                    stochastic_key(seeds[i], int(step)),
                    offsets[i],
                )
            )
        return items

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

    def _local_views(self, group, params, grads, states):
        """DTensor parameters as plain local tensors: (params, grads, states, offsets), where each state is a
        view of the local pieces (:func:`lmopt.quant.sharded.local_state`) and the offset is the flat index of
        the shard's first element (for stochastic rounding). Plain parameters pass through."""
        formats = {name: self._format(group, kind) for name, kind in self._moments(group)}
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

    # -- state dicts: quantized entries resharded to the current layout -----------------------------------------
    def _after_load_state_dict(self) -> None:
        super()._after_load_state_dict()  # type: ignore[misc]
        self._reshard_loaded_state()

    def _reshard_loaded_state(self) -> None:
        """After loading: quantized moments saved with another sharding are requantized into the current blocks
        (:func:`reshard_loaded_state`)."""
        reshard_loaded_state(
            self, lambda group: [(name, self._format(group, kind)) for name, kind in self._moments(group)]
        )

    # -- what happened, visibly ---------------------------------------------------------------------------------
    def state_summary(self) -> str:
        """One line: how many tensors keep quantized state, how many full precision (small), bytes, kernel."""
        quantized = full = qbytes = fbytes = 0
        for s in self.state.values():  # type: ignore[attr-defined]
            nbytes = sum(local_nbytes(t) for k, t in s.items() if isinstance(t, Tensor) and k != "step")
            if f"{self.moments[0][0]}_codes" in s:
                quantized, qbytes = quantized + 1, qbytes + nbytes
            elif s:
                full, fbytes = full + 1, fbytes + nbytes
        groups = self.param_groups  # type: ignore[attr-defined]
        precisions = sorted({str(g.get("state_precision")) for g in groups})
        thresholds = sorted({g.get("min_quantized_numel", 4096) for g in groups})
        blocks = sorted({self._format(g, "first").blocks for g in groups if self._quantized_group(g)})
        on_cuda = any(p.is_cuda for g in groups for p in g["params"])
        if self.kernel_algorithm is None or all(g.get("implementation") == "for_loop" for g in groups):
            kernel = "reference path (for_loop)"
        elif on_cuda:
            kernel = "Triton kernels (CUDA)" if triton_kernel.available() else "CUDA without Triton: reference path"
        else:
            kernel = cpu_kernel.kernel_status()
        return (
            f"{quantized} tensors with {'/'.join(precisions)} state ({qbytes:,} B, blocks of "
            f"{'/'.join(map(str, blocks)) or '-'}), {full} small tensors (< {'/'.join(map(str, thresholds))} "
            f"elements) with fp32 state ({fbytes:,} B); {kernel}"
        )


def _advance_steps(states: list[dict[str, Any]]) -> None:
    steps = [s["step"] for s in states if "step" in s]
    if steps:
        torch._foreach_add_(steps, 1)


def adam_scalars(lr: Any, beta1: float, beta2: float, step: Any) -> tuple[Any, Any]:
    """Per-tensor (lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)) of Adam's bias corrections. The kernels multiply
    by the inverse (torch's division by a Python scalar does too, but rounds the reciprocal its own way): every
    path gets this one number."""
    return lr / (1 - beta1**step), 1.0 / scalar_sqrt(1 - beta2**step)


def reshard_loaded_state(
    optimizer: Any, formats_of: Callable[[dict[str, Any]], Iterable[tuple[str, MomentFormat | None]]]
) -> None:
    """After ``load_state_dict``: quantized moments saved with another number of shards than the parameter now has
    (another world size, or unsharded <-> FSDP2) are requantized into the current per-shard blocks (with a
    warning: one more rounding of those moments); full-precision entries are sliced or gathered to the
    parameter's form, so plain and DTensor state never mix.

    ``formats_of(group)`` names each moment of the group's parameters with its format (None or an unquantized
    format: nothing to re-block). Shared by the low-bit Adam family and the quantized first moment of CAME /
    Adafactor.
    """
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    requantized = []
    for p in (p for group in optimizer.param_groups for p in group["params"] if p in optimizer.state):
        state = optimizer.state[p]
        for name, value in list(state.items()):  # full-precision entries: in the parameter's form
            if isinstance(value, Tensor) and not is_quantized_entry(name):
                state[name] = to_layout_of(value, p)
        for name, fmt in formats_of(groups[id(p)]):
            if f"{name}_codes" not in state or fmt is None or not fmt.quantized:
                continue
            codes, scales = state[f"{name}_codes"], state[f"{name}_scales"]
            shards = int(state.get(f"{name}_shards", 1))
            if not is_dtensor(p):  # plain parameters keep no shard count
                state.pop(f"{name}_shards", None)
            shape = codes_shape(tuple(p.shape), fmt.bits)
            if not is_dtensor(p) and not is_dtensor(codes) and shards == 1 and tuple(codes.shape) == shape:
                continue  # saved as the parameter now needs it
            if is_dtensor(p) and ShardLayout.unsupported_reason(p) is not None:
                raise NotImplementedError(
                    f"{type(optimizer).__name__}: cannot load quantized state into a DTensor parameter of shape "
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
            f"{type(optimizer).__name__}.load_state_dict: requantized {len(requantized)} moment(s) saved with "
            f"another sharding into the current blocks ({', '.join(requantized[:4])}"
            f"{', ...' if len(requantized) > 4 else ''}): one more rounding of those moments; see "
            "docs/low-bit-state.md",
            stacklevel=4,
        )
