"""Worker for test_distributed.py, launched with torchrun (2 CPU processes, gloo).

For every spec of the test database that opts in, trains the same small model twice from the same weights with
the same batches: once sharded with FSDP2 (DTensor parameters) and once unsharded on this process, then writes
the largest relative difference per optimizer to the JSON file named on the command line (rank 0). It also
checks that the sharded run's state dict round-trips through ``torch.save`` / ``torch.load(weights_only=True)``
and resumes bit-exactly on the same world size (parameters and every state entry, DTensors included).
"""

from __future__ import annotations

import io
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.optim_db import OPTIM_DB, make_batch, make_model  # noqa: E402


def _same(a, b) -> bool:
    """Bit-exact equality of two state values (DTensors compared piece by piece, with their placements)."""
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if not isinstance(a, torch.Tensor):
        return a == b
    if hasattr(a, "to_local") != hasattr(b, "to_local"):
        return False  # a plain tensor where a DTensor was: the state must keep its form
    if hasattr(a, "to_local"):
        if a.placements != b.placements or a.shape != b.shape:
            return False
        a, b = a.to_local(), b.to_local()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def resume_bit_exact(spec, kw, step) -> str | None:
    """Train sharded 3 + 3 steps straight, and 3 steps, save (torch.save), load into a fresh sharded model with
    other weights, 3 steps: None when parameters and state agree bit for bit, else what differed."""
    straight, first = make_model(), make_model()
    fully_shard(straight)
    fully_shard(first)
    opt_straight, opt_first = spec.make(straight, kw), spec.make(first, kw)
    for k in range(6):
        step(straight, opt_straight, *make_batch(seed=20 + k))
    for k in range(3):
        step(first, opt_first, *make_batch(seed=20 + k))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=123)
    fully_shard(resumed)
    resumed.load_state_dict(saved["model"])
    opt_resumed = spec.make(resumed, kw)
    opt_resumed.load_state_dict(saved["optimizer"])
    for k in range(3, 6):
        step(resumed, opt_resumed, *make_batch(seed=20 + k))
    for i, (p, q) in enumerate(zip(resumed.parameters(), straight.parameters())):
        if not _same(p.detach(), q.detach()):
            return f"parameter {i} differs after the resume"
        state, expected = opt_resumed.state[p], opt_straight.state[q]
        if set(state) != set(expected):
            return f"parameter {i}: state keys {sorted(state)} != {sorted(expected)}"
        for key in expected:
            if not _same(state[key], expected[key]):
                return f"parameter {i}: state {key!r} differs after the resume"
    return None


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results = {}
    for spec in OPTIM_DB:
        if not spec.distributed:
            continue
        kw = dict(spec.variants[0])
        try:
            sharded, plain = make_model(), make_model()
            fully_shard(sharded)
            opt_sharded, opt_plain = spec.make(sharded, kw), spec.make(plain, kw)
            step = spec.distributed_step or spec.step
            updates = [0.0] * len(list(plain.parameters()))  # the largest change of an element in one step
            for k in range(6):
                x, y = make_batch(seed=10 + k)
                step(sharded, opt_sharded, x, y)
                before = [q.detach().clone() for q in plain.parameters()]
                step(plain, opt_plain, x, y)
                for i, (q, b) in enumerate(zip(plain.parameters(), before)):
                    updates[i] = max(updates[i], float((q.detach() - b).abs().max()))
            worst, per_param = 0.0, []
            for p, q, update in zip(sharded.parameters(), plain.parameters(), updates):
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                scale = q.detach().abs().max().clamp_min(1e-12)
                error = (full.detach() - q.detach()).abs().max()
                worst = max(worst, (error / scale).item())
                per_param.append([error.item(), scale.item(), update])  # for tests/tolerances.py's rule
            results[spec.name] = {"max_rel_err": worst, "per_param": per_param, "steps": 6}
            if spec.lmopt_engine:
                results[spec.name]["resume"] = resume_bit_exact(spec, kw, step) or "bit-exact"
            if spec.lmopt_engine:  # a NaN in one rank's shard must stop the step on every rank
                x, y = make_batch(seed=99)
                opt_sharded.zero_grad()
                (sharded(x) - y).pow(2).mean().backward()
                grad = list(sharded.parameters())[0].grad
                if dist.get_rank() == 0:
                    grad.to_local().view(-1)[0] = float("nan")
                try:
                    opt_sharded.step()
                    results[spec.name]["nonfinite_raised"] = False
                except FloatingPointError:
                    results[spec.name]["nonfinite_raised"] = True
        except NotImplementedError as err:
            results[spec.name] = {"unsupported": str(err)}
        except Exception as err:  # reported per optimizer, the others still run
            results[spec.name] = {"error": f"{type(err).__name__}: {err}"}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # the results are written and the process group destroyed: leave without interpreter finalization, where gloo's
    # worker threads releasing tensors can abort the process ("terminate called without an active exception";
    # pytorch/pytorch#179291), turning a finished run into a failed launch
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
