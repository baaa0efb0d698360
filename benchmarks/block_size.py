"""The block size of lmopt's cache-blocked (``blocked``) CPU paths: step time per block size, one process each.

Every optimizer with a ``blocked`` implementation is timed at each block size (``LMOPT_BLOCK_ELEMENTS``, read by
``lmopt.optim._dispatch`` at import) on the same ~50M fp32 parameters; the table gives median ms and the ratio to
the fastest block size of that optimizer, so one block size can serve all of them.

Usage:
    python benchmarks/block_size.py                        # 2^15 .. 2^19, ~50M parameters
    python benchmarks/block_size.py --params 1e7 --blocks 16,17,18 --seconds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import add_bandwidth, machine_description, time_case  # noqa: E402

#: registry name -> constructor arguments (the blocked path, explicitly)
OPTIMIZERS = {
    "lion": {"lr": 1e-4, "weight_decay": 0.1},
    "adafactor": {"lr": 1e-3, "beta1": 0.9},
    "came": {"lr": 1e-4},
    "sophia": {"lr": 1e-4},
    "schedule_free_adamw": {"lr": 1e-3, "weight_decay": 0.1},
    "adabound": {"lr": 1e-3, "weight_decay": 0.1},
}


def _run_one(name: str, args: argparse.Namespace) -> None:
    import lmopt

    def build(params):
        return lmopt.create_optimizer(name, params, implementation="blocked", **OPTIMIZERS[name])

    print("RESULT " + json.dumps(time_case(build, None, args.params, args.steps, args.seconds)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--blocks", default="15,16,17,18,19", help="log2 of the block sizes")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--out", default=str(HERE / "results" / "block_size.md"))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        _run_one(args.run, args)
        return 0
    blocks = [int(b) for b in args.blocks.split(",")]
    names = [n.strip() for n in args.optimizers.split(",")]
    machine = machine_description()
    print(f"{machine}\nin-place add bandwidth: {add_bandwidth():.1f} GB/s", flush=True)
    table: dict[str, dict[int, float]] = {}
    other_cpu = []
    for name in names:
        for b in blocks:
            env = {**os.environ, "LMOPT_BLOCK_ELEMENTS": str(1 << b)}
            cmd = [sys.executable, __file__, "--run", name, "--params", str(args.params), "--steps", str(args.steps)]
            cmd += ["--seconds", str(args.seconds)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"  {name} 2^{b}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
                continue
            result = json.loads(line[7:])
            table.setdefault(name, {})[b] = result["median_ms"]
            other_cpu.append(result["other_cpu"])
            print(f"  {name:<22} 2^{b}: {result['median_ms']:8.1f} ms", flush=True)
    head = "| optimizer | " + " | ".join(f"2^{b} ms (ratio)" for b in blocks) + " |"
    rows = [head, "|---|" + "---|" * len(blocks)]
    for name, by_block in table.items():
        best = min(by_block.values())
        cells = [f"{by_block[b]:.1f} ({by_block[b] / best:.2f})" if b in by_block else "-" for b in blocks]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    command = "python benchmarks/block_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Block size of the cache-blocked CPU paths",
        "",
        f"- machine: {machine}",
        f"- parameters: ~{args.params:.0e} fp32; median of >= {args.steps} steps and {args.seconds} s, a process each",
        f"- other processes' CPU during the timed steps: max {100 * max(other_cpu or [0]):.0f}%",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `{command}`",
        "",
        *rows,
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
