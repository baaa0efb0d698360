"""lmopt's optimizers. Each module holds one algorithm family and its registry entries (``SPECS``)."""

from .adabound import AdaBound
from .adamw import Adam, AdamW, adamw
from .base import LmoptOptimizer, NonFiniteGradientError
from .lookahead import Lookahead, with_lookahead
from .muon import Muon
from .release import GradientRelease
from .schedule_free import ScheduleFreeAdamW, recompute_batchnorm_statistics

__all__ = ["Adam", "AdamW", "LmoptOptimizer", "NonFiniteGradientError", "adamw"]
__all__ += [
    "AdaBound",
    "GradientRelease",
    "Lookahead",
    "Muon",
    "ScheduleFreeAdamW",
    "recompute_batchnorm_statistics",
    "with_lookahead",
]
