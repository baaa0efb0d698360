"""How far two correct runs of the same optimizer may drift apart, derived from the precision involved.

One rule for the distributed and low-bit comparisons (sharded vs unsharded, one machine's kernels vs another's),
instead of a number measured on one machine:

    tolerance = SAFETY * steps * (unit * max_update / scale + FP32_UNIT_ROUNDOFF)

relative to ``scale`` (the largest |parameter|, the denominator of the tests' relative error), where

* ``max_update`` is the largest change of one parameter element in one step of the reference run (what a
  perturbation of the update is a fraction of: lr for Adam, 2 lr for a flipped Lion sign, ~10 lr for CAME's
  early steps, whose confidence normaliser has no bias correction);
* ``unit`` is the relative error one step's update may carry: two runs whose fp32 sums run in another order
  (another split across shards, another SIMD width: AVX2 vs AVX-512/AMX) differ by ~``sqrt(n) * 2**-24`` for a
  reduction over ``n`` terms; a bf16 moment rounds those neighbouring fp32 values to bf16 neighbours one bf16
  spacing apart, ``2**-7`` relative at most (twice its unit roundoff ``2**-8``); a quantized moment moves by one
  code step of its block's scale, which for an element far below the block's maximum is the element's whole
  value: its update may differ by its whole size (``unit = 1``) -- trajectories of quantized state under other
  blockings are bounded, not close, and the exact checks are the bit-identical aligned-block tests;
* ``FP32_UNIT_ROUNDOFF`` per step: the parameter's own rounding when the updates added to it differ;
* ``steps``: a difference made at one step stays in the parameters (and in the moments, decaying): they add up;
* ``SAFETY = 4``: the bound is on the typical size of a rounding difference, not a worst case over elements.

A real bug moves a parameter by a fraction of its update that no rounding does: a wrong beta or a missing bias
correction changes early updates by ~10-300 %, far above ``unit`` for fp32 and bf16 state
(tests/test_tolerances.py checks both: the tolerance covers flipped bf16 rounding and reordered sums, and
catches a wrong beta and a missing bias correction).
"""

from __future__ import annotations

import math

FP32_UNIT_ROUNDOFF = 2.0**-24
BF16_SPACING = 2.0**-7  # two bf16 neighbours differ by at most this, relative (unit roundoff 2**-8)
SAFETY = 4.0

#: the relative error of one step's update, by the precision of the moments (see the module docstring)
UNIT = {"bf16": BF16_SPACING, "8bit": 1.0, "4bit": 1.0}


def reorder_unit(n: int) -> float:
    """Relative error of an fp32 sum of ``n`` terms computed in another order: ``sqrt(n) * 2**-24``."""
    return math.sqrt(max(1, n)) * FP32_UNIT_ROUNDOFF


def trajectory_tol(*, precision: str, steps: int, max_update: float, scale: float, n: int = 1) -> float:
    """Largest relative parameter difference (``max|a - b| / max|b|``) two correct runs may show.

    Args:
        precision: ``"fp32"`` (only the order of fp32 reductions differs), ``"bf16"``, ``"8bit"`` or ``"4bit"``
            (the precision of the optimizer's moments).
        steps: optimizer steps taken.
        max_update: the largest change of one parameter element in one step of the reference run.
        scale: the largest |parameter| of the reference run (the relative error's denominator).
        n: for ``"fp32"``: the length of the longest reduction whose order differs (elements of a gradient sum,
            of a norm); the other precisions' error dwarfs it.
    """
    unit = reorder_unit(n) if precision == "fp32" else UNIT[precision] + reorder_unit(n)
    return SAFETY * steps * (unit * max_update / scale + FP32_UNIT_ROUNDOFF)
