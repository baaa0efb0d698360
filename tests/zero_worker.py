"""Worker for test_zero.py, launched with torchrun (2 CPU processes, gloo).

Every optimizer of the test database under DDP, once plain and once inside ``ZeroRedundancyOptimizer`` through
``lmopt.train.zero_optimizer`` (its state partitioned across the ranks), from the same weights on the same
batches: the largest relative parameter difference after 4 steps, the number of parameters whose state each rank
holds, or the error ``zero_optimizer`` raised. Rank 0 writes the JSON file named on the command line.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmopt.train import zero_optimizer  # noqa: E402
from tests.optim_db import OPTIM_DB, make_batch, make_model  # noqa: E402

STEPS = 4


def train(spec, kw, zero: bool):
    model = make_model()
    ddp = DistributedDataParallel(model)
    if zero:
        optimizer = zero_optimizer(spec.name, list(model.parameters()), **kw)
    else:
        optimizer = spec.make(model, kw)
    step = spec.distributed_step or spec.step
    rank = dist.get_rank()
    updates = [0.0] * len(list(model.parameters()))
    for k in range(STEPS):
        x, y = make_batch(seed=40 + k, n=32)
        before = [p.detach().clone() for p in model.parameters()]
        step(ddp, optimizer, x[rank * 16 : (rank + 1) * 16], y[rank * 16 : (rank + 1) * 16])
        for i, (p, b) in enumerate(zip(model.parameters(), before)):
            updates[i] = max(updates[i], float((p.detach() - b).abs().max()))
    return model, optimizer, updates


def main(out_path: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    results = {}
    for spec in OPTIM_DB:
        kw = dict(spec.variants[0])
        try:
            zero_model, zero_opt, _ = train(spec, kw, zero=True)
        except ValueError as err:
            if "cannot run inside ZeroRedundancyOptimizer" not in str(err):
                results[spec.name] = {"error": f"ValueError: {err}"}
            else:
                results[spec.name] = {"refused": str(err)}
            continue
        except Exception as err:  # reported per optimizer, the others still run
            results[spec.name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        plain_model, _, updates = train(spec, kw, zero=False)
        per_param = [
            [float((a.detach() - b.detach()).abs().max()), float(b.detach().abs().max()), u, b.numel()]
            for a, b, u in zip(zero_model.parameters(), plain_model.parameters(), updates, strict=True)
        ]
        held = len(zero_opt.optim.state)
        total = [None] * dist.get_world_size()
        dist.all_gather_object(total, held)
        results[spec.name] = {"per_param": per_param, "held": total, "params": len(per_param)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    gc.collect()  # DDP reducers freed while the process group still exists (else gloo aborts at exit)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
