"""Sharded checkpoints (lmopt.train.dcp through CheckpointManager) on 2 gloo processes: resume bit-exact on the
same world size, the same loss curve at 1 and 3 ranks for every optimizer of the test database, SIGKILL mid-save
leaves the previous checkpoint loadable, conversion to and from the single-file layout, clear errors.

The default suite runs a representative subset (plain, quantized 8/4-bit with a scheduler and GradScaler,
Schedule-Free, Lookahead, Muon); the whole database is ``-m slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lmopt
from lmopt.train import CheckpointError, CheckpointManager, convert_checkpoint, load_checkpoint, save_checkpoint
from lmopt.train.dcp import is_sharded_checkpoint, read_sharded_manifest, save_sharded_checkpoint

from .optim_db import BY_NAME, OPTIM_DB, make_batch, make_model
from .test_distributed import _free_port, clean_environment
from .tolerances import loss_tol, moment_precision

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORKER = Path(__file__).with_name("dcp_worker.py")
FAST = ["adamw", "adamw8bit", "came4bit", "schedule_free_adamw", "lookahead_adamw", "muon"]
#: saved by one process and resumed on 2 ranks: the single file (adamw) and the sharded layout (quantized)
FROM_ONE_PROCESS = ("adamw", "adamw8bit", "came4bit")
ALL = [s.name for s in OPTIM_DB if s.distributed and not s.distributed_unsupported]


def _loss_tol(name: str, steps: int) -> float:
    """The loss tolerance of tests/tolerances.py for ``name``'s moment precision (the worker runs variant 0)."""
    return loss_tol(moment_precision(name, BY_NAME[name].variants[0]), steps)


def _run(mode: str, directory: Path, ranks: int, names: list[str] | None = None, kill: Path | None = None) -> dict:
    out = directory.parent / f"{directory.name}-{mode}-{ranks}.json"
    env = {**clean_environment(), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    args = [mode, str(directory), str(out), ",".join(names or []), str(kill or "")]
    if ranks == 1:  # a plain process: no process group, an unsharded model
        cmd = [sys.executable, str(WORKER), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--nnodes=1"]
        cmd += [f"--master-port={_free_port()}", "--master-addr=127.0.0.1", str(WORKER), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if kill is None and not mode.startswith("kill"):
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:  # rank 0 killed itself mid-save (the other ranks then fail in their next collective)
        killed = "exitcode: -9" in proc.stderr or proc.returncode == -9
        assert killed, proc.stderr[-3000:]
    return json.loads(out.read_text()) if out.exists() else {}


def _curves(tmp_path_factory, names: list[str], kill: Path | None = None) -> dict:
    """Save on 2 ranks (and, with ``kill``, the SIGKILL-mid-write test in the same launch), resume on 1 rank in
    this process (no process group, unsharded) and on 3 ranks."""
    from . import dcp_worker

    directory = tmp_path_factory.mktemp("dcp") / "ckpt"
    one = {}
    for spec in [s for s in dcp_worker.SPECS if s.name in names and s.name in FROM_ONE_PROCESS]:
        # one process, plain parameters, both layouts: resumed on 2 ranks by the save launch
        sharded = spec.name != "adamw"
        torch.manual_seed(0)
        model, opt, sched, scaler = dcp_worker.build(spec)
        dcp_worker.train(spec, model, opt, sched, 0, dcp_worker.SAVED_AT)
        manager = CheckpointManager(Path(f"{directory}-one-process") / spec.name, sharded=sharded)
        kwargs = dict(model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_position=dcp_worker.SAVED_AT)
        manager.save(dcp_worker.SAVED_AT, **kwargs)
        one[spec.name] = dcp_worker.train(spec, model, opt, sched, dcp_worker.SAVED_AT, dcp_worker.MORE)
    saved = _run("save", directory, 2, names, kill=kill)
    torch.manual_seed(0)
    specs = [s for s in dcp_worker.SPECS if s.name in names]
    resumed_1 = dcp_worker.resume_mode(str(directory), specs)
    return {"saved": saved, 1: resumed_1, 3: _run("resume", directory, 3, names), "one": one}


KILLED = "kill-write"


@pytest.fixture(scope="module")
def fast_curves(tmp_path_factory) -> dict:
    kill = tmp_path_factory.mktemp("killed") / "ckpt"
    return {**_curves(tmp_path_factory, FAST, kill=kill), KILLED: kill}


@pytest.fixture(scope="module")
def all_curves(tmp_path_factory) -> dict:
    return _curves(tmp_path_factory, [n for n in ALL if n not in FAST])


def _params(names: list[str]):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _get(request, name: str) -> dict:
    return request.getfixturevalue("fast_curves" if name in FAST else "all_curves")


@pytest.mark.parametrize("name", _params(ALL))
def test_sharded_resume_same_world_size_is_bit_exact(name, request):
    saved = _get(request, name)["saved"][name]
    assert "error" not in saved, saved["error"]
    resumed = saved["resumed"]
    assert resumed["losses"] == saved["losses"] and resumed["params"] == saved["params"]
    assert resumed["rng"] == saved["rng"] and saved["rng"][0] != saved["rng"][1]  # per rank, each its own
    assert not resumed["requantized"] and not resumed["notes"]


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("name", _params(ALL))
def test_sharded_resume_other_world_size_continues_the_curve(name, ranks, request):
    """Saved on 2 ranks, resumed on 1 (unsharded) and 3: the loss curve continues within what the sharding changes
    (fp32 reductions in another order: the FSDP2 tolerance of the spec; quantized state: requantized where the
    blocks do not align, which the same tolerance covers, tests/test_distributed.py)."""
    curves = _get(request, name)
    saved, resumed = curves["saved"][name], curves[ranks][name]
    assert "error" not in saved, saved["error"]
    assert "error" not in resumed, resumed["error"]
    tol = _loss_tol(name, len(saved["losses"]))
    for got, want in zip(resumed["losses"], saved["losses"], strict=True):
        assert abs(got - want) <= tol * abs(want), (resumed["losses"], saved["losses"])
    if name in ("adamw8bit", "came4bit"):  # their blocks straddle the new shard boundaries
        assert resumed["requantized"]
    assert any("saved on 2 ranks" in note for note in resumed["notes"])
    assert resumed["rng"][0] == saved["rng"][0]  # rank 0 takes the saved rank 0's streams


@pytest.mark.parametrize("name", FROM_ONE_PROCESS)
def test_one_process_checkpoint_resumes_on_two_ranks(name, fast_curves):
    """Saved by one process with plain parameters (adamw: the single file; the quantized ones: the sharded
    layout), loaded into FSDP2 on 2 ranks: the curve continues within tests/tolerances.loss_tol."""
    saved = fast_curves["saved"][name]
    assert "error" not in saved, saved["error"]
    resumed = saved["from_one_process"]
    assert "error" not in resumed, resumed["error"]
    got, want = resumed["losses"], fast_curves["one"][name]
    tol = _loss_tol(name, len(want))
    assert all(abs(a - b) <= tol * abs(b) for a, b in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("where", ["write", "commit"])
def test_sigkill_mid_save_leaves_the_previous_checkpoint(where, tmp_path, request):
    """Rank 0 killed after DCP wrote its files (2 ranks) or after the manifest, before the rename (1 process):
    step 3 stays the newest, loads, and the next save removes the stale temporary."""
    if where == "write":
        directory = request.getfixturevalue("fast_curves")[KILLED]
    else:
        directory = tmp_path / "ckpt"
        _run(f"kill-{where}", directory, 1)
    manager = CheckpointManager(directory, sharded=True)
    assert [p.name for p in manager.checkpoints()] == ["step-00000003"]
    stale = list(directory.glob(".step-00000006.tmp-*"))
    assert len(stale) == 1, list(directory.iterdir())
    spec = BY_NAME["adamw"]
    model = make_model(seed=4)
    opt = spec.make(model, dict(spec.variants[0]))
    state = manager.load_latest(model=model, optimizer=opt)
    assert state is not None and state.step == 3
    manager.save(4, model=model, optimizer=opt)
    assert not stale[0].exists()
    assert [p.name for p in manager.checkpoints()] == ["step-00000003", "step-00000004"]


def _trained(name: str = "adamw8bit", steps: int = 3):
    spec = BY_NAME[name]
    model = make_model()
    opt = spec.make(model, dict(spec.variants[0]))
    for k in range(steps):
        spec.step(model, opt, *make_batch(seed=k))
    return spec, model, opt


def _continue(spec, model, opt) -> list[torch.Tensor]:
    for k in range(3, 5):
        spec.step(model, opt, *make_batch(seed=k))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adamw8bit", "schedule_free_adamw", "came4bit"])
def test_convert_both_ways_resumes_bit_exact(name, tmp_path):
    spec, model, opt = _trained(name)
    sched = lmopt.schedules.scheduler(opt, lmopt.schedules.warmup_cosine(2, 20))
    single = save_checkpoint(tmp_path / "a.pt", step=3, model=model, optimizer=opt, scheduler=sched, data_position=7)
    expected = _continue(spec, model, opt)
    sharded = convert_checkpoint(single, tmp_path / "b")
    assert is_sharded_checkpoint(sharded) and read_sharded_manifest(sharded)["step"] == 3
    back = convert_checkpoint(sharded, tmp_path / "c.pt")
    for path in (sharded, back):
        other = make_model(seed=9)
        other_opt = spec.make(other, dict(spec.variants[0]))
        other_sched = lmopt.schedules.scheduler(other_opt, lmopt.schedules.warmup_cosine(2, 20))
        state = load_checkpoint(path, model=other, optimizer=other_opt, scheduler=other_sched)
        assert state.step == 3 and state.data_position == 7
        assert other_sched.state_dict() == sched.state_dict() or other_sched.last_epoch == 3
        got = _continue(spec, other, other_opt)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), path


def test_model_only_load_and_clear_errors(tmp_path):
    spec, model, opt = _trained("adamw")
    path = save_sharded_checkpoint(tmp_path / "s", step=3, model=model, optimizer=opt)
    fresh = make_model(seed=2)
    load_checkpoint(path, model=fresh)  # weights only
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    other = make_model()
    wrong = lmopt.create_optimizer("lion", list(other.parameters()), lr=1e-3)
    with pytest.raises(CheckpointError, match="saved with optimizer"):
        load_checkpoint(path, model=other, optimizer=wrong)
    bigger = torch.nn.Sequential(torch.nn.Linear(6, 17))
    with pytest.raises(CheckpointError, match="another model shape"):
        load_checkpoint(path, model=bigger)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path, model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), before, strict=True))
    (path / "manifest.json").unlink()
    assert CheckpointManager(tmp_path).checkpoints() == []


def test_metadata_unpickling_refuses_code(tmp_path):
    """DCP's .metadata is a pickle: lmopt reads it with an unpickler that accepts DCP's records only."""
    import os
    import pickle

    _, model, opt = _trained("adamw")
    path = save_sharded_checkpoint(tmp_path / "s", step=3, model=model, optimizer=opt)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="does not unpickle"):
        load_checkpoint(path, model=make_model(), verify=False)


def test_manager_picks_the_layout(tmp_path):
    _, model, opt = _trained("adamw")
    assert not CheckpointManager(tmp_path).uses_sharded(model)  # one process, plain parameters
    assert CheckpointManager(tmp_path, sharded=True).uses_sharded(model)
    with pytest.raises(ValueError, match="sharded must be"):
        CheckpointManager(tmp_path, sharded="yes")
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, model=model, optimizer=opt)
    CheckpointManager(tmp_path, keep_last=2, sharded=True).save(2, model=model, optimizer=opt)
    CheckpointManager(tmp_path, keep_last=2, sharded=True).save(3, model=model, optimizer=opt)
    assert [p.name for p in manager.checkpoints()] == ["step-00000002", "step-00000003"]
    fresh = make_model(seed=1)
    state = manager.load_latest(model=fresh, optimizer=BY_NAME["adamw"].make(fresh, {}))
    assert state is not None and state.step == 3


def test_cli_checkpoint_convert(tmp_path, capsys):
    from lmopt.cli import main

    _, model, opt = _trained("adamw8bit")
    save_checkpoint(tmp_path / "a.pt", step=3, model=model, optimizer=opt)
    assert main(["checkpoint", "convert", str(tmp_path / "a.pt"), str(tmp_path / "b")]) == 0
    assert main(["checkpoint", "convert", str(tmp_path / "b"), str(tmp_path / "c.pt")]) == 0
    assert main(["checkpoint", "info", str(tmp_path / "b")]) == 0
    assert '"world_size": 1' in capsys.readouterr().out
    for argv, message in (
        (["convert", str(tmp_path / "b"), str(tmp_path / "c.pt")], "exists; choose another destination"),
        (["convert", str(tmp_path / "missing"), str(tmp_path / "d")], "no checkpoint at"),
        (["convert", str(tmp_path / "b"), str(tmp_path / "b")], "exists"),
        (["info", str(tmp_path / "missing")], "No such file or directory"),
    ):
        assert main(["checkpoint", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmopt checkpoint: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("stage", ["capture_rng_state", "_write_manifest", "_verify"])
def test_failed_sharded_save_leaves_the_previous_one_and_no_temporary(stage, tmp_path, monkeypatch):
    from lmopt.train import dcp as lmopt_dcp

    _, model, opt = _trained("adamw")
    manager = CheckpointManager(tmp_path, keep_last=1, sharded=True)
    manager.save(3, model=model, optimizer=opt)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lmopt_dcp, stage, fail)
    with pytest.raises(OSError, match="No space left"):
        manager.save(4, model=model, optimizer=opt)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "step-00000003", model=make_model()).step == 3
