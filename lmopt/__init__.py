"""lmopt: train and fine-tune language models in less memory, with optimizers that converge as well as AdamW.

Public API (everything else is internal):

* optimizers (everything in ``lmopt.optim.__all__``, re-exported here): :class:`AdamW`, :class:`Adam`,
  :class:`Adafactor`, :class:`CAME`, :class:`AdamMini`, :class:`Lion`, :class:`Sophia`, :class:`AdamW8bit`,
  :class:`AdamW4bit`, :class:`Adam8bit`, :class:`Lion8bit`, :class:`StableAdamW`, :class:`AdEMAMix`,
  :class:`ScheduleFreeAdamW` (also SGD, RAdam), :class:`Muon`, :class:`NorMuon`, :class:`AdaBound`,
  :class:`Lookahead`, :class:`GradientRelease`, :class:`SOAP`, :func:`offload` (and every registry entry via
  :func:`create_optimizer`)
* registry: :func:`create_optimizer`, :func:`list_optimizers`, :func:`get_spec`, :class:`OptimizerSpec`
* parameter groups: :func:`param_groups`, :func:`classify_parameters`; muP width scaling: :func:`mup`
  (:class:`MupPlan`)
* recipes and schedules: :func:`recipe`, :mod:`lmopt.schedules`
* training loop practice: :mod:`lmopt.train`; memory planning: :mod:`lmopt.memory`
"""

from . import memory, optim, schedules, train
from ._version import __version__  # noqa: E402
from .mup import MupPlan, mup
from .optim import *  # noqa: F403 (the optimizers: lmopt.optim.__all__ is the one list)
from .param_groups import ParamGroups, ParamInfo, classify_parameters, param_groups
from .recipes import Recipe, recipe
from .registry import OptimizerSpec, StateTensor, create_optimizer, get_spec, list_optimizers

__all__ = [
    "MupPlan",
    "OptimizerSpec",
    "ParamGroups",
    "ParamInfo",
    "Recipe",
    "StateTensor",
    "__version__",
    "classify_parameters",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "memory",
    "mup",
    "param_groups",
    "recipe",
    "schedules",
    "train",
    "optim",
    *optim.__all__,  # every optimizer class and functional step
]
