"""Prodigy and APOLLO / APOLLO-mini beside the authors' packages (prodigyopt, apollo-torch), fp32.

Every case uses the same hyperparameters as its peer. Bytes per parameter (the roofline), fp32:

* Prodigy: the first pass reads g, p, p0, s, m, v and writes s, m, v (36); the update reads p, m, v and writes p
  (16): 52 per parameter (two passes: the update needs the step size estimated from every parameter).
* APOLLO: g, p read and p written (12); the projected moments are ``2 r / n`` of the matrix and the projection a
  matmul per matrix (2 r flops per element), so the step is matmul-bound: run it at a smaller size, as Muon:

    python benchmarks/step_speed.py --suite prodigy_apollo --only prodigy
    python benchmarks/step_speed.py --suite prodigy_apollo --only apollo --params 1e7 \\
        --out benchmarks/results/step_speed_apollo.md

apollo-torch keeps each projection matrix (drawn once every ``update_proj_gap`` steps); lmopt keeps only its seed
and draws it again every step (the paper's memory), or keeps it with ``cache_projection=True`` (the peer's
memory): both are timed. The 2-D tensors are projected (rank 128, Hugging Face Trainer's default; APOLLO-mini
rank 1), the vectors get AdamW, in lmopt and in the peer alike.
"""

from __future__ import annotations

from harness import Case

from lmopt.optim.apollo import APOLLO, APOLLOMini
from lmopt.optim.prodigy import Prodigy

#: growth_rate bounds d: the harness's gradients never change (a linear objective), on which d grows without limit
_PRODIGY = dict(lr=1.0, betas=(0.9, 0.999), weight_decay=0.01, growth_rate=1.02)
_APOLLO = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
_PROJECTED = dict(rank=128, proj="random", scale_type="channel", scale=1.0, update_proj_gap=200, proj_type="std")
_MINI = dict(rank=1, proj="random", scale_type="tensor", scale=128.0, update_proj_gap=200, proj_type="std")


# ---------------------------------------------------------------------------------------------------- Prodigy
def prodigyopt_peer(params):
    from prodigyopt import Prodigy as PeerProdigy

    return PeerProdigy(params, **_PRODIGY)


def lmopt_prodigy(params):
    return Prodigy(params, **_PRODIGY)


def lmopt_prodigy_blocked(params):
    return Prodigy(params, implementation="blocked", **_PRODIGY)


# ---------------------------------------------------------------------------------------------------- APOLLO
def _apollo_peer(params, projected):
    from apollo_torch import APOLLOAdamW

    matrices = [p for p in params if p.ndim == 2]
    rest = [p for p in params if p.ndim != 2]
    return APOLLOAdamW([{"params": matrices, **projected}, {"params": rest}], **_APOLLO)


def apollo_torch_peer(params):
    return _apollo_peer(params, _PROJECTED)


def apollo_torch_mini_peer(params):
    return _apollo_peer(params, _MINI)


def _lmopt_kwargs(projected):
    return {k: v for k, v in projected.items() if k != "proj"}


def lmopt_apollo(params):
    return APOLLO(params, **_APOLLO, **_lmopt_kwargs(_PROJECTED))


def lmopt_apollo_cached(params):
    return APOLLO(params, **_APOLLO, **_lmopt_kwargs(_PROJECTED), cache_projection=True)


def lmopt_apollo_mini(params):
    return APOLLOMini(params, **_APOLLO, **_lmopt_kwargs(_MINI))


def lmopt_apollo_mini_cached(params):
    return APOLLOMini(params, **_APOLLO, **_lmopt_kwargs(_MINI), cache_projection=True)


CASES = [
    Case("prodigyopt Prodigy", "prodigy", "prodigyopt_peer", peer=True, bytes_per_param=52.0),
    Case("lmopt prodigy auto (for_loop)", "prodigy", "lmopt_prodigy", bytes_per_param=52.0),
    Case("lmopt prodigy blocked", "prodigy", "lmopt_prodigy_blocked", bytes_per_param=52.0),
    Case("apollo-torch APOLLOAdamW rank 128", "apollo", "apollo_torch_peer", peer=True, bytes_per_param=12.0),
    Case("lmopt apollo (seed: draws P every step)", "apollo", "lmopt_apollo", bytes_per_param=12.0),
    Case("lmopt apollo cache_projection", "apollo", "lmopt_apollo_cached", bytes_per_param=12.0),
    Case("apollo-torch APOLLOAdamW rank 1", "apollo-mini", "apollo_torch_mini_peer", peer=True, bytes_per_param=12.0),
    Case("lmopt apollo_mini (seed)", "apollo-mini", "lmopt_apollo_mini", bytes_per_param=12.0),
    Case("lmopt apollo_mini cache_projection", "apollo-mini", "lmopt_apollo_mini_cached", bytes_per_param=12.0),
]
