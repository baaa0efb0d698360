"""Prodigy and APOLLO beyond the generic database tests: Prodigy's one estimate over several groups and under an
LR scheduler (against prodigyopt in float64), its estimate in the state dict; APOLLO's routing, its seeded
projections (the seed kept, not the matrix) and its memory at the reference shape."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import lmopt
from lmopt.optim.apollo import next_seed

from .optim_db import make_batch, make_model

prodigyopt = pytest.importorskip("prodigyopt")


def _groups(model: nn.Module) -> list[dict]:
    """Matrices with weight decay, the rest without: the usual decay split, two groups."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _train(model, opt, steps, scheduler=None, seed=1, dtype=torch.float64):
    for k in range(steps):
        x, y = make_batch(dtype, seed=seed + k)
        opt.zero_grad(set_to_none=True)
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _cosine(steps: int):
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


@pytest.mark.parametrize("kw", [{}, {"use_bias_correction": True, "decouple": False}, {"safeguard_warmup": True}])
def test_prodigy_matches_prodigyopt_over_groups_with_a_scheduler(kw):
    """One d over two groups (another weight decay each), lr scaled by a cosine LambdaLR: prodigyopt's numbers."""
    ours, theirs = make_model(torch.float64), make_model(torch.float64)
    opt_ours = lmopt.Prodigy(_groups(ours), **kw)
    opt_theirs = prodigyopt.Prodigy(_groups(theirs), **kw)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, _cosine(100)) for o in (opt_ours, opt_theirs)]
    for k in range(100):
        x, y = make_batch(torch.float64, seed=1 + k)
        for model, opt, s in ((ours, opt_ours, sched[0]), (theirs, opt_theirs, sched[1])):
            opt.zero_grad(set_to_none=True)
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            s.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for key in ("d", "d_max", "d_numerator", "k"):
        for g_ours, g_theirs in zip(opt_ours.param_groups, opt_theirs.param_groups):
            assert g_ours[key] == pytest.approx(g_theirs[key], rel=1e-9), key


def test_prodigy_group_with_lr_zero_is_left_alone():
    model = make_model()
    groups = _groups(model)
    groups[1]["lr"] = 0.0
    opt = lmopt.Prodigy(groups, weight_decay=0.1)
    frozen = [p.detach().clone() for p in groups[1]["params"]]
    moving = [p.detach().clone() for p in groups[0]["params"]]
    _train(model, opt, 5, dtype=torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(groups[1]["params"], frozen))
    assert not any(torch.equal(p, q) for p, q in zip(groups[0]["params"], moving))


def test_prodigy_estimate_resumes_bit_exactly_with_its_scheduler():
    def build(model):
        opt = lmopt.Prodigy(_groups(model), growth_rate=1.05)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _cosine(12))

    straight = make_model()
    opt, sched = build(straight)
    _train(straight, opt, 12, sched, dtype=torch.float32)

    first = make_model()
    opt_first, sched_first = build(first)
    _train(first, opt_first, 5, sched_first, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": opt_first.state_dict(), "s": sched_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert {"d", "d_max", "d_numerator", "k"} <= set(saved["o"]["param_groups"][0])
    resumed = make_model(seed=7)
    resumed.load_state_dict(saved["m"])
    opt_resumed, sched_resumed = build(resumed)
    opt_resumed.load_state_dict(saved["o"])
    sched_resumed.load_state_dict(saved["s"])
    _train(resumed, opt_resumed, 7, sched_resumed, seed=6, dtype=torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters()))
    assert opt_resumed.param_groups[0]["d"] == opt.param_groups[0]["d"]


@pytest.mark.parametrize(("key", "value"), [("d", float("nan")), ("d", -1.0), ("k", -2), ("d_numerator", "x")])
def test_prodigy_refuses_a_corrupted_estimate(key, value):
    model = make_model()
    opt = lmopt.Prodigy(model.parameters())
    _train(model, opt, 2, dtype=torch.float32)
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    before = opt.param_groups[0]["d"]
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["d"] == before


# ------------------------------------------------------------------------------------------------------- APOLLO
class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)

    def forward(self, x):
        return self.lm_head(self.norm(self.down(torch.tanh(self.up(self.embed(x))))))


def test_apollo_projects_the_hidden_matrices_only():
    model = _TinyLM()
    opt = lmopt.create_optimizer("apollo_adamw", model, rank=4)
    projected = {id(p) for g in opt.param_groups if g["use_apollo"] for p in g["params"]}
    assert projected == {id(model.up.weight), id(model.down.weight)}
    x = torch.randint(0, 50, (4, 6))
    model(x).pow(2).mean().backward()
    opt.step()
    assert opt.state[model.up.weight]["exp_avg"].shape == (32, 4)  # tall: rows kept, columns projected
    assert opt.state[model.down.weight]["exp_avg"].shape == (4, 32)  # wide: columns kept
    assert opt.state[model.embed.weight]["exp_avg"].shape == model.embed.weight.shape  # AdamW
    # given only parameters every 2-D tensor is projected; explicit groups choose for themselves
    flat = lmopt.create_optimizer("apollo_adamw", list(model.parameters()), rank=4)
    assert sum(len(g["params"]) for g in flat.param_groups if g["use_apollo"]) == 4
    with pytest.raises(ValueError, match="use_apollo"):
        lmopt.APOLLO([{"params": [model.norm.weight], "use_apollo": True}])


def test_apollo_keeps_the_seed_not_the_matrix():
    model = make_model()
    opt = lmopt.create_optimizer("apollo_adamw", model, rank=3, update_proj_gap=4)
    weight = next(model.parameters())
    _train(model, opt, 1, dtype=torch.float32)
    state = opt.state[weight]
    assert state["seed"] == 1  # the parameter's position, as apollo-torch
    tensors = {k for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert tensors == {"step", "exp_avg", "exp_avg_sq", "scaled_grad"}
    _train(model, opt, 4, dtype=torch.float32)  # steps 2..5: a new projection at step 5 (4 steps taken)
    assert state["seed"] == next_seed(1)


def test_apollo_cached_projection_is_the_drawn_one():
    runs = []
    for cache in (False, True):
        model = make_model()
        opt = lmopt.create_optimizer("apollo_adamw", model, rank=3, update_proj_gap=3, cache_projection=cache)
        _train(model, opt, 8, dtype=torch.float32)
        runs.append(model)
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in runs)))


def test_apollo_memory_at_the_reference_shape():
    """Per parameter of a 4096 x 4096 matrix: APOLLO rank 128 2 * 128 / 4096 of AdamW's moments; APOLLO-mini two
    numbers per row (less than SGD's momentum buffer by a factor of 2048)."""
    shape = (4096, 4096)
    adamw = lmopt.get_spec("adamw").state_bytes(shape)
    apollo = lmopt.get_spec("apollo_adamw").state_bytes(shape)
    mini = lmopt.get_spec("apollo_mini").state_bytes(shape)
    sgd_momentum = 4 * 4096 * 4096
    assert adamw - 4 == 2 * 4 * 4096 * 4096
    assert apollo == 2 * 4 * 4096 * 128 + 4 + 4  # moments, step, scaled_grad
    assert mini == 2 * 4 * 4096 + 4 + 4
    assert mini * 2000 < sgd_momentum
    cached = lmopt.get_spec("apollo_adamw").state_bytes(shape, cache_projection=True)
    assert cached == apollo + 4 * 128 * 4096


@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini"])
def test_apollo_for_loop_is_bit_identical_to_apollo_torch(name):
    """The reference path runs apollo-torch's operations in its order, on the same projections: equal bits."""
    pytest.importorskip("apollo_torch")
    from .optim_db import BY_NAME

    spec = BY_NAME[name]
    kw = {**spec.variants[-1], "implementation": "for_loop"}
    ours, theirs = make_model(torch.float64), make_model(torch.float64)
    opt_ours, opt_theirs = spec.make(ours, kw), spec.reference(theirs, dict(kw))
    _train(ours, opt_ours, 60)
    _train(theirs, opt_theirs, 60)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


def test_prodigy_refuses_an_estimate_beyond_float32_before_changing_anything():
    model = make_model()
    opt = lmopt.Prodigy(model.parameters())
    _train(model, opt, 2, dtype=torch.float32)
    for group in opt.param_groups:
        group["d"] = group["d_max"] = 1e20
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    x, y = make_batch()
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(FloatingPointError, match="growth_rate"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(v, opt.state[next(model.parameters())][k]) for k, v in state.items())


def test_gradient_release_runs_apollo_and_refuses_prodigy():
    """APOLLO's update needs only its own gradient: released during backward it equals the plain step; Prodigy's
    estimate couples every parameter, so gradient release refuses it."""
    plain, released = make_model(), make_model()
    opt_plain = lmopt.create_optimizer("apollo_adamw", plain, rank=3)
    release = lmopt.GradientRelease(lmopt.create_optimizer("apollo_adamw", released, rank=3))
    for k in range(4):
        x, y = make_batch(seed=1 + k)
        opt_plain.zero_grad(set_to_none=True)
        (plain(x) - y).pow(2).mean().backward()
        opt_plain.step()
        (released(x) - y).pow(2).mean().backward()
        release.step()
    for p, q in zip(plain.parameters(), released.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="per_parameter=False"):
        lmopt.GradientRelease(lmopt.Prodigy(make_model().parameters()))


@pytest.mark.slow
def test_prodigy_fsdp_in_use_all_reduces_plain_local_shards(tmp_path):
    """FSDP1-style flat local shards (plain tensors): ``fsdp_in_use=True`` sums the estimate over the process group,
    so each rank's shard moves as the whole parameter does unsharded (float64)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from .test_distributed import _free_port, clean_environment

    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("prodigy_fsdp1_worker.py")
    env = {**clean_environment(), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}"]
    proc = subprocess.run([*cmd, str(worker), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["d"] > 1e-3  # the estimate grew
    assert result["d_sharded"] == pytest.approx(result["d"], rel=1e-12)
    assert result["max_diff"] < 1e-10
