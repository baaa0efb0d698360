"""Does an 8-bit or 4-bit first moment cost CAME or Adafactor quality? fp32 vs 8bit vs 4bit ``momentum_precision``.

Same workload as ``lowbit_quality.py`` (a small byte-level GPT on the Python standard library's own sources),
smaller so that the whole comparison (eight runs) takes about three minutes on a 2-core CPU: one thread per run
by default (the model is tiny: a second thread gains little and, on a shared machine, costs up to 6x when the
other core is busy). Every run starts from the same
initial weights and sees the same batches; reported: validation loss on held-out bytes, the mean training loss
of the last 10% of steps, and the optimizer's state bytes (first moment codes + scales, factored statistics).
As a yardstick for noise, each optimizer is also run once in fp32 with a different batch order ("fp32, other
data order"): a precision whose gap to fp32 is well inside that one is indistinguishable on this budget.
Writes benchmarks/results/lowbit_factored_quality.md.

    python benchmarks/lowbit_factored_quality.py                   # 250 steps, batch 16 x 64 bytes, d=64
    python benchmarks/lowbit_factored_quality.py --steps 1000 --d-model 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lowbit_quality import TinyGPT, load_corpus, train_and_evaluate  # noqa: E402

import lmopt  # noqa: E402

#: hyperparameters per optimizer: lmopt compare's recipes for this workload (lmopt.bench.compare.COMPARE_RECIPES);
#: Adafactor gets beta1=0.9 so that it has a first moment to quantize
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "CAME": {"name": "came", "lr": 3e-4},
    "Adafactor": {"name": "adafactor", "lr": 3e-3, "beta1": 0.9, "relative_step": False, "scale_parameter": False},
}
PRECISIONS = ("fp32", "8bit", "4bit")


def run(
    label: str,
    hyper: dict[str, Any],
    precision: str,
    args: argparse.Namespace,
    train: torch.Tensor,
    val: torch.Tensor,
    data_seed: int = 1,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyGPT(args.d_model, args.layers, args.heads, args.seq)
    kw = {k: v for k, v in hyper.items() if k != "name"}
    opt = lmopt.create_optimizer(
        hyper["name"], lmopt.param_groups(model, weight_decay=0.1), state_precision=precision, **kw
    )
    losses, val_losses, elapsed = train_and_evaluate(model, opt, args, train, val, data_seed)
    tail = losses[-max(1, args.steps // 10) :]
    states = list(opt.state.values())
    result = {
        "label": label,
        "val": sum(val_losses) / len(val_losses),
        "train": sum(tail) / len(tail),
        "seconds": elapsed,
        "state_bytes": sum(t.nbytes for s in states for t in s.values() if torch.is_tensor(t)),
        "moment_bytes": sum(
            t.nbytes for s in states for k, t in s.items() if k.startswith("exp_avg") and torch.is_tensor(t)
        ),
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(f"{label}: val {result['val']:.4f}, train tail {result['train']:.4f}, {elapsed:.0f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowbit_factored_quality.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    data = load_corpus(args.corpus_bytes)
    split = int(data.numel() * 0.95)
    train, val = data[:split], data[split:]
    started = time.perf_counter()
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for name, hyper in OPTIMIZERS.items():
        results = [run(f"{name} {precision}", hyper, precision, args, train, val) for precision in PRECISIONS]
        noise = run(f"{name} fp32, other data order", hyper, "fp32", args, train, val, data_seed=3)
        base = results[0]
        rows += [(name, r, base) for r in [*results, noise]]
    total = time.perf_counter() - started
    n_params = rows[0][1]["params"]
    lines = [
        "# Low-bit first moment of CAME and Adafactor: byte-level LM on the Python standard library",
        "",
        f"Command: `python benchmarks/lowbit_factored_quality.py --steps {args.steps} --batch {args.batch} --seq "
        f"{args.seq} --d-model {args.d_model} --layers {args.layers} --threads {args.threads}`; {n_params:,} "
        "parameters, "
        f"{args.steps * args.batch * args.seq:,} training tokens (bytes) per run, same initial weights and batches; "
        "warmup + cosine, weight decay 0.1 (matrices), clip 1.0; CAME lr 3e-4, betas (0.9, 0.999, 0.9999); "
        "Adafactor lr 3e-3, beta1 0.9, no relative step or parameter scaling; first moment quantized for tensors "
        f">= 4096 elements (blocks of 256 for 8-bit, 128 for 4-bit); torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {total:.0f} s in all (1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs).",
        "",
        "| optimizer | first moment | val loss | vs fp32 | train loss (last 10%) | vs fp32 | first-moment bytes | "
        "state bytes | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r, base in rows:
        precision = r["label"][len(name) + 1 :]
        lines.append(
            f"| {name} | {precision} | {r['val']:.4f} | {100 * (r['val'] / base['val'] - 1):+.2f}% | "
            f"{r['train']:.4f} | {100 * (r['train'] / base['train'] - 1):+.2f}% | {r['moment_bytes']:,} | "
            f"{r['state_bytes']:,} | {r['seconds']:.0f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
