"""A stacked-bar chart of memory plans (one bar per plan: what is live at its peak). Needs matplotlib."""

from __future__ import annotations

from collections.abc import Sequence

from .planner import MemoryPlan

__all__ = ["COMPONENTS", "plot_plans"]

#: (key in ``MemoryPlan.at_peak``, label, colour)
COMPONENTS: tuple[tuple[str, str, str], ...] = (
    ("parameters", "parameters", "#4C72B0"),
    ("master_weights", "fp32 master weights", "#8172B2"),
    ("optimizer_state", "optimizer state", "#C44E52"),
    ("gradients", "gradients", "#DD8452"),
    ("activations", "activations", "#55A868"),
    ("temporaries", "temporaries", "#937860"),
)


def plot_plans(plans: Sequence[MemoryPlan], path: str, *, title: str | None = None) -> str:
    """Write a PNG comparing ``plans`` (e.g. one per optimizer) as stacked bars in GB; returns ``path``.

    Each bar stacks what is live at that plan's peak (``MemoryPlan.at_peak``), so its height is the peak; the
    device memory, when the plans have one, is drawn as a dashed line.
    """
    if not plans:
        raise ValueError("plans must not be empty")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is an optional dependency
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from err
    labels = [p.optimizer for p in plans]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(plans) + 2.5), 4.8))
    bottoms = [0.0] * len(plans)
    for key, label, colour in COMPONENTS:
        values = [p.at_peak.get(key, 0) / 1e9 for p in plans]
        if not any(values):
            continue
        ax.bar(labels, values, bottom=bottoms, label=label, color=colour, width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for i, p in enumerate(plans):
        ax.text(i, bottoms[i], f"{p.peak / 1e9:,.1f} GB", ha="center", va="bottom", fontsize=9)
    limit = plans[0].device_memory
    if limit:
        ax.axhline(limit / 1e9, color="black", linestyle="--", linewidth=1)
        ax.text(-0.45, limit / 1e9, f"device memory {limit / 1e9:g} GB", va="bottom", ha="left", fontsize=8)
    first = plans[0]
    ax.set_ylabel("GB per device at the step's peak")
    ax.set_title(
        title
        or f"{first.model}: {first.precision}, {first.trainable}, {first.devices} device(s) "
        f"{first.sharding}, micro-batch {first.micro_batch} x {first.seq_len}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
