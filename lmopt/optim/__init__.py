"""lmopt's optimizers. Each module holds one algorithm family and its registry entries (``SPECS``)."""

from ._dispatch import resolve_implementation
from .adabound import AdaBound
from .adafactor import Adafactor, adafactor
from .adam_mini import AdamMini, adam_mini, find_partitions
from .adamw import Adam, Adam8bit, AdamW, AdamW4bit, AdamW8bit, adamw
from .ademamix import AdEMAMix, ademamix
from .apollo import APOLLO, APOLLOMini
from .base import LmoptOptimizer, NonFiniteGradientError
from .came import CAME, came
from .convert import convert_state
from .lion import Lion, Lion8bit, lion
from .lookahead import Lookahead, with_lookahead
from .mapped import map_state
from .muon import Muon, NorMuon, muon, normuon
from .offload import OffloadOptimizer, offload
from .prodigy import Prodigy
from .release import GradientRelease
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeRAdam, ScheduleFreeSGD, recompute_batchnorm_statistics
from .soap import SOAP, soap
from .sophia import Sophia, sampled_label_loss, sophia
from .stable_adamw import StableAdamW, stable_adamw

__all__ = [
    # engine
    "LmoptOptimizer",
    "NonFiniteGradientError",
    "resolve_implementation",
    "convert_state",
    # Adam family
    "Adam",
    "AdamW",
    "adamw",
    "AdEMAMix",
    "StableAdamW",
    "ademamix",
    "stable_adamw",
    # low-bit state (docs/low-bit-state.md)
    "Adam8bit",
    "AdamW4bit",
    "AdamW8bit",
    "Lion8bit",
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
    # Schedule-Free, Muon, AdaBound, Lookahead, gradient release (docs/optimizers-schedule-free-muon.md)
    "AdaBound",
    "GradientRelease",
    # offload: state and step on the host (lmopt/optim/offload.py, docs/offload.md)
    "OffloadOptimizer",
    "map_state",
    "offload",
    "Lookahead",
    "Muon",
    "NorMuon",
    "muon",
    "normuon",
    "ScheduleFreeAdamW",
    "ScheduleFreeRAdam",
    "ScheduleFreeSGD",
    "recompute_batchnorm_statistics",
    "with_lookahead",
    # SOAP: Adam in Shampoo's eigenbasis (docs/optimizers-soap.md)
    "SOAP",
    "soap",
    # learning-rate free and low-rank-projected (docs/optimizers-prodigy-apollo.md)
    "APOLLO",
    "APOLLOMini",
    "Prodigy",
]
