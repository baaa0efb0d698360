"""The recommender: which training configurations fit a model on N devices, best first.

Every candidate is a full :func:`~lmopt.memory.plan` (optimizer state read from the registry), so the answer
is as exact as the planner. Candidates cross: the registered optimizers of the ladder below, precision
(``mixed-bf16``; pure ``bf16-sr`` as the cheaper alternative), sharding over the devices (ZeRO-1/2/3),
optimizer offload, activation checkpointing and the largest micro-batch (up to the one asked for) that fits.

Ranking (a lexicographic key, stated in each result's ``reason``):

1. the cost of the memory saving in speed: none / ZeRO-1 / ZeRO-2 first (they move as many bytes as plain data
   parallelism: all-reduce = reduce-scatter + all-gather; Rajbhandari et al. 2020), then ZeRO-3 (1.5x the
   traffic), then optimizer offload (the step runs on the host, gradients cross PCIe) -- lmopt's own
   (:func:`lmopt.offload`, ``offload="lmopt"``: one line, no other framework; pure bf16 or fp32, since it keeps
   no fp32 master) before DeepSpeed's ZeRO-Offload (``"optimizer"``) -- then parameter offload;
2. the optimizer's tier: full-precision AdamW (the reference), then 8-bit AdamW (Dettmers et al. 2022: matches
   AdamW), then the factored / block / 4-bit / sign optimizers (Adafactor, CAME, Adam-mini, 4-bit AdamW,
   Lion);
3. mixed precision with fp32 master weights before pure bf16 with stochastic rounding;
4. no activation checkpointing before full checkpointing (~1/3 more compute; Korthikanti et al. 2022);
5. the larger micro-batch, then the smaller peak.

A plan fits when its peak is at most ``usable_fraction`` (default 0.95) of the device memory: the CUDA
context, allocator fragmentation and communication buffers take the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..registry import list_optimizers
from .planner import MemoryPlan, plan
from .shapes import model_shape
from .units import format_bytes, parse_bytes

__all__ = [
    "OPTIMIZER_LADDER",  # noqa: F822 (read from the specs on access)
    "Recommendation",
    "RecommendationReport",
    "optimizer_ladder",
    "recommend",
]


def optimizer_ladder() -> tuple[tuple[str, int, str], ...]:
    """(registry name, tier, why) in the order the recommender prefers them: every spec with a
    ``recommend_tier``, by tier (registry order within a tier)."""
    on_ladder = [s for s in list_optimizers() if s.recommend_tier is not None]
    return tuple(
        (s.name, s.recommend_tier, s.recommend_reason) for s in sorted(on_ladder, key=lambda s: s.recommend_tier)
    )


def __getattr__(name: str) -> Any:
    # OPTIMIZER_LADDER: read from the specs on access (each optimizer declares its rung beside its algorithm)
    if name == "OPTIMIZER_LADDER":
        return optimizer_ladder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TASKS = ("pretrain", "finetune", "lora")


@dataclass(frozen=True)
class Recommendation:
    """One feasible configuration: the choices, its plan and why it ranks where it does."""

    rank: int
    optimizer: str
    precision: str
    sharding: str
    offload: str
    checkpointing: str
    micro_batch: int
    plan: MemoryPlan
    reason: str

    @property
    def peak(self) -> int:
        return self.plan.peak


@dataclass(frozen=True)
class RecommendationReport:
    """The ranked feasible configurations, or a plain statement that nothing fits."""

    model: str
    devices: int
    device_memory: int
    task: str
    recommendations: tuple[Recommendation, ...]
    message: str
    closest: MemoryPlan | None = None
    closest_key: tuple = ()
    skipped_optimizers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool:
        return bool(self.recommendations)

    def __iter__(self):
        return iter(self.recommendations)

    def __len__(self) -> int:
        return len(self.recommendations)

    def __getitem__(self, i: int) -> Recommendation:
        return self.recommendations[i]


def _shardings(devices: int) -> list[str]:
    # on one device ZeRO-3 only matters with parameter offload (ZeRO-Infinity)
    return ["none", "zero3"] if devices == 1 else ["none", "zero1", "zero2", "zero3"]


def recommend(
    model: Any,
    devices: int = 1,
    device_memory: str | int = "80GB",
    task: str = "pretrain",
    *,
    micro_batch: int = 8,
    seq_len: int | None = None,
    lora_rank: int = 16,
    optimizers: Sequence[str] | None = None,
    usable_fraction: float = 0.95,
    host_memory: str | int | None = None,
    max_results: int = 10,
) -> RecommendationReport:
    """Feasible training configurations for ``model`` on ``devices`` devices of ``device_memory`` each.

    Args:
        model: anything :func:`~lmopt.memory.plan` takes (a name like ``"13B"`` or ``"llama-2-13b"``, a
            config, a module).
        devices: data-parallel devices.
        device_memory: memory of one device (``"80GB"``, ``"24GiB"``, or bytes).
        task: ``"pretrain"``, ``"finetune"`` (all weights trained) or ``"lora"`` (adapters of ``lora_rank``).
        micro_batch: the largest micro-batch to try (the recommender halves it down to 1 to fit).
        seq_len: sequence length (default: the model's context, capped at 4096).
        optimizers: registry names to consider (default: :data:`OPTIMIZER_LADDER`, those registered).
        usable_fraction: share of ``device_memory`` a plan's peak may use.
        host_memory: host memory per device available to offloading (default: not limited; offloaded
            configurations say how much they need).
        max_results: how many configurations to return.

    Returns:
        :class:`RecommendationReport`; ``report.fits`` is False and ``report.message`` says so plainly when no
        configuration fits, with the closest plan.

    Example:
        >>> report = lmopt.memory.recommend("13B", devices=2, device_memory="24GB", task="finetune")
        >>> for r in report: print(r.rank, r.optimizer, r.sharding, format_bytes(r.peak), r.reason)
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch must be an integer >= 1, got {micro_batch!r}")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction!r}")
    memory = parse_bytes(device_memory)
    host_limit = None if host_memory is None else parse_bytes(host_memory, "host_memory")
    limit = int(memory * usable_fraction)
    shape = model_shape(model)
    registered = {s.name for s in list_optimizers()}
    ladder = list(optimizer_ladder())
    if optimizers is not None:
        known = {n: (t, why) for n, t, why in ladder}
        ladder = [(n, *known.get(n, (3, f"{n} (from the registry)"))) for n in optimizers]
    if task == "lora":  # the adapters' state is tiny: AdamW always
        ladder = [entry for entry in ladder if entry[0] == "adamw"] or ladder[:1]
    skipped = tuple(n for n, _, _ in ladder if n not in registered)
    ladder = [entry for entry in ladder if entry[0] in registered]
    if not ladder:
        raise ValueError(f"none of the optimizers to consider is registered; registered: {sorted(registered)}")

    precisions = [("mixed-bf16", 0, ""), ("bf16-sr", 1, "no fp32 master copy")]
    batches = [micro_batch]
    while batches[-1] > 1:
        batches.append(batches[-1] // 2)
    trainable = "lora" if task == "lora" else "full"

    found: list[tuple[tuple, Recommendation]] = []
    closest: MemoryPlan | None = None
    closest_key: tuple = ()
    for opt, tier, why in ladder:
        for prec, prec_tier, prec_why in precisions:
            for sharding in _shardings(devices):
                offloads = ("none", "lmopt", "optimizer") if sharding == "none" else ("none", "optimizer")
                for offload in offloads + (("optimizer+params",) if sharding == "zero3" else ()):
                    if devices == 1 and sharding == "zero3" and offload != "optimizer+params":
                        continue
                    if offload == "lmopt" and prec == "mixed-bf16":  # lmopt.offload keeps no fp32 master
                        continue
                    for ckpt in ("none", "full"):
                        for mb in batches:  # largest micro-batch that fits
                            p = plan(
                                shape,
                                opt,
                                precision=prec,
                                trainable=trainable,
                                lora_rank=lora_rank,
                                micro_batch=mb,
                                seq_len=seq_len,
                                activation_checkpointing=ckpt,
                                devices=devices,
                                sharding=sharding,
                                offload=offload,
                                device_memory=memory,
                            )
                            rank_closest = (p.peak > limit, p.host_memory if p.peak <= limit else p.peak)
                            if closest is None or rank_closest < closest_key:
                                closest, closest_key = p, rank_closest
                            if p.peak <= limit and (host_limit is None or p.host_memory <= host_limit):
                                heavy = {"none": 0, "lmopt": 2, "optimizer": 2, "optimizer+params": 3}[offload] or int(
                                    sharding == "zero3"
                                )
                                key = (heavy, offload == "optimizer", tier, prec_tier, ckpt != "none", -mb, p.peak)
                                parts = [why] + ([prec_why] if prec_why else [])
                                light = (
                                    "no sharding or offload"
                                    if sharding == "none"
                                    else f"ZeRO-{sharding[-1]}: data parallelism's traffic"
                                )
                                parts.append(
                                    (
                                        light,
                                        "ZeRO-3: 1.5x the traffic",
                                        "lmopt.offload: state and step on the host"
                                        if offload == "lmopt"
                                        else "offload (DeepSpeed ZeRO-Offload): the step runs on the host",
                                        "offload of parameters and state: slowest",
                                    )[heavy]
                                )
                                if ckpt != "none":
                                    parts.append("recompute: ~1/3 more compute")
                                if p.host_memory:
                                    pinned = f" ({format_bytes(p.host_pinned)} pinned)" if p.host_pinned else ""
                                    parts.append(f"host needs {format_bytes(p.host_memory)}{pinned}")
                                if p.pcie_bytes_per_step:
                                    parts.append(f"PCIe {format_bytes(p.pcie_bytes_per_step)} per step")
                                rec = Recommendation(0, opt, prec, sharding, offload, ckpt, mb, p, "; ".join(parts))
                                found.append((key, rec))
                                break
    found.sort(key=lambda kv: kv[0])
    # keep the best entry per (optimizer, precision, sharding, offload, checkpointing) and renumber
    ranked = [
        Recommendation(
            i + 1,
            r.optimizer,
            r.precision,
            r.sharding,
            r.offload,
            r.checkpointing,
            r.micro_batch,
            r.plan,
            r.reason,
        )
        for i, (_, r) in enumerate(found[:max_results])
    ]
    usable = f"{format_bytes(limit)} usable of {format_bytes(memory)}"
    if ranked:
        best = ranked[0]
        message = (
            f"{len(found)} configuration(s) fit {shape.name} on {devices} x {format_bytes(memory)} "
            f"({usable}); best: {best.optimizer}, {best.precision}, sharding {best.sharding}, offload "
            f"{best.offload}, checkpointing {best.checkpointing}, micro-batch {best.micro_batch}."
        )
    else:
        assert closest is not None
        setup = (
            f"(with {closest.optimizer}, {closest.precision}, sharding {closest.sharding}, offload "
            f"{closest.offload}, checkpointing {closest.activation_checkpointing}, micro-batch "
            f"{closest.micro_batch})"
        )
        if closest.peak <= limit and host_limit is not None:
            need = (
                f"fits the devices only by offloading, which needs {format_bytes(closest.host_memory)} of "
                f"host memory {setup}, but {format_bytes(host_limit)} is available"
            )
        else:
            need = (
                f"needs at least {format_bytes(closest.peak)} per device {setup}, but {devices} x "
                f"{format_bytes(memory)} gives {usable}"
            )
        message = (
            f"Nothing fits: {shape.name} ({task}) {need}. Use more or larger devices"
            + (", LoRA (task='lora')" if task != "lora" else "")
            + " or shorter sequences."
        )
    if skipped:
        message += f" Not registered here, so not considered: {', '.join(skipped)}."
    return RecommendationReport(shape.name, devices, memory, task, tuple(ranked), message, closest, skipped)
