"""Extra memory one optimizer step allocates, at ~50M fp32 parameters in transformer-like shapes (CPU).

For each optimizer (a fresh process each): build it, take two steps (state is created, allocator caches are
warm), reset the process's RSS high-water mark (``clear_refs``), take a third step, and report ``VmHWM`` minus
the RSS before that step: everything the step touched beyond what the process already held (temporaries of
PyTorch code, dequantized moments, the C kernel's stack buffers; glibc returns large blocks to the system on
free, so each temporary shows).

The issue's bound: the extra memory stays under the size of the largest single parameter's fp32 state
(its two fp32 moments: 8 bytes per element of the largest tensor).

Usage:
    python benchmarks/lowbit_step_memory.py                # writes benchmarks/results/lowbit_step_memory.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = {
    "lmopt AdamW8bit (C kernel)": "lmopt.AdamW8bit(params, lr=1e-3, weight_decay=0.1)",
    "lmopt AdamW8bit, for_loop reference path": "lmopt.AdamW8bit(params, lr=1e-3, weight_decay=0.1, "
    "implementation='for_loop')",
    "lmopt AdamW4bit (C kernel)": "lmopt.AdamW4bit(params, lr=1e-3, weight_decay=0.1)",
    "lmopt Lion8bit (C kernel)": "lmopt.Lion8bit(params, lr=1e-4, weight_decay=0.1)",
    "lmopt CAME, state_precision='8bit'": "lmopt.CAME(params, lr=1e-4, state_precision='8bit')",
    "lmopt CAME, fp32 first moment": "lmopt.CAME(params, lr=1e-4)",
    "lmopt AdamW (fp32 state, fused)": "lmopt.AdamW(params, lr=1e-3, weight_decay=0.1)",
    "torch.optim.AdamW fused (fp32 state)": "torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)",
    "bitsandbytes AdamW8bit": "__import__('bitsandbytes').optim.AdamW8bit(params, lr=1e-3, weight_decay=0.1)",
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(name: str, n_params: float) -> dict:
    import torch
    from harness import make_params

    import lmopt  # noqa: F401  (used by the expressions in CASES)

    params = make_params(n_params)
    opt = eval(CASES[name], {"lmopt": lmopt, "torch": torch, "params": params})
    opt.step()
    opt.step()
    largest = max(p.numel() for p in params)
    # RSS high-water mark of the step
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    opt.step()
    hwm = _rss_kib("VmHWM")
    return dict(n=sum(p.numel() for p in params), largest=largest, rss_growth=max(0, hwm - before) * 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lowbit_step_memory.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.params)))
        return 0
    import platform

    import torch

    rows = []
    bound = None
    for name in CASES:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--params", str(args.params)],
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            rows.append(f"| {name} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]} ||")
            continue
        r = json.loads(line[7:])
        bound = 8 * r["largest"]
        rows.append(f"| {name} | {r['rss_growth'] / 2**20:.2f} | {r['rss_growth'] / bound:.3f} |")
        print(rows[-1], flush=True)
    lines = [
        "# Extra memory of one optimizer step (CPU, ~50M fp32 parameters)",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        f"- parameters: ~{args.params:.3g} fp32 in transformer-like shapes (benchmarks/harness.py); the bound is the "
        f"largest parameter's two fp32 moments: {bound / 2**20 if bound else float('nan'):.1f} MiB",
        "- command: `python benchmarks/lowbit_step_memory.py`",
        "",
        "| optimizer | extra memory of a step (RSS high-water growth) MiB | extra / bound |",
        "|---|---|---|",
        *rows,
        "",
        "Extra memory: VmHWM during the step minus VmRSS before it. 'extra / bound' < 1: the step allocates less "
        "than the largest parameter's two fp32 moments.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
