"""Optimizer step time on a CUDA GPU: lmopt's Triton low-bit kernels beside torch's fused fp32 AdamW,
bitsandbytes and torchao, in one process, same parameters (transformer-like shapes, fp32), CUDA-event timing.

Usage (on a GPU machine):
    python benchmarks/step_speed_cuda.py --params 1e9 --params 5e7 --out benchmarks/results/step_speed_cuda.md

Per case: build the optimizer, 5 warm-up steps (Triton / torch.compile compilation happens there), then the
median and min of ``--steps`` timed steps (each step timed with CUDA events), peak GPU memory of the optimizer
state, and the effective bandwidth (bytes the algorithm must move per parameter x parameters / median time).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import state_bytes, transformer_shapes  # noqa: E402

import lmopt  # noqa: E402

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=1.0)

# (name, algorithm, bytes moved per parameter, factory, peer)
CASES = [
    ("torch.optim.AdamW fused (fp32 state)", "adamw", 28, lambda p: torch.optim.AdamW(p, fused=True, **HYPER), True),
    ("lmopt AdamW8bit (Triton)", "adamw", 16, lambda p: lmopt.AdamW8bit(p, **HYPER), False),
    (
        "lmopt AdamW8bit, norm from clipping",
        "adamw",
        16,
        lambda p: lmopt.AdamW8bit(p, check_finite=False, **HYPER),
        False,
    ),
    ("lmopt AdamW4bit (Triton)", "adamw", 14, lambda p: lmopt.AdamW4bit(p, **HYPER), False),
    ("bitsandbytes AdamW8bit", "adamw", 16, "bnb_adamw8bit", True),
    ("torchao AdamW8bit", "adamw", 16, "ao_adamw8bit", True),
    ("torchao AdamW4bit", "adamw", 14, "ao_adamw4bit", True),
    ("torchao AdamWFp8", "adamw", 16, "ao_adamwfp8", True),
    ("lmopt Lion8bit (Triton)", "lion", 14, lambda p: lmopt.Lion8bit(p, **LION), False),
    ("bitsandbytes Lion8bit", "lion", 14, "bnb_lion8bit", True),
]


def _factory(spec):
    if callable(spec):
        return spec
    if spec.startswith("bnb"):
        import bitsandbytes as bnb

        return {
            "bnb_adamw8bit": lambda p: bnb.optim.AdamW8bit(p, **HYPER),
            "bnb_lion8bit": lambda p: bnb.optim.Lion8bit(p, **LION),
        }[spec]
    import torchao.optim as ao

    return {
        "ao_adamw8bit": lambda p: ao.AdamW8bit(p, **HYPER),
        "ao_adamw4bit": lambda p: ao.AdamW4bit(p, **HYPER),
        "ao_adamwfp8": lambda p: ao.AdamWFp8(p, **HYPER),
    }[spec]


def _params(n: float) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in transformer_shapes(n):
        p = torch.nn.Parameter(torch.randn(shape, device="cuda", generator=g) * 0.02)
        p.grad = torch.randn(shape, device="cuda", generator=g) * 1e-3
        params.append(p)
    return params


def _time(factory, n: float, steps: int) -> dict:
    params = _params(n)
    count = sum(p.numel() for p in params)
    opt = factory(params)
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        opt.step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    out = dict(n=count, median=statistics.median(times), min=min(times), state=state_bytes(opt) / count)
    del opt, params
    torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, action="append", help="approximate parameter counts (repeatable)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "step_speed_cuda.md")
    args = parser.parse_args()
    sizes = args.params or [1e9, 5e7]
    a = torch.empty(2**28, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        a.add_(b)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        a.add_(b)
    e1.record()
    e1.synchronize()
    bandwidth = 10 * 3 * a.numel() * 4 / (e0.elapsed_time(e1) / 1e3) / 1e9
    del a, b
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# Step speed on CUDA: lmopt's Triton low-bit kernels beside their peers",
        "",
        f"- GPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
        f"torch {torch.__version__}",
        f"- in-place add bandwidth (a.add_(b), 1 GiB fp32, 3 x nbytes): {bandwidth:.0f} GB/s",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.steps} timed steps "
        "after 5 warm-up steps, CUDA events around each step; one process, cases in table order",
        "- command: `python benchmarks/step_speed_cuda.py " + " ".join(f"--params {s:g}" for s in sizes) + "`",
        "",
    ]
    for n in sizes:
        lines += [
            f"## ~{n:.3g} parameters",
            "",
            "| implementation | algorithm | median ms | min ms | ratio to fastest peer | GB/s | % of add bandwidth "
            "| state B/param |",
            "|---|---|---|---|---|---|---|---|",
        ]
        results = []
        for name, algo, nbytes, spec, peer in CASES:
            try:
                r = _time(_factory(spec), n, args.steps)
                results.append((name, algo, nbytes, peer, r))
                print(f"{n:g} {name}: {r['median']:.3f} ms", flush=True)
            except Exception as exc:  # a peer missing or failing is reported, not fatal
                results.append((name, algo, nbytes, peer, {"error": f"{type(exc).__name__}: {exc}"[:150]}))
                print(f"{n:g} {name}: failed {exc}", flush=True)
        fastest = {}
        for _name, algo, _, peer, r in results:
            if peer and "median" in r:
                fastest[algo] = min(fastest.get(algo, float("inf")), r["median"])
        for name, algo, nbytes, peer, r in results:
            if "error" in r:
                lines.append(f"| {name} | {algo} | failed: {r['error']} |||||| ")
                continue
            gbs = nbytes * r["n"] / (r["median"] / 1e3) / 1e9
            ratio = f"{r['median'] / fastest[algo]:.2f}" if algo in fastest else "-"
            lines.append(
                f"| {name}{' (peer)' if peer else ''} | {algo} | {r['median']:.3f} | {r['min']:.3f} | {ratio} "
                f"| {gbs:.0f} | {100 * gbs / bandwidth:.0f}% | {r['state']:.3f} |"
            )
        lines.append("")
    lines.append(
        "GB/s = bytes the algorithm must read and write per parameter (fp32 AdamW 28, 8-bit 16, 4-bit 14, "
        "8-bit Lion 14) x parameters / median step time."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
