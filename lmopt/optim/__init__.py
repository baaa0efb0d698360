"""lmopt's optimizers. Each module holds one algorithm family and its registry entries (``SPECS``)."""

from .adamw import Adam, AdamW, adamw
from .base import LmoptOptimizer, NonFiniteGradientError
from .lowbit import Adam8bit, AdamW4bit, AdamW8bit, Lion8bit

__all__ = [
    "Adam",
    "Adam8bit",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "Lion8bit",
    "LmoptOptimizer",
    "NonFiniteGradientError",
    "adamw",
]
