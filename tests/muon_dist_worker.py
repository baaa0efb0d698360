"""Worker for test_muon_distributed.py, launched with torchrun (2 CPU processes, gloo).

Distributed Muon: a model with the matrix kinds Muon meets under FSDP2 (an uneven row split, a tall matrix, a
one-row matrix whose second shard is empty, 3-D expert weights split over experts 2 + 1, a 4-D weight
flattened) is trained sharded (``fully_shard``: Shard(0) DTensors) and unsharded from the same weights with the
same batches, for Muon and NorMuon through the owner-rank path (default) and DTensor's implicit path, with Polar
Express, cautious masking and cautious weight decay, 3-D weights per matrix and flattened. Writes, per case,
the largest relative difference to the unsharded run and the bytes the owner path sent (rank 0's JSON).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmopt  # noqa: E402
from lmopt.optim import _muon_distributed  # noqa: E402


class ExpertModel(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 5)  # 5 rows: 3 + 2 over two ranks
        self.experts = nn.Parameter(torch.randn(3, 5, 7, generator=g) * 0.4)  # 3 experts: 2 + 1
        self.tall = nn.Parameter(torch.randn(20, 7, generator=g) * 0.3)
        self.row = nn.Parameter(torch.randn(1, 20, generator=g) * 0.3)  # one row: the second shard is empty
        self.kernel = nn.Parameter(torch.randn(4, 2, 2, 5, generator=g) * 0.3)  # 4-D: one (4, 20) matrix
        with torch.no_grad():
            for p in (*self.inp.parameters(), *self.mid.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.inp(x))))  # (n, 5)
        e = torch.tanh(torch.einsum("nd,edk->nek", h, self.experts)).mean(1)  # (n, 7)
        t = torch.tanh(e @ self.tall.T)  # (n, 20)
        k = torch.tanh(t @ self.kernel.reshape(4, 20).T)  # (n, 4)
        return torch.cat([t @ self.row.T, k], dim=1)  # (n, 5)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randn(16, 5, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    for k in range(steps):
        x, y = batch(10 + k)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        opt.step()


CASES = {
    "muon_owner": ("muon", {"lr": 2e-2}),
    "muon_dtensor": ("muon", {"lr": 2e-2, "distributed": "dtensor"}),
    "muon_owner_for_loop": ("muon", {"lr": 2e-2, "implementation": "for_loop"}),
    "muon_owner_polar_express": ("muon", {"lr": 2e-2, "ns_coefficients": "polar_express"}),
    "muon_owner_cautious": ("muon", {"lr": 2e-2, "cautious": True, "cautious_weight_decay": True}),
    "muon_dtensor_cautious": (
        "muon",
        {
            "lr": 2e-2,
            "cautious": True,
            "cautious_weight_decay": True,
            "distributed": "dtensor",
            "implementation": "for_loop",
        },
    ),
    "muon_owner_flatten_3d": ("muon", {"lr": 2e-2, "matrix_3d": "flatten"}),
    "normuon_owner": ("normuon", {"lr": 2e-2}),
    "normuon_dtensor": ("normuon", {"lr": 2e-2, "distributed": "dtensor"}),
    "normuon_owner_cautious_pe": (
        "normuon",
        {"lr": 2e-2, "cautious": True, "ns_coefficients": "polar_express", "implementation": "for_loop"},
    ),
}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    results = {}
    for case, (name, kw) in CASES.items():
        try:
            sharded, plain = ExpertModel(), ExpertModel()
            fully_shard(sharded)
            opt_sharded = lmopt.create_optimizer(name, list(sharded.parameters()), **kw)
            opt_plain = lmopt.create_optimizer(name, list(plain.parameters()), **kw)
            before = dict(_muon_distributed.COMM_BYTES)
            train(sharded, opt_sharded)
            sent = sum(_muon_distributed.COMM_BYTES.values()) - sum(before.values())
            train(plain, opt_plain)
            worst = 0.0
            for p, q in zip(sharded.parameters(), plain.parameters(), strict=True):
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                scale = q.detach().abs().max().clamp_min(1e-12)
                worst = max(worst, ((full.detach() - q.detach()).abs().max() / scale).item())
            moved = max(
                (q.detach() - ExpertModel().state_dict()[n]).abs().max().item() for n, q in plain.named_parameters()
            )
            state_ok = True
            for p, q in zip(sharded.parameters(), plain.parameters(), strict=True):
                for key, value in opt_plain.state[q].items():
                    mine = opt_sharded.state[p][key]
                    mine = mine.full_tensor() if hasattr(mine, "full_tensor") else mine
                    if mine.shape != value.shape or not torch.allclose(mine, value, rtol=1e-4, atol=1e-6):
                        state_ok = False
            sent_all = torch.tensor([float(sent)])
            dist.all_reduce(sent_all)
            results[case] = {"max_rel_err": worst, "moved": moved, "state_ok": state_ok, "bytes_sent": sent_all.item()}
        except Exception as err:  # reported per case, the others still run
            results[case] = {"error": f"{type(err).__name__}: {err}"}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
