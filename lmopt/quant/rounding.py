"""Writing an fp32 update into low-precision (bf16) parameters without an fp32 master copy.

An update ``delta`` much smaller than half a bf16 ulp of the parameter is lost entirely by round-to-nearest:
a bf16 model trained without a master copy stops moving once ``lr * update`` falls under ``|p| * 2**-9``.
Two remedies (Zamirai et al. 2020, "Revisiting BFloat16 Training"; optimi; torchao ``bf16_stochastic_round``):

* ``"stochastic"``: round ``p + delta`` up or down at random with probabilities given by the distance to each
  neighbour, so the expected parameter equals the fp32 one. Implemented by adding 16 uniformly random bits to
  the fp32 bit pattern and truncating to bf16. The random bits are a counter-based hash of
  ``(parameter seed, step, element index)``: no generator state to checkpoint, so a resumed run reproduces the
  same bits, and the kernel and the PyTorch path draw the same numbers. (Under FSDP2 each shard must hash its
  *global* element index, i.e. add its shard offset, or all shards would draw the same pattern: torch's
  ``randn_like`` on a CPU DTensor has the same flaw, which is why lmopt does not use it here.)
* ``"kahan"``: keep the rounding error in a compensation buffer of the parameter's dtype (state entry
  ``kahan_comp``) and add it to the next update (Kahan summation): ``s = comp + delta;
  p' = round(p + s); comp' = round(s - (p' - p))``. Two bytes per parameter more, deterministic.

``"nearest"`` is plain round-to-nearest-even (what ``Tensor.copy_`` does).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["ParamRounding", "apply_update_", "hash32", "stochastic_key", "stochastic_round_bf16"]

ParamRounding = Literal["nearest", "stochastic", "kahan"]
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
_M32 = 0xFFFFFFFF


def hash32(x: Tensor | int) -> Tensor | int:
    """lowbias32 (Chris Wellons' integer hash) on uint32 values held in int64 tensors or Python ints."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stochastic_key(param_seed: int, step: int) -> int:
    """The 32-bit key of one parameter tensor at one step (the kernel receives the same number)."""
    return int(hash32((param_seed * 0x9E3779B1 + step * 0x85EBCA77 + 0x6A09E667) & _M32))


def stochastic_round_bf16(x: Tensor, key: int, offset: int = 0) -> Tensor:
    """Round fp32 ``x`` to bf16 stochastically with the counter-based bits of ``key`` (see the module doc).

    ``offset`` is added to the element index (a shard's global offset under FSDP2).
    """
    flat = x.reshape(-1).to(torch.float32)
    index = torch.arange(offset, offset + flat.numel(), dtype=torch.int64, device=x.device)
    noise = hash32(index ^ key) & 0xFFFF
    bits = flat.view(torch.int32).to(torch.int64) & _M32
    bits = ((bits + noise) >> 16) << 16
    rounded = (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)  # back to signed int32
    return rounded.to(torch.bfloat16).reshape(x.shape)  # exact: the low 16 bits are zero


def apply_update_(
    param: Tensor,
    p32: Tensor,
    delta: Tensor,
    rounding: ParamRounding = "nearest",
    *,
    comp: Tensor | None = None,
    key: int = 0,
    offset: int = 0,
) -> None:
    """``param <- p32 + delta`` with the rounding the parameter's dtype needs.

    ``p32`` holds the parameter's current value in the math dtype (it may be ``param`` itself for fp32
    parameters); ``delta`` the full update in the same dtype. For fp32/fp64 parameters the rounding mode does
    nothing. ``comp`` is the Kahan buffer (``rounding="kahan"``), ``key`` the stochastic-rounding key and
    ``offset`` the flat index of ``param``'s first element in the whole tensor (a shard's offset under FSDP2).
    """
    if param.dtype in (torch.float32, torch.float64) or rounding == "nearest":
        if p32 is param:
            param.add_(delta)
        else:
            param.copy_(p32 + delta)
        return
    if rounding == "stochastic":
        if param.dtype != torch.bfloat16:
            raise ValueError(f"param_rounding='stochastic' supports bf16 parameters, not {param.dtype}; use 'kahan'")
        param.copy_(stochastic_round_bf16(p32 + delta, key, offset))
        return
    if comp is None:
        raise ValueError("param_rounding='kahan' needs the kahan_comp state buffer")
    s = comp.to(torch.float32) + delta
    rounded = (p32 + s).to(param.dtype)
    comp.copy_(s - (rounded.to(torch.float32) - p32))
    param.copy_(rounded)
