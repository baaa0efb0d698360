"""The training-memory planner: bytes per device for parameters, master weights, gradients, optimizer state,
activations and the step's temporaries, for any registry optimizer.

Optimizer state is never looked up in a bytes-per-parameter table: for every trainable tensor (or its shard),
the planner asks the optimizer's registry entry (:meth:`lmopt.OptimizerSpec.state_tensors` rule) which tensors
it keeps for that shape, dtype and hyperparameters, and adds their bytes. Factored statistics, quantized codes
with their block scales and full-precision state kept for small tensors are therefore counted exactly, for
optimizers registered later too (a test checks the plan against the bytes the real optimizer allocates).

Precision modes (``precision=``), bytes per trainable parameter before optimizer state:

================  ========  ========  ========  =========================================================
mode              weights   master    grads     what it is
================  ========  ========  ========  =========================================================
``fp32``          4         --        4         everything fp32
``amp-bf16``      4         --        4         fp32 weights, torch.autocast bf16 compute (``amp-fp16``):
                                                autocast caches 16-bit weight copies during forward/backward
``mixed-bf16``    2         4         2         16-bit weights and gradients, fp32 master weights stepped by
                                                the optimizer (``mixed-fp16``; ``mixed`` = bf16). The
                                                published "16 bytes per parameter with Adam" accounting
                                                (Rajbhandari et al. 2020, ZeRO) is ``mixed`` + AdamW
``bf16``          2         --        2         pure bf16, no master copy (plain rounding); state follows the
                                                bf16 parameters unless the optimizer sets its state dtype
``bf16-sr``       2         --        2         pure bf16 with stochastic rounding of the update (no extra
                                                memory; Kahan summation, where an optimizer offers it, is
                                                counted by its state rule)
``bf16-master``   2         4         2         pure bf16 compute with an fp32 master copy in the optimizer
                                                (same bytes as ``mixed-bf16``)
``fp16``          2         --        2         pure fp16, no master
================  ========  ========  ========  =========================================================

Data parallelism (``devices=N``, ``sharding=``): ``zero1`` shards master weights and optimizer state,
``zero2`` also gradients, ``zero3``/``fsdp`` also parameters (Rajbhandari et al. 2020). Sharding is planned
as FSDP2 does it, per tensor along dimension 0 (device 0 holds ``ceil(d0 / N)`` rows), and the optimizer's
state rule is applied to the local shard's shape -- the bytes that device's optimizer allocates. Gradient
reduce-scatter buckets and ZeRO-3's gathered layers (current + prefetched) are counted as temporaries.
``offload="lmopt"`` counts what :func:`lmopt.offload` allocates: on the device the parameters and, with ``overlap``
(``offload_overlap``), only the gradients autograd is producing (one block's, or the largest tensor's, plus a tied
head's until the embedding's half is added); on the host a copy of every parameter in its dtype, a gradient buffer
per trainable parameter, the optimizer state and the step's buffers; over PCIe each gradient per micro-batch and
each parameter per step. ``mapped_state=True`` moves the state tensors :func:`lmopt.map_state` maps (>= 4096
elements) to ``file_backed``. ``offload="optimizer"`` models DeepSpeed's ZeRO-Offload: master weights, optimizer
state, fp32 gradients and the step on the host (Ren et al. 2021); ``"optimizer+params"`` also the parameters
(ZeRO-Infinity).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..optim.mapped import DEFAULT_MIN_NUMEL
from ..registry import OptimizerSpec, list_optimizers, resolve_name
from ..spec import IMPLEMENTATIONS
from .activations import ACTIVATION_MODELS, CHECKPOINTING, ActivationEstimate, estimate_activations
from .shapes import ModelShape, ParamShape, model_shape
from .units import format_bytes, parse_bytes

__all__ = [
    "PER_TENSOR_STATE_KEYS",
    "PRECISIONS",
    "SHARDING",
    "MemoryPlan",
    "Precision",
    "plan",
    "resolve_optimizer",
]


@dataclass(frozen=True)
class Precision:
    """A precision mode: dtypes of weights, gradients, the optimizer's copy and activations."""

    name: str
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    master: bool
    activation_bytes: int
    autocast: bool = False
    description: str = ""

    @property
    def optimizer_dtype(self) -> torch.dtype:
        """dtype of the tensors the optimizer steps (the master copy when there is one)."""
        return torch.float32 if self.master else self.param_dtype


# name, dtype of the weights and gradients, fp32 master weights, activation bytes per element, autocast, description
_MODES: tuple[tuple[str, torch.dtype, bool, int, bool, str], ...] = (
    ("fp32", torch.float32, False, 4, False, "fp32 weights, gradients, compute"),
    ("amp-bf16", torch.float32, False, 2, True, "fp32 weights, torch.autocast bf16 compute"),
    ("amp-fp16", torch.float32, False, 2, True, "fp32 weights, torch.autocast fp16 compute (with a GradScaler)"),
    ("mixed-bf16", torch.bfloat16, True, 2, False, "bf16 weights and gradients, fp32 master weights"),
    ("mixed-fp16", torch.float16, True, 2, False, "fp16 weights and gradients, fp32 master weights (loss scaling)"),
    ("bf16", torch.bfloat16, False, 2, False, "pure bf16, no master weights"),
    ("bf16-sr", torch.bfloat16, False, 2, False, "pure bf16, stochastic rounding of the update, no master weights"),
    ("bf16-master", torch.bfloat16, True, 2, False, "pure bf16 compute, fp32 master weights kept by the optimizer"),
    ("fp16", torch.float16, False, 2, False, "pure fp16, no master weights"),
)

PRECISIONS: dict[str, Precision] = {
    name: Precision(name, dtype, dtype, master, act, autocast=autocast, description=text)
    for name, dtype, master, act, autocast, text in _MODES
}
_PRECISION_ALIASES = {
    "mixed": "mixed-bf16",
    "amp": "amp-bf16",
    "bf16-mixed": "mixed-bf16",
    "fp16-mixed": "mixed-fp16",
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "pure-bf16": "bf16",
    "stochastic-rounding": "bf16-sr",
}

#: sharding name -> ZeRO stage (0: replicated)
SHARDING: dict[str, int] = {
    "none": 0,
    "ddp": 0,
    "zero1": 1,
    "zero2": 2,
    "zero3": 3,
    "fsdp": 3,
    "fsdp-grad-op": 2,
}
#: ``"lmopt"``: :func:`lmopt.offload`, counted as it allocates; ``"optimizer"`` / ``"optimizer+params"``: DeepSpeed's
#: ZeRO-Offload / ZeRO-Infinity
OFFLOAD = ("none", "lmopt", "optimizer", "optimizer+params")
TRAINABLE = ("full", "lora")


def _precision(name: str | None, shape: ModelShape) -> Precision:
    if name is None:
        dtypes = {p.dtype for p in shape.params if p.dtype is not None}
        if not dtypes:
            return PRECISIONS["mixed-bf16"]
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            max(dtypes, key=lambda d: sum(p.numel for p in shape.params if p.dtype == d)), "fp32"
        )
    if not isinstance(name, str):
        raise ValueError(f"precision must be a string, one of {list(PRECISIONS)}, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)} (or {list(_PRECISION_ALIASES)}), got {name!r}")
    return PRECISIONS[key]


def resolve_optimizer(name: str) -> tuple[OptimizerSpec, dict[str, Any]]:
    """The registry entry and implied hyperparameters of ``name``; an unknown name lists the registered."""
    try:
        return resolve_name(name)
    except ValueError as err:
        registered = ", ".join(s.name for s in list_optimizers())
        raise ValueError(f"{err} Registered optimizers: {registered}") from None


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryPlan:
    """A planned training step, in bytes per device (device 0, which holds the largest shards).

    Components (each at its full size):
        parameters, master_weights, gradients, optimizer_state, activations (stored by the forward pass of one
        micro-batch), temporaries (the largest transient of the step: loss gradients, a block's backward
        workspace, gathered ZeRO-3 layers, optimizer-step buffers).

    Peak: gradients and activations never exist in full at the same time (the backward pass frees activations
    as it creates gradients), so ``peak`` is the maximum over the phases of the step (``phases``), and
    ``at_peak`` says what is live at that moment. ``static`` is parameters + master + gradients + state (the
    figure published tables quote). With offload, master weights and state are counted in their components
    and in ``host_memory``, not in ``peak`` (device memory).

    Host and transfers (offload, mapped state):
        host_memory: every byte the host holds for the run (the sum of ``host``); host: it by part --
            ``offload="lmopt"``: parameter copies (every trainable parameter, its dtype; frozen ones stay on the
            device only), gradient buffers (trainable
            parameters, the gradient dtype), accumulation staging (CUDA with accumulation), optimizer state (less
            what is file-backed), step temporaries (the host step's buffers); host_pinned: the page-locked part
            (copies, gradient buffers and staging; 0 on ``device="cpu"``, where nothing is pinned);
            file_backed: state bytes in :func:`lmopt.map_state`'s files (``mapped_state=True``: tensors of >=
            4096 elements; page cache, not resident between steps); pcie_bytes_per_step: gradients to the host
            (``pcie_gradient_bytes_per_step``: once per micro-batch with overlap, so ``/ grad_accumulation`` per
            micro-batch) plus parameters back to the device (``pcie_parameter_bytes_per_step``); None where not
            modelled (no offload, ``"optimizer+params"``).
    """

    model: str
    optimizer: str
    precision: str
    trainable: str
    num_parameters: int
    trainable_parameters: int
    parameters: int
    master_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    temporaries: int
    peak: int
    peak_phase: str
    at_peak: Mapping[str, int]
    phases: Mapping[str, int]
    host_memory: int
    state_by_name: Mapping[str, int]
    devices: int
    sharding: str
    offload: str
    micro_batch: int
    seq_len: int
    grad_accumulation: int
    activation_checkpointing: str
    flash_attention: bool
    device_memory: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    host_pinned: int = 0
    host: Mapping[str, int] = field(default_factory=dict)
    file_backed: int = 0
    pcie_bytes_per_step: int | None = None
    pcie_gradient_bytes_per_step: int | None = None
    pcie_parameter_bytes_per_step: int | None = None
    offload_overlap: bool = True
    mapped_state: bool = False

    @property
    def static(self) -> int:
        """Parameters + master weights + gradients + optimizer state."""
        return self.parameters + self.master_weights + self.gradients + self.optimizer_state

    @property
    def fits(self) -> bool | None:
        """Whether ``peak`` fits ``device_memory`` (None when no device memory was given)."""
        return None if self.device_memory is None else self.peak <= self.device_memory

    def bytes_per_parameter(self, component: str) -> float:
        """``component`` bytes (e.g. ``"optimizer_state"``) divided by the model's parameter count."""
        return getattr(self, component) / max(1, self.num_parameters)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["static"] = self.static
        out["fits"] = self.fits
        return out

    def summary(self) -> str:
        """A few readable lines."""
        fits = (
            ""
            if self.fits is None
            else (" - fits" if self.fits else " - does NOT fit")
            + (f" in {format_bytes(self.device_memory)}" if self.device_memory else "")
        )
        lines = [
            f"{self.model} / {self.optimizer} / {self.precision} / {self.trainable} "
            f"on {self.devices} device(s) "
            f"({self.sharding}, offload {self.offload}), micro-batch {self.micro_batch} x {self.seq_len}",
            f"  parameters {format_bytes(self.parameters)}, master {format_bytes(self.master_weights)}, "
            f"gradients {format_bytes(self.gradients)}, optimizer state {format_bytes(self.optimizer_state)}",
            f"  activations {format_bytes(self.activations)}, temporaries {format_bytes(self.temporaries)}",
            f"  static {format_bytes(self.static)}, peak {format_bytes(self.peak)} ({self.peak_phase}){fits}",
        ]
        if self.host_memory:
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.host.items() if v)
            pinned = f", {format_bytes(self.host_pinned)} pinned" if self.host_pinned else ""
            lines.append(f"  host (offloaded) {format_bytes(self.host_memory)}{pinned}: {parts}")
        if self.file_backed:
            lines.append(f"  file-backed state (lmopt.map_state) {format_bytes(self.file_backed)}")
        if self.pcie_bytes_per_step is not None:
            lines.append(
                f"  PCIe per step {format_bytes(self.pcie_bytes_per_step)}: gradients to the host "
                f"{format_bytes(self.pcie_gradient_bytes_per_step or 0)}, parameters to the device "
                f"{format_bytes(self.pcie_parameter_bytes_per_step or 0)}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------------------------------
def _shard(shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    if n == 1 or not shape:
        return shape
    return (math.ceil(shape[0] / n), *shape[1:])


def _lora_params(shape: ModelShape, rank: int, modules: Sequence[str] | str | None) -> tuple[ParamShape, ...]:
    """Base weights frozen; rank-``rank`` adapters A (r x in) and B (out x r) on the chosen modules."""
    gpt2 = shape.architecture is not None and shape.architecture.family == "gpt2"
    all_linear = modules is None or modules == "all-linear"
    targets = set() if all_linear else {modules} if isinstance(modules, str) else set(modules)
    out, matched = [], set()
    for p in shape.params:
        out.append(replace(p, trainable=False))
        if p.role != "matrix" or len(p.shape) != 2 or not p.name.endswith(".weight"):
            continue
        if not all_linear and p.module not in targets:
            continue
        matched.add(p.module)
        rows, cols = p.shape
        d_out, d_in = (cols, rows) if gpt2 else (rows, cols)  # transformers' Conv1D stores (in, out)
        base = p.name[: -len(".weight")]
        out.append(ParamShape(f"{base}.lora_A.weight", (rank, d_in), "matrix", p.dtype, True))
        out.append(ParamShape(f"{base}.lora_B.weight", (d_out, rank), "matrix", p.dtype, True))
    if not all_linear and not matched:
        names = sorted({p.module for p in shape.params if p.role == "matrix"})
        raise ValueError(f"lora_modules {sorted(targets)} match no matrix of {shape.name}; its modules: {names}")
    return tuple(out)


_STATE_CACHE: dict[tuple, list[tuple[str, tuple[int, ...], torch.dtype, int]]] = {}


def _hyper_key(spec: OptimizerSpec, hyper: Mapping[str, Any]) -> tuple | None:
    try:
        key = (spec.name, id(spec.state), repr(sorted(hyper.items(), key=lambda kv: kv[0])))
        hash(key)
        return key
    except TypeError:
        return None


def _state_tensors(
    spec: OptimizerSpec,
    hyper: Mapping[str, Any],
    hyper_key: tuple | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> list[tuple[str, tuple[int, ...], torch.dtype, int]]:
    """``spec``'s state rule for one tensor, as (name, shape, dtype, bytes); memoised (rules are pure)."""
    key = None if hyper_key is None else (*hyper_key, shape, dtype)
    if key is not None and key in _STATE_CACHE:
        return _STATE_CACHE[key]
    out = [(t.name, tuple(t.shape), t.dtype, t.nbytes) for t in spec.state(shape, dtype, hyper)]
    if key is not None:
        if len(_STATE_CACHE) > 100_000:
            _STATE_CACHE.clear()
        _STATE_CACHE[key] = out
    return out


class _StructureRules(Mapping[str, Callable[[ParamShape, Any], Mapping[str, Any]]]):
    """Registry name -> the spec's ``structure_state`` rule, for optimizers whose state depends on more than a
    tensor's shape (Adam-mini: one second moment per head for query/key projections). Read from the specs on
    each access: the optimizer's module owns the rule."""

    def _rules(self) -> dict[str, Callable[[ParamShape, Any], Mapping[str, Any]]]:
        return {s.name: s.structure_state for s in list_optimizers() if s.structure_state is not None}

    def __getitem__(self, name: str) -> Callable[[ParamShape, Any], Mapping[str, Any]]:
        return self._rules()[name]

    def __iter__(self):
        return iter(self._rules())

    def __len__(self) -> int:
        return len(self._rules())


#: optimizer name -> function giving extra per-tensor keys for its state rule (``spec.structure_state``),
#: called as ``fn(param: ParamShape, architecture: Architecture | None)``; its mapping is merged into the
#: hyperparameters passed to the rule for that tensor (or ``{}``)
PER_TENSOR_STATE_KEYS: Mapping[str, Callable[[ParamShape, Any], Mapping[str, Any]]] = _StructureRules()


def _state(
    spec: OptimizerSpec,
    hyper: Mapping[str, Any],
    shapes: list[tuple[tuple[int, ...], torch.dtype]],
    extras: list[Mapping[str, Any]] | None = None,
    min_numel: int | None = None,
) -> tuple[int, dict[str, int], int]:
    """Total state bytes, bytes by state name, and the bytes in tensors of at least ``min_numel`` elements (those
    :func:`lmopt.map_state` puts in files; 0 when ``min_numel`` is None)."""
    total, by_name, large = 0, {}, 0
    extras = extras or [{} for _ in shapes]
    groups = Counter(
        (shape, dtype, tuple(sorted(extra.items()))) for (shape, dtype), extra in zip(shapes, extras, strict=True)
    )
    keys: dict[tuple, tuple | None] = {}
    for (shape, dtype, extra), count in groups.items():
        h = {**hyper, **dict(extra)} if extra else hyper
        if extra not in keys:
            keys[extra] = _hyper_key(spec, h)
        for name, t_shape, _, nbytes in _state_tensors(spec, h, keys[extra], shape, dtype):
            total += nbytes * count
            by_name[name] = by_name.get(name, 0) + nbytes * count
            if min_numel is not None and math.prod(t_shape) >= min_numel:
                large += nbytes * count
    return total, by_name, large


def _step_implementation(spec: OptimizerSpec, hyper: Mapping[str, Any], fused_ok: bool, device: str) -> str:
    """The implementation the optimizer's step will use, by the optimizers' own rule
    (:func:`lmopt.optim.resolve_implementation`): ``kernel``, ``fused``, ``blocked``, ``foreach`` or ``for_loop``.

    ``fused_ok``: every parameter-sized state tensor has the parameter's dtype (torch's fused kernel needs it);
    ``blocked`` runs on the CPU only; ``kernel`` needs 8/4-bit state."""
    if spec.cls.__module__.startswith("torch.optim"):
        if hyper.get("fused"):
            return "fused"
        foreach = hyper.get("foreach")
        return "foreach" if foreach or (foreach is None and device == "cuda") else "for_loop"
    from ..optim import resolve_implementation

    cls = spec.cls
    available = tuple(getattr(cls, "implementations", ("for_loop",)))
    requested = hyper.get("implementation", "auto")
    requested = getattr(cls, "implementation_aliases", {}).get(requested, requested)
    quantized = hyper.get("state_precision") in ("8bit", "4bit")
    if quantized and requested in ("fused", "blocked"):  # the low-bit classes' old name for their kernel
        requested = "kernel"
    # cautious masks (a whole-tensor mean) run in none of the one-pass paths: foreach, or the per-tensor rule
    masked = _cautious(hyper)
    if quantized and masked:
        return "for_loop"
    applies = {
        "fused": fused_ok and not quantized and not masked,
        # where an optimizer has both, blocked needs what fused needs (AdamW's blocked path is for the masks)
        "blocked": device == "cpu" and not quantized and (fused_ok or "fused" not in available),
        "kernel": quantized,
    }
    if requested != "auto" and not applies.get(requested, True):
        return str(requested)
    return resolve_implementation(
        requested, available, applies, preference=getattr(cls, "auto_preference", IMPLEMENTATIONS), owner=spec.name
    )


def _step_buffers(
    spec: OptimizerSpec,
    hyper: Mapping[str, Any],
    local: list[tuple[int, ...]],
    dtype: torch.dtype,
    upcast_grads: bool,
    device: str,
) -> tuple[int, str]:
    """Bytes the optimizer step allocates on top of its state, and the implementation assumed.

    Per parameter: one fp32 intermediate (Adam's denominator, RMSprop's average, ...; none for SGD, whose
    state is at most a momentum buffer updated in place), fp32 copies of a low-precision parameter and
    gradient, and an fp32 copy of each parameter-sized state tensor kept in another dtype (bf16 or quantized
    moments are upcast for the math). A fused kernel allocates none; the multi-tensor (foreach) path holds
    these for a whole list of tensors at once, the per-tensor path for one tensor at a time.
    """
    per_param, fused_ok, key = [], True, _hyper_key(spec, hyper)
    for shape, count in Counter(local).items():
        numel = math.prod(shape)
        wide = [
            (name, t_dtype)
            for name, t_shape, t_dtype, _ in _state_tensors(spec, hyper, key, shape, dtype)
            if math.prod(t_shape) == numel and numel > 1
        ]
        fused_ok &= all(t_dtype == dtype for _, t_dtype in wide)
        # SGD (no state, or only a momentum buffer) updates in place; the others build a denominator/direction
        in_place = all(name == "momentum_buffer" for name, _ in wide)
        extra = 4 * numel * ((0 if in_place else 1) + (2 if dtype != torch.float32 else (1 if upcast_grads else 0)))
        extra += sum(4 * numel for _, t_dtype in wide if t_dtype != torch.float32)
        per_param.append((extra, count))
    impl = _step_implementation(spec, hyper, fused_ok, device)
    if impl in ("fused", "kernel", "blocked"):  # one pass over memory: no temporaries beyond an upcast gradient
        return (4 * max((math.prod(s) for s in local), default=0) if upcast_grads else 0), impl
    if _cautious(hyper):  # the masked update direction, one more fp32 tensor per parameter
        per_param = [(extra + 4 * math.prod(shape), count) for (extra, count), shape in zip(per_param, Counter(local))]
    if impl == "foreach":
        return sum(extra * count for extra, count in per_param), impl
    return max((extra for extra, _ in per_param), default=0), impl


def _cautious(hyper: Mapping[str, Any]) -> bool:
    """Cautious masking (or cautious weight decay with decay to mask) is on."""
    return bool(hyper.get("cautious")) or bool(hyper.get("cautious_weight_decay") and hyper.get("weight_decay"))


def plan(
    model: str | nn.Module | ModelShape | Any,
    optimizer: str = "adamw",
    *,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    precision: str | None = None,
    trainable: str = "full",
    lora_rank: int = 16,
    lora_modules: Sequence[str] | str | None = None,
    micro_batch: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: str = "none",
    flash_attention: bool | None = None,
    activation_model: str | None = None,
    grad_accumulation: int = 1,
    devices: int = 1,
    sharding: str = "none",
    offload: str = "none",
    device: str = "cuda",
    device_memory: str | int | None = None,
    offload_overlap: bool = True,
    mapped_state: bool = False,
) -> MemoryPlan:
    """Plan the memory of one training step, per device.

    Args:
        model: a name (``"llama-2-7b"``, ``"gpt2-xl"``, ``"7B"``; see :func:`lmopt.memory.named_shapes`), a
            transformers config, an ``nn.Module`` or a :class:`~lmopt.memory.ModelShape`.
        optimizer: a registry name or alias (``lmopt list``); its state is read from its registry entry.
        optimizer_kwargs: hyperparameters that change the state (``amsgrad=True``, ``state_dtype="bf16"``).
        precision: a mode of :data:`PRECISIONS` (default: the module's dtype, else ``"mixed-bf16"``).
        trainable: ``"full"`` or ``"lora"`` (base weights frozen, adapters of rank ``lora_rank`` on
            ``lora_modules``: module names like ``("q_proj", "v_proj")``, default every hidden matrix --
            QLoRA's "all linear layers" practice, Dettmers et al. 2023).
        micro_batch, seq_len: sequences per micro-batch and their length (default the model's context,
            capped at 4096).
        activation_checkpointing: ``"none"``, ``"selective"`` or ``"full"`` (see
            :mod:`~lmopt.memory.activations`).
        flash_attention: attention keeps no ``s x s`` scores (default: True, or what a transformers model's
            ``attn_implementation`` says).
        activation_model: ``"korthikanti"`` (default for names) or ``"transformers"`` (default for
            transformers models and configs: what their modules save).
        grad_accumulation: micro-batches per optimizer step; > 1 keeps gradients alive through every forward.
        devices, sharding: data-parallel devices and ``"none"``, ``"zero1"``, ``"zero2"``, ``"zero3"``/
            ``"fsdp"`` (``"fsdp-grad-op"`` = zero2).
        offload: ``"none"``; ``"lmopt"``: :func:`lmopt.offload`, counted as it allocates (parameters on the device,
            gradients only while autograd produces them; host copies of the parameters, gradient buffers, state and
            the step on the host; no sharding, no fp32 master: use a precision without one); ``"optimizer"``:
            DeepSpeed's ZeRO-Offload (master weights, state, fp32 gradients and the step on the host); or
            ``"optimizer+params"`` (ZeRO-Infinity: also the sharded parameters; needs zero3).
        device: ``"cuda"`` or ``"cpu"``: which implementation torch.optim picks by default (foreach on CUDA).
        device_memory: memory per device (``"80GB"``), to say whether the plan fits.
        offload_overlap: ``offload="lmopt"``'s ``overlap`` (default True: each gradient moves to the host as autograd
            finishes it; False: the device keeps every gradient until the step).
        mapped_state: the state is in :func:`lmopt.map_state`'s files (tensors of >= 4096 elements counted in
            ``file_backed``, not in host or device memory); needs the state on the host: ``offload="lmopt"``, or
            ``offload="none"`` with ``device="cpu"``.

    Returns:
        :class:`MemoryPlan`.

    Example:
        >>> p = lmopt.memory.plan("7B", "adamw", precision="mixed")
        >>> print(p.summary())   # static 112.0 GB: 14 + 28 + 14 + 56
    """
    # ---- validate
    shape = model_shape(model)
    spec, implied = resolve_optimizer(optimizer)
    prec = _precision(precision, shape)
    if offload == "lmopt" and prec.master:
        raise ValueError(
            f"offload='lmopt' steps host copies in the parameters' own dtype and keeps no fp32 master copy, so "
            f"precision={prec.name!r} does not apply; plan precision='bf16' or 'bf16-sr' (a bf16 model), or 'fp32' "
            f"/ 'amp-bf16' (an fp32 model)"
        )
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {list(TRAINABLE)}, got {trainable!r}")
    for name, value in (
        ("micro_batch", micro_batch),
        ("grad_accumulation", grad_accumulation),
        ("devices", devices),
        ("lora_rank", lora_rank),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if sharding not in SHARDING:
        raise ValueError(f"sharding must be one of {list(SHARDING)}, got {sharding!r}")
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {list(OFFLOAD)}, got {offload!r}")
    if activation_checkpointing not in CHECKPOINTING:
        raise ValueError(
            f"activation_checkpointing must be one of {list(CHECKPOINTING)}, got {activation_checkpointing!r}"
        )
    if activation_model is not None and activation_model not in ACTIVATION_MODELS:
        raise ValueError(f"activation_model must be one of {list(ACTIVATION_MODELS)}, got {activation_model!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    stage = SHARDING[sharding]
    if offload == "optimizer+params" and stage != 3:
        raise ValueError("offload='optimizer+params' needs sharding='zero3' (or 'fsdp')")
    for name, value in (("offload_overlap", offload_overlap), ("mapped_state", mapped_state)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if offload == "lmopt" and stage:
        raise ValueError(
            f"offload='lmopt' (lmopt.offload) keeps whole host copies per process and does not shard; use "
            f"sharding='none' or 'ddp' with it, or offload='optimizer' (DeepSpeed ZeRO-Offload) with {sharding!r}"
        )
    if offload_overlap is False and offload != "lmopt":
        raise ValueError("offload_overlap applies to offload='lmopt' only (lmopt.offload's overlap); leave it True")
    if mapped_state and not (offload == "lmopt" or (offload == "none" and device == "cpu")):
        raise ValueError(
            "mapped_state=True needs the optimizer state on the host (lmopt.map_state maps CPU tensors): use "
            "offload='lmopt', or offload='none' with device='cpu'"
        )
    memory_limit = None if device_memory is None else parse_bytes(device_memory)
    hyper = spec.hyperparameters(**{**implied, **dict(optimizer_kwargs or {})})
    notes: list[str] = list(shape.notes)

    params = _lora_params(shape, lora_rank, lora_modules) if trainable == "lora" else shape.params
    n = devices if stage else 1
    p_bytes, g_bytes, o_dtype = (
        _element_size(prec.param_dtype),
        _element_size(prec.grad_dtype),
        prec.optimizer_dtype,
    )
    frozen_bytes = p_bytes  # frozen weights are kept in the working dtype

    # ---- static components (device 0)
    parameters = sum(
        math.prod(_shard(p.shape, n if stage == 3 else 1)) * (p_bytes if p.trainable else frozen_bytes) for p in params
    )
    train = [p for p in params if p.trainable]
    local = [_shard(p.shape, n if stage >= 1 else 1) for p in train]
    gradients = sum(math.prod(_shard(p.shape, n if stage >= 2 else 1)) * g_bytes for p in train)
    master = sum(math.prod(s) * 4 for s in local) if prec.master else 0
    per_tensor = spec.structure_state
    extras = [dict(per_tensor(p, shape.architecture)) for p in train] if per_tensor else None
    state, state_by_name, mappable = _state(
        spec, hyper, [(s, o_dtype) for s in local], extras, DEFAULT_MIN_NUMEL if mapped_state else None
    )
    file_backed = mappable  # lmopt.map_state: the state tensors of >= 4096 elements live in files
    host_parts: dict[str, int] = {}
    pcie_grads = pcie_params = 0
    if offload == "lmopt":
        # lmopt.offload: a host copy of every trainable parameter in its dtype, a host gradient buffer per
        # trainable parameter in the gradient dtype (pinned on CUDA), the inner optimizer's state (pageable: it
        # creates it with zeros_like) and, on CUDA with accumulation, a pinned staging buffer per gradient
        staging = gradients if device == "cuda" and grad_accumulation > 1 and offload_overlap else 0
        trainable_copies = sum(math.prod(p.shape) * p_bytes for p in train)
        host_parts = {
            "parameter copies": trainable_copies,
            "gradient buffers": gradients,
            "accumulation staging": staging,
            "optimizer state": state - file_backed,
        }
        # PCIe: each gradient down (per micro-batch with overlap: the hook moves every backward's gradient; without,
        # the device accumulates and step() moves it once), every trainable parameter up after the step
        pcie_grads = gradients * (grad_accumulation if offload_overlap else 1)
        pcie_params = trainable_copies
        master_dev, state_dev = 0, 0
        notes.append(
            "offload lmopt (lmopt.offload): state and step on the host; "
            + (
                "each gradient moves to the host as autograd finishes it and is released on the device"
                if offload_overlap
                else "the device keeps every gradient until step() moves them (overlap=False)"
            )
        )
    elif offload != "none":
        host_parts = {"master weights": master, "optimizer state": state}
        host_parts["gradients (fp32)"] = sum(math.prod(s) * 4 for s in local)  # for the host step
        # ZeRO-Offload's traffic: the device's gradient partition down per micro-batch, its 16-bit parameters up
        pcie_grads = sum(math.prod(s) for s in local) * g_bytes * grad_accumulation
        pcie_params = sum(math.prod(s) for s in local) * p_bytes
        master_dev, state_dev = 0, 0
        notes.append(
            "offload: gradients stream to the host, where master weights, optimizer state and the step "
            "live (ZeRO-Offload); the device keeps one block's gradients at a time"
        )
    else:
        master_dev, state_dev = master, state - file_backed
    params_dev = parameters
    if offload == "optimizer+params":
        host_parts["parameters"] = parameters
        params_dev = 0
    if mapped_state:
        notes.append(
            f"mapped state (lmopt.map_state): {format_bytes(file_backed)} of state tensors with >= "
            f"{DEFAULT_MIN_NUMEL} elements in files (page cache, paged in by each step, released after it)"
        )

    # ---- activations
    arch = shape.architecture
    seq = seq_len or (min(arch.max_seq_len, 4096) if arch else 1)
    if arch is not None:
        flash = (arch.attention != "eager") if flash_attention is None else bool(flash_attention)
        act_model = activation_model or ("transformers" if arch.implementation == "transformers" else "korthikanti")
        act = estimate_activations(
            arch,
            micro_batch=micro_batch,
            seq_len=seq,
            element_size=prec.activation_bytes,
            flash_attention=flash,
            checkpointing=activation_checkpointing,
            model=act_model,
        )
        notes.extend(act.notes)
        vocab_tokens_fp32 = 4 * arch.vocab_size * micro_batch * seq
    else:
        flash = bool(flash_attention)
        act = ActivationEstimate(0, 0, 0, 0, 0, 0, 0, 0, "none", ())
        vocab_tokens_fp32 = 0
        notes.append("architecture unknown (a module without a transformers config): activations not planned")

    # ---- the step, phase by phase (device 0)
    layers = shape.layers()
    layer_param_bytes = max((sum(p.numel for p in ps) * p_bytes for k, ps in layers.items() if k), default=0)
    layer_grads = max(
        (
            sum(math.prod(_shard(p.shape, n if stage >= 2 else 1)) for p in ps if p.trainable) * g_bytes
            for k, ps in layers.items()
            if k
        ),
        default=0,
    )
    layer_grads_full = max(
        (sum(p.numel for p in ps if p.trainable) * g_bytes for k, ps in layers.items() if k), default=0
    )
    head = [p for p in train if p.role == "head"] or [
        p
        for p in train
        if p.role == "embedding" and shape.architecture is not None and p.shape[0] == shape.architecture.vocab_size
    ]
    head_grads = sum(math.prod(_shard(p.shape, n if stage >= 2 else 1)) for p in head[:1]) * g_bytes
    tied = bool(head) and head[0].role == "embedding"

    resident = params_dev + master_dev + state_dev
    grads_dev = gradients
    streamed = offload == "lmopt" and offload_overlap
    if offload in ("optimizer", "optimizer+params"):  # only the block being reduced is on the device
        grads_dev = layer_grads_full
        head_grads = min(head_grads, grads_dev)
        layer_grads = 0
    elif streamed:
        # each gradient is released once moved: autograd's gradients of the block in backward, and a tied head's
        # gradient, which autograd holds until the embedding's half is added (one post-accumulate-grad call)
        grads_dev = max(layer_grads_full, max((math.prod(p.shape) * g_bytes for p in train), default=0))
    kept_grads = grads_dev if grad_accumulation > 1 and not streamed else 0
    fwd_extra = 0
    if prec.autocast:  # autocast keeps a 16-bit copy of each matmul weight for the forward and backward
        fwd_extra += sum(p.numel for p in params if p.role in ("matrix", "head") and len(p.shape) == 2) * 2
        notes.append("amp: autocast's cache of 16-bit weight copies is counted during forward/backward")
    if stage == 3:
        fwd_extra += 2 * layer_param_bytes  # the gathered block and the prefetched next one
    comm = layer_grads_full if stage >= 2 else 0  # one block's unsharded gradients before reduce-scatter
    A = act.stored
    e = prec.activation_bytes
    tokens_V = vocab_tokens_fp32 // 4
    events: dict[str, dict[str, int]] = {
        "forward end": {"gradients": kept_grads, "activations": A, "temporaries": fwd_extra + act.logits},
        "loss backward": {
            "gradients": kept_grads,
            "activations": A,
            "temporaries": fwd_extra + act.loss_backward,
        },
        "head backward": {
            "gradients": max(kept_grads, head_grads),
            "activations": A - vocab_tokens_fp32,
            "temporaries": fwd_extra + e * tokens_V + (head_grads if kept_grads else 0),
        },
        "block backward": {
            "gradients": max(kept_grads, head_grads + layer_grads),
            "activations": A - vocab_tokens_fp32,
            "temporaries": fwd_extra + act.layer_backward + comm,
        },
        # a tied embedding's second gradient (from the lookup) is summed into the head's out of place
        "backward end": {
            "gradients": grads_dev,
            "activations": 0,
            "temporaries": (2 * head_grads if tied else 0) + comm,
        },
    }
    # an offloaded step runs on the host, with the implementation torch picks there
    step_device = "cpu" if offload != "none" else device
    step_buffers, impl = _step_buffers(spec, hyper, local, o_dtype, prec.master, step_device)
    events["optimizer step"] = {
        "gradients": 0 if streamed else grads_dev,
        "activations": 0,
        "temporaries": 0 if offload != "none" else step_buffers,
    }
    if streamed:  # the block's gradients only, plus a tied head's gradient held until the embedding's is added
        events["block backward"]["gradients"] = layer_grads_full + (head_grads if tied else 0)
    if offload != "none":
        host_parts["step temporaries"] = step_buffers
    host = sum(host_parts.values())
    pcie = pcie_grads + pcie_params if offload in ("lmopt", "optimizer") else None
    phases = {k: resident + sum(v.values()) for k, v in events.items()}
    peak_phase = max(phases, key=phases.get)
    temporaries = max(v["temporaries"] for v in events.values())
    at_peak = {
        "parameters": params_dev,
        "master_weights": master_dev,
        "optimizer_state": state_dev,
        **events[peak_phase],
    }
    notes.append(f"optimizer step: {impl} implementation assumed")
    if prec.name == "bf16-sr":
        notes.append("stochastic rounding needs no memory beyond pure bf16")

    return MemoryPlan(
        model=shape.name,
        optimizer=spec.name if not implied else optimizer.strip().lower(),
        precision=prec.name,
        trainable=trainable if trainable == "full" else f"lora r={lora_rank}",
        num_parameters=shape.num_parameters,
        trainable_parameters=sum(p.numel for p in train),
        parameters=parameters,
        master_weights=master,
        gradients=gradients,
        optimizer_state=state,
        activations=A,
        temporaries=temporaries,
        peak=phases[peak_phase],
        peak_phase=peak_phase,
        at_peak=at_peak,
        phases=phases,
        host_memory=host,
        host_pinned=(
            host_parts["parameter copies"] + host_parts["gradient buffers"] + host_parts["accumulation staging"]
            if offload == "lmopt" and device == "cuda"
            else 0
        ),
        host=host_parts,
        file_backed=file_backed,
        pcie_bytes_per_step=pcie,
        pcie_gradient_bytes_per_step=None if pcie is None else pcie_grads,
        pcie_parameter_bytes_per_step=None if pcie is None else pcie_params,
        offload_overlap=offload_overlap,
        mapped_state=mapped_state,
        state_by_name=state_by_name,
        devices=devices,
        sharding=sharding,
        offload=offload,
        micro_batch=micro_batch,
        seq_len=seq,
        grad_accumulation=grad_accumulation,
        activation_checkpointing=activation_checkpointing,
        flash_attention=flash,
        device_memory=memory_limit,
        notes=tuple(notes),
    )
