"""Worker for test_distributed.py, launched with torchrun (2 CPU processes, gloo).

For every spec of the test database that opts in, trains the same small model twice from the same weights with
the same batches: once sharded with FSDP2 (DTensor parameters) and once unsharded on this process, then writes
the largest relative difference per optimizer to the JSON file named on the command line (rank 0).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.optim_db import OPTIM_DB, make_batch, make_model  # noqa: E402


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results = {}
    for spec in OPTIM_DB:
        if not spec.distributed:
            continue
        kw = dict(spec.variants[0])
        try:
            sharded, plain = make_model(), make_model()
            fully_shard(sharded)
            opt_sharded, opt_plain = spec.make(sharded, kw), spec.make(plain, kw)
            step = spec.distributed_step or spec.step
            for k in range(6):
                x, y = make_batch(seed=10 + k)
                step(sharded, opt_sharded, x, y)
                step(plain, opt_plain, x, y)
            worst = 0.0
            for p, q in zip(sharded.parameters(), plain.parameters()):
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                scale = q.detach().abs().max().clamp_min(1e-12)
                worst = max(worst, ((full.detach() - q.detach()).abs().max() / scale).item())
            results[spec.name] = {"max_rel_err": worst}
            if spec.lmopt_engine:  # a NaN in one rank's shard must stop the step on every rank
                x, y = make_batch(seed=99)
                opt_sharded.zero_grad()
                (sharded(x) - y).pow(2).mean().backward()
                grad = list(sharded.parameters())[0].grad
                if dist.get_rank() == 0:
                    grad.to_local().view(-1)[0] = float("nan")
                try:
                    opt_sharded.step()
                    results[spec.name]["nonfinite_raised"] = False
                except FloatingPointError:
                    results[spec.name]["nonfinite_raised"] = True
        except NotImplementedError as err:
            results[spec.name] = {"unsupported": str(err)}
        except Exception as err:  # reported per optimizer, the others still run
            results[spec.name] = {"error": f"{type(err).__name__}: {err}"}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
