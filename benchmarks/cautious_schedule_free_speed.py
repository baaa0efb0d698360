"""Step time of cautious AdamW / Lion and Schedule-Free SGD / RAdam beside their peers, interleaved in one process.

Every round steps each optimizer of an algorithm once in turn on the same parameters (load changes on a shared
machine hit all cases alike), with the gradients restored from a saved copy before each step, outside the timed
region (the schedulefree package and C-Optim write into ``p.grad``). Reported: median and min ms per step, and the
median's ratio to the fastest peer's. The machine is named from ``lscpu``. lmopt's optimizers check the gradients
for inf/NaN (one more read of them) unless a global norm is recorded, as lmopt's gradient clipping does: rows
"norm from clipping" record one (``record_grad_norm``) before each step, outside the timed region.

Peers: C-Optim's ``AdamW`` (``foreach=False``: its per-tensor path; the default path is a ``torch.compile``-d
asynchronous runtime meant for GPUs) and ``Lion`` (kyleliang919/C-Optim, loaded from a git directory given with
``--c-optim``; skipped when absent), pytorch_optimizer's ``Lion(cautious=True)`` (its mask normalisation is
``numel / (sum + 1)``, the same cost), schedulefree's ``SGDScheduleFree`` and ``RAdamScheduleFree`` (foreach).

Usage:
    python benchmarks/cautious_schedule_free_speed.py [--params 20e6] [--rounds 9] [--threads 1] \\
        [--c-optim /work/.mirror/kyleliang919+C-Optim/repo] [--out benchmarks/results/step_speed_cautious_sf.md]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from harness import make_params  # noqa: E402

import lmopt  # noqa: E402

_ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
_LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.3)
_SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
_RADAM = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)


def _c_optim(git_dir: str | None):
    """C-Optim's modules (c_adamw, c_lion), written from its git directory into a temporary package."""
    if not git_dir or not Path(git_dir).exists():
        return None
    root = Path(tempfile.mkdtemp()) / "c_optim"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name in ("c_adamw.py", "c_lion.py", "opt_utils.py"):
        text = subprocess.run(["git", "-C", git_dir, "show", f"HEAD:{name}"], capture_output=True, text=True)
        (root / name).write_text(text.stdout)
    sys.path.insert(0, str(root.parent))
    return importlib.import_module("c_optim.c_adamw"), importlib.import_module("c_optim.c_lion")


def cases(c_optim) -> dict[str, list[tuple[str, bool, Callable]]]:
    """algorithm -> [(label, is_peer, factory(params))]."""
    import schedulefree
    from pytorch_optimizer import Lion as PoLion

    def sf_peer(cls, kw):
        def build(params):
            opt = cls(params, **kw)
            opt.train()
            return opt

        return build

    out: dict[str, list[tuple[str, bool, Callable]]] = {
        "cautious adamw": [
            ("lmopt cautious_adamw auto (blocked)", False,
             lambda p: lmopt.create_optimizer("cautious_adamw", p, **_ADAMW)),
            ("lmopt cautious_adamw auto, norm from clipping", False,
             lambda p: lmopt.create_optimizer("cautious_adamw", p, **_ADAMW)),
            ("lmopt cautious_adamw foreach", False,
             lambda p: lmopt.create_optimizer("cautious_adamw", p, implementation="foreach", **_ADAMW)),
            ("lmopt cautious_adamw for_loop", False,
             lambda p: lmopt.create_optimizer("cautious_adamw", p, implementation="for_loop", **_ADAMW)),
            ("lmopt adamw auto (fused; no mask)", False, lambda p: lmopt.create_optimizer("adamw", p, **_ADAMW)),
        ],
        "cautious lion": [
            ("pytorch_optimizer Lion(cautious=True)", True, lambda p: PoLion(p, cautious=True, **_LION)),
            ("lmopt cautious_lion auto (blocked)", False,
             lambda p: lmopt.create_optimizer("cautious_lion", p, **_LION)),
            ("lmopt cautious_lion auto, norm from clipping", False,
             lambda p: lmopt.create_optimizer("cautious_lion", p, **_LION)),
            ("lmopt cautious_lion foreach", False,
             lambda p: lmopt.create_optimizer("cautious_lion", p, implementation="foreach", **_LION)),
            ("lmopt cautious_lion for_loop", False,
             lambda p: lmopt.create_optimizer("cautious_lion", p, implementation="for_loop", **_LION)),
        ],
        "schedule-free sgd": [
            ("schedulefree SGDScheduleFree", True, sf_peer(schedulefree.SGDScheduleFree, _SGD)),
            ("lmopt schedule_free_sgd auto (blocked)", False,
             lambda p: lmopt.create_optimizer("schedule_free_sgd", p, **_SGD)),
            ("lmopt schedule_free_sgd auto, norm from clipping", False,
             lambda p: lmopt.create_optimizer("schedule_free_sgd", p, **_SGD)),
            ("lmopt schedule_free_sgd foreach", False,
             lambda p: lmopt.create_optimizer("schedule_free_sgd", p, implementation="foreach", **_SGD)),
            ("lmopt schedule_free_sgd for_loop", False,
             lambda p: lmopt.create_optimizer("schedule_free_sgd", p, implementation="for_loop", **_SGD)),
        ],
        "schedule-free radam": [
            ("schedulefree RAdamScheduleFree", True, sf_peer(schedulefree.RAdamScheduleFree, _RADAM)),
            ("lmopt schedule_free_radam auto (blocked)", False,
             lambda p: lmopt.create_optimizer("schedule_free_radam", p, **_RADAM)),
            ("lmopt schedule_free_radam auto, norm from clipping", False,
             lambda p: lmopt.create_optimizer("schedule_free_radam", p, **_RADAM)),
            ("lmopt schedule_free_radam foreach", False,
             lambda p: lmopt.create_optimizer("schedule_free_radam", p, implementation="foreach", **_RADAM)),
            ("lmopt schedule_free_radam for_loop", False,
             lambda p: lmopt.create_optimizer("schedule_free_radam", p, implementation="for_loop", **_RADAM)),
        ],
    }  # fmt: skip
    if c_optim is not None:
        c_adamw, c_lion = c_optim
        out["cautious adamw"].insert(
            0,
            ("C-Optim AdamW (foreach=False)", True,
             lambda p: c_adamw.AdamW(p, eps=1e-8, no_deprecation_warning=True, foreach=False, **_ADAMW)),
        )  # fmt: skip
        out["cautious lion"].insert(0, ("C-Optim Lion", True, lambda p: c_lion.Lion(p, **_LION)))
    return out


def _machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown machine"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    keys = ("Model name", "CPU(s)", "Flags")
    model, cpus = (fields.get(k, "?").strip() for k in keys[:2])
    flags = fields.get("Flags", "")
    simd = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags.split()]
    return f"{model}, {cpus} CPUs ({', '.join(simd) or 'no AVX2'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=20e6)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--c-optim", default="/work/.mirror/kyleliang919+C-Optim/repo")
    parser.add_argument("--only", default="", help="comma-separated algorithms (default: all)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"machine: {_machine()}; torch {torch.__version__}, {args.threads} thread(s); {args.params:.3g} fp32 "
        f"parameters (transformer shapes); {args.rounds} interleaved rounds after 2 warm-up steps each",
        "",
    ]
    for algorithm, entries in cases(_c_optim(args.c_optim)).items():
        if args.only and algorithm not in args.only.split(","):
            continue
        params = make_params(args.params)
        grads = [p.grad.clone() for p in params]
        optimizers = []
        for _label, _peer, build in entries:
            opt = build(params)
            for _ in range(2):
                for p, g in zip(params, grads, strict=True):
                    p.grad.copy_(g)
                opt.step()
            optimizers.append(opt)
        times: list[list[float]] = [[] for _ in entries]
        for _ in range(args.rounds):
            for i, opt in enumerate(optimizers):
                for p, g in zip(params, grads, strict=True):
                    p.grad.copy_(g)
                if "norm from clipping" in entries[i][0]:
                    opt.record_grad_norm(torch.tensor(1.0))  # what lmopt's clipping hands over: no second read
                start = time.perf_counter()
                opt.step()
                times[i].append(time.perf_counter() - start)
        medians = [statistics.median(t) for t in times]
        peers = [m for m, (_, peer, _) in zip(medians, entries, strict=True) if peer]
        fastest_peer = min(peers) if peers else None
        lines += [f"### {algorithm}", "", "| implementation | min ms | median ms | median / fastest peer |"]
        lines.append("|---|---|---|---|")
        for (label, peer, _), ts, median in zip(entries, times, medians, strict=True):
            ratio = f"{median / fastest_peer:.2f}" if fastest_peer else "-"
            lines.append(f"| {label}{' (peer)' if peer else ''} | {min(ts) * 1e3:.0f} | {median * 1e3:.0f} | {ratio} |")
        lines.append("")
        del optimizers, params, grads
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
