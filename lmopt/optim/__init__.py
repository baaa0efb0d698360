"""lmopt's optimizers. Each module holds one algorithm family and its registry entries (``SPECS``)."""

from .adafactor import Adafactor, adafactor
from .adam_mini import AdamMini, adam_mini, find_partitions
from .adamw import Adam, AdamW, adamw
from .base import LmoptOptimizer, NonFiniteGradientError
from .came import CAME, came
from .lion import Lion, lion
from .sophia import Sophia, sampled_label_loss, sophia

__all__ = [
    "Adam",
    "AdamW",
    "LmoptOptimizer",
    "NonFiniteGradientError",
    "adamw",
    # memory-efficient and sign/curvature optimizers (docs/optimizers-memory-efficient.md)
    "CAME",
    "Adafactor",
    "AdamMini",
    "Lion",
    "Sophia",
    "adafactor",
    "adam_mini",
    "came",
    "find_partitions",
    "lion",
    "sampled_label_loss",
    "sophia",
]
