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
  spacing apart, ``2**-7`` relative at most (twice its unit roundoff ``2**-8``); a quantized moment stored with
  other blocks (a shard boundary inside a block) moves by up to one code step of its block's scale: the map's
  largest half-gap relative to the block's absmax, summed over the first and second moment's maps (8-bit
  0.0105, 4-bit 0.175: 4-bit trajectories under another blocking are only loosely bounded; the exact checks
  are the bit-identical aligned-block tests);
* ``FP32_UNIT_ROUNDOFF`` per step: the parameter's own rounding when the updates added to it differ;
* ``steps``: a difference made at one step stays in the parameters (and in the moments, decaying): they add up;
* ``SAFETY = 4``: the bound is on the typical size of a rounding difference, not a worst case over elements.

For quantized state compared between two blockings (:func:`state_tol`) the code step is already a worst case
for each requantization: ``steps * UNIT`` relative to the tensor's largest magnitude, no safety factor. One
store / load of a moment (:func:`roundtrip_tol`): half a bf16 spacing (``2**-8``), or one code step.

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


def code_step(precision: str, kinds: tuple[str, ...] = ("first", "second")) -> float:
    """The largest distance from a value in a map's range to its code, relative to the block's absmax (one
    rounding of a quantized value moves it by at most this times its block's absmax), summed over the maps of
    ``kinds``: ``"first"`` (signed) and ``"second"`` (unsigned) together bound an update made from both of
    Adam's moments (and, more loosely, from one)."""
    import torch

    from lmopt.quant import MomentFormat, code_map

    total = 0.0
    for kind in kinds:
        values = code_map(MomentFormat(precision=precision, kind=kind).qmap).values.double()
        low = -1.0 if values.min() < 0 else 0.0
        gaps = torch.cat([values[:1] - low, (values[1:] - values[:-1]) / 2, 1.0 - values[-1:]])
        total += float(gaps.max())
    return total


#: the relative error of one step's update, by the precision of the moments (see the module docstring):
#: bf16 0.0078, 8-bit 0.0105 (de8s 0.0070 + de8u 0.0035), 4-bit 0.175 (de4s 0.1125 + lin4u 0.0625)
UNIT = {"bf16": BF16_SPACING, "8bit": code_step("8bit"), "4bit": code_step("4bit")}


def state_tol(precision: str, steps: int) -> float:
    """Largest relative difference of quantized moments (relative to the tensor's largest magnitude) and of the
    parameters they moved (each step's change being below the parameter's magnitude) between two blockings of
    the same run after ``steps`` steps: each step may requantize each moment by one code step of its block's
    scale (``UNIT``), and the differences add up. A code step is a worst case (not a typical rounding), so no
    safety factor."""
    return steps * UNIT[precision]


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


def moment_precision(name: str, variant: dict) -> str:
    """The precision of ``name``'s moments with hyperparameters ``variant``: ``"fp32"``, ``"bf16"``, ``"8bit"``
    or ``"4bit"`` (the variant's ``state_precision``, else the alias's, else the class default)."""
    import inspect

    import lmopt

    spec, implied = lmopt.registry.resolve_name(name)
    for source in (variant, implied, spec.defaults):
        if source.get("state_precision"):
            return str(source["state_precision"])
    parameter = inspect.signature(spec.cls.__init__).parameters.get("state_precision")
    default = parameter.default if parameter is not None else None
    return default if isinstance(default, str) and default in ("bf16", "8bit", "4bit") else "fp32"


def within(per_param, *, precision: str, steps: int, n: int) -> tuple[bool, float]:
    """Whether every ``[abs_err, scale, max_update]`` of ``per_param`` is within :func:`trajectory_tol`; and the
    largest ratio error / tolerance (below 1 passes)."""
    worst = 0.0
    for abs_err, scale, update, *_ in per_param:
        tol = trajectory_tol(precision=precision, steps=steps, max_update=update, scale=max(scale, 1e-12), n=n)
        worst = max(worst, (abs_err / max(scale, 1e-12)) / tol)
    return worst < 1.0, worst


def loss_tol(precision: str, steps: int, n: int = 4096) -> float:
    """Largest relative difference of the losses of two correct continuations of one checkpoint on other world sizes
    after ``steps`` steps: each step's update may carry the precision's unit (quantized state requantized into other
    blocks, a bf16 moment rounded to a neighbour) plus reordered fp32 sums of up to ``n`` terms, and the loss moves
    by at most the relative change of the updates that made it (summed over the steps, with the safety factor)."""
    return SAFETY * steps * (UNIT.get(precision, 0.0) + reorder_unit(n))


def roundtrip_tol(precision: str, kind: str) -> float:
    """Largest error of one store / load of a moment, relative to the tensor's largest magnitude: 0 for fp32,
    the bf16 unit roundoff ``2**-8`` (relative to each value, so to the largest too), one code step of the
    ``kind``'s map for quantized state (relative to the block's absmax, at most the tensor's largest), plus the
    fp32 roundings of ``x / absmax`` and ``code * absmax`` (``2**-23`` of the absmax)."""
    if precision == "fp32":
        return 0.0
    if precision == "bf16":
        return 2.0**-8
    return code_step(precision, (kind,)) + 2.0**-23
