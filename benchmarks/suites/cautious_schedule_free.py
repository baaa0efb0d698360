"""Cautious AdamW / Lion and Schedule-Free SGD / RAdam beside their peers (one process per case).

    python benchmarks/step_speed.py --suite cautious_schedule_free

The same cases as ``benchmarks/cautious_schedule_free_speed.py`` (its interleaved rounds are the measurement to
read on a loaded machine; this suite follows step_speed.py's protocol). Peers that write into ``p.grad`` (the
schedulefree package, C-Optim) get their gradients restored before every step, outside the timed region, so the
repeated in-place division cannot drift them into denormals. C-Optim is loaded from its git directory
(``LMOPT_C_OPTIM``, default /work/.mirror/kyleliang919+C-Optim/repo); without it those cases fail, named.
"""

from __future__ import annotations

import os

import torch
from cautious_schedule_free_speed import _ADAMW, _LION, _RADAM, _SGD, _c_optim
from harness import Case

import lmopt

_C_OPTIM: list = []


def _c():
    if not _C_OPTIM:
        _C_OPTIM.append(_c_optim(os.environ.get("LMOPT_C_OPTIM", "/work/.mirror/kyleliang919+C-Optim/repo")))
    if _C_OPTIM[0] is None:
        raise RuntimeError("C-Optim's git directory not found (set LMOPT_C_OPTIM)")
    return _C_OPTIM[0]


def _keep_grads(opt, params):
    opt._bench_grads = [(p, p.grad.clone()) for p in params]
    return opt


def restore_grads(opt):
    """Put back the gradients a peer modified in place (outside the timed step)."""
    for p, g in opt._bench_grads:
        p.grad.copy_(g)


def record_finite_norm(opt):
    """What lmopt's gradient clipping does: it computed the global norm anyway, and hands it to the optimizer."""
    opt.record_grad_norm(torch.tensor(1.0))


def c_optim_adamw(params):
    c_adamw, _ = _c()
    return _keep_grads(c_adamw.AdamW(params, eps=1e-8, no_deprecation_warning=True, foreach=False, **_ADAMW), params)


def lmopt_cautious_adamw(params):
    return lmopt.create_optimizer("cautious_adamw", params, **_ADAMW)


def lmopt_cautious_adamw_foreach(params):
    return lmopt.create_optimizer("cautious_adamw", params, implementation="foreach", **_ADAMW)


def c_optim_lion(params):
    _, c_lion = _c()
    return c_lion.Lion(params, **_LION)


def po_cautious_lion(params):
    from pytorch_optimizer import Lion

    return Lion(params, cautious=True, **_LION)


def lmopt_cautious_lion(params):
    return lmopt.create_optimizer("cautious_lion", params, **_LION)


def sf_sgd_peer(params):
    import schedulefree

    opt = schedulefree.SGDScheduleFree(params, **_SGD)
    opt.train()
    return _keep_grads(opt, params)


def lmopt_sf_sgd(params):
    return lmopt.create_optimizer("schedule_free_sgd", params, **_SGD)


def sf_radam_peer(params):
    import schedulefree

    opt = schedulefree.RAdamScheduleFree(params, **_RADAM)
    opt.train()
    return _keep_grads(opt, params)


def lmopt_sf_radam(params):
    return lmopt.create_optimizer("schedule_free_radam", params, **_RADAM)


_NORM = "global norm recorded by clipping replaces the inf/NaN check"
CASES = [
    Case("C-Optim AdamW (per-tensor path)", "cautious adamw", "c_optim_adamw", peer=True, prepare="restore_grads"),
    Case("lmopt cautious_adamw auto (blocked)", "cautious adamw", "lmopt_cautious_adamw", bytes_per_param=40.0),
    Case("lmopt cautious_adamw auto, norm from clipping", "cautious adamw", "lmopt_cautious_adamw",
         bytes_per_param=40.0, prepare="record_finite_norm", note=_NORM),
    Case("lmopt cautious_adamw foreach", "cautious adamw", "lmopt_cautious_adamw_foreach"),
    Case("C-Optim Lion", "cautious lion", "c_optim_lion", peer=True, bytes_per_param=20.0),
    Case("pytorch_optimizer Lion(cautious=True)", "cautious lion", "po_cautious_lion", peer=True, bytes_per_param=20.0),
    Case("lmopt cautious_lion auto (blocked)", "cautious lion", "lmopt_cautious_lion", bytes_per_param=28.0),
    Case("lmopt cautious_lion auto, norm from clipping", "cautious lion", "lmopt_cautious_lion",
         bytes_per_param=28.0, prepare="record_finite_norm", note=_NORM),
    Case("schedulefree SGDScheduleFree", "schedule-free sgd", "sf_sgd_peer", peer=True, bytes_per_param=20.0,
         prepare="restore_grads"),
    Case("lmopt schedule_free_sgd auto (blocked)", "schedule-free sgd", "lmopt_sf_sgd", bytes_per_param=20.0),
    Case("lmopt schedule_free_sgd auto, norm from clipping", "schedule-free sgd", "lmopt_sf_sgd",
         bytes_per_param=20.0, prepare="record_finite_norm", note=_NORM),
    Case("schedulefree RAdamScheduleFree", "schedule-free radam", "sf_radam_peer", peer=True,
         prepare="restore_grads"),
    Case("lmopt schedule_free_radam auto (blocked)", "schedule-free radam", "lmopt_sf_radam"),
    Case("lmopt schedule_free_radam auto, norm from clipping", "schedule-free radam", "lmopt_sf_radam",
         prepare="record_finite_norm", note=_NORM),
]  # fmt: skip
