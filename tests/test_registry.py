"""The registry: names, aliases, errors, exact state declarations, and the `lmopt list` command."""

from __future__ import annotations

import pytest
import torch

import lmopt
from lmopt.cli import main
from lmopt.registry import create_optimizer, get_spec, list_optimizers, resolve_name


def test_hugging_face_and_lmopt_aliases():
    assert get_spec("adamw_torch").name == "adamw"
    spec, implied = resolve_name("adamw_torch_fused")
    assert spec.name == "adamw" and implied == {"implementation": "fused"}
    assert get_spec("AdamW").name == "adamw"  # case-insensitive
    opt = create_optimizer("adamw_torch_fused", [torch.nn.Parameter(torch.zeros(3))])
    assert opt.param_groups[0]["implementation"] == "fused"


def test_torch_optim_entries_are_torch_classes_with_lmopt_checks():
    for name, cls in [
        ("sgd", torch.optim.SGD),
        ("adagrad", torch.optim.Adagrad),
        ("rmsprop", torch.optim.RMSprop),
        ("radam", torch.optim.RAdam),
        ("nadam", torch.optim.NAdam),
    ]:
        built = get_spec(name).cls
        assert issubclass(built, cls) and built.__name__ == cls.__name__
        ours, theirs = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
        a, b = built([ours], lr=0.1), cls([theirs], lr=0.1)
        for k in range(3):  # torch's update, unchanged (bit for bit)
            ours.grad = theirs.grad = torch.arange(4.0) - k
            a.step()
            b.step()
        assert torch.equal(ours, theirs)
    opt = create_optimizer("sgd_nesterov", [torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'.*'adamw'"):
        get_spec("adamww")
    with pytest.raises(ValueError, match="lmopt list"):
        get_spec("definitely-not-an-optimizer")


def test_unknown_hyperparameter_names_what_is_accepted():
    with pytest.raises(ValueError, match=r"does not take 'beta1'.*betas"):
        create_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], beta1=0.9)


def test_every_entry_is_complete():
    names = set()
    for spec in list_optimizers():
        assert spec.name == spec.name.lower() and spec.paper and spec.summary
        assert issubclass(spec.cls, torch.optim.Optimizer)
        for alias in spec.aliases:
            assert alias not in names
            names.add(alias)
        names.add(spec.name)
        assert spec.bytes_per_parameter() >= 0


def test_state_bytes_rule():
    adamw = get_spec("adamw")
    assert adamw.state_bytes((10, 10)) == 4 + 2 * 100 * 4
    assert adamw.state_bytes((10, 10), state_dtype="bf16") == 4 + 2 * 100 * 2
    assert adamw.state_bytes((10, 10), torch.bfloat16) == 4 + 2 * 100 * 2
    assert get_spec("amsgrad").bytes_per_parameter() == pytest.approx(12.0, rel=1e-6)
    assert get_spec("sgd").state_bytes((5,)) == 0
    assert get_spec("sgd").state_bytes((5,), momentum=0.9) == 20


def test_public_api_is_explicit():
    for name in lmopt.__all__:
        assert hasattr(lmopt, name), name


def test_cli_list(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in list_optimizers():
        assert spec.name in out
    assert "adamw_torch_fused" in out and "8.000" in out


def test_lookahead_option_wraps_any_registry_optimizer():
    from lmopt.optim.lookahead import Lookahead

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = create_optimizer("lion", params, lr=1e-4, lookahead={"k": 3, "alpha": 0.5})
    assert isinstance(opt, Lookahead) and opt.param_groups[0]["lookahead_k"] == 3
    assert isinstance(create_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], lookahead=True), Lookahead)
    with pytest.raises(ValueError, match="lookahead"):
        create_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], lookahead={"steps": 3})
