"""Checkpoints under failure: injected faults during a save, values a safe load cannot read, damaged or
malformed manifests and payloads, payloads that fail validation after a correct hash (nothing changes), the
older two-file layout, and Schedule-Free's averaged point."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch

import lmopt
from lmopt import schedules
from lmopt.train import CheckpointError, CheckpointManager, checkpoint, load_checkpoint, save_checkpoint

from .optim_db import make_batch, make_model


def _setup(seed: int = 0, name: str = "adamw"):
    model = make_model(seed=seed)
    opt = lmopt.create_optimizer(name, model, lr=1e-2)
    sched = schedules.scheduler(opt, schedules.warmup_cosine(2, 20))
    return model, opt, sched


def _train(model, opt, sched, first: int, last: int) -> None:
    for k in range(first, last):
        x, y = make_batch(seed=k)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()


def _weights(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _write_payload(path: pathlib.Path, payload: dict) -> pathlib.Path:
    header, data = checkpoint._encode(payload)
    path.write_bytes(header + data)
    return path


def _payload(path) -> dict:
    return checkpoint._read(pathlib.Path(path), "cpu", verify=True)


# -- a save that fails at any point leaves the previous checkpoint, and no temporary file ---------------------
def _fail_open_write(monkeypatch):
    import builtins

    real_open = builtins.open

    class Failing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Failing(f) if "w" in mode and ".tmp-" in str(file) else f

    monkeypatch.setattr(builtins, "open", fake_open)


def _fail(target: str):
    def inject(monkeypatch):
        def boom(*args, **kwargs):
            raise OSError(5, f"injected failure in {target}")

        if target == "replace":
            monkeypatch.setattr(checkpoint.os, "replace", boom)
        elif target == "fsync":
            monkeypatch.setattr(checkpoint.os, "fsync", boom)
        elif target == "verify":
            monkeypatch.setattr(checkpoint, "_read", boom)
        elif target == "serialize":
            monkeypatch.setattr(checkpoint.torch, "save", boom)

    return inject


@pytest.mark.parametrize(
    "inject",
    [_fail_open_write, _fail("fsync"), _fail("verify"), _fail("replace"), _fail("serialize")],
    ids=["write", "fsync", "verify", "replace", "serialize"],
)
def test_a_failed_overwrite_leaves_the_previous_checkpoint_loadable(inject, tmp_path, monkeypatch):
    model, opt, sched = _setup()
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, model=model, optimizer=opt, scheduler=sched)
    saved = _weights(model)
    path = tmp_path / "fixed.pt"
    save_checkpoint(path, step=1, model=model, optimizer=opt)
    _train(model, opt, sched, 0, 2)
    with monkeypatch.context() as m:
        inject(m)
        with pytest.raises(OSError, match="injected|No space"):
            save_checkpoint(path, step=3, model=model, optimizer=opt)  # overwriting one path
        with pytest.raises(OSError, match="injected|No space"):
            manager.save(3, model=model, optimizer=opt, scheduler=sched)  # a new one, keep_last=1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.pt", "step-00000001.pt"]  # no debris
    for p in (path, manager.latest()):
        fresh, fresh_opt, _ = _setup(seed=5)
        assert load_checkpoint(p, model=fresh, optimizer=fresh_opt).step == 1
        assert _same(_weights(fresh), saved)


# -- plain data only: converted when lossless, refused by key otherwise ------------------------------------
@dataclasses.dataclass
class _Config:
    lr: float = 0.1


def test_numpy_scalars_and_paths_are_stored_as_python_values(tmp_path):
    model, _, _ = _setup()
    path = save_checkpoint(
        tmp_path / "c.pt",
        step=1,
        model=model,
        data_position=np.int64(7),
        config={"lr": np.float32(0.5), "out": pathlib.Path("/runs/a"), "sizes": [np.int32(3), (np.bool_(True),)]},
    )
    state = load_checkpoint(path, model=model)
    assert state.data_position == 7 and type(state.data_position) is int
    assert state.config == {"lr": 0.5, "out": "/runs/a", "sizes": [3, (True,)]}
    assert type(state.config["lr"]) is float and type(state.config["sizes"][1][0]) is bool


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"extra": {"cfg": _Config()}}, r"extra\['cfg'\] is a .*_Config.*dataclasses\.asdict"),
        ({"config": {"a": {"b": [1, object()]}}}, r"config\['a'\]\['b'\]\[1\] is a builtins\.object"),
        ({"data_position": {"shard": {1, 2}}}, r"data_position\['shard'\] is a builtins\.set"),
        ({"config": {(1, 2): 3}}, r"config has a key of type tuple"),
        ({"config": [1, 2]}, r"config must be a dict"),
    ],
)
def test_values_a_safe_load_cannot_read_are_refused_at_save(kwargs, where, tmp_path):
    model, opt, sched = _setup()
    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save(1, model=model, optimizer=opt)
    with pytest.raises(ValueError, match=where):
        manager.save(2, model=model, optimizer=opt, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # nothing rotated out, nothing left
    assert load_checkpoint(first, model=model, optimizer=opt).step == 1


def test_rotation_happens_only_after_the_new_file_loaded_back(tmp_path, monkeypatch):
    model, opt, _ = _setup()
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, model=model)
    real = checkpoint._read
    calls = []

    def spy(path, *args, **kwargs):
        calls.append((path.name, sorted(p.name for p in tmp_path.iterdir())))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "_read", spy)
    manager.save(2, model=model)
    ((name, present),) = calls
    assert name.startswith(".step-00000002.pt.tmp-") and "step-00000001.pt" in present
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002.pt"]


# -- damaged files and manifests ---------------------------------------------------------------------------
def test_every_byte_flip_and_truncation_is_a_checkpoint_error(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 0, 2)
    path = save_checkpoint(tmp_path / "c.pt", step=2, model=model, optimizer=opt, scheduler=sched)
    good = path.read_bytes()
    target, target_opt, target_sched = _setup(seed=3)
    before = _weights(target)
    positions = sorted(set(np.random.default_rng(0).integers(0, len(good), 150).tolist()) | set(range(0, 40)))
    for pos in positions:
        flipped = bytearray(good)
        flipped[pos] ^= 0x5A
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            load_checkpoint(path, model=target, optimizer=target_opt, scheduler=target_sched)
    for size in (0, 5, len(checkpoint.MAGIC) + 3, 60, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:size])
        with pytest.raises(CheckpointError):
            load_checkpoint(path, model=target, optimizer=target_opt, scheduler=target_sched)
    assert _same(_weights(target), before)
    path.write_bytes(good)
    assert load_checkpoint(path, model=target, optimizer=target_opt).step == 2


def _with_manifest(path: pathlib.Path, manifest) -> None:
    raw = path.read_bytes()
    start = len(checkpoint.MAGIC) + 8
    length = int.from_bytes(raw[len(checkpoint.MAGIC) : start], "big")
    text = json.dumps(manifest).encode()
    path.write_bytes(checkpoint.MAGIC + len(text).to_bytes(8, "big") + text + raw[start + length :])


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ([1, 2], "not a JSON object"),
        (None, "not a JSON object"),
        ({"size": "big", "sha256": "0" * 64}, "no valid size"),
        ({"size": True, "sha256": "0" * 64}, "no valid size"),
        ({"size": -1, "sha256": "0" * 64}, "no valid size"),
        ({"sha256": "0" * 64}, "no valid size"),
        ("SIZE", "sha256"),
        ({"size": "SIZE", "sha256": 12}, "no valid sha256"),
        ({"size": "SIZE", "sha256": "xyz"}, "no valid sha256"),
        ({"size": "SIZE"}, "no valid sha256"),
    ],
)
def test_a_malformed_manifest_is_a_checkpoint_error(manifest, message, tmp_path):
    model, _, _ = _setup()
    path = save_checkpoint(tmp_path / "c.pt", step=1, model=model)
    real = checkpoint.read_manifest(path)
    if manifest == "SIZE":  # right size, wrong hash
        manifest = {"size": real["size"], "sha256": "0" * 64}
        message = "SHA-256 differs"
    elif isinstance(manifest, dict) and manifest.get("size") == "SIZE":
        manifest = {**manifest, "size": real["size"]}
    _with_manifest(path, manifest)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, model=model)


def _legacy(path: pathlib.Path, payload: dict, manifest=True) -> pathlib.Path:
    """The layout-1 checkpoint: a plain torch.save file and a JSON manifest beside it."""
    payload = {**payload, "format_version": 1}
    torch.save(payload, path)
    data = path.read_bytes()
    if manifest:
        record = {"format_version": 1, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        (path.parent / (path.name + ".json")).write_text(json.dumps(record))
    return path


def test_the_older_two_file_layout_still_loads_verified(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 0, 2)
    payload = _payload(save_checkpoint(tmp_path / "new.pt", step=2, model=model, optimizer=opt))
    old = _legacy(tmp_path / "old.pt", payload)
    fresh, fresh_opt, _ = _setup(seed=4)
    assert load_checkpoint(old, model=fresh, optimizer=fresh_opt).step == 2
    assert _same(_weights(fresh), _weights(model))
    flipped = bytearray(old.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    old.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(old, model=fresh)
    bare = _legacy(tmp_path / "bare.pt", payload, manifest=False)
    with pytest.raises(CheckpointError, match="no manifest .* cannot be verified"):
        load_checkpoint(bare, model=fresh)  # verification is never silently off
    assert load_checkpoint(bare, model=fresh, verify=False).step == 2  # the explicit opt-out
    (tmp_path / "bare.pt.json").write_text("null")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_checkpoint(bare, model=fresh)
    save_checkpoint(old, step=3, model=model)  # overwriting a layout-1 file drops its stale manifest
    assert not (tmp_path / "old.pt.json").exists() and load_checkpoint(old, model=fresh).step == 3


# -- a correctly hashed payload is validated before anything changes ----------------------------------------
def _mutations():
    def setter(key, value):
        def mutate(p):
            p[key] = value

        return mutate

    def group(p):
        p["optimizer"]["param_groups"][0] = "lr=1"

    def group_params(p):
        p["optimizer"]["param_groups"][1]["params"] = p["optimizer"]["param_groups"][1]["params"][:-1]

    def bad_moment(p):
        entry = next(iter(p["optimizer"]["state"].values()))
        entry["exp_avg_sq"] = -entry["exp_avg_sq"].abs() - 1

    def bad_lr(p):
        p["optimizer"]["param_groups"][0]["lr"] = float("nan")

    def state_entry(p):
        key = next(iter(p["optimizer"]["state"]))
        p["optimizer"]["state"][key] = [1, 2]

    def model_tensor(p):
        name = next(iter(p["model"]))
        p["model"][name] = "weights"

    def rng(p):
        p["rng"]["numpy"]["keys"] = torch.zeros(3, dtype=torch.int64)

    def python_rng(p):
        p["rng"]["python"] = (3, "abc", None)

    def scheduler_state(p):
        p["scheduler"] = {"current_step": "many"}

    return [
        (setter("format_version", True), "format version True"),
        (setter("format_version", 0), "format version 0"),
        (setter("format_version", -1), "format version -1"),
        (setter("format_version", "2"), "format version '2'"),
        (setter("step", -5), "step must be an int >= 0"),
        (setter("step", 2.0), "step must be an int >= 0"),
        (setter("config", [1]), "config must be a dict"),
        (setter("extra", None), "extra must be a dict"),
        (setter("scheduler", [1]), "scheduler state must be a dict"),
        (setter("optimizer_signature", None), "optimizer_signature"),
        (setter("optimizer", {"state": {}}), "param_groups"),
        (group, "param group 0 is malformed"),
        (group_params, "param group 1 is malformed"),
        (state_entry, "not a dict"),
        (bad_moment, "optimizer state does not load"),
        (bad_lr, "optimizer state does not load"),
        (model_tensor, r"model\[.*\] is not a tensor"),
        (rng, "RNG state is malformed"),
        (python_rng, "RNG state is malformed"),
        (scheduler_state, "scheduler state does not load"),
    ]


@pytest.mark.parametrize(("mutate", "message"), _mutations(), ids=[m for _, m in _mutations()])
def test_a_bad_payload_changes_nothing_and_names_the_problem(mutate, message, tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 0, 3)
    payload = _payload(save_checkpoint(tmp_path / "c.pt", step=3, model=model, optimizer=opt, scheduler=sched))
    mutate(payload)
    path = _write_payload(tmp_path / "bad.pt", payload)
    target, target_opt, target_sched = _setup(seed=8)
    _train(target, target_opt, target_sched, 5, 6)
    weights, opt_state, sched_state = _weights(target), target_opt.state_dict(), target_sched.state_dict()
    rng_before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, model=target, optimizer=target_opt, scheduler=target_sched)
    assert _same(_weights(target), weights)
    after = target_opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for key, entry in opt_state["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][key][k])) for k, v in entry.items())
    assert target_sched.state_dict() == sched_state and torch.equal(torch.get_rng_state(), rng_before)


def _torch_setup(seed: int = 0):
    model = make_model(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, schedules.scheduler(opt, schedules.warmup_cosine(2, 20))


@pytest.mark.parametrize("make", [_setup, _torch_setup], ids=["lmopt", "torch"])
def test_a_failure_after_partial_loading_restores_what_was_loaded(make, tmp_path, monkeypatch):
    model, opt, sched = make()
    _train(model, opt, sched, 0, 3)
    path = save_checkpoint(tmp_path / "c.pt", step=3, model=model, optimizer=opt, scheduler=sched)
    target, target_opt, target_sched = make(seed=8)
    _train(target, target_opt, target_sched, 5, 6)
    weights, groups = _weights(target), target_opt.state_dict()["param_groups"]
    exp_avgs = [target_opt.state[p]["exp_avg"].clone() for p in target.parameters()]

    def broken(state):
        raise RuntimeError("scheduler exploded")

    monkeypatch.setattr(target_sched, "load_state_dict", broken)
    with pytest.raises(CheckpointError, match="scheduler state does not load.*scheduler exploded"):
        load_checkpoint(path, model=target, optimizer=target_opt, scheduler=target_sched)
    assert _same(_weights(target), weights) and target_opt.state_dict()["param_groups"] == groups
    moments = [target_opt.state[p]["exp_avg"] for p in target.parameters()]
    assert all(torch.equal(m, before) for m, before in zip(moments, exp_avgs, strict=True))


# -- Schedule-Free: the averaged point x as the model weights, and a bit-exact resume ------------------------
def test_schedule_free_checkpoint_stores_x_and_resumes_bit_exact(tmp_path):
    total, stop = 8, 3
    straight, straight_opt, straight_sched = _setup(name="schedule_free_adamw")
    _train(straight, straight_opt, straight_sched, 0, total)

    model, opt, sched = _setup(name="schedule_free_adamw")
    _train(model, opt, sched, 0, stop)
    y = _weights(model)
    path = save_checkpoint(tmp_path / "sf.pt", step=stop, model=model, optimizer=opt, scheduler=sched)
    assert opt.mode == "train" and _same(_weights(model), y)  # saving moved nothing
    opt.eval()
    x = _weights(model)
    opt.train()
    assert not _same(x, y)
    evaluated = make_model(seed=11)
    load_checkpoint(path, model=evaluated)  # model only (evaluation, export): x
    assert _same(_weights(evaluated), x)

    resumed, resumed_opt, resumed_sched = _setup(seed=12, name="schedule_free_adamw")
    state = load_checkpoint(path, model=resumed, optimizer=resumed_opt, scheduler=resumed_sched)
    assert resumed_opt.mode == "train" and _same(_weights(resumed), y)
    _train(resumed, resumed_opt, resumed_sched, state.step, total)
    _train(model, opt, sched, stop, total)
    assert _same(_weights(resumed), _weights(straight)) and _same(_weights(model), _weights(straight))


def test_schedule_free_in_eval_mode_saves_its_parameters_as_they_are(tmp_path):
    model, opt, sched = _setup(name="schedule_free_adamw")
    _train(model, opt, sched, 0, 2)
    opt.eval()
    x = _weights(model)
    path = save_checkpoint(tmp_path / "sf.pt", step=2, model=model, optimizer=opt)
    assert "model_train_point" not in _payload(path) and opt.mode == "eval"
    fresh, fresh_opt, _ = _setup(seed=3, name="schedule_free_adamw")
    load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert fresh_opt.mode == "eval" and _same(_weights(fresh), x)
