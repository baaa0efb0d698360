"""Choose the block size of lmopt's 8-bit and 4-bit state by measurement: accuracy, speed and memory.

Accuracy: the moments of a real run (fp32 AdamW on the byte-level LM of lowbit_quality.py, after --warm-steps
steps) are quantized and dequantized with each block size; reported: relative RMS error of m and of v, and the
relative RMS error of the Adam direction m / (sqrt(v) + eps) that the step actually applies (the quantity that
matters). Speed: one lmopt AdamW8bit / AdamW4bit step on --numel elements (kernel path), ms. Memory: the scales
add 4 / block bytes per parameter. Writes benchmarks/results/lowbit_blocksize.md.

    python benchmarks/lowbit_blocksize.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from lowbit_quality import TinyGPT, batches, load_corpus  # noqa: E402

import lmopt  # noqa: E402
from lmopt.quant import MomentFormat, QuantizedState  # noqa: E402

BLOCKS = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def real_moments(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    data = load_corpus(1_000_000)
    model = TinyGPT(128, 2, 4, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    for x, y in batches(data, steps, 16, 128, seed=1):
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [(s["exp_avg"], s["exp_avg_sq"]) for p, s in opt.state.items() if p.numel() >= 4096]


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def round_trip(x: torch.Tensor, precision: str, kind: str, block: int) -> torch.Tensor:
    fmt = MomentFormat(precision, kind, block)  # type: ignore[arg-type]
    q = QuantizedState.zeros(x.shape, fmt.qmap, block)
    return q.copy_(x).dequantize()


def speed(cls, numel: int, block: int) -> float:
    p = torch.nn.Parameter(torch.randn(numel) * 0.02)
    p.grad = torch.randn(numel) * 1e-3
    opt = cls([p], block_size=block, check_finite=False)
    opt.step()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-steps", type=int, default=100)
    parser.add_argument("--numel", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowbit_blocksize.md"))
    args = parser.parse_args()
    moments = real_moments(args.warm_steps)
    n = sum(m.numel() for m, _ in moments)
    lines = [
        "# Block size of the low-bit state: accuracy, speed, memory",
        "",
        f"Command: `python benchmarks/lowbit_blocksize.py --warm-steps {args.warm_steps} --numel {args.numel}`. "
        f"Moments: fp32 AdamW state of the byte-level LM ({len(moments)} tensors >= 4096 elements, {n:,} "
        f"elements) after {args.warm_steps} steps. Errors are relative RMS over all those tensors; 'direction' "
        "is m / (sqrt(v) + 1e-8) from the dequantized moments against the fp32 ones. Speed: one kernel step, "
        f"{args.numel:,} fp32 parameters, {torch.get_num_threads()} threads, median ms (shared machine: compare "
        "within a column).",
        "",
        "| precision | block | err m | err v | err direction | scale bytes/param | step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision, cls in (("8bit", lmopt.AdamW8bit), ("4bit", lmopt.AdamW4bit)):
        for block in BLOCKS:
            em = ev = ed = 0.0
            num_m = num_v = num_d = den_m = den_v = den_d = 0.0
            for m, v in moments:
                mq = round_trip(m, precision, "first", block)
                vq = round_trip(v, precision, "second", block)
                d, dq = m / (v.sqrt() + 1e-8), mq / (vq.sqrt() + 1e-8)
                num_m += (mq - m).pow(2).sum().item()
                den_m += m.pow(2).sum().item()
                num_v += (vq - v).pow(2).sum().item()
                den_v += v.pow(2).sum().item()
                num_d += (dq - d).pow(2).sum().item()
                den_d += d.pow(2).sum().item()
            em, ev, ed = (num_m / den_m) ** 0.5, (num_v / den_v) ** 0.5, (num_d / den_d) ** 0.5
            ms = speed(cls, args.numel, block)
            line = f"| {precision} | {block} | {em:.4f} | {ev:.4f} | {ed:.4f} | {4 / block:.4f} | {ms:.1f} |"
            print(line, flush=True)
            lines.append(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
