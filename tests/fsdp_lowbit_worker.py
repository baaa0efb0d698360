"""Worker for test_distributed.py's low-bit checks, launched with torchrun (2 CPU processes, gloo).

Per low-bit optimizer (rank 0 writes a JSON file named on the command line):

* ``aligned``: DTensor parameters whose shard boundaries are multiples of the block size (one with an uneven
  split, one whose second shard is empty) get per-shard blocks equal to the unsharded blocks, so the same
  gradients must give bit-identical parameters and moments sharded and unsharded, through the C kernel and
  the PyTorch path (bf16 parameters with stochastic rounding and Kahan summation too, for AdamW8bit).
* ``unaligned``: where shard boundaries cut blocks the runs differ a little (largest relative difference).
* ``reshard``: a state dict saved with 2 shards loads into an unsharded optimizer, into a 1-shard HSDP mesh and
  back (requantized, with a warning): bit-exact where the blocks coincide, close where they do not.
* ``dcp``: ``get_optimizer_state_dict`` -> ``torch.distributed.checkpoint`` save/load ->
  ``set_optimizer_state_dict`` resumes bit-exactly, and so does the ``full_state_dict=True`` flow. Into another
  number of shards the full_state_dict flow requantizes; a sharded DCP load stops at DCP's size check, and the
  documented fix (``dcp_to_torch_save``, then the full_state_dict flow) works.
* ``unsupported``: a Shard(1) parameter with quantized state raises NotImplementedError naming the fix.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmopt  # noqa: E402
from lmopt.quant import MomentFormat, code_map, init_moment, load_moment, store_moment  # noqa: E402
from tests.optim_db import make_batch, make_model  # noqa: E402

NAMES = ("adamw8bit", "adam8bit", "adamw4bit", "lion8bit")
# (rows, cols): 64 rows split 32/32; 3 rows split 2/1 (uneven); 1 row split 1/0 (an empty shard); a vector
ALIGNED = [(64, 48), (3, 64), (1, 96), (128,)]
UNALIGNED = [(3, 40), (5, 24), (40,)]


def _grads(shapes, steps, dtype):
    g = torch.Generator().manual_seed(7)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]


def _params(shapes, dtype, mesh=None, placements=None):
    g = torch.Generator().manual_seed(3)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g).to(dtype)
        out.append(torch.nn.Parameter(distribute_tensor(t, mesh, placements) if mesh is not None else t))
    return out


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g.clone()


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _moments(opt, p):
    """The optimizer's moments of ``p`` as full fp32 tensors (dequantized), plus other tensor entries."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state, out = opt.state[p], {}
    for name, kind in opt.moments:
        out[name] = _full(load_moment(state, name, opt._format(group, kind), p.shape))
    if "kahan_comp" in state:
        out["kahan_comp"] = _full(state["kahan_comp"])
    return out


def _formats(name, kw):
    opt = lmopt.create_optimizer(name, [torch.nn.Parameter(torch.zeros(1))], **kw)
    return [opt._format(opt.param_groups[0], kind) for _, kind in opt.moments]


def _map_error(qmap: str) -> float:
    """Largest |x - value(code(x))| for x in the map's range ([-1, 1] signed, [0, 1] unsigned)."""
    values = code_map(qmap).values.double()
    low = -1.0 if values.min() < 0 else 0.0
    gaps = torch.cat([values[:1] - low, (values[1:] - values[:-1]) / 2, 1.0 - values[-1:]])
    return gaps.max().item()


def _compare(opt_a, params_a, opt_b, params_b) -> float:
    """Largest difference (relative to each tensor's largest magnitude) over parameters and moments."""
    worst = 0.0
    for p, q in zip(params_a, params_b):
        pairs = [(_full(p.detach()), _full(q.detach()))]
        ma, mb = _moments(opt_a, p), _moments(opt_b, q)
        pairs += [(ma[k], mb[k]) for k in mb]
        for a, b in pairs:
            a, b = a.float(), b.float()
            scale = b.abs().max().clamp_min(1e-30)
            worst = max(worst, ((a - b).abs().max() / scale).item())
    return worst


def _train(name, kw, params, grads):
    opt = lmopt.create_optimizer(name, params, **kw)
    for gs in grads:
        _set_grads(params, gs)
        opt.step()
    return opt


def sharded_vs_plain(name, kw, shapes, dtype, mesh, steps=4) -> float:
    grads = _grads(shapes, steps, dtype)
    plain = _params(shapes, dtype)
    sharded = _params(shapes, dtype, mesh, [Shard(0)])
    opt_plain = _train(name, kw, plain, grads)
    opt_sharded = _train(name, kw, sharded, grads)
    for p in sharded:  # the state stays sharded: DTensors (ints for the shard counts), never plain tensors
        for key, value in opt_sharded.state[p].items():
            if key != "step" and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
                raise AssertionError(f"plain state entry {key!r} for a DTensor parameter")
    return _compare(opt_sharded, sharded, opt_plain, plain)


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def reshard(name, kw, shapes, mesh, hsdp_mesh) -> dict:
    """Train 3 steps, save the state dict (torch.save / load), load it into parameters sharded otherwise, train
    2 more steps and compare with the run that stayed put: 2 shards -> unsharded, 2 shards -> 1 shard (HSDP
    mesh), unsharded -> 2 shards."""
    grads = _grads(shapes, 5, torch.float32)
    out: dict = {"warned": []}

    def steps(opt, params, gs):
        for g in gs:
            _set_grads(params, g)
            opt.step()

    def start(params):
        opt = lmopt.create_optimizer(name, params, **kw)
        steps(opt, params, grads[:3])
        snapshot = [_full(p.detach()).clone() for p in params]
        moments = [_moments(opt, p) for p in params]
        saved = io.BytesIO()
        torch.save(opt.state_dict(), saved)
        steps(opt, params, grads[3:])
        return opt, params, (snapshot, moments, saved)

    def resume(tag, source, mesh=None, placements=None):
        snapshot, moments, saved = source
        params = [
            torch.nn.Parameter(distribute_tensor(t.clone(), mesh, placements) if mesh is not None else t.clone())
            for t in snapshot
        ]
        opt = lmopt.create_optimizer(name, params, **kw)
        saved.seek(0)  # a fresh copy per load: torch's loader shares the saved `step` tensors with the state
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.load_state_dict(torch.load(saved, weights_only=True))
        out["warned"].append(any("requantized" in str(w.message) for w in caught))
        loaded = 0.0  # the loaded moments against the saved ones: the requantization error alone
        for p, expected in zip(params, moments):
            for key, value in _moments(opt, p).items():
                scale = expected[key].abs().max().clamp_min(1e-30)
                loaded = max(loaded, ((value - expected[key]).abs().max() / scale).item())
        out[f"loaded_{tag}"] = loaded
        steps(opt, params, grads[3:])
        return opt, params

    opt_s, sharded, source_s = start(_params(shapes, torch.float32, mesh, [Shard(0)]))
    opt_p, plain, source_p = start(_params(shapes, torch.float32))
    out["to_plain"] = _compare(*resume("to_plain", source_s), opt_s, sharded)
    hsdp = resume("to_1_shard", source_s, hsdp_mesh, [Replicate(), Shard(0)])
    out["to_1_shard"] = _compare(*hsdp, opt_s, sharded)
    out["from_plain"] = _compare(*resume("from_plain", source_p, mesh, [Shard(0)]), opt_p, plain)
    return out


_TMPDIRS: list[str] = []


def _shared_tmpdir() -> str:
    holder = [tempfile.mkdtemp(prefix="lmopt_dcp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    _TMPDIRS.append(holder[0])
    return holder[0]


def dcp_round_trip(name, kw, hsdp_mesh) -> dict:
    """FSDP2 model: get_optimizer_state_dict -> DCP save / load -> set_optimizer_state_dict, and the
    full_state_dict flow; both must resume bit-exactly on the same world size. Into 1 shard (an HSDP mesh of
    2 replicas x 1 shard): the full_state_dict flow requantizes (with a warning); a sharded DCP load stops at
    DCP's size check (the per-shard slots make the global sizes differ)."""
    out = {}

    def model_and_opt(seed=0, mesh=None):
        model = make_model(seed=seed)
        fully_shard(model, mesh=mesh)
        return model, lmopt.create_optimizer(name, list(model.parameters()), **kw)

    def train(model, opt, seeds):
        for s in seeds:
            opt.zero_grad(set_to_none=True)
            x, y = make_batch(seed=s)
            (model(x) - y).pow(2).mean().backward()
            opt.step()

    straight, opt_straight = model_and_opt()
    train(straight, opt_straight, range(30, 36))
    for mode in ("dcp", "full_state_dict"):
        first, opt_first = model_and_opt()
        train(first, opt_first, range(30, 33))
        resumed, opt_resumed = model_and_opt(seed=123)
        resumed.load_state_dict(first.state_dict())
        if mode == "dcp":
            path = _shared_tmpdir()
            dcp.save({"optim": get_optimizer_state_dict(first, opt_first)}, checkpoint_id=path)
            target = {"optim": get_optimizer_state_dict(resumed, opt_resumed)}
            dcp.load(target, checkpoint_id=path)
            set_optimizer_state_dict(resumed, opt_resumed, target["optim"])
        else:
            options = StateDictOptions(full_state_dict=True)
            full = get_optimizer_state_dict(first, opt_first, options=options)
            plain = all(not isinstance(v, DTensor) for s in full["state"].values() for v in s.values())
            out["full_state_dict_is_plain"] = plain
            set_optimizer_state_dict(resumed, opt_resumed, _save_load(full), options=options)
        train(resumed, opt_resumed, range(33, 36))
        same = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(resumed.parameters(), straight.parameters()))
        for p, q in zip(resumed.parameters(), straight.parameters()):
            for key, value in opt_straight.state[q].items():
                other = opt_resumed.state[p].get(key)
                if isinstance(value, DTensor):
                    same = same and isinstance(other, DTensor) and torch.equal(value.to_local(), other.to_local())
                elif isinstance(value, torch.Tensor):
                    same = same and torch.equal(value, other)
                else:
                    same = same and value == other
        out[mode] = "bit-exact" if same else "differs"
    # another number of shards: 2 -> 1
    first, opt_first = model_and_opt()
    train(first, opt_first, range(30, 33))
    full = _save_load(get_optimizer_state_dict(first, opt_first, options=StateDictOptions(full_state_dict=True)))
    resumed, opt_resumed = model_and_opt(seed=123, mesh=hsdp_mesh)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), first.parameters()):
            p.copy_(distribute_tensor(q.full_tensor(), p.device_mesh, p.placements))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_optimizer_state_dict(resumed, opt_resumed, full, options=StateDictOptions(full_state_dict=True))
    out["full_to_1_shard_warned"] = any("requantized" in str(w.message) for w in caught)
    train(resumed, opt_resumed, range(33, 36))
    worst = 0.0
    for p, q in zip(resumed.parameters(), straight.parameters()):
        a, b = p.full_tensor(), q.full_tensor()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    out["full_to_1_shard"] = worst
    path = _shared_tmpdir()
    dcp.save({"optim": get_optimizer_state_dict(first, opt_first)}, checkpoint_id=path)
    other, opt_other = model_and_opt(seed=123, mesh=hsdp_mesh)
    target = {"optim": get_optimizer_state_dict(other, opt_other)}
    try:
        dcp.load(target, checkpoint_id=path)
        out["dcp_to_1_shard"] = "loaded"
    except CheckpointException as err:  # a BaseException
        out["dcp_to_1_shard"] = f"{type(err).__name__}: {str(err)[-400:]}"
    # the fix: convert the DCP checkpoint to one torch.save file (full tensors), load it as a full state dict
    converted = os.path.join(path, "converted.pt")
    if dist.get_rank() == 0:
        dcp_to_torch_save(path, converted)
    dist.barrier()
    other, opt_other = model_and_opt(seed=123, mesh=hsdp_mesh)
    with torch.no_grad():
        for p, q in zip(other.parameters(), first.parameters()):
            p.copy_(distribute_tensor(q.full_tensor(), p.device_mesh, p.placements))
    full = torch.load(converted, weights_only=True)["optim"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_optimizer_state_dict(other, opt_other, full, options=StateDictOptions(full_state_dict=True))
    out["dcp_converted_to_1_shard_warned"] = any("requantized" in str(w.message) for w in caught)
    train(other, opt_other, range(33, 36))
    same = all(torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(other.parameters(), resumed.parameters()))
    out["dcp_converted_to_1_shard"] = "same as full_to_1_shard" if same else "differs"
    out["dcp_equal_sizes"] = dcp_equal_sizes(name, kw, hsdp_mesh)
    dist.barrier()
    if dist.get_rank() == 0:
        for path in _TMPDIRS:
            shutil.rmtree(path, ignore_errors=True)
    _TMPDIRS.clear()
    return out


def dcp_equal_sizes(name, kw, hsdp_mesh) -> str:
    """A (2, 56) weight has as many code bytes and scales on 2 shards (2 x 56 elements: 2 x 2 blocks of 32)
    as on 1 (112: 4 blocks), with other blocks: DCP loads the 2-shard checkpoint into 1 shard, and
    load_state_dict, seeing ``<name>_shards`` = 2, requantizes it -- as the full_state_dict flow does."""

    def model_and_opt(mesh=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(56, 2, bias=False)
        fully_shard(model, mesh=mesh)
        return model, lmopt.create_optimizer(name, list(model.parameters()), **kw)

    def train(model, opt, seeds):
        for s in seeds:
            opt.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(s)
            model(torch.randn(8, 56, generator=g)).pow(2).mean().backward()
            opt.step()

    first, opt_first = model_and_opt()
    train(first, opt_first, range(3))
    path = _shared_tmpdir()
    dcp.save({"optim": get_optimizer_state_dict(first, opt_first)}, checkpoint_id=path)
    full = get_optimizer_state_dict(first, opt_first, options=StateDictOptions(full_state_dict=True))
    runs, warned = [], []
    for mode in ("dcp", "full_state_dict"):
        model, opt = model_and_opt(hsdp_mesh)
        with torch.no_grad():
            for p, q in zip(model.parameters(), first.parameters()):
                p.copy_(distribute_tensor(q.full_tensor(), p.device_mesh, p.placements))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if mode == "dcp":
                target = {"optim": get_optimizer_state_dict(model, opt)}
                dcp.load(target, checkpoint_id=path)
                set_optimizer_state_dict(model, opt, target["optim"])
            else:
                set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
        warned.append(any("requantized" in str(w.message) for w in caught))
        train(model, opt, range(3, 6))
        runs.append([p.full_tensor() for p in model.parameters()])
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    return f"warned {warned}, " + ("same as full_state_dict" if same else "differs")


def unsupported(name, kw, mesh) -> str:
    p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 64), mesh, [Shard(1)]))
    opt = lmopt.create_optimizer(name, [p], **kw)
    p.grad = distribute_tensor(torch.randn(8, 64), mesh, [Shard(1)])
    try:
        opt.step()
    except NotImplementedError as err:
        return str(err)
    return "no error"


def small_shard1(name, kw, mesh) -> str:
    """A Shard(1) tensor under min_quantized_numel keeps fp32 moments and steps as DTensor math."""
    x, g = torch.randn(2, 6), torch.randn(2, 6)  # 12 elements < min_quantized_numel
    p, q = torch.nn.Parameter(distribute_tensor(x, mesh, [Shard(1)])), torch.nn.Parameter(x.clone())
    opts = [lmopt.create_optimizer(name, [t], **kw) for t in (p, q)]
    p.grad, q.grad = distribute_tensor(g, mesh, [Shard(1)]), g.clone()
    for opt in opts:
        opt.step()
    ok = torch.allclose(p.full_tensor(), q, rtol=1e-6, atol=1e-7) and isinstance(opts[0].state[p]["exp_avg"], DTensor)
    return "ok" if ok else "differs"


def helpers(mesh) -> dict:
    """lmopt.quant's moment helpers on a DTensor parameter, as CAME / Adafactor would keep a quantized first
    moment: load_moment gives a DTensor, store_moment takes one (and refuses a plain tensor); bit-identical to
    the plain helpers where blocks align (a 6 x 32 tensor in 2 shards of 3 blocks of 32)."""
    out = {}
    g = torch.Generator().manual_seed(5)
    for precision, kind in (("8bit", "first"), ("4bit", "second")):
        fmt = MomentFormat(precision, kind, block_size=32, min_quantized_numel=16)
        x = torch.randn(6, 32, generator=g)
        plain, sharded = {}, {}
        init_moment(plain, "m", x, fmt)
        init_moment(sharded, "m", distribute_tensor(x, mesh, [Shard(0)]), fmt)
        for _ in range(3):
            update = torch.randn(6, 32, generator=g)
            update = update.abs() if kind == "second" else update
            m = load_moment(plain, "m", fmt, x.shape)
            m.mul_(0.9).add_(update, alpha=0.1)
            store_moment(plain, "m", m, fmt)
            md = load_moment(sharded, "m", fmt, x.shape)
            md.mul_(0.9).add_(distribute_tensor(update, mesh, [Shard(0)]), alpha=0.1)
            store_moment(sharded, "m", md, fmt)
        back = load_moment(sharded, "m", fmt, x.shape)
        same = isinstance(back, DTensor) and torch.equal(back.full_tensor(), load_moment(plain, "m", fmt, x.shape))
        out[precision] = "bit-identical" if same else "differs"
        try:
            store_moment(sharded, "m", m, fmt)
            out[f"{precision}_plain_value"] = "accepted"
        except ValueError as err:
            out[f"{precision}_plain_value"] = str(err)
    return out


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    hsdp_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    results = {"helpers": helpers(mesh)}
    for name in NAMES:
        res: dict = {}
        try:
            kw = {"lr": 1e-2, "min_quantized_numel": 16, "block_size": 32}
            for impl in ("for_loop", "fused"):
                res[f"aligned_{impl}"] = sharded_vs_plain(
                    name, {**kw, "implementation": impl}, ALIGNED, torch.float32, mesh
                )
            if name == "adamw8bit":
                for rounding in ("stochastic", "kahan"):
                    for impl in ("for_loop", "fused"):
                        res[f"aligned_bf16_{rounding}_{impl}"] = sharded_vs_plain(
                            name,
                            {**kw, "implementation": impl, "param_rounding": rounding},
                            ALIGNED,
                            torch.bfloat16,
                            mesh,
                        )
            res["unaligned"] = sharded_vs_plain(name, kw, UNALIGNED, torch.float32, mesh)
            res["reshard_aligned"] = reshard(name, kw, ALIGNED, mesh, hsdp_mesh)
            res["reshard_unaligned"] = reshard(name, kw, UNALIGNED, mesh, hsdp_mesh)
            res["dcp"] = dcp_round_trip(name, kw, hsdp_mesh)
            res["unsupported"] = unsupported(name, kw, mesh)
            res["small_shard1"] = small_shard1(name, kw, mesh)
            # requantizing moves a value by at most the largest distance from a value in [-1, 1] to its code
            # in the map, times its block's absmax (<= the tensor's largest magnitude)
            maps = {opt_format.qmap for opt_format in _formats(name, kw)}
            res["requantization_bound"] = max(_map_error(m) for m in maps)
        except Exception as err:  # reported per optimizer, the others still run
            import traceback

            res["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"
        results[name] = res
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # the results are written and the process group destroyed: leave without interpreter finalization, where gloo's
    # worker threads releasing tensors can abort the process ("terminate called without an active exception";
    # pytorch/pytorch#179291), turning a finished run into a failed launch
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
