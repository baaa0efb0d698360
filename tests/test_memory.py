"""The memory planner and recommender: published figures, shapes, options, errors (no training here).

Measured-versus-planned checks live in test_memory_measured.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import lmopt
from lmopt.memory import (
    estimate_activations,
    format_bytes,
    model_shape,
    named_shapes,
    parse_bytes,
    plan,
    recommend,
)
from lmopt.memory.shapes import Architecture
from lmopt.registry import list_optimizers

GB = 1e9
REGISTERED = {s.name for s in list_optimizers()}


def needs(name: str):
    return pytest.mark.skipif(
        name not in REGISTERED,
        reason=f"optimizer {name!r} is not registered on this branch "
        f"(its registry entry lands with another issue); this test runs once it is",
    )


# ---------------------------------------------------------------------------------- published figures
def test_7b_mixed_precision_adam_is_112_gb():
    """2 + 4 + 2 + (4 + 4) bytes per parameter: 14 + 28 + 14 + 56 = 112 GB (ZeRO, Rajbhandari et al. 2020)."""
    p = plan("7B", "adamw", precision="mixed")
    assert p.num_parameters == pytest.approx(7e9, rel=1e-6)
    assert round(p.parameters / GB, 2) == 14.0
    assert round(p.master_weights / GB, 2) == 28.0
    assert round(p.gradients / GB, 2) == 14.0
    assert round(p.optimizer_state / GB, 2) == 56.0  # exp_avg + exp_avg_sq (+ one 4-byte step per tensor)
    assert round(p.static / GB, 1) == 112.0
    assert p.state_by_name["exp_avg"] == p.state_by_name["exp_avg_sq"] == 4 * p.num_parameters


def test_70b_mixed_precision_adam_is_1120_gb():
    p = plan("70B", "adamw", precision="mixed")
    assert round(p.static / GB) == 1120
    assert round(p.optimizer_state / GB) == 560


def test_7b_fp32_adam_is_112_gb():
    p = plan("7B", "adamw", precision="fp32")
    assert (round(p.parameters / GB, 2), p.master_weights, round(p.gradients / GB, 2)) == (28.0, 0, 28.0)
    assert round(p.optimizer_state / GB, 2) == 56.0
    assert round(p.static / GB, 1) == 112.0


def test_16_bytes_per_parameter_on_a_real_shape():
    p = plan("llama-2-7b", "adamw", precision="mixed")
    tensors = len(model_shape("llama-2-7b").params)
    assert p.num_parameters == 6_738_415_616
    assert p.static == 16 * p.num_parameters + 4 * tensors  # + the fp32 step scalar of each tensor


@needs("adamw8bit")
def test_8bit_adam_state_7b_is_about_14_gb():
    p = plan("7B", "adamw8bit", precision="mixed")
    # two 1-byte moments per parameter (14 GB) plus one fp32 scale per block and full state for small tensors
    assert 14.0 * GB <= p.optimizer_state <= 14.6 * GB, format_bytes(p.optimizer_state)


@needs("adafactor")
def test_adafactor_state_is_rows_plus_cols():
    shape = model_shape("7B")
    p = plan(shape, "adafactor", precision="mixed", optimizer_kwargs={"beta1": None})
    expected = sum(4 * (s.shape[-2] + s.shape[-1]) if len(s.shape) >= 2 else 4 * s.numel for s in shape.params)
    # factored second moment only; scalars (step, RMS) may add a few bytes per tensor
    assert expected <= p.optimizer_state <= expected + 64 * len(shape.params)
    assert p.optimizer_state < 0.001 * plan(shape, "adamw", precision="mixed").optimizer_state


def test_state_comes_from_the_registry_rule_for_every_optimizer():
    """No table: every registered optimizer's planned state is its rule summed over the model's tensors."""
    from lmopt.memory.planner import PER_TENSOR_STATE_KEYS

    shape = model_shape("gpt2-small")
    for spec in list_optimizers():
        p = plan(shape, spec.name, precision="fp32")
        keys = PER_TENSOR_STATE_KEYS.get(spec.name, lambda t, arch: {})
        expected = sum(spec.state_bytes(t.shape, torch.float32, **keys(t, shape.architecture)) for t in shape.params)
        assert p.optimizer_state == expected, spec.name


def test_state_options_change_the_plan():
    base = plan("gpt2-small", "adamw", precision="fp32")
    assert plan("gpt2-small", "adamw", precision="fp32", optimizer_kwargs={"amsgrad": True}).optimizer_state == (
        base.optimizer_state + 4 * base.num_parameters
    )
    assert plan("gpt2-small", "adamw_bf16", precision="fp32").state_by_name["exp_avg"] == 2 * base.num_parameters
    assert plan("gpt2-small", "sgd", precision="fp32").optimizer_state == 0


# --------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("gpt2-small", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("llama-7b", 6_738_415_616),
        ("llama-2-13b", 13_015_864_320),
        ("llama-2-70b", 68_976_648_192),
        ("llama-3-8b", 8_030_261_248),
        ("llama-3-70b", 70_553_706_496),
        ("mistral-7b", 7_241_732_096),
        ("t5-3b", 2_851_598_336),
        ("t5-11b", 11_307_321_344),
    ],
)
def test_named_shapes_have_the_published_parameter_counts(name, count):
    assert model_shape(name).num_parameters == count


def _meta_from_config(config):
    import transformers

    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def _transformers_configs(layers: int) -> dict:
    transformers = pytest.importorskip("transformers")
    return {
        "llama-2-70b": transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=layers,
            num_attention_heads=64,
            num_key_value_heads=8,
        ),
        "mistral-7b": transformers.MistralConfig(num_hidden_layers=layers),
        "gpt2-xl": transformers.GPT2Config(n_embd=1600, n_layer=layers, n_head=25),
        "t5-3b": transformers.T5Config(d_model=1024, d_ff=16384, d_kv=128, num_heads=32, num_layers=layers),
    }


def _with_layers(name: str, layers: int):
    from lmopt.memory import shapes

    full = model_shape(name)
    arch = full.architecture
    if arch.family == "gpt2":
        return shapes._gpt2(name, layers=layers, hidden=arch.hidden_size, heads=arch.num_heads)
    if arch.family == "t5":
        return shapes._t5(
            name,
            layers=layers,
            d_model=arch.hidden_size,
            d_ff=arch.intermediate_size,
            d_kv=arch.head_dim,
            heads=arch.num_heads,
        )
    return shapes._llama(
        name,
        layers=layers,
        hidden=arch.hidden_size,
        heads=arch.num_heads,
        kv_heads=arch.num_kv_heads,
        ffn=arch.intermediate_size,
        vocab=arch.vocab_size,
        context=arch.max_seq_len,
    )


def test_named_shapes_match_transformers_models_tensor_by_tensor():
    """Names, shapes and roles equal those of transformers' models (built on the meta device, 2 blocks)."""
    for name, config in _transformers_configs(2).items():
        ours = [(p.name, p.shape, p.role) for p in _with_layers(name, 2).params]
        theirs = [(p.name, p.shape, p.role) for p in model_shape(config).params]
        assert ours == theirs, name


@pytest.mark.slow
def test_named_shapes_match_transformers_models_full_size():
    layers = {"llama-2-70b": 80, "mistral-7b": 32, "gpt2-xl": 48, "t5-3b": 24}
    for name, config in _transformers_configs(0).items():
        config = type(config)(**{**config.to_dict(), **_layer_kwargs(config, layers[name])})
        assert model_shape(config).num_parameters == model_shape(name).num_parameters, name


def _layer_kwargs(config, layers: int) -> dict:
    if config.model_type == "t5":
        return {"num_layers": layers, "num_decoder_layers": layers}
    return {{"gpt2": "n_layer"}.get(config.model_type, "num_hidden_layers"): layers}


def test_names_are_forgiving_and_unknown_names_list_the_known():
    assert model_shape("Llama2-7B").name == "llama-2-7b"
    assert model_shape("meta-llama/Llama-2-70b-hf").name == "llama-2-70b"
    assert model_shape("gpt2").name == "gpt2-small"
    assert model_shape("1.5B").num_parameters == pytest.approx(1.5e9, rel=1e-5)
    assert set(named_shapes()) >= {"gpt2-xl", "llama-3-70b", "t5-11b"}
    with pytest.raises(ValueError, match="known: .*llama-2-7b"):
        model_shape("llama-9000")


def test_module_input_uses_its_tensors_and_dtypes():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 32), torch.nn.LayerNorm(32))
    model[1].weight.requires_grad_(False)
    p = plan(model, "adamw")
    assert p.precision == "fp32"
    assert p.parameters == 4 * sum(t.numel() for t in model.parameters())
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p.gradients == 4 * trainable and p.trainable_parameters == trainable
    assert p.activations == 0 and any("activations not planned" in n for n in p.notes)
    assert plan(model.to(torch.bfloat16), "adamw").precision == "bf16"


# -------------------------------------------------------------------------------------------- options
def test_lora_trains_only_the_adapters():
    shape = model_shape("llama-2-7b")
    p = plan(shape, "adamw", precision="mixed", trainable="lora", lora_rank=8, lora_modules=("q_proj", "v_proj"))
    expected = 32 * 2 * 8 * (4096 + 4096)
    assert p.trainable_parameters == expected
    assert p.gradients == 2 * expected and p.master_weights == 4 * expected
    assert p.parameters == 2 * (shape.num_parameters + expected)
    assert plan(shape, "adamw", trainable="lora").trainable_parameters > expected  # default: all hidden matrices
    with pytest.raises(ValueError, match="lora_modules"):
        plan(shape, "adamw", trainable="lora", lora_modules=("c_attn",))


@pytest.mark.parametrize("sharding", ["zero1", "zero2", "zero3"])
def test_zero_stages_shard_what_they_should(sharding):
    one = plan("llama-2-13b", "adamw", precision="mixed")
    sharded = plan("llama-2-13b", "adamw", precision="mixed", devices=8, sharding=sharding)
    stage = int(sharding[-1])
    assert sharded.optimizer_state == pytest.approx(one.optimizer_state / 8, rel=1e-3)
    assert sharded.master_weights == pytest.approx(one.master_weights / 8, rel=1e-3)
    assert sharded.gradients == pytest.approx(one.gradients / (8 if stage >= 2 else 1), rel=1e-3)
    assert sharded.parameters == pytest.approx(one.parameters / (8 if stage == 3 else 1), rel=1e-3)
    assert sharded.peak < one.peak


def test_offload_moves_state_to_the_host():
    on = plan("llama-2-7b", "adamw", precision="mixed")
    off = plan("llama-2-7b", "adamw", precision="mixed", offload="optimizer")
    assert off.host_memory >= on.optimizer_state + on.master_weights
    assert off.peak < on.peak - on.optimizer_state
    with pytest.raises(ValueError, match="zero3"):
        plan("llama-2-7b", "adamw", offload="optimizer+params")


def test_precision_modes():
    n = model_shape("gpt2-small").num_parameters
    b = {
        m: plan("gpt2-small", "adamw", precision=m)
        for m in ("fp32", "amp", "mixed-fp16", "mixed-bf16", "bf16", "bf16-sr", "bf16-master")
    }
    assert b["bf16"].parameters == b["bf16"].gradients == 2 * n and b["bf16"].master_weights == 0
    assert b["bf16"].state_by_name["exp_avg"] == 2 * n  # state follows the bf16 parameters
    assert b["bf16-sr"].static == b["bf16"].static
    assert b["bf16-master"].static == b["mixed-bf16"].static == b["mixed-fp16"].static
    assert b["amp"].precision == "amp-bf16" and b["amp"].static == b["fp32"].static
    assert b["amp"].activations < b["fp32"].activations  # 16-bit activations
    with pytest.raises(ValueError, match="precision"):
        plan("gpt2-small", "adamw", precision="fp8")


def test_accumulation_keeps_gradients_through_the_forward():
    one = plan("llama-2-7b", "adamw", precision="mixed", micro_batch=4)
    acc = plan("llama-2-7b", "adamw", precision="mixed", micro_batch=4, grad_accumulation=8)
    assert acc.phases["loss backward"] == one.phases["loss backward"] + one.gradients
    assert acc.peak >= one.peak


def test_device_memory_and_fits():
    p = plan("7B", "adamw", precision="mixed", device_memory="80GB")
    assert p.device_memory == 80 * 10**9 and p.fits is False
    assert plan("gpt2-small", "adamw", device_memory="80GB").fits is True
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="device_memory"):
        parse_bytes("lots")


def test_invalid_arguments_name_themselves():
    for kwargs, arg in [
        ({"micro_batch": 0}, "micro_batch"),
        ({"devices": 0}, "devices"),
        ({"sharding": "zero4"}, "sharding"),
        ({"offload": "disk"}, "offload"),
        ({"activation_checkpointing": "some"}, "activation_checkpointing"),
        ({"trainable": "half"}, "trainable"),
        ({"seq_len": -1}, "seq_len"),
        ({"activation_model": "guess"}, "activation_model"),
    ]:
        with pytest.raises(ValueError, match=arg):
            plan("gpt2-small", "adamw", **kwargs)


def test_unknown_optimizer_lists_the_registered_ones():
    with pytest.raises(ValueError, match="Registered optimizers: .*adamw") as err:
        plan("7B", "definitely_not_an_optimizer")
    for spec in list_optimizers():
        assert spec.name in str(err.value)


# ---------------------------------------------------------------------------------------- activations
def _gpt_arch(h=1024, a=16, layers=24, V=50257):
    return Architecture("gpt2", layers, h, a, a, h // a, 4 * h, V, gated_mlp=False, dropout=True)


@pytest.mark.parametrize(("s", "b"), [(2048, 1), (1024, 8)])
def test_korthikanti_formula_per_layer(s, b):
    """Korthikanti et al. 2022, eq. (1): s b h (34 + 5 a s / h) bytes per layer in 16-bit with dropout."""
    arch = _gpt_arch()
    est = estimate_activations(arch, micro_batch=b, seq_len=s, element_size=2, flash_attention=False)
    h, a = arch.hidden_size, arch.num_heads
    assert est.per_layer == s * b * h * (34 + 5 * a * s / h)
    flash = estimate_activations(arch, micro_batch=b, seq_len=s, element_size=2, flash_attention=True)
    assert flash.per_layer == s * b * h * 34 + 4 * a * s * b  # no s^2 term; log-sum-exp instead
    selective = estimate_activations(
        arch, micro_batch=b, seq_len=s, element_size=2, flash_attention=False, checkpointing="selective"
    )
    assert selective.per_layer == flash.per_layer
    full = estimate_activations(
        arch, micro_batch=b, seq_len=s, element_size=2, flash_attention=False, checkpointing="full"
    )
    assert full.per_layer == 2 * s * b * h  # the paper's 2sbh per layer
    assert full.stored < selective.stored < est.stored


def test_activations_scale_with_tokens_and_checkpointing_lowers_the_peak():
    a = plan("llama-2-7b", "adamw", precision="mixed", micro_batch=1, seq_len=2048)
    b = plan("llama-2-7b", "adamw", precision="mixed", micro_batch=2, seq_len=2048)
    assert b.activations == pytest.approx(2 * a.activations, rel=1e-6)
    c = plan("llama-2-7b", "adamw", precision="mixed", micro_batch=8, seq_len=4096, activation_checkpointing="full")
    d = plan("llama-2-7b", "adamw", precision="mixed", micro_batch=8, seq_len=4096)
    assert c.activations < d.activations / 10 and c.peak < d.peak


# ------------------------------------------------------------------------------------------ recommend
def test_recommend_prefers_full_adamw_when_it_fits():
    report = recommend("gpt2-small", devices=1, device_memory="80GB", task="pretrain")
    assert report.fits and report[0].optimizer == "adamw" and report[0].sharding == "none"
    assert report[0].offload == "none" and report[0].checkpointing == "none"
    assert all(r.peak <= 0.95 * 80e9 for r in report)
    assert [r.rank for r in report] == list(range(1, len(report) + 1))
    assert "reference" in report[0].reason


def test_recommend_says_plainly_when_nothing_fits():
    report = recommend(
        "llama-2-70b", devices=1, device_memory="16GB", task="pretrain", host_memory="64GB", micro_batch=1
    )
    assert not report.fits and len(report) == 0
    assert report.message.startswith("Nothing fits") and report.closest is not None
    assert report.closest.peak > 16e9 or report.closest.host_memory > 64e9
    offloaded = recommend("llama-2-70b", devices=1, device_memory="24GB", micro_batch=1)
    assert offloaded.fits and all(r.offload == "optimizer+params" for r in offloaded)
    assert "host needs" in offloaded[0].reason


def test_recommend_uses_sharding_or_lora_to_fit():
    report = recommend("13B", devices=2, device_memory="24GB", task="finetune", micro_batch=2)
    assert report.fits and all(r.sharding == "zero3" or r.offload != "none" for r in report)
    lora = recommend("13B", devices=2, device_memory="24GB", task="lora", micro_batch=2)
    assert lora.fits and lora[0].plan.trainable.startswith("lora")


def test_recommend_takes_full_adamw_then_pure_bf16():
    # llama-2-7b on one 80 GB device: mixed-precision AdamW (16 B/param) needs offload, pure bf16 AdamW fits
    report = recommend("llama-2-7b", devices=1, device_memory="80GB", task="pretrain", micro_batch=1)
    assert (report[0].optimizer, report[0].precision, report[0].offload) == ("adamw", "bf16-sr", "none")


@needs("adamw8bit")
def test_recommend_takes_8bit_adamw_when_adamw_does_not_fit():
    # 48 GB: AdamW needs >= 54 GB even in pure bf16; 8-bit AdamW (~2 B/param of state) fits without offload
    report = recommend("llama-2-7b", devices=1, device_memory="48GB", task="pretrain", micro_batch=1)
    assert report.fits
    assert (report[0].optimizer, report[0].sharding, report[0].offload) == ("adamw8bit", "none", "none")


def test_recommend_validates():
    with pytest.raises(ValueError, match="task"):
        recommend("7B", task="train")
    with pytest.raises(ValueError, match="devices"):
        recommend("7B", devices=0)


def test_public_api():
    import lmopt.memory as memory

    for name in memory.__all__:
        assert hasattr(memory, name), name
    assert math.isclose(plan("7B").static, lmopt.memory.plan("7B", "adamw", precision="mixed").static)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_plan_compare_plot_and_unknown_names(tmp_path, capsys, monkeypatch):
    from lmopt.cli import main

    monkeypatch.setenv("COLUMNS", "160")
    png = tmp_path / "plans.png"
    assert (
        main(
            [
                "plan",
                "7B",
                "--compare",
                "adamw,amsgrad,sgd",
                "--precision",
                "mixed",
                "--device-memory",
                "80GB",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "112.00 GB" in out and "16.00 B/p" in out and "amsgrad" in out
    assert png.exists() and png.stat().st_size > 10_000
    assert main(["plan", "7B", "--optimizer", "no_such_optimizer"]) == 2
    err = capsys.readouterr().err
    assert "Registered optimizers:" in err and "adamw" in err


def test_cli_recommend(capsys, monkeypatch):
    from lmopt.cli import main

    monkeypatch.setenv("COLUMNS", "160")
    assert main(["recommend", "gpt2-small", "--devices", "1", "--device-memory", "24GB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out and "configuration(s) fit" in out
    assert (
        main(
            [
                "recommend",
                "llama-2-70b",
                "--device-memory",
                "8GB",
                "--host-memory",
                "64GB",
                "--micro-batch",
                "1",
            ]
        )
        == 0
    )
    assert "Nothing fits" in capsys.readouterr().out
