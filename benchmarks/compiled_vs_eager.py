"""``implementation="compiled"`` (the group's step through torch.compile / Inductor) beside ``auto`` on this machine.

Usage:
    python benchmarks/compiled_vs_eager.py                       # ~8M fp32 parameters, the optimizers of issue #16
    python benchmarks/compiled_vs_eager.py --params 2e6 --repeats 9 --optimizers adamw,lion

For each optimizer: build it twice on the same parameters (``auto`` and ``compiled``), compile (the first compiled
step, timed apart), then time steps alternating between the two (interleaved, so a busy machine slows both alike)
and report medians and the ratio compiled / auto (< 1: the compiled path is faster). ``auto`` keeps today's CPU
paths where the ratio is > 1 (docs/compile.md). Writes benchmarks/results/compiled_vs_eager.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import machine_description  # noqa: E402

import lmopt  # noqa: E402

DEFAULT = "adamw,lion,adafactor,came,adam_mini,schedule_free_adamw,adabound,sophia,muon,stable_adamw,adamw8bit"


def _params(total: float) -> list[torch.nn.Parameter]:
    side = 1024
    count = max(1, round(total / (side * side)))
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(side, side) * 0.02) for _ in range(count)]
    params += [torch.nn.Parameter(torch.zeros(side)) for _ in range(count)]
    return params


def _build(name: str, params: list[torch.nn.Parameter], implementation: str) -> torch.optim.Optimizer:
    spec = lmopt.registry.get_spec(name)
    hyper = {**dict(spec.compare or {}), "implementation": implementation}
    hyper.pop("model", None)
    return lmopt.create_optimizer(name, params, **hyper)


def _bench(name: str, total: float, repeats: int) -> dict:
    base = _params(total)
    pairs = {}
    for impl in ("auto", "compiled"):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in base]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        opt = _build(name, ps, impl)
        if hasattr(opt, "train"):
            opt.train()
        pairs[impl] = (opt, ps)
    start = time.perf_counter()
    pairs["compiled"][0].step()  # compiles
    compile_s = time.perf_counter() - start
    pairs["auto"][0].step()
    times: dict[str, list[float]] = {"auto": [], "compiled": []}
    for _ in range(repeats):
        for impl in ("auto", "compiled"):
            opt = pairs[impl][0]
            start = time.perf_counter()
            opt.step()
            times[impl].append(time.perf_counter() - start)
    auto_ms = statistics.median(times["auto"]) * 1e3
    compiled_ms = statistics.median(times["compiled"]) * 1e3
    used = pairs["auto"][0]._implementation_used if hasattr(pairs["auto"][0], "_implementation_used") else {}
    return {
        "name": name,
        "auto": "/".join(sorted(set(used.values()))) or "?",
        "auto_ms": auto_ms,
        "compiled_ms": compiled_ms,
        "ratio": compiled_ms / auto_ms,
        "compile_s": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=8e6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--optimizers", default=DEFAULT)
    parser.add_argument("--out", default=str(HERE / "results" / "compiled_vs_eager.md"))
    args = parser.parse_args()
    rows = []
    for name in args.optimizers.split(","):
        try:
            row = _bench(name, args.params, args.repeats)
        except Exception as error:  # a failure is a row of the table, not the end of the run
            row = {"name": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
        rows.append(row)
        print(row, flush=True)
    lines = [
        '# `implementation="compiled"` vs `auto` (CPU)',
        "",
        f"Machine: {machine_description()}; torch {torch.__version__}; {args.params:.0e} fp32 parameters "
        f"(1024x1024 matrices + biases), gradients fixed, {args.repeats} interleaved steps each, medians.",
        "",
        f"Command: `python benchmarks/compiled_vs_eager.py --params {args.params:g} --repeats {args.repeats}`",
        "",
        "| optimizer | auto ran | auto ms | compiled ms | compiled / auto | first compile s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | |")
        else:
            lines.append(
                f"| {r['name']} | {r['auto']} | {r['auto_ms']:.1f} | {r['compiled_ms']:.1f} | {r['ratio']:.2f} | "
                f"{r['compile_s']:.0f} |"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
