"""Interleaved step times of one algorithm's cases of a suite, in one process, on a shared parameter set.

For a loaded machine, where one-process-per-case timings drift with other processes' load: every round steps
each optimizer once in turn, so load changes hit all cases alike and the ratios stay comparable. It does not
replace step_speed.py (fresh process per case, the protocol); it is the fallback measurement.

Usage: python benchmarks/interleaved_compare.py SUITE ALGORITHM [--params 50e6] [--threads 1] [--rounds 4]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "suites")]

from harness import make_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("algorithm")
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite = importlib.import_module(args.suite)
    cases = [c for c in suite.CASES if c.algorithm == args.algorithm]
    params = make_params(args.params)  # gradients are left in place; optimizers only read them
    optimizers = []
    for case in cases:
        opt = getattr(suite, case.factory)(params)
        opt.step()
        opt.step()
        optimizers.append(opt)
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(args.rounds):
        for case, opt in zip(cases, optimizers, strict=True):
            start = time.perf_counter()
            opt.step()
            times[case.name].append(time.perf_counter() - start)
    fastest_peer = min(statistics.median(times[c.name]) for c in cases if c.peer)
    print("| implementation | min ms | median ms | median / fastest peer |")
    print("|---|---|---|---|")
    for case in cases:
        ts = times[case.name]
        median = statistics.median(ts)
        label = case.name + (" (peer)" if case.peer else "")
        print(f"| {label} | {min(ts) * 1e3:.0f} | {median * 1e3:.0f} | {median / fastest_peer:.2f} |")


if __name__ == "__main__":
    main()
