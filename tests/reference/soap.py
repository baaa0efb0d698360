"""The authors' SOAP, transcribed as a test oracle (never shipped).

Source: github.com/nikhilvyas/SOAP, ``soap.py`` (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using
Adam", arXiv:2409.11321). The algorithm is kept line for line: the first step only starts the statistics and
their eigenbases (``torch.linalg.eigh``), the moments live in the eigenbasis, the first moment is rotated back
and forth around every statistics update, the bases are refreshed every ``precondition_frequency`` steps by one
power iteration and a QR with ``exp_avg_sq`` permuted by the estimated eigenvalue order, the weight decay is
applied after the update.

Changes, so that the comparison is exact in float64 and covers lmopt's options:

* the statistics and bases take the gradient's dtype (the authors create them in the default dtype and run the
  decompositions in fp32, which would limit a float64 comparison to fp32 precision);
* ``shampoo_beta=None`` means ``betas[1]`` (the authors' -1);
* ``cautious`` (C-Optim's mask ``1[u * g > 0] / max(mean, 1e-3)`` on the update in the parameter's space, before
  ``normalize_grads``), ``cautious_weight_decay`` (Chen et al. 2025, "Cautious Weight Decay": the decay only
  where ``u * p >= 0``, at SOAP's place, after the update) and ``maximize`` (the gradient negated) are added;
  ``data_format`` is dropped (channels-first only).
"""

from __future__ import annotations

from itertools import chain

import torch


class ReferenceSOAP(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr=3e-3,
        betas=(0.95, 0.95),
        shampoo_beta=None,
        eps=1e-8,
        weight_decay=0.01,
        precondition_frequency=10,
        max_precond_dim=10000,
        merge_dims=False,
        precondition_1d=False,
        normalize_grads=False,
        correct_bias=True,
        cautious=False,
        maximize=False,
        cautious_weight_decay=False,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            cautious=cautious,
            maximize=maximize,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults)

    @staticmethod
    def merge_dims(grad, max_precond_dim):
        shape = grad.shape
        new_shape = []
        curr_shape = 1
        for sh in shape:
            temp_shape = curr_shape * sh
            if temp_shape > max_precond_dim:
                if curr_shape > 1:
                    new_shape.append(curr_shape)
                    curr_shape = sh
                else:
                    new_shape.append(sh)
                    curr_shape = 1
            else:
                curr_shape = temp_shape
        if curr_shape > 1 or len(new_shape) == 0:
            new_shape.append(curr_shape)
        return grad.reshape(new_shape)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                if "Q" not in state:
                    shampoo_beta = group["shampoo_beta"]
                    self.init_preconditioner(
                        grad,
                        state,
                        precondition_frequency=group["precondition_frequency"],
                        precondition_1d=group["precondition_1d"],
                        shampoo_beta=group["betas"][1] if shampoo_beta is None else shampoo_beta,
                        max_precond_dim=group["max_precond_dim"],
                        merge_dims=group["merge_dims"],
                    )
                    self.update_preconditioner(
                        grad,
                        state,
                        max_precond_dim=group["max_precond_dim"],
                        merge_dims=group["merge_dims"],
                        precondition_1d=group["precondition_1d"],
                    )
                    continue  # the first step only starts the statistics

                grad_projected = self.project(
                    grad, state, merge_dims=group["merge_dims"], max_precond_dim=group["max_precond_dim"]
                )
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad_projected, alpha=(1.0 - beta1))
                exp_avg_sq.mul_(beta2).add_(grad_projected.square(), alpha=(1.0 - beta2))
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** (state["step"])
                    bias_correction2 = 1.0 - beta2 ** (state["step"])
                    step_size = step_size * (bias_correction2**0.5) / bias_correction1
                norm_grad = self.project_back(
                    exp_avg / denom, state, merge_dims=group["merge_dims"], max_precond_dim=group["max_precond_dim"]
                )
                if group["cautious"]:  # C-Optim (c_adamw.py): mask = (u * g > 0); mask / mask.mean().clamp(1e-3)
                    mask = (norm_grad * grad > 0).to(grad.dtype)
                    mask.div_(mask.mean().clamp_(min=1e-3))
                    norm_grad = norm_grad * mask
                if group["normalize_grads"]:
                    norm_grad = norm_grad / (1e-30 + torch.mean(norm_grad**2) ** 0.5)
                p.add_(norm_grad, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    decayed = p
                    if group["cautious_weight_decay"]:  # Chen et al. 2025: decay where update and weight agree
                        decayed = p * (norm_grad * p >= 0).to(p.dtype)
                    p.add_(decayed, alpha=(-group["lr"] * group["weight_decay"]))
                self.update_preconditioner(
                    grad,
                    state,
                    max_precond_dim=group["max_precond_dim"],
                    merge_dims=group["merge_dims"],
                    precondition_1d=group["precondition_1d"],
                )
        return loss

    def init_preconditioner(
        self, grad, state, precondition_frequency, shampoo_beta, max_precond_dim, precondition_1d, merge_dims
    ):
        state["GG"] = []
        if grad.dim() == 1:
            if not precondition_1d or grad.shape[0] > max_precond_dim:
                state["GG"].append([])
            else:
                state["GG"].append(torch.zeros(grad.shape[0], grad.shape[0], dtype=grad.dtype, device=grad.device))
        else:
            if merge_dims:
                grad = self.merge_dims(grad, max_precond_dim)
            for sh in grad.shape:
                if sh > max_precond_dim:
                    state["GG"].append([])
                else:
                    state["GG"].append(torch.zeros(sh, sh, dtype=grad.dtype, device=grad.device))
        state["Q"] = None
        state["precondition_frequency"] = precondition_frequency
        state["shampoo_beta"] = shampoo_beta

    def project(self, grad, state, merge_dims=False, max_precond_dim=10000):
        original_shape = grad.shape
        if merge_dims:
            grad = self.merge_dims(grad, max_precond_dim)
        for mat in state["Q"]:
            if len(mat) > 0:
                grad = torch.tensordot(grad, mat, dims=[[0], [0]])
            else:
                grad = grad.permute(list(range(1, len(grad.shape))) + [0])
        if merge_dims:
            grad = grad.reshape(original_shape)
        return grad

    def update_preconditioner(self, grad, state, max_precond_dim=10000, merge_dims=False, precondition_1d=False):
        if state["Q"] is not None:
            state["exp_avg"] = self.project_back(
                state["exp_avg"], state, merge_dims=merge_dims, max_precond_dim=max_precond_dim
            )
        if grad.dim() == 1:
            if precondition_1d and grad.shape[0] <= max_precond_dim:
                state["GG"][0].lerp_(grad.unsqueeze(1) @ grad.unsqueeze(0), 1 - state["shampoo_beta"])
        else:
            new_grad = self.merge_dims(grad, max_precond_dim) if merge_dims else grad
            for idx, sh in enumerate(new_grad.shape):
                if sh <= max_precond_dim:
                    others = [*chain(range(idx), range(idx + 1, len(new_grad.shape)))]
                    outer_product = torch.tensordot(new_grad, new_grad, dims=[others] * 2)
                    state["GG"][idx].lerp_(outer_product, 1 - state["shampoo_beta"])
        if state["Q"] is None:
            state["Q"] = self.get_orthogonal_matrix(state["GG"])
        if state["step"] > 0 and state["step"] % state["precondition_frequency"] == 0:
            state["Q"] = self.get_orthogonal_matrix_QR(state, max_precond_dim, merge_dims)
        if state["step"] > 0:
            state["exp_avg"] = self.project(
                state["exp_avg"], state, merge_dims=merge_dims, max_precond_dim=max_precond_dim
            )

    def project_back(self, grad, state, merge_dims=False, max_precond_dim=10000):
        original_shape = grad.shape
        if merge_dims:
            grad = self.merge_dims(grad, max_precond_dim)
        for mat in state["Q"]:
            if len(mat) > 0:
                grad = torch.tensordot(grad, mat, dims=[[0], [1]])
            else:
                grad = grad.permute(list(range(1, len(grad.shape))) + [0])
        if merge_dims:
            grad = grad.reshape(original_shape)
        return grad

    @staticmethod
    def get_orthogonal_matrix(mat):
        final = []
        for m in mat:
            if len(m) == 0:
                final.append([])
                continue
            try:
                _, Q = torch.linalg.eigh(m + 1e-30 * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))
            except Exception:  # noqa: BLE001 - the authors' fallback
                _, Q = torch.linalg.eigh(
                    m.to(torch.float64) + 1e-30 * torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
                )
                Q = Q.to(m.dtype)
            final.append(torch.flip(Q, [1]))
        return final

    def get_orthogonal_matrix_QR(self, state, max_precond_dim=10000, merge_dims=False):
        orig_shape = state["exp_avg_sq"].shape
        exp_avg_sq = self.merge_dims(state["exp_avg_sq"], max_precond_dim) if merge_dims else state["exp_avg_sq"]
        final = []
        for ind, (m, o) in enumerate(zip(state["GG"], state["Q"])):
            if len(m) == 0:
                final.append([])
                continue
            est_eig = torch.diag(o.T @ m @ o)
            sort_idx = torch.argsort(est_eig, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(ind, sort_idx)
            o = o[:, sort_idx]
            power_iter = m @ o
            Q, _ = torch.linalg.qr(power_iter)
            final.append(Q)
        if merge_dims:
            exp_avg_sq = exp_avg_sq.reshape(orig_shape)
        state["exp_avg_sq"] = exp_avg_sq
        return final
