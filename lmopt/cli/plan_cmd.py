"""``lmopt plan``: the memory a training step needs, per device, as a table (and a stacked-bar PNG)."""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console
from rich.table import Table

from ..memory import PRECISIONS, SHARDING, plan
from ..memory.planner import OFFLOAD, MemoryPlan, resolve_optimizer
from ..memory.units import format_bytes
from ._args import integer

NAME = "plan"
HELP = "plan the memory of a training step: parameters, master weights, gradients, optimizer state, activations"

ROWS = (
    ("parameters", "parameters"),
    ("master_weights", "fp32 master weights"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("activations", "activations (1 micro-batch)"),
    ("temporaries", "temporaries (largest)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a named model (llama-2-7b, gpt2-xl, t5-3b, ...), 'NB' for a generic "
        "N-billion decoder (7B), or a transformers config.json / model folder",
    )
    parser.add_argument("--optimizer", default="adamw", help="registry name or alias (default adamw)")
    parser.add_argument(
        "--compare",
        help="comma-separated optimizers to compare side by side (e.g. adamw,adamw8bit,adafactor,lion)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help=f"one of {', '.join(PRECISIONS)}; 'mixed' = mixed-bf16 (default mixed-bf16 for named models)",
    )
    parser.add_argument("--devices", type=integer(1), default=1, help="data-parallel devices (default 1)")
    parser.add_argument("--device-memory", default=None, help="memory per device, e.g. 80GB or 24GiB")
    parser.add_argument("--sharding", default="none", choices=list(SHARDING), help="ZeRO stage / FSDP")
    parser.add_argument(
        "--offload",
        default="none",
        choices=list(OFFLOAD),
        help="lmopt: lmopt.offload, counted as it allocates; optimizer / optimizer+params: DeepSpeed ZeRO-Offload / "
        "ZeRO-Infinity",
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="--offload lmopt with overlap=False: the device keeps every gradient until the step",
    )
    parser.add_argument(
        "--mapped-state",
        action="store_true",
        help="state in lmopt.map_state's files (needs --offload lmopt, or --device cpu)",
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="where the step runs without offload: picks torch's default implementation (default cuda)",
    )
    parser.add_argument("--micro-batch", type=integer(1), default=1)
    parser.add_argument("--seq-len", type=integer(1), default=None, help="default: the model's context, at most 4096")
    parser.add_argument("--grad-accumulation", type=integer(1), default=1)
    parser.add_argument(
        "--checkpointing",
        default="none",
        choices=["none", "selective", "full"],
        help="activation checkpointing",
    )
    parser.add_argument(
        "--attention",
        default="flash",
        choices=["flash", "eager"],
        help="flash keeps no s x s scores (default); eager materialises them",
    )
    parser.add_argument("--activation-model", default=None, choices=["korthikanti", "transformers"])
    parser.add_argument("--trainable", default="full", choices=["full", "lora"])
    parser.add_argument("--lora-rank", type=integer(1), default=16)
    parser.add_argument(
        "--lora-modules", default=None, help="comma-separated module names (default: all hidden matrices)"
    )
    parser.add_argument("--plot", metavar="FILE", help="write a stacked-bar PNG of the plans")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON instead of a table")


def load_model(name: str):
    """A name, or a transformers config.json / a folder holding one."""
    if os.path.exists(name):
        try:
            from transformers import AutoConfig
        except ImportError as err:
            raise ValueError("reading a config.json needs transformers installed") from err
        return AutoConfig.from_pretrained(name)
    return name


def _gb(n: int, params: int) -> str:
    return f"{n / 1e9:,.2f} GB" + (f"  [dim]{n / params:.2f} B/p[/dim]" if params else "")


def render(plans: list[MemoryPlan], console: Console) -> None:
    first = plans[0]
    title = (
        f"{first.model} ({first.num_parameters / 1e9:,.2f}B parameters, "
        f"{first.trainable_parameters / 1e9:,.3g}B "
        f"trainable): {first.precision}, {first.trainable}, {first.devices} device(s), sharding "
        f"{first.sharding}, offload {first.offload}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("per device", style="bold")
    for p in plans:
        table.add_column(p.optimizer, justify="right", style="cyan" if p is first else None)
    n = first.num_parameters
    for key, label in ROWS:
        table.add_row(
            label,
            *[_gb(getattr(p, key), n if key not in ("activations", "temporaries") else 0) for p in plans],
        )
    table.add_section()
    table.add_row("static (p+m+g+s)", *[_gb(p.static, n) for p in plans])
    table.add_row("[bold]peak[/bold]", *[f"[bold]{p.peak / 1e9:,.2f} GB[/bold]" for p in plans])
    table.add_row("peak phase", *[p.peak_phase for p in plans])
    if any(p.host_memory for p in plans):
        table.add_section()
        table.add_row("host memory (offload)", *[format_bytes(p.host_memory) for p in plans])
        for part in dict.fromkeys(k for p in plans for k, v in p.host.items() if v):
            table.add_row(f"  {part}", *[format_bytes(p.host.get(part, 0)) for p in plans])
        if any(p.host_pinned for p in plans):
            table.add_row("  of it pinned", *[format_bytes(p.host_pinned) for p in plans])
    if any(p.file_backed for p in plans):
        table.add_row("file-backed state (map_state)", *[format_bytes(p.file_backed) for p in plans])
    if any(p.pcie_bytes_per_step is not None for p in plans):
        table.add_row("PCIe per step", *[format_bytes(p.pcie_bytes_per_step or 0) for p in plans])
        table.add_row("  gradients to host", *[format_bytes(p.pcie_gradient_bytes_per_step or 0) for p in plans])
        table.add_row("  parameters to device", *[format_bytes(p.pcie_parameter_bytes_per_step or 0) for p in plans])
    if first.device_memory:
        table.add_row(
            f"fits {format_bytes(first.device_memory)}?",
            *["[green]yes[/green]" if p.fits else "[red]no[/red]" for p in plans],
        )
    console.print(table)
    if len(plans) == 1:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in first.state_by_name.items())
        console.print(f"optimizer state by tensor: {parts or 'none'}")
    console.print(
        f"micro-batch {first.micro_batch} x {first.seq_len} tokens, accumulation "
        f"{first.grad_accumulation}, checkpointing {first.activation_checkpointing}, "
        f"{'flash' if first.flash_attention else 'eager'} attention"
    )
    for note in dict.fromkeys(note for p in plans for note in p.notes if "optimizer step" not in note):
        console.print(f"[dim]- {note}[/dim]")


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.compare.split(",") if n.strip()] if args.compare else [args.optimizer]
    for name in names:  # fail on an unknown name before planning anything
        resolve_optimizer(name)
    model = load_model(args.model)
    lora_modules = [m.strip() for m in args.lora_modules.split(",")] if args.lora_modules else None
    plans = [
        plan(
            model,
            name,
            precision=args.precision,
            trainable=args.trainable,
            lora_rank=args.lora_rank,
            lora_modules=lora_modules,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            activation_checkpointing=args.checkpointing,
            flash_attention=args.attention == "flash",
            activation_model=args.activation_model,
            grad_accumulation=args.grad_accumulation,
            devices=args.devices,
            sharding=args.sharding,
            offload=args.offload,
            device=args.device,
            device_memory=args.device_memory,
            offload_overlap=not args.no_overlap,
            mapped_state=args.mapped_state,
        )
        for name in names
    ]
    console = Console()
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2, default=str))
    else:
        render(plans, console)
    if args.plot:
        from ..memory.plot import plot_plans

        plot_plans(plans, args.plot)
        console.print(f"wrote {args.plot}")
    return 0
