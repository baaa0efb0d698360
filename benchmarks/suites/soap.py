"""SOAP beside heavyball's SOAP (the multi-tensor ``ForeachSOAP`` of heavyball 1.x, ``heavyball.SOAP`` in 3.x).

Both run the same settings: the authors' hyperparameters (betas (0.95, 0.95), shampoo_beta 0.95, eps 1e-8,
weight decay 0.01), the eigenbases refreshed every 10 steps (heavyball: ``use_precond_schedule=False``,
``precondition_frequency=10``), no dimension merging, 1-D tensors unpreconditioned, every dimension of the
transformer shapes under ``max_precond_dim``. SOAP is matmul-bound (per m x n matrix and step: G G^T, G^T G and
four rotations, ~6 mn(m + n) flops; every 10th step a QR of each basis), so run it at a small size:

    python benchmarks/step_speed.py --suite soap --params 2e6 --steps 30 --seconds 5

The median step excludes most refresh steps (1 in 10); the table's note gives the mean as well.
"""

from __future__ import annotations

from harness import Case

from lmopt.optim.soap import SOAP

_SOAP = dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01, precondition_frequency=10)


def _keeping_grads(opt, params):
    opt._bench_grads = [(p, p.grad) for p in params]  # heavyball sets p.grad = None after its step
    return opt


def reattach_grads(opt):
    for p, g in opt._bench_grads:
        p.grad = g


def heavyball_soap(params):
    import heavyball

    opt = heavyball.SOAP(
        params,
        merge_dims=False,
        precondition_1d=False,
        max_precond_dim=10000,
        use_precond_schedule=False,
        **_SOAP,
    )
    return _keeping_grads(opt, params)


def lmopt_soap(params):
    return _keeping_grads(SOAP(params, max_precond_dim=10000, **_SOAP), params)


def lmopt_soap_foreach(params):
    return _keeping_grads(SOAP(params, max_precond_dim=10000, implementation="foreach", **_SOAP), params)


def lmopt_soap_for_loop(params):
    return _keeping_grads(SOAP(params, max_precond_dim=10000, implementation="for_loop", **_SOAP), params)


def lmopt_soap_bf16(params):
    return _keeping_grads(SOAP(params, max_precond_dim=10000, preconditioner_precision="bf16", **_SOAP), params)


CASES = [
    Case("heavyball SOAP (ForeachSOAP)", "soap", "heavyball_soap", peer=True, prepare="reattach_grads"),
    Case("lmopt soap auto (for_loop)", "soap", "lmopt_soap", prepare="reattach_grads"),
    Case("lmopt soap foreach", "soap", "lmopt_soap_foreach", prepare="reattach_grads"),
    Case("lmopt soap preconditioner_precision=bf16", "soap", "lmopt_soap_bf16", prepare="reattach_grads"),
]
