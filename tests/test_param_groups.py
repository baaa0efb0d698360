"""Structural parameter groups on real architectures (configs with random weights, no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmopt
from lmopt.param_groups import classify_parameters, param_groups

transformers = pytest.importorskip("transformers")


def _llama(tie: bool = False):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _by_name(groups):
    return {name: g for g in groups for name in g["param_names"]}


def test_llama_untied():
    model = _llama(tie=False)
    groups = param_groups(model, weight_decay=0.1)
    names = _by_name(groups)
    assert names["model.embed_tokens.weight"]["weight_decay"] == 0.0
    assert names["model.norm.weight"]["weight_decay"] == 0.0
    assert names["model.layers.0.input_layernorm.weight"]["weight_decay"] == 0.0
    assert names["model.layers.0.self_attn.q_proj.weight"]["weight_decay"] == 0.1
    assert names["model.layers.1.mlp.down_proj.weight"]["weight_decay"] == 0.1
    assert names["lm_head.weight"]["weight_decay"] == 0.1  # an untied head is a matrix
    roles = {i.name: i.role for i in classify_parameters(model)}
    assert roles["lm_head.weight"] == "head"
    assert roles["model.layers.0.post_attention_layernorm.weight"] == "norm"
    # every trainable tensor exactly once
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_llama_tied_head_counted_once():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = param_groups(model, weight_decay=0.1)
    tensors = [p for g in groups for p in g["params"]]
    assert len(tensors) == len({id(p) for p in tensors}) == len(list(model.parameters()))
    names = _by_name(groups)
    assert "lm_head.weight" not in names
    assert names["model.embed_tokens.weight"]["weight_decay"] == 0.0


def test_gpt2_conv1d_biases_layernorms_embeddings():
    model = _gpt2()
    names = _by_name(param_groups(model, weight_decay=0.05))
    assert names["transformer.wte.weight"]["weight_decay"] == 0.0
    assert names["transformer.wpe.weight"]["weight_decay"] == 0.0
    assert names["transformer.h.0.ln_1.weight"]["weight_decay"] == 0.0
    assert names["transformer.h.0.ln_1.bias"]["weight_decay"] == 0.0
    assert names["transformer.h.0.attn.c_attn.weight"]["weight_decay"] == 0.05  # transformers' Conv1D
    assert names["transformer.h.0.attn.c_attn.bias"]["weight_decay"] == 0.0
    assert names["transformer.h.1.mlp.c_proj.weight"]["weight_decay"] == 0.05


class RMSNorm(nn.Module):
    """A user's own norm: found by its class name, although nothing in torch knows it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.norm = RMSNorm(16)
        self.proj = nn.Linear(16, 16, bias=False)
        self.gate = nn.Parameter(torch.zeros(16))  # a 1-D tensor that is neither a bias nor a norm
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        return self.head(self.proj(self.norm(self.tok(ids))) * self.gate)


def test_custom_rmsnorm_and_vectors():
    model = Tiny()
    roles = {i.name: i.role for i in classify_parameters(model)}
    assert roles == {
        "tok.weight": "embedding",
        "norm.scale": "norm",
        "proj.weight": "matrix",
        "gate": "vector",
        "head.weight": "head",
        "head.bias": "bias",
    }
    names = _by_name(param_groups(model, weight_decay=0.1))
    assert [n for n, g in names.items() if g["weight_decay"] > 0] == ["proj.weight", "head.weight"]


def test_lr_multipliers_glob_and_regex():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.1, lr_multipliers={"head.*": 10, "re:^proj": 0.5}, base_lr=1e-3)
    names = _by_name(groups)
    assert names["head.weight"]["lr"] == pytest.approx(1e-2)
    assert names["head.bias"]["lr"] == pytest.approx(1e-2) and names["head.bias"]["weight_decay"] == 0.0
    assert names["proj.weight"]["lr"] == pytest.approx(5e-4)
    assert names["tok.weight"]["lr"] == pytest.approx(1e-3)
    summary = groups.summary()
    assert "x10" in summary and "tensors" in summary and "parameters" in summary
    # schedulers scale each group from its own initial lr
    opt = lmopt.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups}["decay_lr_x10"] == pytest.approx(5e-3)


def test_bad_inputs():
    model = Tiny()
    with pytest.raises(ValueError, match="base_lr"):
        param_groups(model, lr_multipliers={"head.*": 10})
    with pytest.raises(ValueError, match="match no trainable"):
        param_groups(model, lr_multipliers={"lm_head.*": 10}, base_lr=1e-3)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, weight_decay=-1)
    with pytest.raises(ValueError, match="lr_multipliers"):
        param_groups(model, lr_multipliers={"head.*": 0}, base_lr=1e-3)
    with pytest.raises(ValueError, match="nn.Module"):
        param_groups(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = Tiny()
    model.tok.weight.requires_grad_(False)
    names = _by_name(param_groups(model))
    assert "tok.weight" not in names


def test_create_optimizer_from_model_uses_structural_groups():
    model = _llama()
    opt = lmopt.create_optimizer("adamw", model, lr=1e-3, weight_decay=0.1)
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decays == {"decay": 0.1, "no_decay": 0.0}
    flat = lmopt.create_optimizer("adamw", model, lr=1e-3, weight_decay=0.1, no_decay=False)
    assert [g["weight_decay"] for g in flat.param_groups] == [0.1]
    with_mult = lmopt.create_optimizer("adamw", model, lr=1e-3, lr_multipliers={"lm_head.*": 10})
    lrs = {g["name"]: g["lr"] for g in with_mult.param_groups}
    assert lrs == pytest.approx({"decay": 1e-3, "decay_lr_x10": 1e-2, "no_decay": 1e-3})
