"""Recipes: published values with sources, optimizer translations, batch scaling, building; the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmopt
from lmopt import recipes as R
from lmopt import schedules as S
from lmopt.cli import main


def test_7b_pretrain_recipe_is_llama2s_with_sources():
    r = lmopt.recipe("7B", phase="pretrain", optimizer="adamw")
    assert isinstance(r, lmopt.Recipe)
    assert (r.lr, r.betas, r.eps, r.weight_decay) == (3e-4, (0.9, 0.95), 1e-5, 0.1)
    assert (r.warmup_steps, r.min_lr_ratio, r.grad_clip, r.schedule) == (2000, 0.1, 1.0, "cosine")
    assert r.batch_tokens == 4_000_000 and r.total_steps == 500_000  # 2T tokens / 4M per step
    for name in (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "warmup_steps",
        "min_lr_ratio",
        "grad_clip",
        "schedule",
    ):
        assert r.sources[name], name
    assert "Llama 2 paper" in r.sources["lr"]
    assert r.notes == ()


@pytest.mark.parametrize(
    ("size", "lr", "warmup"),
    [
        ("125M", 6e-4, 750),
        ("350M", 3e-4, 750),
        ("1.3B", 2e-4, 375),
        ("7B", 3e-4, 2000),
        ("13B", 3e-4, 2000),
        ("30B", 1.5e-4, 2000),
        ("65B", 1.5e-4, 2000),
        ("70B", 1.5e-4, 2000),
        ("175B", 0.6e-4, 117),
    ],
)
def test_pretrain_table(size, lr, warmup):
    r = lmopt.recipe(size)
    assert r.lr == pytest.approx(lr) and r.warmup_steps == warmup
    assert (r.betas, r.weight_decay, r.min_lr_ratio, r.grad_clip) == ((0.9, 0.95), 0.1, 0.1, 1.0)


def test_gpt3_rows_convert_published_token_counts_to_steps():
    r = lmopt.recipe("125M")
    assert r.batch_tokens == 500_000 and r.total_steps == 520_000  # cosine over 260B tokens
    assert "375M tokens" in r.sources["warmup_steps"] and "Table 2.1" in r.sources["lr"]


def test_sizes_parse_and_nearest_size_is_noted():
    assert R.parse_size("1.3b") == 1.3e9 and R.parse_size("125M") == 125e6 and R.parse_size(7e9) == 7e9
    assert lmopt.recipe("6.7B").size == "7B" and lmopt.recipe("6.7B").notes == ()
    r = lmopt.recipe("40B")
    assert r.size == "30B" and "nearest published size" in r.notes[0]
    for bad in ("7Q", "", "-1B", True, 0):
        with pytest.raises(ValueError, match="size"):
            lmopt.recipe(bad)


def test_finetune_recipe():
    r = lmopt.recipe("7B", phase="finetune")
    assert (r.lr, r.betas, r.eps, r.weight_decay, r.schedule, r.min_lr_ratio) == (
        2e-5,
        (0.9, 0.999),
        1e-8,
        0.0,
        "cosine",
        0.0,
    )
    assert r.warmup_steps == 30 and r.total_steps == 1000  # 3% warmup
    assert lmopt.recipe("13B", phase="finetune").lr == 1e-5
    r5 = lmopt.recipe("7B", phase="finetune", total_steps=5000)
    assert r5.warmup_steps == 150 and r5.total_steps == 5000
    assert "Alpaca" in r.sources["lr"]
    with pytest.raises(ValueError, match="batch_tokens"):
        lmopt.recipe("7B", phase="finetune", batch_tokens=1000)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_lion_translation(phase):
    base, lion = lmopt.recipe("7B", phase=phase), lmopt.recipe("7B", phase=phase, optimizer="lion")
    assert lion.lr == pytest.approx(base.lr / 3, rel=1e-3)
    assert lion.weight_decay == pytest.approx(base.weight_decay * 3)
    assert lion.betas == (0.9, 0.99) and lion.eps is None
    assert "Lion paper" in lion.sources["lr"] and lion.optimizer_kwargs().keys() == {
        "lr",
        "weight_decay",
        "betas",
    }


def test_adafactor_translation():
    pre = lmopt.recipe("7B", optimizer="adafactor")
    assert pre.lr == 1e-2 and pre.schedule == "inverse_sqrt" and pre.weight_decay == 0.0 and pre.betas is None
    assert pre.optional["relative_step"] is False and pre.optional["scale_parameter"] is True
    f = pre.make_schedule()  # the relative step min(1e-2, 1/sqrt(t)) after the warmup
    for step in (2000, 9_999, 10_000, 50_000):
        assert pre.lr * f(step) == pytest.approx(min(1e-2, 1 / math.sqrt(max(step, 1))), rel=1e-12)
    fine = lmopt.recipe("7B", phase="finetune", optimizer="adafactor")
    assert fine.lr == 2e-5 and fine.schedule == "cosine" and fine.optional["scale_parameter"] is False


def test_other_translations():
    came = lmopt.recipe("1.3B", optimizer="came")
    assert came.betas == (0.9, 0.999, 0.9999) and came.optional == {"eps": (1e-30, 1e-16)} and came.lr == 2e-4
    muon = lmopt.recipe("1.3B", optimizer="muon")
    assert muon.lr == 2e-4 and muon.weight_decay == 0.1
    assert muon.optional == {"momentum": 0.95, "betas": (0.9, 0.95), "eps": 1e-8}
    sf = lmopt.recipe("1.3B", optimizer="schedule_free_adamw")
    assert sf.schedule == "constant" and sf.make_schedule()(10**6) == 1.0
    for name in ("adamw8bit", "adam_mini"):
        r = lmopt.recipe("1.3B", optimizer=name)
        assert (r.lr, r.betas, r.weight_decay, r.schedule) == (2e-4, (0.9, 0.95), 0.1, "cosine")
    unknown = lmopt.recipe("1.3B", optimizer="my-optimizer")
    assert unknown.optimizer == "my_optimizer" and unknown.optional == {"betas": (0.9, 0.95), "eps": 1e-8}


def test_aliases_take_their_entrys_translation():
    """came8bit is CAME with an 8-bit first moment: CAME's translation, not AdamW8bit's (which "8bit" in a name
    otherwise means); an alias's own hyperparameters win over the translation's (adafactor8bit keeps beta1)."""
    model = torch.nn.Linear(4, 4)
    for phase in ("pretrain", "finetune"):
        came = lmopt.recipe("1.3B", phase=phase, optimizer="came8bit")
        assert came.betas == (0.9, 0.999, 0.9999) and came.optional == {"eps": (1e-30, 1e-16)}
        opt = came.build_optimizer(model)
        assert isinstance(opt, lmopt.CAME) and opt.param_groups[0]["momentum_precision"] == "8bit"
        ada = lmopt.recipe("1.3B", phase=phase, optimizer="adafactor8bit")
        assert "beta1" not in ada.optional and ada.betas is None
        group = ada.build_optimizer(model).param_groups[0]
        assert (group["beta1"], group["momentum_precision"]) == (0.9, "8bit")
    assert any("keeps beta1=0.9" in n for n in lmopt.recipe("1.3B", optimizer="adafactor8bit").notes)
    assert lmopt.recipe("1.3B", optimizer="paged_lion_8bit").betas == (0.9, 0.99)  # Lion's, via its entry


def test_translation_does_not_need_the_optimizer_registered_until_build():
    r = lmopt.recipe("125M", optimizer="not_registered_yet", total_steps=3000)
    assert r.lr == 6e-4
    with pytest.raises(ValueError, match="unknown optimizer 'not_registered_yet'"):
        r.build_optimizer(torch.nn.Linear(2, 2))


def test_build_optimizer_and_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 10))
    r = lmopt.recipe("125M", total_steps=2000)
    opt, sched = r.build(model)
    assert isinstance(opt, lmopt.AdamW) and isinstance(sched, S.ScheduleLR)
    decay = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert len(decay) == 1 and decay[0]["weight_decay"] == 0.1 and decay[0]["betas"] == (0.9, 0.95)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-4 / 751)
    assert sched.schedule == r.make_schedule()
    # optional arguments are dropped for an optimizer without them (SGD has no betas/eps)
    sgd = lmopt.recipe("125M", optimizer="sgd", total_steps=2000).build_optimizer(model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == 6e-4


def test_an_optimizer_that_warms_up_itself_gets_no_second_warmup():
    r = lmopt.recipe("125M", optimizer="schedule_free_adamw", total_steps=2000)
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "warmup_steps": 750}], lr=1e-3)
    sched = r.build_scheduler(opt)
    assert sched.schedule == S.Constant(1.0) and opt.param_groups[0]["lr"] == 1e-3


def test_batch_size_scaling():
    assert R.scale_lr(3e-4, 4_000_000, 1_000_000) == pytest.approx(1.5e-4)
    assert R.scale_lr(0.1, 256, 1024, "linear") == pytest.approx(0.4)
    for kwargs, name in (({"lr": 0}, "lr"), ({"to_batch": -1}, "to_batch"), ({"rule": "cubic"}, "rule")):
        args = {"lr": 1e-3, "from_batch": 1, "to_batch": 2, **kwargs}
        with pytest.raises(ValueError, match=name):
            R.scale_lr(**args)
    r = lmopt.recipe("7B", batch_tokens=1_000_000)
    assert r.lr == pytest.approx(1.5e-4) and r.warmup_steps == 8000 and r.total_steps == 2_000_000
    assert "sqrt" in r.notes[-1] and "heuristic" in r.notes[-1]
    assert lmopt.recipe("7B", batch_tokens=1_000_000, batch_scaling="linear").lr == pytest.approx(7.5e-5)
    assert lmopt.recipe("7B", optimizer="sgd", batch_tokens=8_000_000).lr == pytest.approx(6e-4)  # auto: linear


def test_validation_and_plain_data():
    with pytest.raises(ValueError, match="phase"):
        lmopt.recipe("7B", phase="rlhf")
    with pytest.raises(ValueError, match=r"warmup_steps \(2000\) must be < total_steps \(1000\); for a run"):
        lmopt.recipe("7B", total_steps=1000)  # the published 2000-step warmup does not fit
    short = lmopt.recipe("7B", total_steps=1000, warmup_steps=30)
    assert (short.warmup_steps, short.total_steps, short.sources["warmup_steps"]) == (30, 1000, "set for this run")
    both = lmopt.recipe("7B", batch_tokens=1_000_000, total_steps=5000, warmup_steps=100)
    assert (both.lr, both.total_steps, both.warmup_steps) == (pytest.approx(1.5e-4), 5000, 100)
    assert lmopt.recipe("7B", optimizer="adamw_torch_fused").sources["lr"] == lmopt.recipe("7B").sources["lr"]
    with pytest.raises(ValueError, match="optimizer"):
        lmopt.recipe("7B", optimizer="")
    data = lmopt.recipe("7B", optimizer="came").to_dict()
    assert json.loads(json.dumps(data))["optimizer"] == "came"


def test_published_models_all_have_sources():
    assert {"GPT-3 175B", "Falcon-7B", "Falcon-40B", "Mistral 7B"} <= set(R.PUBLISHED)
    assert any(k.startswith("LLaMA") for k in R.PUBLISHED) and any(k.startswith("Llama 2") for k in R.PUBLISHED)
    for fields in R.PUBLISHED.values():
        for value in fields.values():
            assert value.source
    labels = "; ".join(v.source for f in R.PUBLISHED.values() for v in f.values())
    for label in ("GPT-3 paper", "LLaMA paper", "Llama 2 paper", "Falcon-7B card", "Mistral paper"):
        assert label in labels and label in R.REFERENCES


# -- CLI ---------------------------------------------------------------------------------------------------
def test_cli_schedule_prints_key_steps_and_plots(tmp_path, capsys):
    png = tmp_path / "s.png"
    rc = main(["schedule", "cosine", "--warmup", "2000", "--total", "100000", "--peak", "3e-4", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("last warmup step", "99,999", "3e-05", "0.0003", "beyond the end"):
        assert text in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize(
    "argv",
    [
        ["wsd", "--warmup", "10", "--total", "100", "--shape", "cosine"],
        ["sgdr", "--t0", "50", "--t-mult", "2"],
        ["inverse-sqrt", "--warmup", "100"],
        ["linear", "--total", "50"],
        ["constant", "--warmup", "5"],
    ],
)
def test_cli_schedule_kinds(argv, capsys):
    assert main(["schedule", *argv]) == 0
    assert "multiplier" in capsys.readouterr().out


def test_cli_schedule_errors(capsys):
    assert main(["schedule", "cosine", "--warmup", "100", "--total", "100"]) == 2
    assert "warmup_steps (100) must be < total_steps (100)" in capsys.readouterr().err
    assert main(["schedule", "cosine", "--warmup", "10"]) == 2
    assert "--total is required" in capsys.readouterr().err


def test_cli_recipe(capsys):
    assert main(["recipe", "7B", "--phase", "finetune", "--optimizer", "lion"]) == 0
    out = capsys.readouterr().out
    assert "6.67e-06" in out and "(0.9, 0.99)" in out and "Lion paper" in out and "references:" in out
    assert main(["recipe", "7B", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lr"] == 3e-4
    assert main(["recipe", "--table", "--published"]) == 0
    out = capsys.readouterr().out
    assert "GPT-3" in out and "Small" in out and "Falcon-40B" in out
    assert main(["recipe", "7X"]) == 2
    assert "size" in capsys.readouterr().err
