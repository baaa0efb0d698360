"""A slow, obviously-correct reference for a first moment kept at reduced precision between steps.

An optimizer that keeps its first moment ``m`` in bf16, 8 or 4 bits computes, each step, exactly what its
full-precision self computes from the *stored* ``m`` -- and then stores the new ``m`` at that precision. So the
reference is the full-precision peer (came-pytorch's CAME, transformers' Adafactor: they keep ``m`` in
``state["exp_avg"]`` and update the parameter from the new ``m``), stepped as it is, after which every stored
``m`` is replaced by the value its reduced-precision storage holds:

* ``"bf16"``: ``m`` rounded to bf16 (round to nearest even), read back;
* ``"8bit"`` / ``"4bit"``: blockwise quantization written out element by element below -- blocks of
  ``block_size`` consecutive values of the flattened tensor, each with scale ``s = max |x|``; each value becomes
  the map value nearest to ``x / s`` (ties to the lower value: the code is the number of midpoints between
  consecutive map values that lie strictly below ``x / s``), times ``s``. The arithmetic is lmopt's stated
  definition in fp32: the normalised value is ``x`` times the fp32 reciprocal of ``s``, clamped to [-1, 1]; the
  midpoints are ``(value[c] + value[c + 1]) / 2`` in fp32. Tensors with fewer than ``min_quantized_numel``
  elements are not rounded (they keep a full-precision moment).

The code maps are lmopt's signed dynamic-exponent maps (``de8s``, ``de4s``), themselves checked bit for bit
against bitsandbytes' ``create_dynamic_map`` in tests/test_lowbit_peers.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmopt.quant import code_map

_MAPS = {"8bit": "de8s", "4bit": "de4s"}
_BLOCKS = {"8bit": 256, "4bit": 128}


def fake_quantize(x: Tensor, qmap: str, block_size: int) -> Tensor:
    """The values blockwise quantization of ``x`` stores (same shape and dtype as ``x``), one block at a time."""
    values = code_map(qmap).values.float()
    midpoints = (values[:-1] + values[1:]) / 2
    flat = x.detach().reshape(-1).float()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        scale = block.abs().max()
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        normalized = (block * inverse).clamp(-1.0, 1.0)
        codes = (normalized[:, None] > midpoints[None, :]).sum(dim=1)
        out[start : start + block_size] = values[codes] * scale
    return out.view(x.shape).to(x.dtype)


def stored_value(m: Tensor, precision: str | None, block_size: int | None, min_quantized_numel: int) -> Tensor:
    """What a first moment ``m`` reads back as after being stored at ``precision``."""
    if precision in (None, "fp32"):
        return m.clone()
    if precision == "bf16":
        return m.to(torch.bfloat16).to(m.dtype)
    if m.numel() < max(1, min_quantized_numel):
        return m.clone()
    return fake_quantize(m, _MAPS[precision], block_size or _BLOCKS[precision])


class RoundedFirstMoment:
    """Steps a full-precision peer optimizer, then rounds every stored first moment (``state["exp_avg"]``) to what
    its storage at ``precision`` holds."""

    def __init__(
        self, optimizer: Any, precision: str | None, block_size: int | None = None, min_quantized_numel: int = 4096
    ) -> None:
        self.optimizer = optimizer
        self.precision, self.block_size, self.min_quantized_numel = precision, block_size, min_quantized_numel

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        for state in self.optimizer.state.values():
            m = state.get("exp_avg")
            if isinstance(m, Tensor):
                m.copy_(stored_value(m, self.precision, self.block_size, self.min_quantized_numel))
