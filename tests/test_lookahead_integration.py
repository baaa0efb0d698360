"""Lookahead wrappers as torch tools see them: schedulers, pickling, step hooks (issue #17 item 6)."""

import io
import pickle

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import lmopt


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_one_cycle_cycle_momentum_with_lookahead_adamw():
    model = _model()
    opt = lmopt.create_optimizer("lookahead_adamw", model, lr=1e-3)
    assert "betas" in opt.defaults and "lookahead_k" in opt.defaults
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=True)
    first_beta1 = opt.param_groups[0]["betas"][0]
    for _ in range(3):
        _train_step(model, opt)
        scheduler.step()
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.param_groups[0]["betas"][0] != first_beta1  # the momentum cycle reached the inner groups


def test_lookahead_optimizer_pickles_and_torch_saves():
    model = _model()
    opt = lmopt.create_optimizer("lookahead_adamw", model, lr=1e-3, lookahead_k=2)
    for _ in range(3):
        _train_step(model, opt)
    cls = type(opt)
    assert cls.__qualname__ == cls.__name__ and getattr(lmopt.optim.lookahead, cls.__name__) is cls
    for restored in (pickle.loads(pickle.dumps(opt)), _torch_round_trip(opt)):
        assert type(restored) is cls
        assert restored.param_groups is restored.optimizer.param_groups
        assert restored.state is restored.optimizer.state
        assert restored.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
        restored_state = restored.state_dict()["state"]
        for index, entry in opt.state_dict()["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(restored_state[index][key], value, rtol=0, atol=0)


def _torch_round_trip(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_step_hooks_fire_once_per_step():
    model = _model()
    opt = lmopt.create_optimizer("lookahead_adamw", model, lr=1e-3)
    calls = {"global_pre": 0, "global_post": 0, "post": 0, "inner_post": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    handles = [
        register_optimizer_step_pre_hook(count("global_pre")),
        register_optimizer_step_post_hook(count("global_post")),
        opt.register_step_post_hook(count("post")),
        opt.optimizer.register_step_post_hook(count("inner_post")),
    ]
    try:
        for _ in range(3):
            _train_step(model, opt)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"global_pre": 3, "global_post": 3, "post": 3, "inner_post": 3}
