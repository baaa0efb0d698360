"""Worker for test_dcp_checkpoint.py, launched with torchrun (gloo on CPU) or as a plain process (1 rank).

``python dcp_worker.py MODE DIRECTORY RESULTS.json [SPEC,SPEC,...] [KILL_DIRECTORY]`` (default: every spec;
with ``KILL_DIRECTORY``, ``kill-write`` runs there after MODE, in the same processes):

* ``save`` (2 ranks): for every spec of the test database, trains the small model sharded with FSDP2 for 3
  steps, saves a sharded checkpoint through :class:`lmopt.train.CheckpointManager` (scheduler and GradScaler
  included), then trains 3 more steps, recording the loss on a fixed batch after each step and a hash of the
  final full parameters: the uninterrupted curve. Then it resumes from that checkpoint on the same 2 ranks as
  ``resume`` does (``resumed``), and resumes the checkpoints a single process saved in ``DIRECTORY-one-process``
  (``from_one_process``).
* ``resume`` (any world size; 1 = a plain process and an unsharded model): loads the newest checkpoint of each
  spec into a fresh model (other weights) and optimizer and trains the same 3 steps, recording the same.
* ``kill-write`` / ``kill-commit`` (2 ranks): saves step 3 of AdamW, trains, then starts saving step 6 and rank 0
  kills itself with SIGKILL mid-save: after DCP wrote its files (``write``) or after the manifest, just before
  the rename (``commit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmopt import schedules  # noqa: E402
from lmopt.train import CheckpointManager  # noqa: E402
from lmopt.train import dcp as lmopt_dcp  # noqa: E402
from tests.optim_db import OPTIM_DB, make_batch, make_model  # noqa: E402

SAVED_AT, MORE = 3, 3
SPECS = [s for s in OPTIM_DB if s.distributed and not s.distributed_unsupported]


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def build(spec, seed: int = 0):
    model = make_model(seed=seed)
    if world() > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = spec.make(model, dict(spec.variants[0]))
    sched = schedules.scheduler(opt, schedules.warmup_cosine(2, 20)) if spec.name in ("adamw", "adamw8bit") else None
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if spec.name == "adamw" else None
    return model, opt, sched, scaler


def train(spec, model, opt, sched, first: int, steps: int) -> list[float]:
    step = spec.distributed_step or spec.step
    x_eval, y_eval = make_batch(seed=77)
    losses = []
    for k in range(first, first + steps):
        step(model, opt, *make_batch(seed=10 + k))
        if sched is not None:
            sched.step()
        with torch.no_grad():
            losses.append((model(x_eval) - y_eval).pow(2).mean().item())
    return losses


def rng_probe() -> list:
    """The next draws of Python's, NumPy's and torch's generators on every rank (restored per rank)."""
    import random

    import numpy as np

    mine = [random.random(), float(np.random.rand()), torch.rand(1).item()]
    if not dist.is_initialized():
        return [mine]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def params_hash(model) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        digest.update(full.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_mode(directory: str, specs) -> dict:
    results = {}
    for spec in specs:
        try:
            model, opt, sched, scaler = build(spec)
            train(spec, model, opt, sched, 0, SAVED_AT)
            manager = CheckpointManager(os.path.join(directory, spec.name), keep_last=2)
            assert manager.uses_sharded(model)
            manager.save(SAVED_AT, model=model, optimizer=opt, scheduler=sched, scaler=scaler, data_position=SAVED_AT)
            rng = rng_probe()
            losses = train(spec, model, opt, sched, SAVED_AT, MORE)
            results[spec.name] = {"losses": losses, "params": params_hash(model), "rng": rng}
            results[spec.name]["resumed"] = resume(spec, directory)
            single = os.path.join(directory + "-one-process", spec.name)
            if os.path.isdir(single):  # saved by one process (plain parameters): resumed here on 2 ranks
                try:
                    results[spec.name]["from_one_process"] = resume(spec, directory + "-one-process")
                except Exception as err:
                    results[spec.name]["from_one_process"] = {"error": f"{type(err).__name__}: {err}"}
        except Exception as err:  # reported per optimizer, the others still run
            results[spec.name] = {"error": f"{type(err).__name__}: {err}"}
    return results


def resume(spec, directory: str) -> dict:
    model, opt, sched, scaler = build(spec, seed=123)
    manager = CheckpointManager(os.path.join(directory, spec.name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = manager.load_latest(model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    assert state is not None and state.step == SAVED_AT and state.data_position == SAVED_AT, state
    rng = rng_probe()
    losses = train(spec, model, opt, sched, SAVED_AT, MORE)
    return {
        "rng": rng,
        "losses": losses,
        "params": params_hash(model),
        "requantized": any("requantized" in str(w.message) for w in caught),
        "notes": state.warnings,
    }


def resume_mode(directory: str, specs) -> dict:
    results = {}
    for spec in specs:
        try:
            results[spec.name] = resume(spec, directory)
        except Exception as err:
            results[spec.name] = {"error": f"{type(err).__name__}: {err}"}
    return results


def kill_mode(directory: str, where: str) -> dict:
    spec = next(s for s in OPTIM_DB if s.name == "adamw")
    model, opt, sched, scaler = build(spec)
    manager = CheckpointManager(
        directory, keep_last=1, sharded=True
    )  # keep_last=1: a broken save must not delete step 3
    train(spec, model, opt, sched, 0, SAVED_AT)
    manager.save(SAVED_AT, model=model, optimizer=opt)
    train(spec, model, opt, sched, SAVED_AT, MORE)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if not dist.is_initialized() or dist.get_rank() == 0:
        if where == "write":  # DCP's files are on disk, the RNG and common files not yet, no manifest
            lmopt_dcp.capture_rng_state = die
        else:  # every file and the manifest are written, the rename has not happened
            real_verify = lmopt_dcp._verify

            def verify_then_die(path):
                real_verify(path)
                die()

            lmopt_dcp._verify = verify_then_die
    manager.save(SAVED_AT + MORE, model=model, optimizer=opt)
    return {"survived": True}


def main(mode: str, directory: str, out_path: str, names: str = "", kill_directory: str = "") -> None:
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    import random

    import numpy as np

    rank = dist.get_rank() if dist.is_initialized() else 0
    random.seed(rank)  # each rank its own Python and NumPy streams: a resume must restore each rank's
    np.random.seed(rank)
    specs = [s for s in SPECS if s.name in names.split(",")] if names else SPECS
    if mode == "save":
        results = save_mode(directory, specs)
    elif mode == "resume":
        results = resume_mode(directory, specs)
    else:
        results = kill_mode(directory, mode.removeprefix("kill-"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    if kill_directory:  # then the kill test in the same processes (saves a launch): results are written already
        if dist.is_initialized():
            dist.barrier()
        kill_mode(kill_directory, "write")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
