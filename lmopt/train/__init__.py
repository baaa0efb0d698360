"""Training-loop practice: clipping, accumulation, z-loss, health monitoring, complete checkpoints, a loop.

* :func:`clip_grad_norm` -- global-norm clipping over all param groups, returning the pre-clip norm and factor
* :class:`GradientAccumulator` -- k micro-batches equal one large batch (by 1/k or by tokens)
* :func:`z_loss`, :func:`cross_entropy_with_z_loss` -- PaLM's z-loss
* :class:`HealthMonitor` -- loss spikes, gradient norms, clip rate, update ratios, NaN/inf, with suggestions
* :func:`save_checkpoint`, :func:`load_checkpoint`, :class:`CheckpointManager`, :class:`PreemptionHandler`
* :func:`save_sharded_checkpoint`, :func:`load_sharded_checkpoint`, :func:`convert_checkpoint` -- sharded
  checkpoints through torch.distributed.checkpoint (torchrun, FSDP2), resumable at another world size
* :func:`optimizer_step` -- one update after the backward pass: clip, non-finite policy, step, zero, schedule
* :func:`fit` -- the reference training loop that uses all of the above
* :func:`zero_optimizer` -- a registry optimizer inside ZeroRedundancyOptimizer (DDP, state partitioned)

All of it runs under torchrun with FSDP2 or DDP (:mod:`lmopt.train.distributed`): global gradient norms,
reduced losses and monitor statistics, and non-finite / stop decisions agreed by every rank.
"""

from .accumulate import GradientAccumulator
from .checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    PreemptionHandler,
    TrainState,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .clip import ClipResult, clip_grad_norm
from .dcp import convert_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from .distributed import ZERO_UNSUPPORTED, is_main_process, zero_optimizer
from .fit import FitResult, StepInfo, fit, lm_loss
from .monitor import SUGGESTIONS, HealthEvent, HealthMonitor
from .step import NonFinitePolicy, StepOutcome, optimizer_step
from .zloss import cross_entropy_with_z_loss, z_loss

__all__ = [
    "FORMAT_VERSION",
    "SUGGESTIONS",
    "CheckpointError",
    "CheckpointManager",
    "ClipResult",
    "FitResult",
    "GradientAccumulator",
    "HealthEvent",
    "HealthMonitor",
    "NonFinitePolicy",
    "PreemptionHandler",
    "StepInfo",
    "StepOutcome",
    "TrainState",
    "ZERO_UNSUPPORTED",
    "capture_rng_state",
    "clip_grad_norm",
    "convert_checkpoint",
    "cross_entropy_with_z_loss",
    "fit",
    "is_main_process",
    "lm_loss",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "optimizer_step",
    "restore_rng_state",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "z_loss",
    "zero_optimizer",
]
