"""Complete checkpoints: round trip, atomicity under kill, clear errors, bit-exact resume for every optimizer,
the reference loop's resume and its SIGTERM handling."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import lmopt
from lmopt import schedules
from lmopt.train import (
    CheckpointError,
    CheckpointManager,
    checkpoint,
    fit,
    load_checkpoint,
    save_checkpoint,
)
from lmopt.train.checkpoint import read_manifest

from .optim_db import OPTIM_DB, OptimSpec, make_batch, make_model


def _write_payload(path: Path, payload: dict) -> Path:
    """A combined checkpoint file with a valid manifest for ``payload`` (to test what loading checks)."""
    header, data = checkpoint._encode(payload)
    path.write_bytes(header + data)
    return path


ROOT = Path(__file__).resolve().parents[1]


def _setup(seed: int = 0):
    model = make_model(seed=seed)
    opt = lmopt.create_optimizer("adamw", model, lr=1e-2)
    sched = schedules.scheduler(opt, schedules.warmup_cosine(2, 20))
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    for k in range(steps):
        x, y = make_batch(seed=k)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    _train(model, opt, sched, 3)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = save_checkpoint(
        tmp_path / "c.pt",
        step=3,
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        data_position={"shard": 2, "offset": 17},
        config={"lr": 1e-2},
        extra={"note": "x"},
    )
    expected = (random.random(), np.random.rand(), torch.rand(2))
    assert read_manifest(path)["step"] == 3 and not (tmp_path / "c.pt.json").exists()

    model2, opt2, sched2 = _setup(seed=9)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=4.0)
    state = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert (state.step, state.data_position, state.config, state.extra) == (
        3,
        {"shard": 2, "offset": 17},
        {"lr": 1e-2},
        {"note": "x"},
    )
    assert state.lmopt_version == lmopt.__version__ and state.rng_restored
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert scaler2.get_scale() == 128.0
    assert sched2.current_step == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_keep_last_n(tmp_path):
    model, opt, sched = _setup()
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None and manager.load_latest(model=model) is None
    for step in (1, 2, 3, 4):
        manager.save(step, model=model, optimizer=opt)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000003.pt", "step-00000004.pt"]
    assert manager.latest().name == "step-00000004.pt"
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


_KILL_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from lmopt.train import CheckpointManager, checkpoint
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    manager = CheckpointManager(sys.argv[1], keep_last=3)
    manager.save(1, model=model)
    def slow_verify(*args, **kwargs):  # the new file is written, not yet renamed into place
        print("WRITING", flush=True)
        time.sleep(60)
    checkpoint._read = slow_verify
    with torch.no_grad():
        model.weight.add_(1.0)
    manager.save(2, model=model)
    print("FINISHED", flush=True)
    """
)


def test_killing_a_saving_process_leaves_the_previous_checkpoint_intact(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "WRITING", child.stderr.read()
        child.kill()  # SIGKILL in the middle of writing checkpoint 2
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    manager = CheckpointManager(tmp_path)
    assert [p.name for p in manager.checkpoints()] == ["step-00000001.pt"]
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the interrupted write, never renamed
    torch.manual_seed(0)
    reference = torch.nn.Linear(256, 256)
    model = torch.nn.Linear(256, 256)
    state = manager.load_latest(model=model)
    assert state.step == 1 and torch.equal(model.weight, reference.weight)
    manager.save(2, model=model)  # the next save clears the debris
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


# -- clear errors --------------------------------------------------------------------------------------------
def test_error_other_model_shape(tmp_path):
    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", step=1, model=model, optimizer=opt, config={"width": 16})
    other = torch.nn.Sequential(
        torch.nn.Linear(6, 32),
        torch.nn.LayerNorm(32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 12),
        torch.nn.Tanh(),
        torch.nn.Linear(12, 3),
    )
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match=r"another model shape.*0\.weight: checkpoint \(16, 6\), model \(32, 6\)"):
        load_checkpoint(path, model=other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))  # nothing changed
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        load_checkpoint(path, model=torch.nn.Sequential(*make_model(), torch.nn.Linear(3, 3)))


def test_error_other_optimizer(tmp_path):
    model, opt, _ = _setup()
    _train(model, opt, schedules.scheduler(opt, schedules.Constant()), 1)
    path = save_checkpoint(tmp_path / "c.pt", step=1, model=model, optimizer=opt)
    sgd = lmopt.create_optimizer("sgd", model, lr=0.1)
    with pytest.raises(CheckpointError, match=r"saved with optimizer lmopt\.optim\.adamw\.AdamW.*SGD"):
        load_checkpoint(path, model=model, optimizer=sgd)
    flat = lmopt.create_optimizer("adamw", list(model.parameters()), lr=0.1)  # one group instead of two
    with pytest.raises(CheckpointError, match="param groups differ"):
        load_checkpoint(path, model=model, optimizer=flat)
    with pytest.raises(CheckpointError, match="no scheduler state"):
        load_checkpoint(path, model=model, scheduler=schedules.scheduler(opt, schedules.Constant()))


def test_error_truncated_and_corrupted(tmp_path):
    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", step=1, model=model, optimizer=opt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, model=model)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):  # unverified, torch's reader notices
        load_checkpoint(path, model=model, verify=False)

    path = save_checkpoint(tmp_path / "d.pt", step=1, model=model, optimizer=opt)
    flipped = bytearray(path.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupted: its SHA-256"):
        load_checkpoint(path, model=model)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", model=model)
    path = save_checkpoint(tmp_path / "e.pt", step=1, model=model)
    raw = bytearray(path.read_bytes())
    raw[len(checkpoint.MAGIC) + 8] = ord("[")  # the manifest's opening brace
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="manifest is unreadable"):
        load_checkpoint(path, model=model)
    assert load_checkpoint(path, model=model, verify=False).step == 1


def test_error_newer_format_and_foreign_files(tmp_path):
    model, _, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", step=1, model=model)
    payload = checkpoint._read(path, "cpu", verify=True)
    payload["format_version"] = 99
    _write_payload(tmp_path / "new.pt", payload)
    with pytest.raises(CheckpointError, match="format version 99, newer"):
        load_checkpoint(tmp_path / "new.pt", model=model)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="has no manifest"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an lmopt checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt", verify=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    model, _, _ = _setup()
    with pytest.raises(ValueError, match=r"extra\['payload'\] is a .*_Evil"):  # refused at save
        save_checkpoint(tmp_path / "c.pt", step=1, model=model, extra={"payload": _Evil()})
    payload = checkpoint._read(save_checkpoint(tmp_path / "c.pt", step=1, model=model), "cpu", verify=True)
    payload["extra"] = {"payload": _Evil()}
    path = _write_payload(tmp_path / "c.pt", payload)  # a hostile file with a valid manifest
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path, model=model)


# -- bit-exact resume for every optimizer in the test database -------------------------------------------
def _noisy_batch(k: int):
    x, y = make_batch(seed=100 + k)
    return x + 0.01 * torch.randn_like(x), y  # draws from the global RNG: its state must be restored


def _run(spec: OptimSpec, model, opt, sched, first: int, last: int) -> list[float]:
    losses = []
    probe_x, probe_y = make_batch(seed=999)
    for k in range(first, last):
        x, y = _noisy_batch(k)
        spec.step(model, opt, x, y)
        sched.step()
        with torch.no_grad():
            losses.append(float(((model(probe_x) - probe_y) ** 2).mean()))
    return losses


CASES = [(spec, i) for spec in OPTIM_DB for i in range(len(spec.variants))]


@pytest.mark.parametrize(("spec", "variant"), CASES, ids=[f"{s.name}-{i}" for s, i in CASES])
def test_resume_through_checkpoint_is_bit_exact_for_every_optimizer(spec: OptimSpec, variant: int, tmp_path):
    kw = spec.variants[variant]
    total, stop = 10, 4
    torch.manual_seed(1234)
    straight = make_model()
    opt = spec.make(straight, kw)
    sched = schedules.scheduler(opt, schedules.warmup_cosine(2, total))
    straight_losses = _run(spec, straight, opt, sched, 0, total)

    torch.manual_seed(1234)
    first = make_model()
    opt_first = spec.make(first, kw)
    sched_first = schedules.scheduler(opt_first, schedules.warmup_cosine(2, total))
    first_losses = _run(spec, first, opt_first, sched_first, 0, stop)
    manager = CheckpointManager(tmp_path)
    manager.save(stop, model=first, optimizer=opt_first, scheduler=sched_first, data_position=stop)
    torch.manual_seed(999)  # disturb every generator: the checkpoint must restore them
    random.seed(999)

    resumed = make_model(seed=123)  # different weights: everything must come from the checkpoint
    opt_resumed = spec.make(resumed, kw)
    sched_resumed = schedules.scheduler(opt_resumed, schedules.warmup_cosine(2, total))
    state = manager.load_latest(model=resumed, optimizer=opt_resumed, scheduler=sched_resumed)
    assert state.step == stop and state.data_position == stop
    resumed_losses = _run(spec, resumed, opt_resumed, sched_resumed, stop, total)

    assert first_losses + resumed_losses == straight_losses
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)
    for p_r, p_s in zip(resumed.parameters(), straight.parameters(), strict=True):
        for key, value in opt.state[p_s].items():
            other = opt_resumed.state[p_r][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), key
            else:
                assert value == other, key


# -- the reference loop ------------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 17, width: int = 12) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.LayerNorm(width)
        self.drop = torch.nn.Dropout(0.1)  # uses the torch RNG: resume must restore it
        self.lm_head = torch.nn.Linear(width, vocab)

    def forward(self, ids):
        return self.lm_head(self.drop(self.norm(self.embed(ids))))


def _lm_batches(n: int = 64, vocab: int = 17):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (3, 9), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _fit_setup(total: int):
    torch.manual_seed(0)
    model = TinyLM()
    opt = lmopt.create_optimizer("adamw", model, lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    sched = schedules.scheduler(opt, schedules.warmup_cosine(2, total))
    return model, opt, sched


def test_fit_resume_equals_uninterrupted(tmp_path):
    data = _lm_batches()
    kwargs = dict(accumulation_steps=2, clip=0.5, z_loss=1e-4, monitor=True, config={"run": "test"})
    model, opt, sched = _fit_setup(8)
    straight = fit(model, opt, data, steps=8, scheduler=sched, **kwargs)
    assert straight.step == 8 and straight.stopped_by is None and straight.tokens == 8 * 2 * 3 * 8

    model1, opt1, sched1 = _fit_setup(8)
    part = fit(model1, opt1, data, steps=3, scheduler=sched1, checkpoint_dir=tmp_path, **kwargs)
    assert part.last_checkpoint.endswith("step-00000003.pt")
    torch.manual_seed(77)
    model2, opt2, sched2 = _fit_setup(8)
    seen = []
    rest = fit(
        model2,
        opt2,
        data,
        steps=8,
        scheduler=sched2,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        callbacks=[seen.append],
        **kwargs,
    )
    assert rest.resumed_from.endswith("step-00000003.pt")
    assert part.losses + rest.losses == straight.losses
    for p, q in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [i.step for i in seen] == [4, 5, 6, 7, 8]
    assert all(i.tokens_per_s > 0 and i.grad_norm is not None for i in seen)
    assert [p.name for p in CheckpointManager(tmp_path).checkpoints()][-1] == "step-00000008.pt"


def test_fit_token_weighting_callable_source_and_stops(tmp_path):
    data = _lm_batches(n=10)
    model, opt, sched = _fit_setup(20)
    result = fit(
        model,
        opt,
        lambda position: iter(data[position:]),
        steps=20,
        scheduler=sched,
        accumulation_steps=3,
        accumulation_weighting="tokens",
        monitor=False,
        checkpoint_dir=tmp_path,
    )
    assert result.stopped_by == "data" and result.step == 3  # 10 micro-batches: 3 full steps
    state = CheckpointManager(tmp_path).load_latest(model=model)
    assert state.step == 3 and state.data_position == 9  # the dropped partial step is not counted
    stopped = fit(model, opt, data, steps=20, callbacks=[lambda info: info.step >= 2], monitor=False)
    assert stopped.stopped_by == "callback" and stopped.step == 2
    with pytest.raises(ValueError, match="checkpoint_every needs"):
        fit(model, opt, data, steps=1, checkpoint_every=1)
    with pytest.raises(ValueError, match="z_loss"):
        fit(model, opt, data, steps=1, loss_fn=lambda m, b: m(b[0]).sum(), z_loss=1e-4)
    with pytest.raises(ValueError, match="steps"):
        fit(model, opt, data, steps=-1)


_SIGTERM_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    from tests.test_checkpoint import _fit_setup, _lm_batches
    from lmopt.train import fit
    model, opt, sched = _fit_setup(1000)
    data = _lm_batches(n=4000)
    def progress(info):
        if info.step == 3:
            print("READY", flush=True)
    result = fit(model, opt, data, steps=1000, scheduler=sched, checkpoint_dir=sys.argv[1],
                 callbacks=[progress])
    print(json.dumps({"stopped_by": result.stopped_by, "step": result.step,
                      "checkpoint": result.last_checkpoint}), flush=True)
    """
)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_CHILD, str(tmp_path), str(ROOT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "READY"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["stopped_by"] == "SIGTERM" and 3 <= report["step"] < 1000
    step = report["step"]
    assert Path(report["checkpoint"]).name == f"step-{step:08d}.pt"

    # the preempted run resumes exactly where an uninterrupted one would be
    model, opt, sched = _fit_setup(1000)
    straight = fit(model, opt, _lm_batches(n=4000), steps=step + 2, scheduler=sched, monitor=False)
    model2, opt2, sched2 = _fit_setup(1000)
    resumed = fit(
        model2,
        opt2,
        _lm_batches(n=4000),
        steps=step + 2,
        scheduler=sched2,
        checkpoint_dir=tmp_path,
        monitor=False,
    )
    assert resumed.losses == straight.losses[step:]
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


class _HFLike(TinyLM):
    def forward(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=super().forward(input_ids))


def test_fit_dict_batches_shift_labels_like_hugging_face():
    torch.manual_seed(0)
    model = _HFLike()
    model.drop.p = 0.0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 17, (2, 7), generator=g)
    labels = ids.clone()
    labels[1, 4:] = -100
    with torch.no_grad():
        logits = model(ids).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 17), labels[:, 1:].reshape(-1))
    opt = lmopt.create_optimizer("adamw", model, lr=1e-3)
    result = fit(model, opt, [{"input_ids": ids, "labels": labels}], steps=1, monitor=False)
    assert result.losses[0] == pytest.approx(expected.item(), rel=1e-6)
    assert result.tokens == int((labels[:, 1:] != -100).sum())


def test_fit_with_grad_scaler_matches_fit_without():
    data = _lm_batches(n=8)
    model, opt, sched = _fit_setup(4)
    plain = fit(model, opt, data, steps=4, scheduler=sched, clip=0.5, monitor=False)
    model2, opt2, sched2 = _fit_setup(4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaled = fit(model2, opt2, data, steps=4, scheduler=sched2, clip=0.5, scaler=scaler, monitor=False)
    assert scaled.losses == pytest.approx(plain.losses, rel=1e-5)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_preemption_handler_flags_the_first_signal_and_lets_the_second_through():
    from lmopt.train import PreemptionHandler

    before = signal.getsignal(signal.SIGINT)
    with PreemptionHandler() as preempt:
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the loop sees a flag
        assert preempt.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second one interrupts at once
    assert signal.getsignal(signal.SIGINT) is before


def test_fit_stops_or_skips_on_divergence():
    data = _lm_batches(n=6)
    poisoned = list(data)
    model, opt, sched = _fit_setup(6)
    with torch.no_grad():
        model.lm_head.bias[0] = float("nan")  # every loss from here on is NaN
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, opt, poisoned, steps=6, scheduler=sched)
    assert result.stopped_by == "nonfinite" and result.step == 0
    assert any(e.kind == "loss_nonfinite" for e in result.events)
    for p, b in zip(model.parameters(), before, strict=True):  # the diverged update was not applied
        torch.testing.assert_close(p, b, rtol=0, atol=0, equal_nan=True)
    skipped = fit(model, opt, poisoned, steps=3, scheduler=sched, on_nonfinite="skip", monitor=False)
    assert skipped.stopped_by is None and skipped.skipped_steps == 3
    with pytest.raises(lmopt.NonFiniteGradientError):
        fit(model, opt, poisoned, steps=4, on_nonfinite="raise", monitor=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        fit(model, opt, poisoned, steps=1, on_nonfinite="ignore")


def test_fit_under_autocast():
    model, opt, sched = _fit_setup(4)
    result = fit(model, opt, _lm_batches(n=2), steps=2, scheduler=sched, autocast_dtype=torch.bfloat16, monitor=False)
    assert result.step == 2 and all(math.isfinite(v) for v in result.losses)
