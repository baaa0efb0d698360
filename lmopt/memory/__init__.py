"""Training-memory planning: how many bytes a training step needs, per device, for any registry optimizer.

* :func:`plan` -- parameters, master weights, gradients, optimizer state (exact, from the registry's state
  rules), activations and temporaries, for a named model, a transformers config or an ``nn.Module``, under a
  precision mode, LoRA, micro-batch, sequence length, checkpointing, accumulation, ZeRO/FSDP sharding and
  offload.
* :func:`recommend` -- feasible configurations for a model on N devices of a given memory, ranked.
* :func:`measure_training_step` -- the same components measured on a real step (CPU or CUDA), to check plans.
* :func:`model_shape` / :func:`named_shapes` -- per-tensor shapes of named models.

See docs/memory-planning.md.
"""

from .activations import ACTIVATION_MODELS, ActivationEstimate, estimate_activations
from .measure import MeasuredMemory, measure_training_step, optimizer_state_bytes, tensor_bytes
from .planner import PRECISIONS, SHARDING, MemoryPlan, Precision, plan, resolve_optimizer
from .recommend import Recommendation, RecommendationReport, optimizer_ladder, recommend
from .shapes import Architecture, ModelShape, ParamShape, generic_decoder, model_shape, named_shapes
from .units import format_bytes, parse_bytes

__all__ = [
    "ACTIVATION_MODELS",
    "OPTIMIZER_LADDER",
    "PRECISIONS",
    "SHARDING",
    "ActivationEstimate",
    "Architecture",
    "MeasuredMemory",
    "MemoryPlan",
    "ModelShape",
    "ParamShape",
    "Precision",
    "Recommendation",
    "RecommendationReport",
    "estimate_activations",
    "format_bytes",
    "generic_decoder",
    "measure_training_step",
    "model_shape",
    "named_shapes",
    "optimizer_ladder",
    "optimizer_state_bytes",
    "parse_bytes",
    "plan",
    "recommend",
    "resolve_optimizer",
    "tensor_bytes",
]


def __getattr__(name: str):
    # OPTIMIZER_LADDER is read from the optimizer specs when asked for (lmopt.memory.recommend)
    if name == "OPTIMIZER_LADDER":
        return optimizer_ladder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
