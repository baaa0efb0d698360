"""Blockwise quantization of optimizer state (Dettmers et al. 2022; Li et al. 2023) and bf16 update rounding.

* :mod:`lmopt.quant.maps` -- code maps (dynamic exponent, zero-free linear) and their nearest-code tables
* :mod:`lmopt.quant.blockwise` -- ``quantize_blockwise`` / ``dequantize_blockwise`` and :class:`QuantizedState`
* :mod:`lmopt.quant.moments` -- :class:`MomentFormat` and the helpers optimizers use to keep a moment at a
  chosen precision (``init_moment`` / ``load_moment`` / ``store_moment`` / ``moment_state``)
* :mod:`lmopt.quant.sharded` -- quantized state of DTensor (FSDP2) parameters: blocks per local shard, stored as
  evenly sharded DTensors, and resharding (:class:`ShardLayout`, ``reshard_quantized``, ``local_state``)
* :mod:`lmopt.quant.rounding` -- stochastic rounding and Kahan summation for bf16 parameters
"""

from .blockwise import QuantizedState, dequantize_blockwise, quantize_blockwise
from .maps import CodeMap, code_map, dynamic_exponent_map, linear_map
from .moments import (
    DEFAULT_BLOCK_SIZE,
    MomentFormat,
    init_moment,
    load_moment,
    local_nbytes,
    moment_state,
    moment_summary,
    quantized_view,
    state_layout,
    store_moment,
)
from .rounding import apply_update_, stochastic_round_bf16
from .sharded import ShardLayout, local_state, reshard_quantized

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "CodeMap",
    "MomentFormat",
    "QuantizedState",
    "ShardLayout",
    "apply_update_",
    "code_map",
    "dequantize_blockwise",
    "dynamic_exponent_map",
    "init_moment",
    "linear_map",
    "load_moment",
    "local_nbytes",
    "local_state",
    "moment_state",
    "moment_summary",
    "quantize_blockwise",
    "quantized_view",
    "reshard_quantized",
    "state_layout",
    "stochastic_round_bf16",
    "store_moment",
]
