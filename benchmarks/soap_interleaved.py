"""SOAP beside heavyball's SOAP, interleaved in one process: the ratio on a loaded machine.

Each case gets its own copy of the same parameters and gradients (heavyball frees ``p.grad`` after a step; the
gradients are re-attached outside the timed region). Every round steps each case once, in an order rotated from
round to round, so load changes hit all cases alike. Reports the median (mostly steps without a basis refresh)
and the mean (every ``precondition_frequency``-th step refreshes the bases: the mean includes that cost, and
heavyball's recompilations) and both ratios to heavyball.

Usage:
    python benchmarks/soap_interleaved.py [--params 2e6] [--rounds 40] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "suites")]

import soap as suite  # noqa: E402
from harness import make_params  # noqa: E402

CASES = [
    ("heavyball SOAP (ForeachSOAP)", "heavyball_soap"),
    ("lmopt soap auto (for_loop)", "lmopt_soap"),
    ("lmopt soap foreach", "lmopt_soap_foreach"),
    ("lmopt soap preconditioner_precision=bf16", "lmopt_soap_bf16"),
]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=2e6)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="comma-separated factory names (default: all)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if not args.only or c[1] in args.only.split(",")]
    optimizers, first = [], {}
    for name, factory in cases:
        opt = getattr(suite, factory)(make_params(args.params))
        start = time.perf_counter()
        suite.reattach_grads(opt)
        opt.step()  # state, first eigendecompositions, heavyball's compilation
        first[name] = time.perf_counter() - start
        optimizers.append(opt)
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for r in range(args.rounds):
        order = list(range(len(cases)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            suite.reattach_grads(optimizers[i])
            start = time.perf_counter()
            optimizers[i].step()
            times[cases[i][0]].append(time.perf_counter() - start)
    peer = cases[0][0]
    peer_median, peer_mean = statistics.median(times[peer]), statistics.mean(times[peer])
    lines = [
        f"- machine: {_cpu_model()}, {args.threads} torch thread(s), torch {torch.__version__}; shared with other "
        "jobs (ratios only)",
        f"- parameters: {sum(p.numel() for p in make_params(args.params)):,} fp32 (transformer shapes); "
        f"{args.rounds} interleaved rounds after the first step",
        f"- command: `python benchmarks/soap_interleaved.py --params {args.params:g} --rounds {args.rounds} "
        f"--threads {args.threads}`",
        "",
        "| implementation | first step s | median ms | mean ms | min ms | median / peer | mean / peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, _ in cases:
        ts = times[name]
        median, mean = statistics.median(ts), statistics.mean(ts)
        label = name + (" (peer)" if name == peer else "")
        lines.append(
            f"| {label} | {first[name]:.1f} | {median * 1e3:.0f} | {mean * 1e3:.0f} | {min(ts) * 1e3:.0f} | "
            f"{median / peer_median:.2f} | {mean / peer_mean:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
