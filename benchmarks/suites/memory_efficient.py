"""Adafactor, CAME, Adam-mini, Lion and Sophia: lmopt beside its peers (fp32, ~50M parameters).

Peers: transformers Adafactor and torch.optim.Adafactor; came-pytorch and pytorch_optimizer CAME; the
adam-mini package and pytorch_optimizer AdamMini; lion-pytorch and pytorch_optimizer Lion; pytorch_optimizer
SophiaH. Every case uses the same hyperparameters as its peers (each algorithm's published defaults).

Bytes per parameter (the roofline) are what each algorithm must read and write at least, fp32:
Adafactor g, p read + p written = 12 (its row/column statistics are negligible); CAME, Adam-mini and Lion
g + m and p read and written = 20; Sophia's step g, m, h, p read + m, p written = 24 (the Hessian refresh,
every k steps, is not part of the step in either lmopt or SophiaH here).

Partitions: the harness's parameters carry no module names, so lmopt Adam-mini uses one block per output
neuron for matrices, and the adam-mini package is given names that select the same rule. pytorch_optimizer's
AdamMini finds no name it knows and uses one block per tensor, a cheaper reduction; the case
"lmopt Adam-mini, one block per tensor" gives lmopt that same partition for a like-for-like comparison.
"""

from __future__ import annotations

import torch
from harness import Case

import lmopt

# ------------------------------------------------------------------------------------------------ Adafactor
# transformers' defaults: relative step capped at 1e-2, parameter scaling, decay -0.8, clip 1, no first moment


def lmopt_adafactor(params):
    return lmopt.create_optimizer("adafactor_relative_step", params)


def lmopt_adafactor_for_loop(params):
    return lmopt.create_optimizer("adafactor_relative_step", params, implementation="for_loop")


def hf_adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=None, relative_step=True, scale_parameter=True, warmup_init=False)


def torch_adafactor(params):
    return torch.optim.Adafactor(params, lr=1e-2)


def torch_adafactor_for_loop(params):
    return torch.optim.Adafactor(params, lr=1e-2, foreach=False)


# ----------------------------------------------------------------------------------------------------- CAME
def lmopt_came(params):
    return lmopt.CAME(params, lr=2e-4)


def lmopt_came_for_loop(params):
    return lmopt.CAME(params, lr=2e-4, implementation="for_loop")


def came_pytorch(params):
    from came_pytorch import CAME

    return CAME(params, lr=2e-4)


def pytorch_optimizer_came(params):
    from pytorch_optimizer import CAME

    return CAME(params, lr=2e-4)


# ------------------------------------------------------------------------------------------------ Adam-mini
_MINI = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def lmopt_adam_mini(params):
    return lmopt.AdamMini(params, **_MINI)


def lmopt_adam_mini_fused(params):
    return lmopt.AdamMini(params, implementation="blocked", **_MINI)


def lmopt_adam_mini_per_tensor(params):
    group = {"params": list(params), "partitions": [(None, ()) for _ in params]}
    return lmopt.AdamMini([group], **_MINI)


def adam_mini_package(params):
    from adam_mini import Adam_mini

    named = [(f"layers.{i}.mlp.weight" if p.ndim >= 2 else f"layers.{i}.norm.weight", p) for i, p in enumerate(params)]
    return Adam_mini(named, verbose=False, **_MINI)


def pytorch_optimizer_adam_mini(params):
    from pytorch_optimizer import AdamMini

    holder = torch.nn.Module()
    for i, p in enumerate(params):
        holder.register_parameter(f"p{i}", p)
    return AdamMini(holder, num_embeds=1024, num_heads=16, **_MINI)


# ----------------------------------------------------------------------------------------------------- Lion
_LION = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.3)


def lmopt_lion(params):
    return lmopt.Lion(params, **_LION)


def lmopt_lion_foreach(params):
    return lmopt.Lion(params, implementation="foreach", **_LION)


def lmopt_lion_for_loop(params):
    return lmopt.Lion(params, implementation="for_loop", **_LION)


def lion_pytorch(params):
    from lion_pytorch import Lion

    return Lion(params, **_LION)


def pytorch_optimizer_lion(params):
    from pytorch_optimizer import Lion

    return Lion(params, **_LION)


# --------------------------------------------------------------------------------------------------- Sophia
# SophiaH(lr, p) clamps m / max(h, eps) to [-p, p]; lmopt's Sophia with lr*p and rho=p is the same step


def _sophia_state(opt, params):
    """A Hessian estimate as a refresh would leave it (so the step divides by realistic values)."""
    return [p.grad.abs() * 10 + 1e-3 for p in params]


def lmopt_sophia(params):
    opt = lmopt.Sophia(params, lr=6e-2 * 1e-2, rho=1e-2, eps=1e-14, weight_decay=0.0, betas=(0.96, 0.99))
    for p, h in zip(params, _sophia_state(opt, params), strict=False):
        opt._init_state(opt.param_groups[0], p, opt.state[p])
        opt.state[p]["hessian"].copy_(h)
    return opt


def lmopt_sophia_foreach(params):
    opt = lmopt_sophia(params)
    opt.param_groups[0]["implementation"] = "foreach"
    return opt


def pytorch_optimizer_sophiah(params):
    from pytorch_optimizer import SophiaH

    class SophiaHExternal(SophiaH):
        """SophiaH given its Hessian estimate at the first step (no double backward in this benchmark)."""

        def step(self, closure=None, hessian=None):
            if not getattr(self, "_given", False):
                self._given = True
                return super().step(closure, hessian=_sophia_state(self, params))
            return super().step(closure)

    return SophiaHExternal(
        params, lr=6e-2, p=1e-2, eps=1e-12, weight_decay=0.0, betas=(0.96, 0.99), update_period=10**9
    )


CASES = [
    Case("transformers Adafactor", "adafactor", "hf_adafactor", peer=True, bytes_per_param=12.0),
    Case("torch.optim.Adafactor (foreach)", "adafactor", "torch_adafactor", peer=True, bytes_per_param=12.0),
    Case(
        "torch.optim.Adafactor (for-loop)",
        "adafactor",
        "torch_adafactor_for_loop",
        peer=True,
        bytes_per_param=12.0,
    ),
    Case("lmopt Adafactor (auto = blocked)", "adafactor", "lmopt_adafactor", bytes_per_param=12.0),
    Case("lmopt Adafactor for_loop", "adafactor", "lmopt_adafactor_for_loop", bytes_per_param=12.0),
    Case("came-pytorch CAME", "came", "came_pytorch", peer=True, bytes_per_param=20.0),
    Case("pytorch_optimizer CAME", "came", "pytorch_optimizer_came", peer=True, bytes_per_param=20.0),
    Case("lmopt CAME (auto = blocked)", "came", "lmopt_came", bytes_per_param=20.0),
    Case("lmopt CAME for_loop", "came", "lmopt_came_for_loop", bytes_per_param=20.0),
    Case(
        "adam-mini package",
        "adam_mini",
        "adam_mini_package",
        peer=True,
        bytes_per_param=20.0,
        note="per output neuron",
    ),
    Case(
        "pytorch_optimizer AdamMini",
        "adam_mini",
        "pytorch_optimizer_adam_mini",
        peer=True,
        bytes_per_param=20.0,
        note="one block per tensor (no known names)",
    ),
    Case(
        "lmopt Adam-mini (auto = for_loop)",
        "adam_mini",
        "lmopt_adam_mini",
        bytes_per_param=20.0,
        note="per output neuron",
    ),
    Case(
        "lmopt Adam-mini blocked",
        "adam_mini",
        "lmopt_adam_mini_fused",
        bytes_per_param=20.0,
        note="per output neuron",
    ),
    Case(
        "lmopt Adam-mini, one block per tensor",
        "adam_mini",
        "lmopt_adam_mini_per_tensor",
        bytes_per_param=20.0,
        note="the pytorch_optimizer partition here",
    ),
    Case("lion-pytorch Lion", "lion", "lion_pytorch", peer=True, bytes_per_param=20.0),
    Case("pytorch_optimizer Lion", "lion", "pytorch_optimizer_lion", peer=True, bytes_per_param=20.0),
    Case("lmopt Lion (auto = blocked)", "lion", "lmopt_lion", bytes_per_param=20.0),
    Case("lmopt Lion foreach", "lion", "lmopt_lion_foreach", bytes_per_param=20.0),
    Case("lmopt Lion for_loop", "lion", "lmopt_lion_for_loop", bytes_per_param=20.0),
    Case(
        "pytorch_optimizer SophiaH",
        "sophia",
        "pytorch_optimizer_sophiah",
        peer=True,
        bytes_per_param=24.0,
        note="step only; keeps an extra Hessian buffer",
    ),
    Case("lmopt Sophia (auto = blocked)", "sophia", "lmopt_sophia", bytes_per_param=24.0, note="step only"),
    Case("lmopt Sophia foreach", "sophia", "lmopt_sophia_foreach", bytes_per_param=24.0, note="step only"),
]
