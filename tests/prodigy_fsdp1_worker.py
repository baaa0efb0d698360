"""Worker for test_prodigy_apollo.py (torchrun, 2 CPU processes, gloo): Prodigy with ``fsdp_in_use=True`` on plain
local shards of a flat parameter (FSDP1 style, not DTensors) against an unsharded Prodigy on the whole parameter,
float64, a quadratic objective (so d grows); rank 0 writes the largest difference and both estimates as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmopt  # noqa: E402


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    start = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = 3 * torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    whole = torch.nn.Parameter(start.clone())
    shard = torch.nn.Parameter(start.chunk(world)[rank].clone())
    opt_whole, opt_shard = lmopt.Prodigy([whole]), lmopt.Prodigy([shard], fsdp_in_use=True)
    for k in range(20):
        noise = 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
        whole.grad = whole.detach() - target + noise
        shard.grad = shard.detach() - target.chunk(world)[rank] + noise.chunk(world)[rank]
        opt_whole.step()
        opt_shard.step()
    diff = (shard.detach() - whole.detach().chunk(world)[rank]).abs().max().item()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {"max_diff": diff, "d": opt_whole.param_groups[0]["d"], "d_sharded": opt_shard.param_groups[0]["d"]}, f
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
