"""lmopt's optimizers. Each module holds one algorithm family and its registry entries (``SPECS``)."""

from .adamw import Adam, AdamW, adamw
from .base import LmoptOptimizer, NonFiniteGradientError

__all__ = ["Adam", "AdamW", "LmoptOptimizer", "NonFiniteGradientError", "adamw"]
