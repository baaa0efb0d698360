"""lmopt: train and fine-tune language models in less memory, with optimizers that converge as well as AdamW.

Public API (everything else is internal):

* optimizers: :class:`AdamW`, :class:`Adam`, :class:`Adafactor`, :class:`CAME`, :class:`AdamMini`, :class:`Lion`,
  :class:`Sophia`, :class:`AdamW8bit`, :class:`AdamW4bit`, :class:`Adam8bit`, :class:`Lion8bit`,
  :class:`StableAdamW`, :class:`AdEMAMix`, :class:`ScheduleFreeAdamW`, :class:`Muon`, :class:`AdaBound`,
  :class:`Lookahead`, :class:`GradientRelease` (and every registry entry via :func:`create_optimizer`)
* registry: :func:`create_optimizer`, :func:`list_optimizers`, :func:`get_spec`, :class:`OptimizerSpec`
* parameter groups: :func:`param_groups`, :func:`classify_parameters`
* recipes and schedules: :func:`recipe`, :mod:`lmopt.schedules`
* training loop practice: :mod:`lmopt.train`; memory planning: :mod:`lmopt.memory`
"""

from . import memory, schedules, train
from .optim import (
    CAME,
    AdaBound,
    Adafactor,
    Adam,
    Adam8bit,
    AdamMini,
    AdamW,
    AdamW4bit,
    AdamW8bit,
    AdEMAMix,
    GradientRelease,
    Lion,
    Lion8bit,
    LmoptOptimizer,
    Lookahead,
    Muon,
    NonFiniteGradientError,
    ScheduleFreeAdamW,
    Sophia,
    StableAdamW,
    recompute_batchnorm_statistics,
)
from .param_groups import ParamGroups, ParamInfo, classify_parameters, param_groups
from .recipes import Recipe, recipe
from .registry import OptimizerSpec, StateTensor, create_optimizer, get_spec, list_optimizers

__version__ = "0.1.0"

__all__ = [
    "CAME",
    "AdaBound",
    "AdEMAMix",
    "Adafactor",
    "Adam",
    "Adam8bit",
    "AdamMini",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "GradientRelease",
    "Lion",
    "Lion8bit",
    "LmoptOptimizer",
    "Lookahead",
    "Muon",
    "NonFiniteGradientError",
    "OptimizerSpec",
    "ParamGroups",
    "ParamInfo",
    "Recipe",
    "ScheduleFreeAdamW",
    "Sophia",
    "StableAdamW",
    "StateTensor",
    "__version__",
    "classify_parameters",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "memory",
    "param_groups",
    "recipe",
    "recompute_batchnorm_statistics",
    "schedules",
    "train",
]
