"""lmopt.mup: per-role multipliers and init scales (Tensor Programs V, Table 3), 1/d attention, coordinate check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lmopt
from lmopt.bench.workload import ModelSize, build_model

pytest.importorskip("transformers")

VOCAB, SEQ = 64, 16


def _llama(width: int, seed: int = 0) -> nn.Module:
    return build_model(
        ModelSize(hidden=width, layers=2, heads=2, intermediate=3 * width), vocab_size=VOCAB, seq_len=SEQ, seed=seed
    )


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(seed))


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]


def test_multipliers_per_role_adam_and_sgd():
    adam = lmopt.mup(_llama(64), base_width=32)
    assert (adam.width, adam.base_width, adam.width_mult) == (64, 32, 2.0)
    expected_adam = {"matrix": 0.5, "head": 0.5, "embedding": 1.0, "norm": 1.0}
    assert set(adam.roles.values()) == set(expected_adam)
    for name, role in adam.roles.items():
        assert adam.lr_multipliers[name] == expected_adam[role], name
    assert adam.lr_multipliers["lm_head.weight"] == 0.5
    assert adam.lr_multipliers["model.layers.0.mlp.down_proj.weight"] == 0.5

    sgd = lmopt.mup(_llama(64), base_width=32, optimizer_family="sgd")
    expected_sgd = {"matrix": 1.0, "head": 0.5, "embedding": 2.0, "norm": 2.0}
    for name, role in sgd.roles.items():
        assert sgd.lr_multipliers[name] == expected_sgd[role], name
    # the init rules do not depend on the optimizer
    assert sgd.init_scales == adam.init_scales

    table = adam.table()
    assert table == str(adam)
    for row in ("embedding  1", "matrix     14", "head       1", "norm       5"):
        assert row in table
    assert "width 64, base width 32" in table


def test_width_read_from_the_model_or_given():
    assert lmopt.mup(_llama(64), base_width=32).width == 64
    assert lmopt.mup(_llama(64), base_width=16, width=128).width_mult == 8.0

    class Mlp(nn.Module):  # no config: the most common fan-in of the hidden matrices
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 48)
            self.hidden = nn.ModuleList(nn.Linear(48, 48) for _ in range(3))
            self.head = nn.Linear(48, 10)

    plan = lmopt.mup(Mlp(), base_width=24)
    assert plan.width == 48
    assert plan.lr_multipliers["hidden.0.bias"] == 1.0 and plan.lr_multipliers["hidden.0.weight"] == 0.5


def test_init_scales_applied_in_place():
    sp, mu = _llama(128), _llama(128)
    plan = lmopt.mup(mu, base_width=32)  # width_mult 4
    sp_params = dict(sp.named_parameters())
    for name, p in mu.named_parameters():
        scale = plan.init_scales[name]
        expected = {"matrix": 0.5, "head": 0.25}.get(plan.roles[name], 1.0)
        assert scale == expected, name
        # a rescale keeps the seed's draw: every weight is the SP weight times its factor
        torch.testing.assert_close(p, sp_params[name] * scale, rtol=0, atol=0)
    std = {n: p.std().item() for n, p in mu.named_parameters()}
    sp_std = {n: p.std().item() for n, p in sp.named_parameters()}
    assert std["model.layers.1.self_attn.q_proj.weight"] / sp_std["model.layers.1.self_attn.q_proj.weight"] == (
        pytest.approx(0.5)
    )
    assert std["lm_head.weight"] / sp_std["lm_head.weight"] == pytest.approx(0.25)
    assert std["model.embed_tokens.weight"] == sp_std["model.embed_tokens.weight"]

    zero = _llama(64)
    plan = lmopt.mup(zero, base_width=32, zero_readout=True)
    assert plan.init_scales["lm_head.weight"] == 0.0 and not zero.lm_head.weight.any()


def test_redraw_is_deterministic_and_has_the_muP_std():
    a, b = _llama(128, seed=0), _llama(128, seed=1)
    plan = lmopt.mup(a, base_width=32, init="redraw", seed=7)
    lmopt.mup(b, base_width=32, init="redraw", seed=7)
    assert plan.init_std == pytest.approx(0.02)  # config.initializer_range
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if plan.roles[name] in ("matrix", "head"):
            assert torch.equal(pa, pb), name
    assert a.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02 * 0.5, rel=0.05)
    assert a.lm_head.weight.std().item() == pytest.approx(0.02 * 0.25, rel=0.05)


def test_base_width_is_the_identity():
    sp, mu = _llama(32), _llama(32)
    scalings = [m.scaling for m in _attention_modules(mu)]
    plan = lmopt.mup(mu, base_width=32)
    assert set(plan.lr_multipliers.values()) == {1.0} and set(plan.init_scales.values()) == {1.0}
    for (name, p), q in zip(mu.named_parameters(), sp.parameters()):
        assert torch.equal(p, q), name
    assert [m.scaling for m in _attention_modules(mu)] == scalings == [16**-0.5] * 2
    with torch.no_grad():
        assert torch.equal(mu(input_ids=_ids()).logits, sp(input_ids=_ids()).logits)


def test_attention_scaling_is_one_over_d_and_used_in_the_forward():
    width, base = 128, 32
    model = _llama(width)
    head_dim = width // 2
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    plan = lmopt.mup(model, base_width=base, init="keep")  # weights untouched: only the logit scale changes
    base_head_dim = head_dim * base / width
    for module in _attention_modules(model):
        assert module.head_dim == head_dim
        assert module.scaling == pytest.approx(math.sqrt(base_head_dim) / head_dim)
    assert len(plan.attention_scaling) == 2
    assert all(s == pytest.approx(math.sqrt(base_head_dim) / head_dim) for s in plan.attention_scaling.values())
    with torch.no_grad():
        after = model(input_ids=_ids()).logits
    assert not torch.allclose(before, after)

    # the forward reads module.scaling: the same logits come from the SP model with q scaled by the ratio
    # (RoPE is linear in q, so q x c scales every attention logit by c)
    reference = _llama(width)
    with torch.no_grad():
        for module in _attention_modules(reference):
            module.q_proj.weight.mul_(math.sqrt(base / width))
        torch.testing.assert_close(reference(input_ids=_ids()).logits, after, rtol=1e-5, atol=1e-5)


def test_lr_multipliers_through_create_optimizer():
    model = _llama(64)
    plan = lmopt.mup(model, base_width=32)
    base_lr = 3e-3
    opt = lmopt.create_optimizer("adamw", model, lr=base_lr, weight_decay=0.1, lr_multipliers=plan.lr_multipliers)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(base_lr * plan.lr_multipliers[name]), name
    groups = plan.param_groups(base_lr, weight_decay=0.1)
    assert sorted((g["name"], g["lr"]) for g in groups) == sorted((g["name"], g["lr"]) for g in opt.param_groups)


def test_exact_names_with_glob_characters_match_only_themselves():
    model = nn.Module()
    model.blocks = nn.ModuleDict({"a[0]": nn.Linear(4, 4), "a0": nn.Linear(4, 4), "a*": nn.Linear(4, 4)})
    multipliers = {"blocks.a0.weight": 2.0, "blocks.a[0].weight": 0.5, "blocks.a*.weight": 4.0}
    groups = lmopt.param_groups(model, lr_multipliers=multipliers, base_lr=1.0)
    lr = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lr["blocks.a[0].weight"] == 0.5 and lr["blocks.a0.weight"] == 2.0 and lr["blocks.a*.weight"] == 4.0
    assert lr["blocks.a0.bias"] == 1.0  # "blocks.a*.weight" is not a glob over the other blocks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_width": 0}, "base_width must be a positive integer"),
        ({"base_width": "64"}, "base_width must be a positive integer"),
        ({"base_width": True}, "base_width must be a positive integer"),
        ({"base_width": 32, "width": -1}, "width must be a positive integer"),
        ({"base_width": 32, "optimizer_family": "lion"}, "optimizer_family must be one of"),
        ({"base_width": 32, "init": "xavier"}, "init must be one of"),
        ({"base_width": 32, "init_std": 0.02}, "init_std is used only by init='redraw'"),
        ({"base_width": 32, "init": "redraw", "init_std": -1.0}, "needs init_std > 0"),
        ({"base_width": 32, "init": "keep", "zero_readout": True}, "cannot be combined with init='keep'"),
        ({"base_width": 32, "attention": 1}, "attention must be True or False"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lmopt.mup(_llama(32), **kwargs)


def test_refuses_a_second_call_a_tied_head_and_unscalable_attention():
    model = _llama(64)
    lmopt.mup(model, base_width=32)
    with pytest.raises(ValueError, match="already in muP"):
        lmopt.mup(model, base_width=32)

    tied = _llama(32)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied to the input embedding"):
        lmopt.mup(tied, base_width=32)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = SelfAttention()
            self.head = nn.Linear(16, 4)

    with pytest.raises(ValueError, match="pass attention=False"):
        lmopt.mup(Net(), base_width=8)
    assert lmopt.mup(Net(), base_width=8, attention=False).lr_multipliers["attn.qkv.weight"] == 0.5

    with pytest.warns(UserWarning, match="no output head"):
        lmopt.mup(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), base_width=4)


def _activation_change(width: int, parametrization: str, steps: int = 3, lr: float = 1e-2) -> float:
    """Mean |change| of the residual stream after the first decoder layer over a few AdamW steps."""
    model = _llama(width, seed=0)
    ids = _ids(1)
    multipliers = lmopt.mup(model, base_width=32).lr_multipliers if parametrization == "mup" else None
    opt = lmopt.create_optimizer("adamw", model, lr=lr, weight_decay=0.0, lr_multipliers=multipliers)

    def hidden() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states[1]

    start = hidden()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return (hidden() - start).abs().mean().item()


def test_coordinate_check_activation_updates_stay_flat_across_width_under_mup():
    # The coordinate check of Tensor Programs V (Fig. 5): after a few steps at one learning rate, how far the
    # hidden activations moved should not depend on width under muP, and grows with width under SP (each
    # Adam step moves every entry of a hidden matrix by ~lr, and a row sums `width` of them). Measured on this
    # model (widths 32/64/128, 3 AdamW steps at lr 1e-2, seeds 0-6): the change at width 128 over width 32 was
    # 0.87-1.03 under muP and 7.9-18.9 under SP, so the bounds below (muP spread < 1.5x, SP growth > 4x and
    # increasing) leave a wide margin on both sides.
    widths = (32, 64, 128)
    mup = [_activation_change(w, "mup") for w in widths]
    sp = [_activation_change(w, "sp") for w in widths]
    assert mup[0] == pytest.approx(sp[0])  # width 32 is the base width: the same model and optimizer
    assert max(mup) / min(mup) < 1.5, mup
    assert sp[0] < sp[1] < sp[2] and sp[2] / sp[0] > 4.0, sp
