"""Cost of lmopt's training-loop helpers on ~50M fp32 parameters: clipping + step, and complete checkpoints.

Cases (each timed in this process, medians of >= 10 repetitions after 3 warm-ups; gradients refilled outside
the timed region because clipping scales them in place):

* ``torch clip_grad_norm_ + torch AdamW fused`` -- the usual loop;
* ``lmopt clip_grad_norm + lmopt AdamW`` -- the clip hands its norm to the optimizer (no second read of grads);
* ``torch clip_grad_norm_ + lmopt AdamW`` -- the optimizer checks the gradients itself;
* ``save_checkpoint`` / ``load_checkpoint`` of model + AdamW state + RNG (atomic write with fsync, SHA-256
  manifest, verified ``weights_only`` load), with MB/s.

Usage: ``python benchmarks/train_step.py [--params 5e7] [--repeats 10] [--out benchmarks/results/train_step.md]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import _machine_busy_jiffies, _own_jiffies, machine_description, make_params  # noqa: E402

import lmopt  # noqa: E402
from lmopt.train import clip_grad_norm, load_checkpoint, save_checkpoint  # noqa: E402

HYPER = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _time(fn, refill, repeats: int) -> list[float]:
    for _ in range(3):
        refill()
        fn()
    times = []
    for _ in range(repeats):
        refill()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=5e7)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.md"))
    args = parser.parse_args(argv)

    params = make_params(args.params)
    grads = [p.grad.clone() for p in params]
    n = sum(p.numel() for p in params)

    def refill() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad.copy_(g)

    torch_opt = torch.optim.AdamW(params, fused=True, **HYPER)
    lmopt_opt = lmopt.AdamW(params, **HYPER)
    cases = {
        "torch clip_grad_norm_ + torch AdamW fused": lambda: (
            torch.nn.utils.clip_grad_norm_(params, 1e-3),
            torch_opt.step(),
        ),
        "lmopt clip_grad_norm + lmopt AdamW (norm handed over)": lambda: (
            clip_grad_norm(lmopt_opt, 1e-3),
            lmopt_opt.step(),
        ),
        "torch clip_grad_norm_ + lmopt AdamW (checks grads itself)": lambda: (
            torch.nn.utils.clip_grad_norm_(params, 1e-3),
            lmopt_opt.step(),
        ),
        "lmopt clip_grad_norm alone": lambda: clip_grad_norm(lmopt_opt, 1e-3),
        "torch clip_grad_norm_ alone": lambda: torch.nn.utils.clip_grad_norm_(params, 1e-3),
    }
    rows = []
    busy0, total0 = _machine_busy_jiffies()
    own0 = _own_jiffies()
    for name, fn in cases.items():
        t = _time(fn, refill, args.repeats)
        rows.append((name, statistics.median(t) * 1e3, min(t) * 1e3, max(t) * 1e3))

    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)
    save_times, load_times, size = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        for _ in range(max(3, args.repeats // 3)):
            t = time.perf_counter()
            save_checkpoint(path, step=1, model=model, optimizer=lmopt_opt)
            save_times.append(time.perf_counter() - t)
            size = path.stat().st_size
            t = time.perf_counter()
            load_checkpoint(path, model=model, optimizer=lmopt_opt)
            load_times.append(time.perf_counter() - t)
    busy1, total1 = _machine_busy_jiffies()
    other = max(0, (busy1 - busy0) - (_own_jiffies() - own0)) / max(1, total1 - total0)

    lines = [
        "# Training-step helpers and checkpoints",
        "",
        f"`python benchmarks/train_step.py --params {args.params:g} --repeats {args.repeats}`",
        "",
        f"{machine_description()}; {n / 1e6:.1f}M fp32 parameters; "
        f"other processes' CPU load during the run: {other:.0%}",
        "",
        "| case | median ms | min ms | max ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {med:.1f} | {lo:.1f} | {hi:.1f} |" for name, med, lo, hi in rows]
    mb = size / 2**20
    lines += [
        "",
        "| checkpoint (model + AdamW state + RNG) | median s | MB | MB/s |",
        "|---|---|---|---|",
        f"| save_checkpoint (tmp, fsync, rename, SHA-256 manifest) | {statistics.median(save_times):.2f} | "
        f"{mb:.0f} | {mb / statistics.median(save_times):.0f} |",
        f"| load_checkpoint (SHA-256 verify, weights_only, shape checks) | {statistics.median(load_times):.2f} | "
        f"{mb:.0f} | {mb / statistics.median(load_times):.0f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
