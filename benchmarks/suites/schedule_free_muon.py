"""Schedule-Free AdamW, AdaBound, Lookahead and Muon beside their peers.

Peers: schedulefree's AdamWScheduleFree, torch.optim.Muon (with torch.optim.AdamW for the 1-D tensors, which
torch's Muon refuses), pytorch_optimizer's AdaBound and Lookahead (when installed).

The elementwise optimizers run at the default ~50M parameters; Muon's Newton-Schulz iterations are matmul-bound
(~1.3 TFLOP per step at 50M), so run its cases at a smaller size:

    python benchmarks/step_speed.py --suite schedule_free_muon --only "schedule-free,adabound,lookahead"
    python benchmarks/step_speed.py --suite schedule_free_muon --only muon --params 2e6 \\
        --out benchmarks/results/step_speed_muon.md
"""

from __future__ import annotations

import torch
from harness import Case

import lmopt
from lmopt.optim.adabound import AdaBound
from lmopt.optim.lookahead import Lookahead
from lmopt.optim.muon import Muon
from lmopt.optim.schedule_free import ScheduleFreeAdamW

_SF = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=10)
_AB = dict(lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, weight_decay=0.0)
_ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


# ------------------------------------------------------------------------------------------- Schedule-Free AdamW
def schedulefree_peer(params):
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(params, **_SF)
    opt.train()
    return opt


def lmopt_sf(params):
    return ScheduleFreeAdamW(params, **_SF)


def lmopt_sf_foreach(params):
    return ScheduleFreeAdamW(params, implementation="foreach", **_SF)


def lmopt_sf_for_loop(params):
    return ScheduleFreeAdamW(params, implementation="for_loop", **_SF)


# ------------------------------------------------------------------------------------------- AdaBound
def po_adabound(params):
    from pytorch_optimizer import AdaBound as PeerAdaBound

    return PeerAdaBound(params, weight_decouple=False, **_AB)


def lmopt_adabound(params):
    return AdaBound(params, **_AB)


def lmopt_adabound_foreach(params):
    return AdaBound(params, implementation="foreach", **_AB)


# ------------------------------------------------------------------------------------------- Lookahead
def po_lookahead(params):
    from pytorch_optimizer import Lookahead as PeerLookahead

    return PeerLookahead(torch.optim.AdamW(params, fused=True, **_ADAMW), k=5, alpha=0.5)


def lmopt_lookahead_torch_inner(params):
    return Lookahead(torch.optim.AdamW(params, fused=True, **_ADAMW), k=5, alpha=0.5)


def lmopt_lookahead_adamw(params):
    return lmopt.create_optimizer("lookahead_adamw", params, lookahead_k=5, **_ADAMW)


# ------------------------------------------------------------------------------------------- Muon
class _TorchMuonPair(torch.optim.Optimizer):
    """torch.optim.Muon on the matrices and torch.optim.AdamW (fused) on the vectors, as one object."""

    def __init__(self, params, **kw):
        matrices = [p for p in params if p.ndim == 2]
        vectors = [p for p in params if p.ndim != 2]
        self.muon = torch.optim.Muon(matrices, **kw)
        self.adamw = torch.optim.AdamW(
            vectors, lr=kw["lr"], betas=(0.9, 0.95), weight_decay=kw["weight_decay"], fused=True
        )
        super().__init__(params, {})
        self.state = self.muon.state
        self.state.update(self.adamw.state)

    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()
        self.state.update(self.adamw.state)


_MUON = dict(lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")


def torch_muon(params):
    return _TorchMuonPair(params, **_MUON)


def lmopt_muon_bf16(params):
    return Muon(params, ns_dtype="bf16", **_MUON)


def lmopt_muon(params):
    return Muon(params, **_MUON)


def lmopt_muon_for_loop(params):
    return Muon(params, implementation="for_loop", **_MUON)


CASES = [
    Case("schedulefree AdamWScheduleFree", "schedule-free adamw", "schedulefree_peer", peer=True),
    Case("lmopt schedule-free auto (blocked)", "schedule-free adamw", "lmopt_sf"),
    Case("lmopt schedule-free foreach", "schedule-free adamw", "lmopt_sf_foreach"),
    Case("lmopt schedule-free for_loop", "schedule-free adamw", "lmopt_sf_for_loop"),
    Case("pytorch_optimizer AdaBound", "adabound", "po_adabound", peer=True),
    Case("lmopt adabound auto (blocked)", "adabound", "lmopt_adabound"),
    Case("lmopt adabound foreach", "adabound", "lmopt_adabound_foreach"),
    Case(
        "pytorch_optimizer Lookahead(torch AdamW fused)",
        "lookahead(adamw)",
        "po_lookahead",
        peer=True,
        bytes_per_param=32.0,
        note="k=5: + (12 + 8) B / 5 per step for the slow update",
    ),
    Case("lmopt Lookahead(torch AdamW fused)", "lookahead(adamw)", "lmopt_lookahead_torch_inner", bytes_per_param=32.0),
    Case("lmopt lookahead_adamw", "lookahead(adamw)", "lmopt_lookahead_adamw", bytes_per_param=32.0),
    Case(
        "torch.optim.Muon (bf16 NS) + AdamW", "muon", "torch_muon", peer=True, bytes_per_param=20.0, note="matmul-bound"
    ),
    Case("lmopt muon ns_dtype=bf16 (torch's definition)", "muon", "lmopt_muon_bf16", bytes_per_param=20.0),
    Case("lmopt muon auto (fp32 NS on CPU, foreach)", "muon", "lmopt_muon", bytes_per_param=20.0),
    Case("lmopt muon for_loop (fp32 NS)", "muon", "lmopt_muon_for_loop", bytes_per_param=20.0),
]
