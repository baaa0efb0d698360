"""``lmopt schedule``: print a learning-rate schedule at its key steps, and plot it."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from .. import schedules as S
from ._args import integer, number

NAME = "schedule"
HELP = "print a learning-rate schedule at key steps (warmup edges, decay quarters, end) and plot it"

KINDS = ("cosine", "linear", "constant", "wsd", "sgdr", "inverse-sqrt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="schedule shape")
    parser.add_argument("--warmup", type=integer(0), default=0, help="linear warmup steps (default 0)")
    parser.add_argument("--total", type=integer(1), default=None, help="total training steps (cosine/linear/wsd)")
    parser.add_argument(
        "--peak", type=number(above=0), default=1.0, help="peak learning rate (default 1.0: multipliers)"
    )
    parser.add_argument(
        "--min-lr-ratio",
        type=number(0, 1),
        default=None,
        help="floor as a fraction of the peak (default 0.1 for cosine, 0 otherwise)",
    )
    parser.add_argument(
        "--decay-steps", type=integer(0), default=None, help="wsd: decay length (default 20%% of total)"
    )
    parser.add_argument("--shape", choices=("1-sqrt", "linear", "cosine"), default="1-sqrt", help="wsd decay shape")
    parser.add_argument("--t0", type=integer(1), default=1000, help="sgdr: first cycle length (T_0)")
    parser.add_argument("--t-mult", type=integer(1), default=2, help="sgdr: cycle growth factor (T_mult)")
    parser.add_argument(
        "--timescale",
        type=integer(1),
        default=None,
        help="inverse-sqrt: steps at the peak (default the warmup, or 10000)",
    )
    parser.add_argument("--steps", type=integer(0), nargs="*", default=(), help="further steps to print")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG plot of the schedule")


def build(args: argparse.Namespace) -> tuple[S.Schedule, int]:
    """The schedule the arguments describe, and the horizon to print and plot."""
    needs_total = args.kind in ("cosine", "linear", "wsd")
    if needs_total and args.total is None:
        raise ValueError(f"--total is required for {args.kind}")
    floor = args.min_lr_ratio
    if args.kind == "cosine":
        return S.warmup_cosine(args.warmup, args.total, min_lr_ratio=0.1 if floor is None else floor), args.total
    if args.kind == "linear":
        return S.warmup_linear(args.warmup, args.total, min_lr_ratio=floor or 0.0), args.total
    if args.kind == "wsd":
        f = S.warmup_stable_decay(
            args.warmup, args.total, decay_steps=args.decay_steps, shape=args.shape, min_lr_ratio=floor or 0.0
        )
        return f, args.total
    if args.kind == "sgdr":
        f = S.sgdr(args.t0, args.t_mult, min_lr_ratio=floor or 0.0, warmup_steps=args.warmup)
        horizon = args.total or args.warmup + sum(args.t0 * args.t_mult**i for i in range(3))
        return f, horizon
    if args.kind == "inverse-sqrt":
        f = S.inverse_sqrt(args.warmup, timescale=args.timescale)
        return f, args.total or max(10 * (args.timescale or args.warmup or 10_000), 1)
    horizon = args.total or max(2 * args.warmup, 100)
    return S.warmup_constant(args.warmup), horizon


def _label(step: int, warmup: int, total: int) -> str:
    if step == 0:
        return "first step"
    if warmup and step < warmup - 1:
        return "warmup"
    if warmup and step == warmup - 1:
        return "last warmup step"
    if warmup and step == warmup:
        return "first step after warmup"
    if step == total - 1:
        return "last step"
    if step >= total:
        return "beyond the end"
    return f"{(step - warmup) / max(1, total - warmup):.0%} of the decay"


def plot(schedule: S.Schedule, horizon: int, peak: float, path: str, title: str) -> None:
    """Write a PNG of ``peak * schedule(step)`` over ``[0, horizon]``."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(horizon + 1, 2000)
    steps = sorted({round(i * horizon / max(1, count - 1)) for i in range(count)})
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot(steps, [peak * schedule(s) for s in steps], lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if not args.peak > 0:
        raise ValueError(f"--peak must be > 0, got {args.peak}")
    schedule, horizon = build(args)
    steps = S.key_steps(args.warmup, horizon, extra=args.steps)
    title = f"{args.kind}: warmup {args.warmup:,}, total {horizon:,}, peak {args.peak:g}"
    table = Table(title=title)
    table.add_column("step", justify="right")
    table.add_column("where")
    table.add_column("multiplier", justify="right")
    table.add_column("learning rate", justify="right", style="bold cyan")
    for step, mult, lr in S.describe(schedule, steps, args.peak):
        table.add_row(f"{step:,}", _label(step, args.warmup, horizon), f"{mult:.6f}", f"{lr:.4g}")
    console = Console()
    console.print(table)
    if args.plot:
        plot(schedule, horizon, args.peak, args.plot, title)
        console.print(f"plot written to {args.plot}")
    return 0
