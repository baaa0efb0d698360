"""Adafactor, CAME, Adam-mini, Lion and Sophia beyond the generic tests of test_optimizers.py.

* factored statistics on N-D (conv-like 4-D, batched 3-D) and degenerate (1 x n, n x 1) shapes;
* Adafactor against torch.optim.Adafactor, and Sophia against pytorch_optimizer's SophiaH, where their
  definitions coincide;
* Adam-mini's partitions on transformers' Llama and GPT-2, nn.MultiheadAttention and plain nn.Linear models,
  and its match with the adam-mini package on Llama;
* Sophia's Hessian-refresh API;
* each optimizer trains a tiny transformer LM below its initial loss with its registry defaults.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lmopt
from lmopt.optim.adam_mini import block_count, find_partitions

SHAPES = [(2, 3, 4, 5), (3, 4, 5), (1, 7), (7, 1), (1, 1), (5, 6)]


def _params(shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _set_grads(params, step, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype)


def _run(opt, params, steps):
    for k in range(steps):
        _set_grads(params, k, params[0].dtype)
        opt.step()


# ---------------------------------------------------------------------------------------- factored statistics
@pytest.mark.parametrize("name", ["adafactor", "came"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_factored_state_shapes(name, shape):
    (p,) = _params([shape])
    opt = lmopt.create_optimizer(name, [p])
    _run(opt, [p], 2)
    assert tuple(opt.state[p]["row_var"].shape) == shape[:-1]
    assert tuple(opt.state[p]["col_var"].shape) == shape[:-2] + shape[-1:]
    declared = {t.name: t.shape for t in lmopt.get_spec(name).state_tensors(shape, p.dtype)}
    assert declared == {k: tuple(v.shape) for k, v in opt.state[p].items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_factored_matches_peers_on_nd_and_degenerate_shapes(shape):
    from came_pytorch import CAME as PeerCAME
    from transformers.optimization import Adafactor as HFAdafactor

    for ours_kw, make_peer in [
        (
            {"name": "adafactor_relative_step", "beta1": 0.9},
            lambda ps: HFAdafactor(ps, lr=None, beta1=0.9, relative_step=True, scale_parameter=True),
        ),
        ({"name": "came", "lr": 1e-2}, lambda ps: PeerCAME(ps, lr=1e-2)),
    ]:
        ours_kw = dict(ours_kw)
        name = ours_kw.pop("name")
        for implementation in ("for_loop", "fused"):
            ours, theirs = _params([shape]), _params([shape])
            opt = lmopt.create_optimizer(name, ours, implementation=implementation, **ours_kw)
            _run(opt, ours, 30)
            _run(make_peer(theirs), theirs, 30)
            torch.testing.assert_close(ours[0], theirs[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["adafactor", "came"])
def test_batched_matrices_are_factored_independently(name):
    """A (B, R, C) tensor is B independent (R, C) matrices when nothing couples them (no clipping, explicit
    lr)."""
    kw = {"clip_threshold": 1e9}
    (stacked,) = _params([(3, 4, 5)])
    slices = [nn.Parameter(stacked.detach()[b].clone()) for b in range(3)]
    opt_stacked = lmopt.create_optimizer(name, [stacked], **kw)
    opt_slices = lmopt.create_optimizer(name, slices, **kw)
    for k in range(10):
        g = torch.Generator().manual_seed(k)
        grad = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
        stacked.grad = grad
        for b, s in enumerate(slices):
            s.grad = grad[b].clone()
        opt_stacked.step()
        opt_slices.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([s.detach() for s in slices]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(1, 9), (9, 1)])
def test_degenerate_factored_equals_unfactored(shape):
    """With one row (or one column) the rank-1 estimate is exact: the same update as the full second
    moment."""
    (matrix,) = _params([shape])
    vector = nn.Parameter(matrix.detach().reshape(-1).clone())
    opt_m = lmopt.Adafactor([matrix], eps=(0.0, 1e-3))
    opt_v = lmopt.Adafactor([vector], eps=(0.0, 1e-3))
    for k in range(20):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        matrix.grad, vector.grad = g, g.reshape(-1).clone()
        opt_m.step()
        opt_v.step()
    torch.testing.assert_close(matrix.detach().reshape(-1), vector.detach(), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------ other peers
def test_adafactor_matches_torch_adafactor_where_definitions_coincide():
    """torch.optim.Adafactor = relative step capped by lr, parameter scaling, no eps added to g^2, no first
    moment (its weight decay multiplies lr rather than the step size, so it is left at 0)."""
    from .optim_db import make_batch, make_model

    ours, theirs = make_model(torch.float64), make_model(torch.float64)
    opt = lmopt.create_optimizer("adafactor_relative_step", list(ours.parameters()), eps=(0.0, 1e-3))
    ref = torch.optim.Adafactor(
        theirs.parameters(),
        lr=1e-2,
        beta2_decay=-0.8,
        eps=(0.0, 1e-3),
        d=1.0,
        weight_decay=0.0,
        foreach=False,
    )
    for k in range(120):
        x, y = make_batch(torch.float64, seed=k)
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            o.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-11)


def test_sophia_matches_pytorch_optimizer_sophiah_where_definitions_coincide():
    """SophiaH(lr, p, eps, wd) clamps m / max(h, eps) to [-p, p]: Sophia with lr*p, rho=p, eps*p and wd/p."""
    from pytorch_optimizer import SophiaH

    from .optim_db import make_batch, make_model

    lr, clip, eps, wd, k_period = 0.05, 0.02, 1e-12, 0.1, 3
    ours, theirs = make_model(torch.float64), make_model(torch.float64)
    opt = lmopt.Sophia(
        ours.parameters(),
        lr=lr * clip,
        rho=clip,
        eps=eps * clip,
        weight_decay=wd / clip,
        betas=(0.96, 0.99),
        update_period=k_period,
        estimator="hutchinson",
    )
    ref = SophiaH(
        theirs.parameters(),
        lr=lr,
        betas=(0.96, 0.99),
        weight_decay=wd,
        p=clip,
        eps=eps,
        update_period=k_period,
        hessian_distribution="gaussian",
        foreach=False,
    )
    for k in range(100):
        x, y = make_batch(torch.float64, seed=k)
        opt.zero_grad()
        loss = (ours(x) - y).pow(2).mean()
        loss.backward()
        if opt.hessian_due():
            torch.manual_seed(k)
            opt.update_hessian(lambda x=x, y=y: (ours(x) - y).pow(2).mean())
        opt.step()
        ref.zero_grad()
        (theirs(x) - y).pow(2).mean().backward(create_graph=True)
        torch.manual_seed(k)
        ref.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-11)


# ----------------------------------------------------------------------------------------- Sophia refresh API
def test_sophia_refresh_api():
    from .optim_db import make_batch, make_model

    model = make_model()
    opt = lmopt.Sophia(model.parameters(), lr=1e-3, update_period=2, estimator="gnb")
    x, y = make_batch()
    due = []
    for _ in range(5):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        due.append(opt.hessian_due())
        if due[-1]:
            with pytest.raises(ValueError, match="batch_size"):
                opt.update_hessian(lambda: model(x).pow(2).mean())
            opt.update_hessian(lambda: (model(x) - model(x).detach() - torch.randn(32, 3)).pow(2).mean(), batch_size=32)
            for p, g in zip(model.parameters(), grads, strict=False):
                assert torch.equal(p.grad, g)  # the refresh leaves .grad alone
            assert all((opt.state[p]["hessian"] >= 0).all() for p in model.parameters())  # GNB is PSD
        opt.step()
    assert due == [True, False, True, False, True]


def test_sampled_label_loss_is_cross_entropy_on_model_samples():
    logits = torch.randn(4, 6, 10, requires_grad=True)
    torch.manual_seed(0)
    loss = lmopt.optim.sampled_label_loss(logits)
    loss.backward()
    assert loss.shape == () and logits.grad is not None
    # the expected gradient of the sampled loss is zero (E_y[grad log p(y)] = 0): check on many samples
    big = torch.randn(1, 5).expand(20000, 5).clone().requires_grad_(True)
    lmopt.optim.sampled_label_loss(big).backward()
    assert big.grad.sum(0).abs().max() < 0.02


def test_lion_maximize_is_descent_on_the_negated_gradient():
    a, b = _params([(4, 5)], torch.float32), _params([(4, 5)], torch.float32)
    opt_a = lmopt.Lion(a, lr=1e-2, maximize=True)
    opt_b = lmopt.Lion(b, lr=1e-2)
    for k in range(5):
        _set_grads(a, k, torch.float32)
        b[0].grad = -a[0].grad
        opt_a.step()
        opt_b.step()
    assert torch.equal(a[0], b[0])


# --------------------------------------------------------------------------------------------- Adam-mini
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def test_adam_mini_partitions_llama():
    parts = find_partitions(_tiny_llama())
    layer = "model.layers.0."
    assert parts[layer + "self_attn.q_proj.weight"] == (0, ((4, 8),))  # 4 heads of head_dim 8
    assert parts[layer + "self_attn.k_proj.weight"] == (0, ((2, 8),))  # 2 key/value heads (GQA)
    assert parts[layer + "self_attn.v_proj.weight"] == (0, ((16, 1),))  # per output neuron
    assert parts[layer + "self_attn.o_proj.weight"] == (0, ((32, 1),))
    assert parts[layer + "mlp.up_proj.weight"] == (0, ((48, 1),))
    assert parts["model.embed_tokens.weight"] == (0, ((50, 1),))  # per token
    assert parts["lm_head.weight"] == (0, ((50, 1),))
    assert parts[layer + "input_layernorm.weight"] == (None, ())  # one block


def test_adam_mini_partitions_gpt2_fused_attention():
    model = _tiny_gpt2()
    parts = find_partitions(model)
    # Conv1D weights are (in, out): blocks along dim 1; c_attn = [Q heads | K heads | V neurons]
    assert parts["transformer.h.0.attn.c_attn.weight"] == (1, ((4, 8), (4, 8), (32, 1)))
    assert parts["transformer.h.0.mlp.c_fc.weight"] == (1, ((128, 1),))
    assert parts["transformer.wte.weight"] == (0, ((50, 1),))  # tied with lm_head: one tensor, per token
    assert "lm_head.weight" not in parts
    opt = lmopt.create_optimizer("adam_mini", model)
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    spec = lmopt.get_spec("adam_mini")
    for name, p in model.named_parameters():
        state = opt.state[p]
        declared = {t.name: t.shape for t in spec.state_tensors(p.shape, p.dtype, blocks=block_count(parts[name]))}
        assert declared == {k: tuple(v.shape) for k, v in state.items()}, name
    assert "per head" in opt.partition_summary()


def test_adam_mini_partitions_plain_models():
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    assert find_partitions(mlp) == {
        "0.weight": (0, ((6, 1),)),
        "0.bias": (None, ()),
        "2.weight": (0, ((2, 1),)),
        "2.bias": (None, ()),
    }
    attention = nn.MultiheadAttention(16, num_heads=4)
    assert find_partitions(attention)["in_proj_weight"] == (0, ((4, 4), (4, 4), (16, 1)))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 4)

    with pytest.raises(ValueError, match="n_heads"):
        find_partitions(Attention())
    parts = find_partitions(Attention(), n_heads=4, n_kv_heads=2)
    assert parts["q_proj.weight"] == (0, ((4, 2),)) and parts["k_proj.weight"] == (0, ((2, 2),))


@pytest.mark.parametrize("implementation", ["for_loop", "fused"])
def test_adam_mini_matches_package_on_llama(implementation):
    from adam_mini import Adam_mini

    ours, theirs = _tiny_llama().double(), _tiny_llama().double()

    def groups(model):
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        rest = [p for n, p in model.named_parameters() if "norm" not in n]
        return [{"params": rest, "weight_decay": 0.1}, {"params": norms, "weight_decay": 0.0}]

    opt = lmopt.AdamMini(groups(ours), lr=1e-2, betas=(0.9, 0.95), model=ours, implementation=implementation)
    ref = Adam_mini(
        theirs.named_parameters(),
        lr=1e-2,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        dim=32,
        n_heads=4,
        n_kv_heads=2,
        verbose=False,
    )
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(30):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(ids, labels=ids).loss.backward()
            o.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-10, msg=name)


# ------------------------------------------------------------------------- a tiny LM trains with the defaults
class TinyLM(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 32, heads: int = 4, context: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        self.block = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        n = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        h = self.block(self.embed(ids) + self.position[:n], src_mask=mask, is_causal=True)
        return self.lm_head(self.norm(h))


_TEXT = (
    b"the quick brown fox jumps over the lazy dog. a memory efficient optimizer keeps less state "
    b"than adam and still trains the language model. "
) * 3


def _batches():
    data = torch.tensor([c % 40 for c in _TEXT])
    starts = torch.arange(0, len(data) - 33, 17)[:8]
    chunk = torch.stack([data[s : s + 33] for s in starts])
    return chunk[:, :-1], chunk[:, 1:]


@pytest.mark.parametrize("name", ["adafactor", "came", "adam_mini", "lion", "sophia"])
def test_trains_a_tiny_lm_with_registry_defaults(name):
    torch.manual_seed(0)
    model = TinyLM()
    x, y = _batches()  # 8 x 32 = 256 tokens
    loss_fn = nn.CrossEntropyLoss()

    def loss_of():
        return loss_fn(model(x).flatten(0, 1), y.flatten())

    opt = lmopt.create_optimizer(name, model)
    with torch.no_grad():
        initial = loss_of().item()
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        if name == "sophia" and opt.hessian_due():
            opt.update_hessian(lambda: lmopt.optim.sampled_label_loss(model(x)), batch_size=y.numel())
        opt.step()
    with torch.no_grad():
        final = loss_of().item()
    assert final < initial - 0.05, (initial, final)


def test_resume_keeps_adam_mini_partitions():
    model = _tiny_llama()
    opt = lmopt.create_optimizer("adam_mini", model)
    saved = copy.deepcopy(opt.state_dict())
    other = lmopt.create_optimizer("adam_mini", _tiny_llama())
    other.load_state_dict(saved)
    assert [g["partitions"] for g in other.param_groups] == [g["partitions"] for g in opt.param_groups]
