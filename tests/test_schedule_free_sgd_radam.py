"""Schedule-Free SGD and RAdam: the train/eval-mode safety ScheduleFreeAdamW has, for the two new variants.

The update itself is checked bit for bit against the schedulefree package in float64 (tests/optim_db.py's
``schedule_free_sgd`` / ``schedule_free_radam`` entries, with the generic tests and FSDP2); here: the modes and
their arithmetic, checkpoints saved in either mode, lmopt.integrations' detection and ``eval_mode``,
``save_checkpoint``'s averaged point, the HF Trainer callback, RAdam's silent phase.
"""

from __future__ import annotations

import io

import pytest
import torch

import lmopt
from lmopt import schedules
from lmopt.integrations import eval_mode, is_schedule_free, schedule_free_optimizers
from lmopt.optim.schedule_free import ScheduleFree, schedule_free_mode
from lmopt.train import load_checkpoint, save_checkpoint

from .optim_db import make_batch, make_model

NAMES = {
    "schedule_free_sgd": {"lr": 0.05, "weight_decay": 0.01, "warmup_steps": 3},
    # (the silent phase's first 4 steps move nothing: tested on its own below)
    "schedule_free_radam": {"lr": 1e-2, "weight_decay": 0.05, "silent_sgd_phase": False},
    "schedule_free_adamw": {"lr": 1e-2, "weight_decay": 0.05, "warmup_steps": 3},  # the one they follow
}


def _train(model, opt, steps: int, first: int = 0, sched=None) -> None:
    dtype = next(model.parameters()).dtype
    for k in range(first, first + steps):
        x, y = make_batch(dtype, seed=k)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _weights(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_modes_move_between_y_and_x(name):
    model = make_model(torch.float64)
    opt = lmopt.create_optimizer(name, model, **NAMES[name])
    assert isinstance(opt, ScheduleFree) and opt.mode == "train"
    _train(model, opt, 8)
    beta = opt.param_groups[0].get("momentum") or opt.param_groups[0]["betas"][0]
    y = [p.detach().clone() for p in model.parameters()]
    with opt.evaluating(model):
        assert opt.mode == "eval" and not model.training
        for p, y_p in zip(model.parameters(), y, strict=True):  # y = (1 - beta) z + beta x
            z = opt.state[p]["z"]
            torch.testing.assert_close(p, (y_p - (1 - beta) * z) / beta, rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match=f"{type(opt).__name__}.step\\(\\) called in eval mode"):
            _train(model, opt, 1)
    assert opt.mode == "train" and model.training
    for p, y_p in zip(model.parameters(), y, strict=True):
        torch.testing.assert_close(p, y_p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save_mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["schedule_free_sgd", "schedule_free_radam"])
def test_checkpoint_in_either_mode_resumes_the_trajectory(name, save_mode):
    kw = NAMES[name]
    straight = make_model()
    opt = lmopt.create_optimizer(name, straight, **kw)
    _train(straight, opt, 10)
    first = make_model()
    opt_first = lmopt.create_optimizer(name, first, **kw)
    _train(first, opt_first, 4)
    buffer = io.BytesIO()
    if save_mode == "eval":
        with opt_first.evaluating(first):
            torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    else:
        torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["train_mode"] is (save_mode == "train")
    resumed = make_model(seed=7)
    resumed.load_state_dict(saved["model"])
    opt_resumed = lmopt.create_optimizer(name, resumed, **kw)
    opt_resumed.load_state_dict(saved["optimizer"])
    assert opt_resumed.mode == save_mode
    opt_resumed.train()
    _train(resumed, opt_resumed, 6, first=4)
    # an eval-mode save is one round trip y -> x -> y away: equal to rounding, not bit for bit
    tol = {"rtol": 0, "atol": 0} if save_mode == "train" else {"rtol": 1e-5, "atol": 1e-6}
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("name", ["schedule_free_sgd", "schedule_free_radam"])
def test_integrations_detect_them_and_eval_mode_restores(name):
    model = make_model()
    opt = lmopt.create_optimizer(name, model, **NAMES[name])
    _train(model, opt, 3)
    assert is_schedule_free(opt) and schedule_free_mode(opt) == "train"
    wrapped = type("Wrapped", (), {"optimizer": opt})()  # accelerate / Lightning wrappers hold .optimizer
    assert schedule_free_optimizers(wrapped) == [opt]
    y = _weights(model)
    with eval_mode(wrapped, model) as found:
        assert found == [opt] and schedule_free_mode(opt) == "eval" and not model.training
        assert not _same(_weights(model), y)
    assert opt.mode == "train" and model.training
    for a, b in zip(_weights(model), y, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["schedule_free_sgd", "schedule_free_radam"])
def test_save_checkpoint_stores_x_and_resumes_bit_exact(tmp_path, name):
    def setup(seed=0):
        model = make_model(seed=seed)
        opt = lmopt.create_optimizer(name, model, **NAMES[name])
        return model, opt, schedules.scheduler(opt, schedules.warmup_cosine(2, 20))

    total, stop = 8, 3
    straight, straight_opt, straight_sched = setup()
    _train(straight, straight_opt, total, sched=straight_sched)
    model, opt, sched = setup()
    _train(model, opt, stop, sched=sched)
    y = _weights(model)
    path = save_checkpoint(tmp_path / "sf.pt", step=stop, model=model, optimizer=opt, scheduler=sched)
    assert opt.mode == "train" and _same(_weights(model), y)  # saving moved nothing
    with opt.evaluating():
        x = _weights(model)
    evaluated = make_model(seed=11)
    load_checkpoint(path, model=evaluated)  # model only (evaluation, export): x
    assert _same(_weights(evaluated), x) and not _same(x, y)
    resumed, resumed_opt, resumed_sched = setup(seed=12)
    state = load_checkpoint(path, model=resumed, optimizer=resumed_opt, scheduler=resumed_sched)
    assert resumed_opt.mode == "train" and _same(_weights(resumed), y)
    _train(resumed, resumed_opt, total - state.step, first=state.step, sched=resumed_sched)
    _train(model, opt, total - stop, first=stop, sched=sched)
    assert _same(_weights(resumed), _weights(straight)) and _same(_weights(model), _weights(straight))


def test_radam_silent_phase_moves_nothing_then_rectifies():
    model = make_model(torch.float64)
    opt = lmopt.create_optimizer("schedule_free_radam", model, lr=1e-2)
    start = _weights(model)
    _train(model, opt, 4)  # rho_t <= 4 for t <= 4 at beta2 = 0.999 (rho_t ~ t): only v accumulates
    assert _same(_weights(model), start) and opt.param_groups[0]["scheduled_lr"] == 0.0
    assert all(opt.state[p]["exp_avg_sq"].abs().sum() > 0 for p in model.parameters())
    _train(model, opt, 1, first=4)
    assert not _same(_weights(model), start) and opt.param_groups[0]["scheduled_lr"] > 0
    loud = make_model(torch.float64)
    opt = lmopt.create_optimizer("schedule_free_radam", loud, lr=1e-2, silent_sgd_phase=False)
    _train(loud, opt, 1)  # SGD steps (rate lr) until the rectification is defined
    assert not _same(_weights(loud), start) and opt.param_groups[0]["scheduled_lr"] == 1e-2


def test_gradients_are_not_modified():
    """The package adds the decay to ``p.grad`` (and RAdam divides it) in place; lmopt leaves gradients alone."""
    for name in ("schedule_free_sgd", "schedule_free_radam"):
        model = make_model()
        opt = lmopt.create_optimizer(name, model, **NAMES[name], implementation="foreach")
        _train(model, opt, 6)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))


def test_hf_names_and_registry():
    from lmopt.optim.schedule_free import ScheduleFreeRAdam, ScheduleFreeSGD

    for name, cls in (("schedule_free_sgd", ScheduleFreeSGD), ("schedule_free_radam", ScheduleFreeRAdam)):
        assert isinstance(lmopt.create_optimizer(name, make_model()), cls)  # HF Trainer's optim= names
    spec = lmopt.get_spec("schedule_free_sgd")
    assert [t.name for t in spec.state_tensors((4, 3))] == ["z"]
    assert [t.name for t in lmopt.get_spec("schedule_free_radam").state_tensors((4, 3))] == ["z", "exp_avg_sq"]
    assert not spec.per_parameter and {"schedule_free_sgd", "schedule_free_radam"} <= {
        s.name for s in lmopt.list_optimizers()
    }


@pytest.mark.slow  # ~15 s (a Trainer run); the callback itself is optimizer-agnostic and tested in the default suite
def test_hf_trainer_callback_saves_x(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmopt.integrations import ScheduleFreeCallback

    from .test_integrations import _args, params_of, tiny_llama, token_rows

    model = tiny_llama()
    opt = lmopt.create_optimizer("schedule_free_radam", model, lr=1e-2, silent_sgd_phase=False)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=token_rows(),
        optimizers=(opt, None),
        callbacks=[ScheduleFreeCallback()],
    )
    trainer.train()
    assert opt.mode == "eval"  # after training: x, for save_model
    saved = params_of(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint-4"))
    torch.testing.assert_close(saved, params_of(trainer.model), rtol=0, atol=1e-6)
    state = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=False)
    assert all(not g["train_mode"] for g in state["param_groups"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("schedule_free_sgd", NAMES["schedule_free_sgd"]),
        ("schedule_free_radam", NAMES["schedule_free_radam"]),
        ("schedule_free_radam", {"lr": 1e-2, "weight_decay": 0.05}),  # silent phase, then rectified
        ("schedule_free_radam", {"lr": 1e-2, "silent_sgd_phase": False}),  # unrectified SGD steps, no decay
    ],
)
def test_blocked_walks_blocks_and_equals_foreach(monkeypatch, name, kw, dtype):
    """Blocks of 40 elements (the test model's tensors are smaller than a real block): partial blocks, tensors
    of one block and of many, bf16 upcast block by block; the same operations as foreach, so the same bits."""
    monkeypatch.setattr("lmopt.optim._dispatch.BLOCK_ELEMENTS", 40)
    runs = []
    for impl in ("foreach", "blocked"):
        model = make_model(dtype)
        opt = lmopt.create_optimizer(name, model, **kw, implementation=impl)
        _train(model, opt, 8)
        assert opt._implementation_used[id(opt.param_groups[0])] == impl
        runs.append((_weights(model), [opt.state[p]["z"].clone() for p in model.parameters()]))
    assert _same(runs[0][0], runs[1][0]) and _same(runs[0][1], runs[1][1])
