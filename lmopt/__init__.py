"""lmopt: train and fine-tune language models in less memory, with optimizers that converge as well as AdamW.

Public API (everything else is internal):

* optimizers: :class:`AdamW`, :class:`Adam` (and every registry entry via :func:`create_optimizer`)
* registry: :func:`create_optimizer`, :func:`list_optimizers`, :func:`get_spec`, :class:`OptimizerSpec`
* parameter groups: :func:`param_groups`, :func:`classify_parameters`
"""

from . import schedules, train
from .optim import Adam, Adam8bit, AdamW, AdamW4bit, AdamW8bit, Lion8bit, LmoptOptimizer, NonFiniteGradientError
from .param_groups import ParamGroups, ParamInfo, classify_parameters, param_groups
from .recipes import Recipe, recipe
from .registry import OptimizerSpec, StateTensor, create_optimizer, get_spec, list_optimizers

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "Adam8bit",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "Lion8bit",
    "LmoptOptimizer",
    "NonFiniteGradientError",
    "OptimizerSpec",
    "Recipe",
    "ParamGroups",
    "ParamInfo",
    "StateTensor",
    "__version__",
    "classify_parameters",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "param_groups",
    "recipe",
    "schedules",
    "train",
]
