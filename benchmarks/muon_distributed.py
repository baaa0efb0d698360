"""Distributed Muon under FSDP2: the owner-rank path against DTensor's implicit collectives (issue 13 item 5).

Launches itself with torchrun on N gloo CPU processes per world size. Each process builds the same transformer-like
set of matrices (``--layers`` blocks of q/k/v (3d x d), out (d x d), up (4d x d), down (d x 4d); d = ``--dim``:
50.3M parameters at the defaults), shards it with ``fully_shard`` (Shard(0) DTensors), gives it fixed gradients,
and steps Muon with ``distributed="owner"`` and ``distributed="dtensor"`` interleaved (owner, dtensor, owner, ...)
so load changes hit both alike. Step time: the slowest rank's ``opt.step()`` between barriers, median over the
timed steps (after one untimed warm-up step each). Bytes: what every rank sends, summed over ranks, per step:

* owner path: counted by the path itself (``lmopt.optim._muon_distributed.COMM_BYTES``: a gather sends each
  rank's padded shard to the owner once, a scatter sends the owner's other shards once each);
* DTensor path: every functional collective DTensor issues (``torch.ops._c10d_functional.*``, seen by a dispatch
  mode), charged with a ring algorithm's sends per rank: all-gather ``(n - 1) x input``, reduce-scatter and
  all-to-all ``(n - 1) / n x input``, all-reduce ``2 (n - 1) / n x input``.

Usage: python benchmarks/muon_distributed.py [--world 2 4] [--dim 1024] [--layers 4] [--steps 3]
       [--out benchmarks/results/muon_distributed.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------------------ worker (per rank)
def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    import lmopt
    from lmopt.optim import _muon_distributed

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, args.threads))

    class CountCollectives(CommDebugMode):  # DTensor routes its collectives through an active CommDebugMode
        def __init__(self) -> None:
            super().__init__()
            self.sent = 0.0

        def __torch_dispatch__(self, func, types, fargs=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)  # "_c10d_functional.all_reduce.default" (or the legacy "c10d_functional" namespace)
            if "c10d_functional" in name and fargs:
                size = _nbytes(fargs[0])
                if "all_gather_into_tensor" in name:
                    self.sent += (world - 1) * size
                elif "reduce_scatter_tensor" in name or "all_to_all_single" in name:
                    self.sent += (world - 1) / world * size
                elif "all_reduce" in name:
                    self.sent += 2 * (world - 1) / world * size
                elif "wait_tensor" not in name and "wrap_tensor" not in name:
                    raise NotImplementedError(f"no byte count for {name}")
            return super().__torch_dispatch__(func, types, fargs, kwargs)

    def _nbytes(t) -> float:
        if isinstance(t, (list, tuple)):
            return float(sum(x.numel() * x.element_size() for x in t))
        return float(t.numel() * t.element_size())

    d = args.dim
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * args.layers

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.ParameterList([nn.Parameter(torch.randn(s) * 0.02) for s in shapes])
        fully_shard(model)
        g = torch.Generator().manual_seed(1 + rank)
        for p in model:
            local = p.to_local()
            p.grad = DTensor.from_local(
                torch.randn(local.shape, generator=g) * 1e-3,
                p.device_mesh,
                p.placements,
                shape=p.shape,
                stride=p.stride(),
            )
        return model

    paths = ["owner", "dtensor"]
    models = {path: build() for path in paths}
    opts = {
        path: lmopt.create_optimizer("muon", list(models[path].parameters()), lr=1e-3, distributed=path)
        for path in paths
    }
    times: dict[str, list[float]] = {p: [] for p in paths}
    sent: dict[str, list[float]] = {p: [] for p in paths}
    for k in range(args.steps + 1):
        for path in paths:
            counter = CountCollectives()
            before = sum(_muon_distributed.COMM_BYTES.values())
            dist.barrier()
            start = time.perf_counter()
            with counter:
                opts[path].step()
            dist.barrier()
            elapsed = time.perf_counter() - start
            mine = torch.tensor([elapsed, counter.sent + sum(_muon_distributed.COMM_BYTES.values()) - before])
            slowest = mine[:1].clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            total = mine[1:].clone()
            dist.all_reduce(total)
            if k > 0:  # the first step of each path is a warm-up (state allocation, first-touch)
                times[path].append(slowest.item())
                sent[path].append(total.item())
    if rank == 0:
        n = sum(torch.Size(s).numel() for s in shapes)
        result = {
            "world": world,
            "params": n,
            "threads": args.threads,
            **{f"{p}_median_s": statistics.median(times[p]) for p in paths},
            **{f"{p}_times_s": times[p] for p in paths},
            **{f"{p}_bytes_per_step": statistics.median(sent[p]) for p in paths},
        }
        Path(args.result).write_text(json.dumps(result))
    dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="threads per process (0: cores / world, at least 1)")
    parser.add_argument("--out", default=None, help="a markdown file for the table (e.g. benchmarks/results/...)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    rows = []
    for world in args.world:
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={world}",
                "--nnodes=1",
                f"--master-port={_free_port()}",
                "--master-addr=127.0.0.1",
                __file__,
                "--worker",
                f"--dim={args.dim}",
                f"--layers={args.layers}",
                f"--steps={args.steps}",
                f"--threads={threads}",
                f"--result={result}",
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-4000:])
            rows.append(json.loads(result.read_text()))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"Muon step under FSDP2 (gloo, CPU): owner-rank path vs DTensor's implicit collectives; {_cpu_name()}, "
        f"{os.cpu_count()} cores shared by all processes (and by other jobs on this machine: read the ratios).",
        "",
        f"`python benchmarks/muon_distributed.py --world {' '.join(map(str, args.world))} --dim {args.dim} "
        f"--layers {args.layers} --steps {args.steps}`",
        "",
        "| processes | parameters | threads / process | owner step (median s) | dtensor step (median s) | "
        "dtensor / owner time | owner MB sent / step | dtensor MB sent / step | dtensor / owner bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['params'] / 1e6:.1f}M | {r['threads']} | {r['owner_median_s']:.2f} | "
            f"{r['dtensor_median_s']:.2f} | {r['dtensor_median_s'] / r['owner_median_s']:.2f} | "
            f"{r['owner_bytes_per_step'] / 1e6:.1f} | {r['dtensor_bytes_per_step'] / 1e6:.1f} | "
            f"{r['dtensor_bytes_per_step'] / max(r['owner_bytes_per_step'], 1):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
