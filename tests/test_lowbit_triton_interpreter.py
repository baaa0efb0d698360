"""The Triton low-bit kernels under Triton's interpreter (``TRITON_INTERPRET=1``: the kernels run on CPU tensors
with numpy) against lmopt's PyTorch reference path, bit for bit (skipped when Triton does not import).

CI has no GPU: this runs the kernel code of :mod:`lmopt.kernels.lowbit_triton` (both launches: the address
table and a launch per tensor) on a couple of small tensors for a few steps. The interpreter computes in numpy
fp32 with IEEE square root and division and no fused multiply-add, as the compiled kernel does, so the
parameters, codes and scales must equal the reference's exactly (the CUDA comparison is tests/test_lowbit_cuda.py).

The kernel is called through its entry point ``lowbit_step_cuda``, with the state the reference optimizer
created on its first step, so only the public state layout (``<moment>_codes`` / ``_scales``, ``kahan_comp``)
and the kernel's entry point are relied on.

``triton.jit`` reads TRITON_INTERPRET when it decorates, also the functions of ``triton.language`` itself (such
as ``tl.max``), which are decorated when Triton is first imported: so the cases run in a subprocess started with
TRITON_INTERPRET=1 (``python tests/test_lowbit_triton_interpreter.py`` prints their differences as JSON), and
the pytest process itself never switches Triton to the interpreter.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmopt
from lmopt.kernels import lowbit_triton
from lmopt.quant.moments import MomentFormat
from lmopt.quant.rounding import stochastic_key

SHAPES = [(17, 29), (300,)]  # 8-bit: two partial blocks of 256; 4-bit: odd sizes (a half-filled last byte)
STEPS = 3
_ROUNDING = {"nearest": 0, "stochastic": 1, "kahan": 2}
# class -> (precision, algorithm, decoupled weight decay)
_KIND = {
    lmopt.AdamW8bit: ("8bit", "adam", True),
    lmopt.Adam8bit: ("8bit", "adam", False),
    lmopt.AdamW4bit: ("4bit", "adam", True),
    lmopt.Lion8bit: ("8bit", "lion", True),
}
CASES = [
    (lmopt.AdamW8bit, {"weight_decay": 0.1}, torch.float32, "nearest", "table"),
    (lmopt.Adam8bit, {"weight_decay": 0.1, "maximize": True, "block_size": 64}, torch.bfloat16, "stochastic", "direct"),
    (lmopt.AdamW4bit, {"weight_decay": 0.1, "block_size": 48}, torch.bfloat16, "kahan", "table"),
    (lmopt.Lion8bit, {"weight_decay": 0.5, "lr": 1e-4}, torch.bfloat16, "nearest", "direct"),
    (lmopt.AdamW4bit, {"weight_decay": 0.0}, torch.float32, "nearest", "direct"),
]
IDS = [f"{c.__name__}-{i}" for i, (c, *_) in enumerate(CASES)]


def round_bf16_to_nearest_in_interpreter() -> None:
    """Make the interpreter round fp32 -> bf16 casts to nearest even, as the GPU does.

    Triton 3.x's interpreter truncates ``x.to(tl.bfloat16)`` (``_convert_float`` with no rounding mode keeps
    the top 16 bits), so bf16 parameters with ``param_rounding="nearest"`` or ``"kahan"`` would differ from the
    compiled kernel and the reference by one ulp where the dropped bits are >= half an ulp. torch's conversion
    is round-to-nearest-even, like the GPU's ``cvt.rn.bf16.f32``.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def _grads(k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return [(torch.randn(s, generator=g) * 0.1 * (k + 1)).to(dtype) for s in SHAPES]


def kernel_vs_reference(cls, kw, dtype, rounding, launch, steps=STEPS) -> dict[str, int]:
    """Run the reference optimizer for one step (to create its state), copy the parameters and state, then
    ``steps`` more steps of the reference and of the kernel on the copy; the number of differing elements of
    each parameter and state entry."""
    precision, algorithm, decoupled = _KIND[cls]
    lowbit_triton._DIRECT_NUMEL = 0 if launch == "direct" else 1 << 62  # a subprocess of its own: no restore
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    opt = cls(params, implementation="for_loop", param_rounding=rounding, min_quantized_numel=0, **kw)
    for p, g in zip(params, _grads(0, dtype)):
        p.grad = g
    opt.step()
    copies = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    first = MomentFormat(precision, "first", group["block_size"], 0)
    second = MomentFormat(precision, "second", group["block_size"], 0)
    m, v = "exp_avg", "exp_avg_sq"
    adam = algorithm == "adam"
    hyper = dict(
        beta1=beta1,
        beta2=beta2,
        eps=float(group.get("eps", 0.0)),
        weight_decay=wd,
        lr=lr,
        decoupled=decoupled,
        maximize=group["maximize"],
        rounding=_ROUNDING[rounding],
    )
    for k in range(1, steps + 1):
        grads = _grads(k, dtype)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        step = 1 + k
        items = [
            lowbit_triton.CudaItem(
                p,
                g,
                s[f"{m}_codes"],
                s[f"{m}_scales"],
                s[f"{v}_codes"] if adam else None,
                s[f"{v}_scales"] if adam else None,
                s.get("kahan_comp"),
                lr / (1 - beta1**step) if adam else 0.0,
                1.0 / math.sqrt(1 - beta2**step) if adam else 1.0,
                stochastic_key(seed, step),  # a parameter's seed is its position in the optimizer
                0,
            )
            for seed, (p, g, s) in enumerate(zip(copies, grads, states))
        ]
        lowbit_triton.lowbit_step_cuda(
            items,
            m_map=first.qmap,
            v_map=second.qmap if adam else None,
            block=first.blocks,
            bits=8 if precision == "8bit" else 4,
            algorithm=algorithm,
            hyper=hyper,
        )
    diffs = {}
    for i, (ref, got, state) in enumerate(zip(params, copies, states)):
        diffs[f"param{i}"] = int((ref.detach().view(-1) != got.view(-1)).sum())
        for key, value in opt.state[ref].items():
            if key != "step":
                diffs[f"param{i}.{key}"] = int((value.reshape(-1) != state[key].reshape(-1)).sum())
    return diffs


@pytest.fixture(scope="module")
def interpreted_diffs() -> dict[str, dict[str, int]]:
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", IDS)
def test_interpreted_kernel_matches_reference_bitwise(case, interpreted_diffs):
    diffs = interpreted_diffs[case]
    lion = case.startswith("Lion")
    assert len(diffs) >= 2 * (3 if lion else 5)  # parameters, codes and scales were compared
    assert not any(diffs.values()), diffs


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set
    torch.set_num_threads(1)
    round_bf16_to_nearest_in_interpreter()
    print(json.dumps({name: kernel_vs_reference(*case) for name, case in zip(IDS, CASES)}))
