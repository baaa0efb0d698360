"""Step time of optimizers beside their peers, one fresh process per implementation.

Usage:
    python benchmarks/step_speed.py --suite adamw                 # ~50M fp32 parameters, >= 20 steps and 3 s
    python benchmarks/step_speed.py --suite adamw --params 5e6 --steps 5 --seconds 0.5   # quick smoke run

A suite is a module in benchmarks/suites/ defining ``CASES: list[harness.Case]`` and the factory functions the
cases name. The table (median / min / max ms, ratio to the fastest peer of the same algorithm, effective bandwidth
and its share of the machine's in-place add bandwidth, optimizer-state bytes per parameter, other processes' CPU
use during the timed steps) goes to benchmarks/results/step_speed_<suite>.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suites"))

from harness import Case, Result, add_bandwidth, machine_description, time_case  # noqa: E402


def _run_one(suite: str, index: int, args: argparse.Namespace) -> None:
    module = importlib.import_module(suite)
    case: Case = module.CASES[index]
    build = getattr(module, case.factory)
    prepare = getattr(module, case.prepare) if case.prepare else None
    out = time_case(build, prepare, args.params, args.steps, args.seconds)
    print("RESULT " + json.dumps(out))


def _spawn(suite: str, index: int, case: Case, args: argparse.Namespace) -> Result:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--suite",
        suite,
        "--run-case",
        str(index),
        "--params",
        str(args.params),
        "--steps",
        str(args.steps),
        "--seconds",
        str(args.seconds),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return Result(case=case, ok=True, **json.loads(line[7:]))
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Result(case=case, ok=False, error=err[:200])


def _table(results: list[Result], bandwidth: float) -> list[str]:
    fastest_peer: dict[str, float] = {}
    for r in results:
        if r.ok and r.case.peer:
            fastest_peer[r.case.algorithm] = min(fastest_peer.get(r.case.algorithm, math.inf), r.median_ms)
    rows = [
        "| implementation | algorithm | first step ms | median ms | min | max | steps | ratio to fastest peer "
        "| GB/s | % of add roofline | state B/param | other CPU % | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.ok:
            rows.append(f"| {r.case.name} | {r.case.algorithm} | failed: {r.error} |||||||||||")
            continue
        peer = fastest_peer.get(r.case.algorithm)
        ratio = f"{r.median_ms / peer:.2f}" if peer else "-"
        gbs = r.case.bytes_per_param * r.n_params / (r.median_ms / 1e3) / 1e9
        rows.append(
            f"| {r.case.name}{' (peer)' if r.case.peer else ''} | {r.case.algorithm} | {r.first_ms:.0f} | "
            f"{r.median_ms:.1f} | {r.min_ms:.1f} | {r.max_ms:.1f} | {r.steps} | {ratio} | {gbs:.1f} | "
            f"{100 * gbs / bandwidth:.0f}% | {r.state_bytes / r.n_params:.3f} | {100 * r.other_cpu:.0f} | "
            f"{r.case.note} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, help="module name in benchmarks/suites/")
    parser.add_argument("--params", type=float, default=50e6, help="approximate parameter count (default 50e6)")
    parser.add_argument("--steps", type=int, default=20, help="minimum timed steps (default 20)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds (default 3)")
    parser.add_argument("--only", help="comma-separated substrings: run only matching case names")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per case")
    parser.add_argument("--out", help="output Markdown file (default benchmarks/results/step_speed_<suite>.md)")
    parser.add_argument("--run-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_case is not None:
        _run_one(args.suite, args.run_case, args)
        return 0

    module = importlib.import_module(args.suite)
    cases = list(enumerate(module.CASES))
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",")]
        cases = [(i, c) for i, c in cases if any(k in c.name.lower() for k in keys)]
    machine = machine_description()
    bandwidth = add_bandwidth()
    print(f"{machine}\nin-place add bandwidth: {bandwidth:.1f} GB/s", flush=True)
    results = []
    for index, case in cases:
        result = _spawn(args.suite, index, case, args)
        status = f"{result.median_ms:8.1f} ms" if result.ok else f"failed: {result.error}"
        print(f"  {case.name:<48} {status}", flush=True)
        results.append(result)
    command = "python benchmarks/step_speed.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"# Step speed: suite `{args.suite}`",
        "",
        f"- machine: {machine}",
        f"- in-place add bandwidth (a.add_(b), 512 MB fp32, 3 x nbytes): {bandwidth:.1f} GB/s",
        f"- parameters: {results[0].n_params if results and results[0].ok else '?':,} fp32 in transformer-like "
        f"shapes; >= {args.steps} timed steps and {args.seconds} s after 3 warm-up steps, one process per case",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{command}`",
        "",
        *_table(results, bandwidth),
        "",
        "GB/s = bytes the algorithm must read and write per parameter x parameters / median step time. "
        "'other CPU %' is the share of the machine's CPU time used by other processes during the timed steps "
        "(noise: compare ratios only when it is low).",
    ]
    out = Path(args.out) if args.out else HERE / "results" / f"step_speed_{args.suite}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[7:]))
    print(f"\nwritten to {out}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
