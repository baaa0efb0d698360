"""Optimizer-state bytes and peak memory per optimizer on the ``lmopt compare`` workload.

Each case runs in a fresh Python process (so one optimizer's allocator state cannot leak into the next): build
the compare model (a randomly initialised Llama, :mod:`lmopt.bench.workload`), take the resident size as the
baseline, build the optimizer, run ``--steps`` training steps on random token batches of the compare shape
(memory does not depend on the token values), and report

* ``state``: bytes of every tensor in ``optimizer.state`` (inner tensors of tensor subclasses included, shared
  storage once: :func:`lmopt.bench.compare.optimizer_state_bytes`);
* ``registry``: the state the optimizer's registry entry declares for these parameters (lmopt optimizers only;
  it must equal ``state``);
* ``peak``: the process's peak resident set size (``VmHWM``) during the steps, and ``growth``: that peak minus
  the baseline (parameters are in the baseline; gradients, optimizer state, activations and temporaries are
  in the growth). On CUDA, ``torch.cuda.max_memory_allocated`` instead.

Peers (``--peers``) are the libraries lmopt's optimizers are tested against, built on the same parameters.

Usage::

    python benchmarks/peak_memory.py                 # lmopt's default compare set + peers -> results table
    python benchmarks/peak_memory.py --optimizers adamw,lion --no-peers --steps 3

Writes ``benchmarks/results/peak_memory.md`` (``--out`` to change) with the machine description and the
command.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: peer optimizers: name -> (import, how to build it from the model)
PEERS: dict[str, str] = {
    "torch.optim.AdamW (fused)": "torch_adamw",
    "bitsandbytes AdamW8bit": "bnb_adamw8bit",
    "torchao AdamW8bit": "torchao_adamw8bit",
    "transformers Adafactor": "hf_adafactor",
    "lion-pytorch Lion": "lion_pytorch",
    "came-pytorch CAME": "came_pytorch",
    "adam-mini Adam_mini": "adam_mini",
    "schedulefree AdamWScheduleFree": "schedulefree_adamw",
}


_PEER_MODULES = {
    "torch_adamw": "torch.optim",
    "bnb_adamw8bit": "bitsandbytes",
    "torchao_adamw8bit": "torchao.optim",
    "hf_adafactor": "transformers.optimization",
    "lion_pytorch": "lion_pytorch",
    "came_pytorch": "came_pytorch",
    "adam_mini": "adam_mini",
    "schedulefree_adamw": "schedulefree",
}


def _import_peer(kind: str) -> None:
    importlib.import_module(_PEER_MODULES[kind])


def _peer_optimizer(kind: str, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "torch_adamw":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if kind == "bnb_adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-3)
    if kind == "torchao_adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=1e-3)
    if kind == "hf_adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    if kind == "lion_pytorch":
        from lion_pytorch import Lion

        return Lion(params, lr=1e-4)
    if kind == "came_pytorch":
        from came_pytorch import CAME

        return CAME(params, lr=1e-4)
    if kind == "adam_mini":
        from adam_mini import Adam_mini

        cfg = model.config
        return Adam_mini(
            model.named_parameters(),
            lr=1e-3,
            dim=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            verbose=False,
        )
    if kind == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(params, lr=1e-3)
        opt.train()
        return opt
    raise ValueError(f"unknown peer {kind!r}")


def worker(args: argparse.Namespace) -> dict:
    """One case, in this process: JSON-ready measurements."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmopt.bench.compare import MemoryMeter, optimizer_state_bytes, resolve_device, train_step
    from lmopt.bench.corpus import ByteTokenizer
    from lmopt.bench.workload import build_model, count_parameters
    from lmopt.registry import create_optimizer, resolve_name

    device = resolve_device(args.device)
    model = build_model(args.model, vocab_size=ByteTokenizer.vocab_size, seq_len=args.seq_len, seed=0, device=device)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch_size, args.seq_len), generator=generator) for _ in range(args.steps)]
    # imports (peer libraries, the registry's modules) happen before the baseline is taken
    if args.worker.startswith("peer:"):
        _import_peer(args.worker[5:])
        spec = None
    else:
        spec, _ = resolve_name(args.worker)
    meter = MemoryMeter(device)
    meter.start()
    if spec is None:
        optimizer = _peer_optimizer(args.worker[5:], model)
        declared = None
    else:
        accepted = inspect.signature(spec.cls.__init__).parameters
        optimizer = create_optimizer(args.worker, model, **({"nonfinite": "skip"} if "nonfinite" in accepted else {}))
        declared = sum(
            spec.state_bytes(p.shape, p.dtype, **{k: v for k, v in group.items() if k not in ("params", "param_names")})
            for group in optimizer.param_groups
            for p in group["params"]
        )
    started = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, batch.to(device), max_grad_norm=1.0)
    elapsed = time.perf_counter() - started
    growth, peak = meter.peak()
    return {
        "case": args.worker,
        "parameters": count_parameters(model),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "state_bytes": optimizer_state_bytes(optimizer),
        "declared_state_bytes": declared,
        "peak_bytes": peak,
        "growth_bytes": growth,
        "baseline_bytes": meter.baseline,
        "seconds_per_step": elapsed / max(1, args.steps),
        "method": meter.method,
    }


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _machine(threads: int | None) -> str:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {platform.platform()}; load average at the end: {load}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--optimizers",
        help="comma-separated registry names (default: lmopt compare's default "
        "set, those registered); 'all' for every registered optimizer",
    )
    parser.add_argument("--no-peers", action="store_true", help="lmopt's optimizers only")
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each case's process")
    parser.add_argument("--out", default=str(HERE / "results" / "peak_memory.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from lmopt.bench.compare import CompareConfig, resolve_optimizer_names

    defaults = CompareConfig()
    args.batch_size = args.batch_size or defaults.batch_size
    args.seq_len = args.seq_len or defaults.seq_len
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0

    requested = None if not args.optimizers else args.optimizers.split(",")
    names, skipped = resolve_optimizer_names(requested)
    cases = [(name, name) for name in names]
    if not args.no_peers:
        cases += [(label, f"peer:{kind}") for label, kind in PEERS.items()]
    rows, failures = [], []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for label, case in cases:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            case,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            failures.append((label, tail))
            print(f"{label}: failed: {tail}", file=sys.stderr)
            continue
        result = json.loads(line[len("RESULT ") :])
        result["label"] = label
        rows.append(result)
        print(
            f"{label}: state {_mib(result['state_bytes'])} MiB, peak growth {_mib(result['growth_bytes'])} MiB",
            file=sys.stderr,
        )
    if not rows:
        print("no case ran", file=sys.stderr)
        return 1
    first = rows[0]
    cmd = "python benchmarks/peak_memory.py " + " ".join(sys.argv[1:])
    lines = [
        "# Peak memory and optimizer state on the `lmopt compare` workload",
        "",
        f"Workload: `{args.model}` Llama ({first['parameters']:,} fp32 parameters, "
        f"{_mib(first['parameter_bytes'])} MiB), {args.steps} training steps of {args.batch_size} x "
        f"{args.seq_len} tokens, gradient clipping at 1.0, each case in a fresh process.",
        "",
        f"Machine: {_machine(args.threads)}.",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Peak memory ({first['method'].split(':')[0]}): the peak (RSS high-water mark on CPU, reset after "
        f"gc "
        f"and malloc_trim; max_memory_allocated on CUDA) during the steps, and its growth over the baseline "
        f"taken before the optimizer was built (interpreter, torch, transformers and the model's "
        f"parameters: {_mib(first['baseline_bytes'])} MiB).",
        "",
        "| optimizer | state MiB | state B/param | registry MiB | peak growth MiB | peak MiB | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_mib(r['state_bytes'])} | {r['state_bytes'] / r['parameters']:.3f} | "
            f"{_mib(r['declared_state_bytes'])} | {_mib(r['growth_bytes'])} | {_mib(r['peak_bytes'])} | "
            f"{r['seconds_per_step']:.3f} |"
        )
    lines += [
        "",
        "state: bytes of every tensor in `optimizer.state`; registry: what the optimizer's registry entry "
        "declares for the same parameters (lmopt only; equal to state when the declaration is exact); "
        "peak growth: peak minus baseline (gradients, optimizer state, activations, temporaries). s/step "
        "is indicative only (few steps, shared machine; see step_speed.py for timings).",
    ]
    for item in skipped:
        lines.append(f"\nSkipped `{item['name']}`: {item['reason']}.")
    for label, reason in failures:
        lines.append(f"\n`{label}` failed: {reason}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
