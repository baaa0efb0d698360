"""Schedules: edges of every builder, composition, torch parity, and exact resume of ScheduleLR."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch

from lmopt import schedules as S


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared machine (50x faster under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _opt(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * (i + 1)} for i in range(groups)]
    return torch.optim.SGD(params, lr=lr)


# -- warmup + cosine ----------------------------------------------------------------------------------------
def test_warmup_cosine_edges():
    f = S.warmup_cosine(4, 12, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 5)  # step 0: already moving
    assert f(3) == pytest.approx(4 / 5)  # last warmup step
    assert f(4) == 1.0  # first decay step: the peak
    assert f(5) < 1.0
    assert f(11) == pytest.approx(0.1)  # last step: the floor exactly
    assert f(12) == pytest.approx(0.1) and f(10**9) == pytest.approx(0.1)  # beyond the end
    values = [f(s) for s in range(4, 12)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # strictly decreasing
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 7)))  # p = (8 - 4) / (8 - 1)


def test_zero_warmup_starts_at_peak():
    f = S.warmup_cosine(0, 10)
    assert f(0) == 1.0 and f(9) == pytest.approx(0.1)
    assert S.warmup_linear(0, 5)(0) == 1.0 and S.warmup_linear(0, 5)(4) == 0.0
    assert S.warmup_constant(0)(0) == 1.0


@pytest.mark.parametrize("builder", [S.warmup_cosine, S.warmup_linear])
def test_warmup_longer_than_training_is_a_clear_error(builder):
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be < total_steps \(10\)"):
        builder(10, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        builder(20, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        S.warmup_stable_decay(20, 10)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"warmup_steps": -1, "total_steps": 5}, "warmup_steps"),
        ({"warmup_steps": 1.5, "total_steps": 5}, "warmup_steps"),
        ({"warmup_steps": 0, "total_steps": 0}, "total_steps"),
        ({"warmup_steps": 0, "total_steps": 5, "min_lr_ratio": 1.5}, "min_lr_ratio"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        S.warmup_cosine(**kwargs)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step"):
        S.warmup_cosine(1, 5)(-1)


def test_single_step_decay_is_the_floor():
    f = S.warmup_cosine(3, 4, min_lr_ratio=0.2)
    assert f(3) == pytest.approx(0.2)


# -- linear, constant, inverse sqrt ------------------------------------------------------------------------
def test_linear_and_constant():
    f = S.warmup_linear(2, 7, min_lr_ratio=0.0)
    assert [round(f(s), 6) for s in range(8)] == [round(v, 6) for v in (1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25, 0, 0)]
    g = S.warmup_constant(3)
    assert [g(s) for s in (0, 2, 3, 10**6)] == [0.25, 0.75, 1.0, 1.0]


def test_inverse_sqrt_is_adafactors_relative_step():
    f = S.inverse_sqrt(timescale=10_000)
    for step in (0, 1, 9_998, 9_999, 10_000, 40_000, 10**6):
        t = step + 1
        assert 1e-2 * f(step) == pytest.approx(min(1e-2, 1 / math.sqrt(t)), rel=1e-12)


def test_inverse_sqrt_with_warmup_is_continuous():
    f = S.inverse_sqrt(100)
    assert f(99) == pytest.approx(100 / 101)
    assert f(100) == 1.0
    assert f(400) == pytest.approx(math.sqrt(100 / 400))


# -- WSD ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_shapes_edges(shape):
    f = S.warmup_stable_decay(2, 20, decay_steps=5, shape=shape, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert all(f(s) == 1.0 for s in range(2, 16))  # stable, and the first decay step (15) is the peak
    assert f(16) < 1.0
    assert f(19) == pytest.approx(0.1) and f(25) == pytest.approx(0.1)
    p = 1 / 4
    expected = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "1-sqrt": 1 - math.sqrt(p)}[shape]
    assert f(16) == pytest.approx(0.1 + 0.9 * expected)


def test_wsd_default_decay_fraction_and_validation():
    f = S.warmup_stable_decay(10, 100)
    assert f.decay_steps == 20 and f.decay_start == 80 and f.total_steps == 100
    with pytest.raises(ValueError, match="decay_steps"):
        S.warmup_stable_decay(10, 100, decay_steps=95)
    with pytest.raises(ValueError, match="shape"):
        S.warmup_stable_decay(10, 100, shape="exp")
    with pytest.raises(ValueError, match="decay_steps needs total_steps"):
        S.warmup_stable_decay(10, decay_steps=5)


def test_wsd_decay_decided_later_from_a_stable_phase_checkpoint():
    stable = S.warmup_stable_decay(3)  # no end yet
    assert stable.total_steps is None and stable(10**7) == 1.0
    opt = _opt(0.5)
    sched = S.scheduler(opt, stable)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    saved = pickle.loads(pickle.dumps(sched.state_dict()))

    decided = stable.decay_from(8, decay_steps=4)
    opt2 = _opt(0.5)
    sched2 = S.scheduler(opt2, decided)
    sched2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.5
    after = []
    for _ in range(6):
        after.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert after[0] == 0.5 and after[1] < 0.5 and after[3] == 0.0 and after[5] == 0.0
    assert [decided(s) for s in range(8)] == [stable(s) for s in range(8)]
    with pytest.raises(ValueError, match="stable phase"):
        decided.decay_from(10, 3)
    with pytest.raises(ValueError, match="decay_start"):
        S.WarmupStableDecay(5, decay_start=2, decay_steps=3)


# -- SGDR ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("T_0", "T_mult"), [(5, 1), (3, 2), (2, 3)])
def test_sgdr_matches_torch(T_0, T_mult):  # noqa: N803
    ratio = 0.05
    opt = _opt(2.0)
    theirs = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=T_0, T_mult=T_mult, eta_min=2.0 * ratio)
    f = S.sgdr(T_0, T_mult, min_lr_ratio=ratio)
    for step in range(60):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * f(step), rel=1e-12, abs=1e-15), step
        opt.step()
        theirs.step()


def test_sgdr_restarts_and_warmup():
    f = S.sgdr(4, 2)
    assert [S.SGDR(4, 2).cycle(s)[:2] for s in (0, 3, 4, 11, 12, 27, 28)] == [
        (0, 0),
        (0, 3),
        (1, 0),
        (1, 7),
        (2, 0),
        (2, 15),
        (3, 0),
    ]
    assert f(4) == 1.0 and f(12) == 1.0
    g = S.sgdr(4, warmup_steps=2)
    assert g(0) == pytest.approx(1 / 3) and g(2) == 1.0 and g(6) == 1.0


# -- composition -------------------------------------------------------------------------------------------
def test_join_and_with_warmup():
    f = S.join([S.Constant(0.5), S.ShapedDecay(3, "linear"), S.Constant(0.25)], [2, 5])
    assert [f(s) for s in range(7)] == [0.5, 0.5, 1.0, 0.5, 0.0, 0.25, 0.25]
    g = S.with_warmup(S.SGDR(3), 2)
    assert g(2) == 1.0 and g(5) == 1.0
    assert S.with_warmup(S.Constant(0.3), 0) == S.Constant(0.3)
    with pytest.raises(ValueError, match="boundaries"):
        S.join([S.Constant(), S.Constant()], [])
    with pytest.raises(ValueError, match="increase"):
        S.join([S.Constant(), S.Constant(), S.Constant()], [4, 4])
    with pytest.raises(ValueError, match="callable"):
        S.join([S.Constant(), 3], [1])


def test_schedules_are_plain_data():
    f = S.warmup_cosine(10, 100)
    assert pickle.loads(pickle.dumps(f)) == f
    assert f == S.warmup_cosine(10, 100) and f != S.warmup_cosine(10, 101)
    assert "ShapedDecay" in repr(f)


# -- the torch scheduler -------------------------------------------------------------------------------------
def test_schedule_lr_is_a_lambda_lr_and_scales_every_group():
    opt = _opt(0.1, groups=2)
    sched = S.scheduler(opt, S.warmup_cosine(2, 10))
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.2 / 3)
    for _ in range(2):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.1, 0.2])


def test_schedule_lr_state_is_minimal_and_resume_is_exact():
    schedule = S.warmup_cosine(3, 30, min_lr_ratio=0.1)
    opt = _opt(0.3, groups=2)
    sched = S.scheduler(opt, schedule)
    straight = []
    for step in range(20):
        straight.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        if step == 6:
            buffer = io.BytesIO()
            torch.save(sched.state_dict(), buffer)
    state = sched.state_dict()
    assert set(state) == {"format", "step", "base_lrs"} and state["step"] == 20

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt2 = _opt(5.0, groups=2)  # a different lr: everything must come from the state
    sched2 = S.scheduler(opt2, schedule)
    sched2.load_state_dict(saved)
    resumed = []
    for _ in range(7, 20):
        resumed.append([g["lr"] for g in opt2.param_groups])
        opt2.step()
        sched2.step()
    assert resumed == straight[7:]  # bit for bit
    assert sched2.current_step == 20


def test_schedule_lr_errors():
    with pytest.raises(ValueError, match="newer"):
        S.scheduler(_opt(), S.Constant()).load_state_dict({"format": 99, "step": 1, "base_lrs": [1.0]})
    with pytest.raises(ValueError, match="param groups"):
        S.scheduler(_opt(), S.Constant()).load_state_dict({"format": 1, "step": 1, "base_lrs": [1.0, 2.0]})
    with pytest.raises(ValueError, match="not an lmopt"):
        S.scheduler(_opt(), S.Constant()).load_state_dict({"last_epoch": 3})
    with pytest.raises(ValueError, match="callable"):
        S.ScheduleLR(_opt(), 3)


def test_key_steps_and_describe():
    steps = S.key_steps(2000, 100_000)
    assert steps[0] == 0 and {1999, 2000, 99_999, 100_000} <= set(steps)
    rows = S.describe(S.warmup_cosine(2000, 100_000), steps, peak=3e-4)
    assert rows[-1][2] == pytest.approx(3e-5)
