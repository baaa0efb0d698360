"""Training-loop helpers: clipping, accumulation, z-loss, health monitor."""

from __future__ import annotations

import contextlib
import logging
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import lmopt
from lmopt.train import (
    GradientAccumulator,
    HealthMonitor,
    clip_grad_norm,
    cross_entropy_with_z_loss,
    optimizer_step,
    z_loss,
)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))


def _data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# -- clipping ----------------------------------------------------------------------------------------------
def test_clip_matches_torch_over_all_groups():
    a, b = _model(), _model()
    x, y = _data()
    for m in (a, b):
        ((m(x) - y) ** 2).sum().backward()
    opt = lmopt.create_optimizer("adamw", a, lr=1e-3)  # two param groups (decay / no decay)
    assert len(opt.param_groups) == 2
    result = clip_grad_norm(opt, 0.5)
    expected_norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert torch.allclose(result.norm, expected_norm)
    assert result.factor == pytest.approx(min(1.0, 0.5 / (expected_norm.item() + 1e-6)))
    assert result.clipped
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_below_threshold_and_measure_only():
    m = _model()
    x, y = _data()
    ((m(x) - y) ** 2).mean().backward()
    before = _grads(m)
    r = clip_grad_norm(m.parameters(), 1e6)
    assert r.factor == 1.0 and not r.clipped
    r2 = clip_grad_norm(m.parameters(), None)
    assert r2.factor == 1.0 and r2.norm == pytest.approx(r.norm.item())
    for g, p in zip(before, m.parameters(), strict=True):
        assert torch.equal(g, p.grad)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(m.parameters(), -1.0)
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm(m.parameters(), 1.0, norm_type=0)
    with pytest.raises(ValueError, match="scaler"):
        clip_grad_norm(m.parameters(), 1.0, scaler=torch.amp.GradScaler("cpu"))
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0).norm == 0.0


def test_clip_hands_the_norm_to_the_optimizer_which_skips_its_own_check(monkeypatch):
    m = _model()
    opt = lmopt.create_optimizer("adamw", m, lr=1e-3)
    x, y = _data()
    ((m(x) - y) ** 2).mean().backward()
    calls = []
    monkeypatch.setattr(type(opt), "_first_nonfinite", lambda self, c: calls.append(1))
    clip_grad_norm(opt, 1.0)
    opt.step()
    assert calls == []  # the recorded finite norm stood in for the finiteness pass
    opt.step()  # without a recorded norm the optimizer checks itself
    assert calls == [1]


def test_clip_nonfinite_norm_makes_lmopt_optimizer_refuse_the_step():
    m = _model()
    opt = lmopt.create_optimizer("adamw", m, lr=1e-3)
    x, y = _data()
    ((m(x) - y) ** 2).mean().backward()
    next(m.parameters()).grad[0, 0] = float("inf")
    r = clip_grad_norm(opt, 1.0)
    assert not math.isfinite(r.norm.item())
    with pytest.raises(lmopt.NonFiniteGradientError):
        opt.step()


def test_clip_with_grad_scaler_unscales_first_and_steps_like_no_scaler():
    plain, scaled = _model(), _model()
    opt_plain = lmopt.create_optimizer("adamw", plain, lr=1e-2)
    opt_scaled = lmopt.create_optimizer("adamw", scaled, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(3):
        x, y = _data(seed=k)
        ((plain(x) - y) ** 2).mean().backward()
        r1 = clip_grad_norm(opt_plain, 0.1)
        opt_plain.step()
        opt_plain.zero_grad()
        scaler.scale(((scaled(x) - y) ** 2).mean()).backward()
        r2 = clip_grad_norm(opt_scaled, 0.1, scaler=scaler)
        r3 = clip_grad_norm(opt_scaled, 0.1, scaler=scaler)  # a second call does not unscale twice
        assert r2.norm.item() == pytest.approx(r1.norm.item(), rel=1e-6)
        assert r3.norm.item() == pytest.approx(min(r1.norm.item(), 0.1), rel=1e-5)
        scaler.step(opt_scaled)
        scaler.update()
        opt_scaled.zero_grad()
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clip_after_accumulation_equals_clip_of_the_large_batch():
    big, acc_model = _model(), _model()
    x, y = _data(n=16)
    ((big(x) - y) ** 2).mean().backward()
    r_big = clip_grad_norm(big.parameters(), 0.05)
    opt = torch.optim.SGD(acc_model.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, 4)
    for i in range(4):
        acc.backward(((acc_model(x[4 * i : 4 * i + 4]) - y[4 * i : 4 * i + 4]) ** 2).mean())
    acc.finish()
    r_acc = clip_grad_norm(opt, 0.05)
    assert r_acc.norm.item() == pytest.approx(r_big.norm.item(), rel=1e-5)
    for p, q in zip(big.parameters(), acc_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_optimizer_step_policies_for_a_non_finite_gradient():
    x, y = _data()

    def poisoned(opt):  # gradients with a NaN, a fresh model each time
        model = _model()
        F.mse_loss(model(x), y).backward()
        next(model.parameters()).grad[0, 0] = float("nan")
        return model, opt(model)

    for policy in ("skip", "stop", "raise"):
        model, opt = poisoned(lambda m: lmopt.create_optimizer("adamw", m, lr=1e-2, nonfinite="skip"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        before = [p.detach().clone() for p in model.parameters()]
        outcome = optimizer_step(opt, clip=1.0, scheduler=sched, on_nonfinite=policy)
        assert outcome.nonfinite and outcome.skipped == (policy != "stop") and outcome.stopped == (policy == "stop")
        assert outcome.applied == (policy == "raise") and opt.skipped_steps == (policy == "raise")
        assert sched.last_epoch == (0 if policy == "stop" else 1)  # a stop does not advance the schedule
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.mse_loss(model(x), y).backward()
    outcome = optimizer_step(opt, clip=None, loss=1.0)
    assert outcome.applied and not (outcome.nonfinite or outcome.skipped or outcome.stopped)
    assert not optimizer_step(opt, clip=None, loss=float("nan"), on_nonfinite="skip").applied
    with pytest.raises(ValueError, match="on_nonfinite"):
        optimizer_step(opt, clip=None, on_nonfinite="ignore")


# -- accumulation ------------------------------------------------------------------------------------------
def test_mean_accumulation_equals_one_large_batch():
    big, small = _model(), _model()
    x, y = _data(n=12)
    loss_big = ((big(x) - y) ** 2).mean()
    loss_big.backward()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, 3)
    lasts = []
    for i in range(3):
        lasts.append(acc.backward(((small(x[4 * i : 4 * i + 4]) - y[4 * i : 4 * i + 4]) ** 2).mean()))
    assert lasts == [False, False, True]
    loss = acc.finish()
    assert loss.item() == pytest.approx(loss_big.item(), rel=1e-6)
    for p, q in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    # and the optimizer step from those gradients is the large batch's step
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1)
    opt_big.step()
    opt.step()
    for p, q in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _lm_batch(lengths, vocab=11, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=g)
    labels = ids.clone()
    for row, n in enumerate(lengths):
        labels[row, n:] = -100  # padding
    return ids, labels


def test_token_weighted_accumulation_equals_one_large_batch_with_uneven_micro_batches():
    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    twin = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    twin.load_state_dict(emb.state_dict())
    lengths = [6, 1, 3, 2, 5, 6]
    ids, labels = _lm_batch(lengths)
    big_loss = F.cross_entropy(emb(ids).reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    big_loss.backward()
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, 3, weighting="tokens")
    for rows in ([0], [1, 2, 3], [4, 5]):  # micro-batches of different sizes and token counts
        loss = F.cross_entropy(twin(ids[rows]).reshape(-1, 11), labels[rows].reshape(-1), ignore_index=-100)
        acc.backward(loss, tokens=int((labels[rows] != -100).sum()))
    mean = acc.finish()
    assert mean.item() == pytest.approx(big_loss.item(), rel=1e-6)
    for p, q in zip(emb.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_accumulator_misuse_and_no_sync():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    synced = []

    class DDPLike(torch.nn.Module):
        @contextlib.contextmanager
        def no_sync(self):
            synced.append("off")
            yield

    acc = GradientAccumulator(opt, 2, model=DDPLike())
    x, y = _data()
    with pytest.raises(RuntimeError, match="finish"):
        acc.finish()
    acc.backward(((m(x) - y) ** 2).mean())
    acc.backward(((m(x) - y) ** 2).mean())
    assert synced == ["off"]  # only the first micro-batch skips the gradient sync
    with pytest.raises(RuntimeError, match="finish"):
        acc.backward(((m(x) - y) ** 2).mean())
    acc.finish()
    with pytest.raises(ValueError, match="steps"):
        GradientAccumulator(opt, 0)
    with pytest.raises(ValueError, match="weighting"):
        GradientAccumulator(opt, 2, weighting="sum")
    with pytest.raises(ValueError, match="tokens"):
        GradientAccumulator(opt, 2, weighting="tokens").backward(((m(x) - y) ** 2).mean())


# -- z-loss ------------------------------------------------------------------------------------------------
def test_z_loss_formula_and_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 3
    lse = torch.logsumexp(logits, -1)
    assert z_loss(logits).item() == pytest.approx(1e-4 * (lse**2).mean().item(), rel=1e-6)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    assert z_loss(logits, weight=0.5, mask=mask).item() == pytest.approx(0.5 * (lse[0, :2] ** 2).mean().item())
    assert z_loss(logits, mask=torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0
    assert z_loss(logits.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="z_loss_weight"):
        z_loss(logits, weight=-1.0)
    with pytest.raises(ValueError, match="mask"):
        z_loss(logits, mask=torch.ones(5, dtype=torch.bool))


def test_cross_entropy_with_z_loss_and_its_gradient_pulls_log_z_to_zero():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 4, 9, generator=g) + 5.0).requires_grad_()
    targets = torch.randint(0, 9, (3, 4), generator=g)
    targets[0, 0] = -100
    total, parts = cross_entropy_with_z_loss(logits, targets, z_loss_weight=1e-2)
    ce = F.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1), ignore_index=-100)
    keep = targets != -100
    z = 1e-2 * (torch.logsumexp(logits, -1)[keep] ** 2).mean()
    assert total.item() == pytest.approx((ce + z).item(), rel=1e-6)
    assert parts["cross_entropy"].item() == pytest.approx(ce.item(), rel=1e-6)
    zl = z_loss(logits, weight=1.0)
    zl.backward()
    assert (logits.grad.sum(-1) > 0).all()  # log Z > 0 here: descending lowers every logit's sum


# -- monitor -----------------------------------------------------------------------------------------------
def test_loss_spike_detection_and_no_false_alarms(caplog, capsys):
    mon = HealthMonitor(window=50, min_history=20)
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(200, generator=g) * 0.02).tolist()
    with caplog.at_level(logging.WARNING, logger="lmopt.train"):
        for step, n in enumerate(noise):
            assert mon.after_step(step, loss=3.0 - step * 1e-3 + n) == []
        events = mon.after_step(200, loss=4.5)
    assert [e.kind for e in events] == ["loss_spike"]
    assert "learning rate" in events[0].suggestion and "batch" in events[0].suggestion
    assert events[0].data["value"] == 4.5
    assert "loss_spike" not in capsys.readouterr().err  # nothing printed
    assert any("step 200" in r.getMessage() for r in caplog.records)  # logged
    assert mon.summary()["events"] == {"loss_spike": 1}


def test_nonfinite_loss_and_grad_norm_are_errors():
    mon = HealthMonitor()
    assert mon.after_step(0, loss=float("nan"))[0].kind == "loss_nonfinite"
    ev = mon.after_step(1, grad_norm=float("inf"))[0]
    assert ev.kind == "grad_nonfinite" and ev.severity == "error"


def test_grad_norm_history_and_clip_rate_event_once_per_episode():
    mon = HealthMonitor(window=20, min_history=10, max_clip_rate=0.5)
    kinds = []
    for step in range(40):
        for e in mon.after_step(step, grad_norm=1.0 + 0.01 * (step % 3), clip_factor=0.5 if step >= 5 else 1.0):
            kinds.append((step, e.kind))
    assert kinds == [(10, "clip_rate_high")]
    assert mon.clip_rate == 1.0
    assert len(mon.grad_norms) == 20


def test_update_ratio_per_group_and_state_check():
    m = _model()
    opt = lmopt.create_optimizer("sgd", m, lr=10.0)
    mon = HealthMonitor(ratio_every=1, state_every=1)
    x, y = _data()
    ((m(x) - y) ** 2).mean().backward()
    mon.before_step(0, opt)
    opt.step()
    events = mon.after_step(0, optimizer=opt)
    assert {e.kind for e in events} == {"update_ratio_high"}
    assert set(mon.update_ratios) == {0, 1} and mon.update_ratios[0][0][1] > 1e-2

    adam = lmopt.create_optimizer("adamw", m, lr=1e-3)
    ((m(x) - y) ** 2).mean().backward()
    adam.step()
    next(iter(adam.state.values()))["exp_avg_sq"].view(-1)[0] = float("nan")
    events = HealthMonitor(ratio_every=0, state_every=1).after_step(0, optimizer=adam)
    assert [e.kind for e in events] == ["state_nonfinite"]
    assert "exp_avg_sq" in events[0].message and "0.weight" in events[0].message


def test_monitor_state_round_trip_and_validation():
    mon = HealthMonitor(min_history=2)
    for s in range(5):
        mon.after_step(s, loss=1.0 + s * 0.01, grad_norm=0.5, clip_factor=1.0)
    other = HealthMonitor(min_history=2)
    other.load_state_dict(mon.state_dict())
    assert list(other.losses) == list(mon.losses) and other.clip_rate == mon.clip_rate
    for kwargs, name in (
        ({"window": 1}, "window"),
        ({"spike_sigmas": 0}, "spike_sigmas"),
        ({"ratio_bounds": (1.0, 0.5)}, "ratio_bounds"),
        ({"max_clip_rate": 2}, "max_clip_rate"),
        ({"min_history": 200}, "min_history"),
    ):
        with pytest.raises(ValueError, match=name):
            HealthMonitor(**kwargs)
