"""Code maps: the sorted values a quantized code stands for, and the tables that find the nearest code fast.

A value ``x`` normalized by its block's absmax (so ``x`` lies in [-1, 1]) is stored as the code
``#{c : midpoint[c] < x}``, i.e. the index of the nearest map value (ties go to the lower code), where
``midpoint[c] = (value[c] + value[c + 1]) / 2`` in fp32. That is bitsandbytes' rule (``torch.bucketize`` over
the midpoints), so lmopt's codes and bitsandbytes' agree on the same input.

Maps:

* ``dynamic_exponent_map`` -- Dettmers et al. 2022 ("8-bit Optimizers via Block-wise Quantization", ICLR 2022):
  a dynamic-exponent (DE) code: an exponent in decimal orders of magnitude plus a linear fraction, so small
  values keep relative precision. Signed for first moments, unsigned (one more fraction bit) for second
  moments.
* ``linear_map(4, zero=False)`` -- Li et al. 2023 ("Memory Efficient Optimizers with 4-bit States", NeurIPS
  2023): for the 4-bit second moment a zero-point-free linear map, ``(k + 1) / 16``, because rounding small
  second moments to exactly zero makes ``1 / sqrt(v)`` explode.

For the CPU kernel each map also carries a lookup table indexed by the sign, the exponent and the top ``M``
mantissa bits of ``x``: it gives the code ``c0`` of the bucket's lowest value, and since every bucket holds at
most one midpoint (checked when the table is built), the nearest code is ``c0 + (x > midpoint[c0])``: two table
reads instead of a binary search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["CodeMap", "code_map", "dynamic_exponent_map", "linear_map", "CODE_MAPS"]


def dynamic_exponent_map(*, signed: bool, exponent_bits: int, total_bits: int) -> Tensor:
    """The dynamic-exponent code of Dettmers et al. 2022, as ``2**total_bits`` sorted fp32 values in [-1, 1].

    For each decimal exponent ``10**(i - exponent_bits + 1)`` (``i = 0 .. exponent_bits - 1``) the fraction
    interval [0.1, 1] is cut into ``2**(i + fraction_bits)`` equal pieces and their centres are the values
    (signed maps mirror them). Zero and 1.0 complete the map; an unsigned map spends the sign bit on one more
    fraction bit. With ``signed=True, exponent_bits=7, total_bits=8`` this is bitsandbytes' ``dynamic`` map.
    """
    if total_bits < 2 or not 1 <= exponent_bits < total_bits:
        raise ValueError(f"need 1 <= exponent_bits < total_bits, got {exponent_bits}, {total_bits}")
    fraction_bits = total_bits - 1 - exponent_bits
    values: list[float] = []

    def add_decade(scale: float, pieces: int) -> None:
        edges = torch.linspace(0.1, 1, pieces + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        values.extend((scale * centres).tolist())
        if signed:
            values.extend((-scale * centres).tolist())

    for i in range(exponent_bits):
        pieces = 2 ** (i + fraction_bits) * (1 if signed else 2)
        add_decade(10.0 ** (i - (exponent_bits - 1)), pieces)
    # the codes with all exponent bits zero and no indicator bit: one more set of centres in the top decade
    extra = 2**fraction_bits - 1
    if extra > 0:
        add_decade(10.0 ** (exponent_bits - 1 - (exponent_bits - 1)), extra)
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise AssertionError(f"dynamic map has {len(values)} values for {total_bits} bits")
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def linear_map(bits: int, *, zero: bool = False) -> Tensor:
    """Unsigned linear map with ``2**bits`` values: ``k / (2**bits - 1)`` with zero, ``(k + 1) / 2**bits`` without."""
    n = 2**bits
    if zero:
        return torch.linspace(0, 1, n, dtype=torch.float32)
    return torch.linspace(0, 1, n + 1, dtype=torch.float32)[1:].contiguous()


@dataclass(frozen=True, eq=False)
class CodeMap:
    """A code map with its nearest-code tables (see the module docstring).

    Attributes:
        name: registry key, e.g. ``"de8s"``.
        bits: 8 or 4.
        values: sorted fp32 values, ``2**bits`` of them.
        midpoints: ``2**bits`` fp32 thresholds; ``midpoints[c]`` separates codes ``c`` and ``c + 1``; the last is
            +inf.
        lut: int32 table of ``2 * lut_buckets`` entries ``(c0 << 24) | threshold`` (see ``encode_with_lut``).
        lut_exponents: ``E``: magnitudes below ``2**-E`` share the bucket of zero.
        lut_mantissa_bits: ``M``: mantissa bits in the bucket index.
        zero_code: the code of 0.0 (what a zero moment is stored as).
    """

    name: str
    bits: int
    signed: bool
    values: Tensor
    midpoints: Tensor
    lut: Tensor
    lut_exponents: int
    lut_mantissa_bits: int
    zero_code: int
    _device_tables: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict, repr=False)

    @property
    def lut_buckets(self) -> int:
        return (self.lut_exponents << self.lut_mantissa_bits) + 1

    def encode(self, normalized: Tensor) -> Tensor:
        """Nearest codes (int64) of fp32 values already normalized to [-1, 1] (the reference rule)."""
        return torch.bucketize(normalized, self.on(normalized.device)[1][:-1], right=False)

    def encode_with_lut(self, normalized: Tensor) -> Tensor:
        """The same codes, found with the kernel's table method (used to test the table).

        The bucket of ``x`` is its sign, exponent and top ``M`` mantissa bits. A bucket's entry holds the code
        ``c0`` of its lowest value and, when a midpoint falls inside the bucket, that midpoint's remaining
        mantissa bits (flipped for negative buckets, where a larger magnitude is a smaller value): the code is
        ``c0 + (low bits of x > threshold)``, exact because ``x`` and the midpoint share all higher bits. One
        table read per element.
        """
        x = normalized.float().clamp(-1.0, 1.0).contiguous()
        bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        sign = bits >> 31
        mag = bits & 0x7FFFFFFF
        shift = 23 - self.lut_mantissa_bits
        low_mask = (1 << shift) - 1
        base = (127 - self.lut_exponents) << self.lut_mantissa_bits
        bucket = ((mag >> shift) - base).clamp_min(0) + sign * self.lut_buckets
        entry = self.on(x.device)[2][bucket].to(torch.int64) & 0xFFFFFFFF
        key = (mag & low_mask) ^ (sign * low_mask)
        return (entry >> 24) + (key > (entry & low_mask)).to(torch.int64)

    def decode(self, codes: Tensor) -> Tensor:
        return self.on(codes.device)[0][codes.to(torch.int64)]

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(values, midpoints, lut) on ``device``: the CPU tensors themselves, or copies made once per device."""
        if device.type == "cpu":
            return self.values, self.midpoints, self.lut
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = (self.values.to(device), self.midpoints.to(device), self.lut.to(device))
        return self._device_tables[key]

    def __repr__(self) -> str:
        return f"CodeMap({self.name!r}, bits={self.bits}, signed={self.signed})"


def _build(name: str, values: Tensor, signed: bool, bits: int) -> CodeMap:
    values = values.to(torch.float32).contiguous()
    midpoints = torch.cat([(values[:-1] + values[1:]) / 2, torch.tensor([float("inf")])])
    for exponents in (23, 24, 28, 32):
        for mantissa_bits in (6, 8, 10):
            lut = _build_lut(values, midpoints, exponents, mantissa_bits)
            if lut is not None:
                zero_code = int(torch.bucketize(torch.zeros(1), midpoints[:-1], right=False).item())
                return CodeMap(name, bits, signed, values, midpoints, lut, exponents, mantissa_bits, zero_code)
    raise AssertionError(f"no lookup table resolves code map {name}")


def _build_lut(values: Tensor, midpoints: Tensor, exponents: int, mantissa_bits: int) -> Tensor | None:
    """int32 table: per bucket ``(c0 << 24) | threshold`` (see :meth:`CodeMap.encode_with_lut`), or None when
    some bucket holds two midpoints (then a finer table is tried)."""
    shift = 23 - mantissa_bits
    low_mask = (1 << shift) - 1
    base = (127 - exponents) << mantissa_bits
    buckets = (exponents << mantissa_bits) + 1
    k = torch.arange(buckets, dtype=torch.int64)
    start = (k + base) << shift
    start[0] = 0
    end = ((k + 1 + base) << shift) - 1  # last magnitude (as bits) inside bucket k
    end[-1] = 0x3F800000  # the top bucket holds 1.0 only (inputs are clamped to [-1, 1])
    lo = start.to(torch.int32).view(torch.float32)
    hi = end.to(torch.int32).view(torch.float32)
    if bool(values.abs().max() > 1.0):
        return None
    inner = midpoints[:-1]
    table = []
    for sign, (low_value, high_value) in enumerate(((lo, hi), (-hi, -lo))):  # positive buckets, then negative
        c0 = torch.bucketize(low_value, inner, right=False)
        c1 = torch.bucketize(high_value, inner, right=False)
        if bool((c1 > c0 + 1).any()) or bool(c1[0] != c0[0]):  # the merged bucket 0 may hold no midpoint
            return None
        has_mid = c1 == c0 + 1
        mid_bits = midpoints[c0.clamp_max(len(inner) - 1)].view(torch.int32).to(torch.int64) & low_mask
        threshold = torch.where(has_mid, mid_bits ^ (low_mask if sign else 0), torch.full_like(c0, low_mask))
        table.append((c0 << 24) | threshold)
    return torch.cat(table).to(torch.int32)


#: the maps lmopt uses, by name: de = dynamic exponent, s / u = signed / unsigned, lin4 = zero-free linear
CODE_MAPS = {
    "de8s": lambda: dynamic_exponent_map(signed=True, exponent_bits=7, total_bits=8),
    "de8u": lambda: dynamic_exponent_map(signed=False, exponent_bits=7, total_bits=8),
    "de4s": lambda: dynamic_exponent_map(signed=True, exponent_bits=3, total_bits=4),
    "lin4u": lambda: linear_map(4, zero=False),
}


#: the maps built so far (a plain dict rather than ``functools.cache``: a traced step reads a built map as a
#: constant, where dynamo would trace into the cached function and its host reads)
_BUILT: dict[str, CodeMap] = {}


def code_map(name: str) -> CodeMap:
    """The :class:`CodeMap` named ``name`` (one of :data:`CODE_MAPS`), built once per process (optimizers build
    theirs when a quantized format is declared, before any step can be traced)."""
    built = _BUILT.get(name)
    if built is not None:
        return built
    if name not in CODE_MAPS:
        raise ValueError(f"code map must be one of {sorted(CODE_MAPS)}, got {name!r}")
    values = CODE_MAPS[name]()
    built = _BUILT[name] = _build(name, values, signed=name.endswith("s"), bits=8 if "8" in name else 4)
    return built
