"""The planner's ``offload="lmopt"`` and ``mapped_state`` figures against the real :func:`lmopt.offload` and
:func:`lmopt.map_state` on CPU, byte for byte (issue #16 item 4; docs/offload.md "Planning an offloaded run").

The host side is counted from the live tensors after a step: the host parameter copies, the host gradient buffers and
the inner optimizer's state (:func:`lmopt.memory.optimizer_state_bytes`); the file-backed bytes are
:func:`lmopt.optim.mapped.mapped_bytes`; the PCIe bytes are the bytes written into the host gradient buffers during
backward and into the device parameters during the step, seen by a dispatch mode (every ``copy_`` / ``add_``).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lmopt
from lmopt.memory import optimizer_state_bytes, plan, recommend, tensor_bytes
from lmopt.optim.mapped import mapped_bytes


def _model(dtype: torch.dtype) -> nn.Module:
    """Tensors above and below map_state's / the quantizer's 4096 elements, and a frozen one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8))
    model[0].bias.requires_grad_(False)
    return model.to(dtype)


class _Writes(TorchDispatchMode):
    """(destination storage address, bytes written) of every in-place copy / add."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.copy_.default, torch.ops.aten.add_.Tensor):
            dst, src = args[0], args[1]
            if isinstance(src, torch.Tensor):
                self.writes.append((dst.untyped_storage().data_ptr(), src.numel() * src.element_size()))
        return func(*args, **(kwargs or {}))


def _written(writes: list[tuple[int, int]], tensors: list[torch.Tensor]) -> int:
    targets = {t.untyped_storage().data_ptr() for t in tensors}
    return sum(n for ptr, n in writes if ptr in targets)


CASES = [
    # (optimizer, dtype, precision, overlap, micro-batches, mapped state)
    ("adamw", torch.float32, "fp32", True, 1, False),
    ("adamw8bit", torch.float32, "fp32", True, 1, False),
    ("adamw", torch.bfloat16, "bf16", True, 1, False),
    ("came", torch.float32, "fp32", True, 1, False),
    ("adamw", torch.float32, "fp32", True, 3, False),
    ("adamw", torch.float32, "fp32", False, 3, False),
    ("adamw", torch.float32, "fp32", True, 1, True),
    ("adamw8bit", torch.float32, "fp32", True, 2, True),
]


@pytest.mark.parametrize(
    ("name", "dtype", "precision", "overlap", "micro", "mapped"),
    CASES,
    ids=[f"{n}-{p}-overlap{o}-x{m}{'-mapped' if mm else ''}" for n, _, p, o, m, mm in CASES],
)
def test_planned_host_file_and_pcie_bytes_equal_the_real_offload(
    tmp_path, name, dtype, precision, overlap, micro, mapped
):
    if mapped and not sys.platform.startswith("linux"):
        pytest.skip("map_state: Linux")
    model = _model(dtype)
    opt = lmopt.offload(name, model, lr=1e-3, overlap=overlap)
    if mapped:
        lmopt.map_state(opt.optimizer, tmp_path / "state")  # the inner optimizer: its step and load hooks
    x = torch.randn(micro, 4, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    for _ in range(2):  # the second step is measured: the state exists
        opt.zero_grad(set_to_none=True)
        mode = _Writes()
        with mode:
            for m in range(micro):
                model(x[m]).float().pow(2).mean().backward()
            grads_written = len(mode.writes)
            opt.step()
    host_grads = [h.grad for h in opt.host_params if h.grad is not None]
    pcie_grads = _written(mode.writes[:grads_written], host_grads)
    if not overlap:  # moved by step()'s synchronize
        pcie_grads = _written(mode.writes, host_grads)
    pcie_params = _written(mode.writes[grads_written:], list(model.parameters()))

    planned = plan(
        model,
        name,
        precision=precision,
        device="cpu",
        grad_accumulation=micro,
        offload="lmopt",
        offload_overlap=overlap,
        mapped_state=mapped,
    )
    state = optimizer_state_bytes(opt)
    files = mapped_bytes(opt.optimizer) if mapped else 0
    assert planned.host["parameter copies"] == tensor_bytes(opt.host_params)
    assert planned.host["gradient buffers"] == tensor_bytes(host_grads)
    assert planned.host["accumulation staging"] == 0  # CUDA only
    assert planned.host["optimizer state"] == state - files
    assert planned.file_backed == files
    assert planned.host_memory == sum(planned.host.values())
    assert planned.host_pinned == 0  # nothing is pinned without CUDA
    assert planned.pcie_gradient_bytes_per_step == pcie_grads
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) < len(list(model.parameters()))  # the frozen bias is neither copied nor written back
    assert planned.pcie_parameter_bytes_per_step == pcie_params == tensor_bytes(trainable)
    assert planned.pcie_bytes_per_step == pcie_grads + pcie_params
    if overlap:  # every micro-batch's gradients cross once
        assert pcie_grads == micro * tensor_bytes(host_grads)
    if mapped:
        assert files > 0 and planned.host["optimizer state"] < 0.2 * state


def test_mapped_state_on_cpu_without_offload_equals_map_state(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("map_state: Linux")
    model = _model(torch.float32)
    opt = lmopt.map_state(lmopt.create_optimizer("adamw8bit", model, lr=1e-3), tmp_path / "state")
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    planned = plan(model, "adamw8bit", device="cpu", mapped_state=True)
    unmapped = plan(model, "adamw8bit", device="cpu")
    assert planned.file_backed == mapped_bytes(opt)
    assert planned.optimizer_state == optimizer_state_bytes(opt)  # the component at its full size
    assert planned.at_peak["optimizer_state"] == optimizer_state_bytes(opt) - mapped_bytes(opt)
    assert planned.peak == unmapped.peak - mapped_bytes(opt)


def test_lmopt_offload_device_side():
    on = plan("llama-2-7b", "adamw", precision="bf16")
    off = plan("llama-2-7b", "adamw", precision="bf16", offload="lmopt")
    assert off.at_peak["optimizer_state"] == 0 and off.at_peak["parameters"] == on.parameters
    # with overlap the device never holds every gradient; with accumulation it keeps none through the forward
    assert max(off.phases.values()) == off.peak <= on.peak - on.optimizer_state
    assert off.phases["backward end"] - off.parameters < on.gradients / 20
    assert off.phases["optimizer step"] == off.parameters  # no gradients, no state, no step buffers on the device
    acc = plan("llama-2-7b", "adamw", precision="bf16", offload="lmopt", grad_accumulation=4)
    assert acc.peak == off.peak and acc.pcie_gradient_bytes_per_step == 4 * off.gradients
    assert acc.host["accumulation staging"] == off.gradients  # CUDA: one staging buffer per gradient
    assert acc.host_pinned == 2 * off.gradients + off.parameters
    kept = plan("llama-2-7b", "adamw", precision="bf16", offload="lmopt", offload_overlap=False, grad_accumulation=4)
    assert kept.phases["forward end"] >= off.phases["forward end"] + off.gradients  # all gradients kept
    assert kept.pcie_gradient_bytes_per_step == off.gradients  # moved once, at the step
    lora = plan("llama-2-7b", "adamw", precision="bf16", offload="lmopt", trainable="lora")
    # lmopt.offload copies only the trainable parameters (the adapters) to the host and back each step
    assert lora.host["parameter copies"] == lora.gradients == lora.pcie_parameter_bytes_per_step
    assert lora.host["gradient buffers"] == lora.gradients < lora.parameters / 50


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"offload": "lmopt", "precision": "mixed"}, "precision='mixed-bf16' does not apply"),
        ({"offload": "lmopt", "precision": "bf16", "devices": 4, "sharding": "zero2"}, "sharding='none'"),
        ({"offload": "optimizer", "offload_overlap": False}, "offload_overlap applies to offload='lmopt'"),
        ({"offload": "lmopt", "precision": "bf16", "offload_overlap": "yes"}, "offload_overlap must be True or"),
        ({"mapped_state": True}, "mapped_state=True needs the optimizer state on the host"),
        ({"mapped_state": 1, "device": "cpu"}, "mapped_state must be True or False"),
    ],
)
def test_bad_offload_arguments_name_the_argument_and_the_fix(kwargs, needle):
    with pytest.raises(ValueError) as error:
        plan("gpt2-small", "adamw", **kwargs)
    assert needle in str(error.value)


# ------------------------------------------------------------------------------------------ recommend
def test_recommend_uses_lmopt_offload_when_only_it_fits():
    # llama-2-7b pure bf16 AdamW needs ~62 GB on the device, 8-bit AdamW ~35 GB: neither fits 24 GB without
    # offload on one device; lmopt.offload keeps 13.5 GB of parameters and a block's gradients there
    report = recommend("llama-2-7b", devices=1, device_memory="24GB", micro_batch=1, seq_len=2048, optimizers=["adamw"])
    assert report.fits
    best = report[0]
    assert (best.offload, best.precision) == ("lmopt", "bf16-sr"), [(r.offload, r.precision) for r in report]
    assert "lmopt.offload" in best.reason and "host needs" in best.reason and "PCIe" in best.reason
    assert best.plan.pcie_bytes_per_step == best.plan.gradients + best.plan.parameters
    assert "offload lmopt" in report.message
    assert all(
        r.offload != "none" or r.sharding != "none" for r in report
    )  # nothing fits without offload on one device


def test_recommend_does_not_offload_beyond_the_host_memory():
    need = plan("llama-2-7b", "adamw", precision="bf16-sr", offload="lmopt", seq_len=2048).host_memory
    report = recommend(
        "llama-2-7b",
        devices=1,
        device_memory="24GB",
        micro_batch=1,
        seq_len=2048,
        optimizers=["adamw"],
        host_memory=int(need * 0.9),
    )
    assert all(r.offload != "lmopt" for r in report)
    if not report.fits:  # the plain statement names the host memory that was short
        assert "of host memory" in report.message and "offload lmopt" in report.message
    assert all(r.plan.host_memory <= need * 0.9 for r in report)


def test_cli_plan_with_lmopt_offload(capsys, monkeypatch):
    from lmopt.cli import main

    monkeypatch.setenv("COLUMNS", "160")
    argv = ["plan", "llama-2-7b", "--optimizer", "adamw8bit", "--precision", "bf16", "--offload", "lmopt"]
    assert main([*argv, "--device-memory", "24GB", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    for row in ("parameter copies", "gradient buffers", "of it pinned", "PCIe per step", "parameters to device"):
        assert row in out
    assert main([*argv, "--json"]) == 0
    import json

    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["pcie_bytes_per_step"] == entry["gradients"] + entry["parameters"]
    assert entry["host_memory"] == sum(entry["host"].values()) and entry["host_pinned"] > 0
    assert main(["plan", "7B", "--offload", "lmopt", "--precision", "mixed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no fp32 master copy" in err[0] and "precision='bf16'" in err[0]
