"""Pure array codecs for block-wise quantization. Knows nothing of optax.

Level tables (sorted float32 numpy arrays in [-1, 1] or (0, 1]):

* ``linear_levels(bits, signed, zero)``: evenly spaced levels.
* ``dynamic_tree_levels(8, signed)``: bitsandbytes' 8-bit dynamic map.
* ``dynamic_exponent_levels(bits, signed)``: the same construction at 2..8 bits (the
  4-bit paper's "DE" tables; at 8 bits it equals the dynamic tree).

A ``Codec`` (a frozen, hashable value: bits, level table or logarithmic, block size,
rounding, scale dtype) quantizes an array block-wise along its last axis:

* table codecs store per block of ``block_size`` values one absmax scale and, per value,
  the index of a level (nearest, or stochastic between the two neighbouring levels with
  probability proportional to the linear distance: unbiased);
* the logarithmic codec (SOLO, unsigned) stores per block the max ``D`` and a base ``a``
  from the block's ``quantile`` (10%): levels ``D * a**k``, k = 0 .. 2**bits - 1, no zero
  level; rounding ``nearest`` (in the exponent), ``stochastic_log`` (exponent domain,
  ``round(e + u)``, u ~ U[-0.5, 0.5)) or ``stochastic`` (unbiased, linear distance
  between the two neighbouring levels).

Codes are stored at their real bit width in ``uint8`` bytes, packed along the last axis
(8-bit: one code a byte; 4-bit: two; 2-bit: four; 3-bit: eight codes in three bytes),
so a ``(..., n)`` array becomes codes ``(..., ceil(n / B) * B * bits / 8)`` and scales
``(..., ceil(n / B))``: the rank is kept, so sharding annotations carry over. A last
axis that is not a multiple of the block is padded (by repeating its last value, which
changes neither the absmax nor, much, the quantile) and the padding is dropped on decode.

Scales are clamped below at the smallest normal float32 (not bitsandbytes' 1e-12, which
would inflate the decoded magnitude of states below 1e-12, e.g. second moments of
gradients below 1e-6); an all-zero block decodes to zeros (table codecs) or to
``D * a**k`` with ``D`` the clamp (log codec: no exact zero exists).

Nothing searches. The nearest code of a table is the number of its float32 midpoints
below the value, read from a table indexed by the top bits of the value's float32 bit
pattern plus one integer comparison (see ``_count_below``; arithmetic for the dyadic
zero-free linear tables): exactly what a binary search over the midpoints gives, for
every float32. SOLO's sampled block quantile is a selection (``_kth_smallest``), its
levels are decoded by repeated squaring, and stochastic rounding draws its noise from a
positional hash of the key (``hash_uniform``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Codec",
    "QuantizedArray",
    "dequantize",
    "dynamic_exponent_levels",
    "dynamic_tree_levels",
    "decode_blocks",
    "encode_blocks",
    "from_blocks",
    "hash_uniform",
    "linear_levels",
    "make_codec",
    "pack",
    "quantize",
    "round_to_table",
    "to_blocks",
    "uniform_noise",
    "unpack",
]

MAPS = ("dynamic", "linear", "linear_zero_free", "log")
Rounding = Literal["nearest", "stochastic", "stochastic_log"]
ROUNDINGS = ("nearest", "stochastic", "stochastic_log")
PACKABLE_BITS = (1, 2, 3, 4, 8)
_TINY = float(np.finfo(np.float32).tiny)


# ------------------------------------------------------------------------------------
# Level tables
# ------------------------------------------------------------------------------------


def _check_bits(bits: int, allowed=range(1, 9)) -> None:
    if not isinstance(bits, (int, np.integer)) or bits not in allowed:
        raise ValueError(
            f"bits must be an int in {list(allowed)}, got {bits!r}; pass e.g. bits=8, 4, 3 or 2"
        )


def linear_levels(bits: int, signed: bool, zero: bool = True) -> np.ndarray:
    """Evenly spaced levels.

    Args:
      bits: code width; at most ``2**bits`` levels.
      signed: levels in [-1, 1] (else [0, 1]).
      zero: include an exact zero level. Signed with zero: the ``2**bits - 1``
        symmetric levels ``k / (2**(bits-1) - 1)``; signed without zero:
        ``linspace(-1, 1, 2**bits)`` (the map of SOLO's swamping analysis); unsigned
        with zero: ``linspace(0, 1, 2**bits)``; unsigned without zero:
        ``(k + 1) / 2**bits`` (the 4-bit paper's zero-point-free second-moment map).

    Returns:
      Sorted float32 array.
    """
    _check_bits(bits)
    n = 2**bits
    if signed and zero:
        half = n // 2 - 1
        if half == 0:
            raise ValueError("a signed linear map with a zero level needs bits >= 2")
        levels = np.arange(-half, half + 1) / half
    elif signed:
        levels = np.linspace(-1.0, 1.0, n)
    elif zero:
        levels = np.linspace(0.0, 1.0, n)
    else:
        levels = np.arange(1, n + 1) / n
    return np.asarray(levels, np.float32)


def _dynamic_map(signed: bool, exponent_bits: int, total_bits: int) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map`` construction, in float32 arithmetic.

    For exponent index i = 0 .. E-1: evenly spaced float32 boundaries on [0.1, 1]
    (``2**(i + total_bits - 1 - E) + 1`` of them signed, twice the intervals unsigned),
    their midpoints scaled by ``10**(i - (E - 1))``, negated copies when signed; then 0
    and 1.
    """
    data: list[np.ndarray] = []
    for i in range(exponent_bits):
        n = 2 ** (i + total_bits - 1 - exponent_bits) * (1 if signed else 2) + 1
        bounds = np.linspace(0.1, 1.0, n, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (i - (exponent_bits - 1))) * means
        data.append(scaled)
        if signed:
            data.append(-scaled)
    data.append(np.array([0.0, 1.0], np.float32))
    levels = np.sort(np.concatenate(data).astype(np.float32))
    assert len(levels) == 2**total_bits, (len(levels), total_bits)
    return levels


def dynamic_tree_levels(bits: int = 8, signed: bool = True) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic (tree) map, 256 sorted float32 levels.

    Args:
      bits: must be 8 (for other widths use ``dynamic_exponent_levels``).
      signed: 254 signed values + 0 + 1, or 254 unsigned values + 0 + 1.
    """
    if bits != 8:
        raise ValueError(
            f"the dynamic tree map is 8-bit, got bits={bits!r}; use "
            "dynamic_exponent_levels(bits, signed) for 2..7 bits"
        )
    return _dynamic_map(signed, exponent_bits=7, total_bits=8)


def dynamic_exponent_levels(bits: int, signed: bool = True) -> np.ndarray:
    """Dynamic-exponent map at ``bits`` (2..8): the dynamic construction with
    ``bits - 1`` exponent levels. 4-bit signed: 0, ±0.0055, ±0.0325, ±0.0775, ±0.2125,
    ±0.4375, ±0.6625, ±0.8875, 1; 3-bit: 0, ±0.055, ±0.325, ±0.775, 1; 2-bit: 0, ±0.55, 1.
    """
    _check_bits(bits, range(2, 9))
    return _dynamic_map(signed, exponent_bits=bits - 1, total_bits=bits)


# ------------------------------------------------------------------------------------
# Bit packing along the last axis
# ------------------------------------------------------------------------------------


# Codes move with whole-word bit operations, in the form that ran faster on XLA CPU in
# the fused update loop for each width:
# * 4-bit, pairs: a ``(..., n / 2, 2)`` view and a sum of shifted codes (10% less time
#   for an adamw_4bit update than the word form);
# * 1, 2 and 3 bits, words: ``bitcast_convert_type`` views 4 bytes (one code each) as a
#   uint32 (little-endian) and two shift-or-mask steps gather the 4 codes into its low
#   ``4 * bits`` bits, or spread them back (25-30% less time for a SOLO update).


def _words(codes: jax.Array) -> jax.Array:
    """uint8 ``(..., n)`` -> uint32 ``(..., n // 4)``, byte 0 lowest."""
    return jax.lax.bitcast_convert_type(codes.reshape(*codes.shape[:-1], -1, 4), jnp.uint32)


def _bytes(words: jax.Array) -> jax.Array:
    """Inverse of ``_words``."""
    b = jax.lax.bitcast_convert_type(words, jnp.uint8)
    return b.reshape(*b.shape[:-2], -1)


def _gather4(w: jax.Array, bits: int) -> jax.Array:
    """uint32 words holding one code per byte -> the 4 codes side by side (4 * bits)."""
    w = (w | (w >> (8 - bits))) & jnp.uint32((2 ** (2 * bits) - 1) * 0x00010001)
    return (w | (w >> (16 - 2 * bits))) & jnp.uint32(2 ** (4 * bits) - 1)


def _spread4(w: jax.Array, bits: int) -> jax.Array:
    """Inverse of ``_gather4``: 4 codes in the low ``4 * bits`` bits -> one per byte."""
    w = (w | (w << (16 - 2 * bits))) & jnp.uint32((2 ** (2 * bits) - 1) * 0x00010001)
    return (w | (w << (8 - bits))) & jnp.uint32((2**bits - 1) * 0x01010101)


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs integer codes in [0, 2**bits) along the last axis into uint8 bytes, code
    ``j`` of a byte in bits ``j * bits ..`` (3-bit: eight codes in three bytes, one
    24-bit little-endian word).

    The last axis length times ``bits`` must be a multiple of 8 (3-bit: of 24).
    """
    _check_bits(bits, PACKABLE_BITS)
    codes = codes.astype(jnp.uint8)
    if bits == 8:
        return codes
    n = codes.shape[-1]
    group = 8 if bits == 3 else 8 // bits  # codes per packing group
    if n % group:
        raise ValueError(f"last axis {n} is not a multiple of {group} for {bits}-bit packing")
    if bits == 4:
        pairs = codes.reshape(*codes.shape[:-1], n // 2, 2).astype(jnp.uint32)
        word = jnp.sum(pairs << jnp.array([0, 4], jnp.uint32), axis=-1, dtype=jnp.uint32)
        return word.astype(jnp.uint8)
    w = _gather4(_words(codes), bits)
    if bits == 2:
        return w.astype(jnp.uint8)
    w = w.reshape(*w.shape[:-1], -1, 2)  # 1 and 3 bits: eight codes from two words
    word = w[..., 0] | (w[..., 1] << (4 * bits))
    if bits == 1:
        return word.astype(jnp.uint8)
    word = jnp.stack([(word >> (8 * k)) & 0xFF for k in range(3)], axis=-1)
    return word.astype(jnp.uint8).reshape(*codes.shape[:-1], -1)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of ``pack``: uint8 bytes -> uint8 codes, ``8 / bits`` times longer."""
    _check_bits(bits, PACKABLE_BITS)
    if bits == 8:
        return packed
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    if bits == 4:
        codes = (packed.astype(jnp.uint32)[..., None] >> jnp.array([0, 4], jnp.uint32)) & 0xF
        return codes.astype(jnp.uint8).reshape(*lead, -1)
    if bits == 2:
        return _bytes(_spread4(packed.astype(jnp.uint32), 2))
    if bits == 3:
        b = packed.reshape(*lead, nbytes // 3, 3).astype(jnp.uint32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    else:
        word = packed.astype(jnp.uint32)
    halves = jnp.stack([word & (2 ** (4 * bits) - 1), word >> (4 * bits)], axis=-1)
    return _bytes(_spread4(halves, bits)).reshape(*lead, -1)


# ------------------------------------------------------------------------------------
# Codec
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Codec:
    """Static description of a block-wise quantizer (hashable: usable as jit static).

    Attributes:
      bits: code width (1, 2, 3, 4 or 8).
      levels: sorted level table (tuple of floats, at most ``2**bits`` entries), or
        ``None`` for SOLO's logarithmic unsigned quantizer.
      block_size: values per block along the last axis (a multiple of 8).
      rounding: ``nearest``, ``stochastic`` (unbiased, linear distance between the two
        neighbouring levels) or ``stochastic_log`` (log codec only: in the exponent).
      scale_dtype: dtype name of the per-block scales (``float32`` or ``bfloat16``).
      quantile: log codec only, the block quantile that sets the smallest level.
      quantile_sample: log codec only; 0 computes the quantile over the whole block
        (exact, a sort per block), ``k`` over every ``block_size // k``-th value (an
        estimate, ~16x cheaper at k = 16 on a 128 block).
    """

    bits: int
    levels: tuple[float, ...] | None = None
    block_size: int = 128
    rounding: Rounding = "nearest"
    scale_dtype: str = "float32"
    quantile: float = 0.1
    quantile_sample: int = 0

    def __post_init__(self) -> None:
        _check_bits(self.bits, PACKABLE_BITS)
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 8:
            raise ValueError(
                f"block_size must be a positive multiple of 8, got {self.block_size!r}"
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.levels is None:
            if not 0.0 < self.quantile < 1.0:
                raise ValueError(f"quantile must be in (0, 1), got {self.quantile!r}")
            s = self.quantile_sample
            if not isinstance(s, int) or s < 0 or (s and (s < 2 or self.block_size % s)):
                raise ValueError(
                    f"quantile_sample must be 0 (whole block) or a divisor >= 2 of "
                    f"block_size {self.block_size}, got {s!r}"
                )
        else:
            lv = np.asarray(self.levels, np.float64)
            if lv.ndim != 1 or not 2 <= len(lv) <= 2**self.bits:
                raise ValueError(
                    f"a {self.bits}-bit codec needs 2..{2**self.bits} levels, got {len(lv)}"
                )
            if np.any(np.diff(lv) <= 0) or lv[0] < -1 or lv[-1] > 1:
                raise ValueError("levels must be strictly increasing within [-1, 1]")
            if self.rounding == "stochastic_log":
                raise ValueError(
                    "rounding='stochastic_log' rounds in the exponent and needs the "
                    "logarithmic codec (levels=None); use 'stochastic' for a level table"
                )
        if self.scale_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"scale_dtype must be 'float32' or 'bfloat16', got {self.scale_dtype!r}"
            )

    @property
    def is_log(self) -> bool:
        return self.levels is None

    @property
    def signed(self) -> bool:
        return self.levels is not None and self.levels[0] < 0

    def num_blocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def abstract(self, shape: tuple[int, ...]) -> QuantizedArray:
        """Shapes and dtypes of ``quantize`` of an array of ``shape``, without values."""
        shape = tuple(shape)
        if not shape:
            raise ValueError("cannot quantize a scalar block-wise; keep it in float32")
        nb = self.num_blocks(shape[-1])
        lead = shape[:-1]
        scale = jax.ShapeDtypeStruct((*lead, nb), jnp.dtype(self.scale_dtype))
        return QuantizedArray(
            codes=jax.ShapeDtypeStruct((*lead, nb * self.block_size * self.bits // 8), jnp.uint8),
            scales=scale,
            bases=scale if self.is_log else None,
            codec=self,
            shape=shape,
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "bases"],
    meta_fields=["codec", "shape"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A block-wise quantized array: packed codes, per-block scales (and log bases).

    A pytree whose leaves are ``codes`` (uint8, packed), ``scales`` and, for the log
    codec, ``bases``; ``codec`` and the original ``shape`` are static.
    """

    codes: jax.Array
    scales: jax.Array
    bases: jax.Array | None
    codec: Codec
    shape: tuple[int, ...]


def to_blocks(x: jax.Array, block: int) -> jax.Array:
    """(..., n) -> (..., ceil(n / block), block), padding the tail by repeating the last
    value (keeps the block's absmax and, nearly, its quantile)."""
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], mode="edge")
    return x.reshape(*x.shape[:-1], (n + pad) // block, block)


def from_blocks(xb: jax.Array, n: int) -> jax.Array:
    """Inverse of ``to_blocks`` for a last axis of length ``n``."""
    return xb.reshape(*xb.shape[:-2], -1)[..., :n]


# Nearest-level search without a search. Sorted float32 thresholds t (the table's
# midpoints for nearest rounding, its levels for the index below) cut the float line;
# ``#{t < y}`` is the code. The float32 bit pattern of y maps to an unsigned key that is
# monotone in y (negatives flipped), so ``t < y`` is ``key(t) < key(y)``, exactly as IEEE
# compares them (also for denormals, which XLA CPU flushes to zero in float arithmetic;
# NaN sorts above +inf). The keys are cut into 2**K buckets by their top K bits, with K
# the smallest width (at least 9) that puts at most one threshold in a bucket (K <= 16
# for every map of this module: 15 for the signed 8-bit dynamic tree, 16 unsigned). One
# uint32 per bucket packs the count of thresholds below the bucket (top bits) and the
# low bits of the one threshold inside it (all ones if none), so the count is one gather,
# one shift and one integer comparison: exactly what a binary search gives.


def _sortable_keys(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``_sortable_key``: uint32 keys, monotone in the float32 value."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    return np.where(bits >= np.uint32(2**31), ~bits, bits | np.uint32(2**31)).astype(np.uint32)


def _sortable_key(y: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(y.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >= jnp.uint32(2**31), ~bits, bits | jnp.uint32(2**31))


_NEG_ZERO_KEY, _POS_ZERO_KEY = 2**31 - 1, 2**31


@functools.cache
def _key_lut(thresholds: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """``(shift, entries)`` counting the sorted uint32 ``thresholds`` below a key ``k`` as
    ``(e >> shift) + ((e & mask) < (k & mask))`` with ``e = entries[k >> shift]``."""
    t = np.asarray(thresholds, np.uint64)
    for width in range(9, 25):  # >= 9 bits: the count (up to 256) fits above the low bits
        shift = 32 - width
        if len(np.unique(t >> shift)) == len(t):
            break
    else:  # pragma: no cover - only for tables with two equal thresholds
        raise ValueError("thresholds must be distinct")
    mask = (1 << shift) - 1
    lowest = np.arange(2**width, dtype=np.uint64) << np.uint64(shift)
    base = np.searchsorted(t, lowest, side="left").astype(np.uint64)
    low = np.full(2**width, mask, np.uint64)
    low[(t >> shift).astype(np.int64)] = t & mask
    return shift, ((base << np.uint64(shift)) | low).astype(np.uint32)


def _count_below(y: jax.Array, thresholds: tuple[float, ...], strict: bool) -> jax.Array:
    """``#{t < y}`` (``#{t <= y}`` if not ``strict``) for each float32 ``y``, by table
    (int32)."""
    keys = _sortable_keys(np.asarray(thresholds, np.float32)).astype(np.int64)
    k = _sortable_key(y)
    if not strict:  # t <= y is key(t) - 1 < key(y), with -0.0 counted as +0.0
        keys = np.where(keys == _NEG_ZERO_KEY, _POS_ZERO_KEY, keys) - 1
        k = jnp.where(k == _NEG_ZERO_KEY, jnp.uint32(_POS_ZERO_KEY), k)
    shift, entries = _key_lut(tuple(int(v) for v in keys))
    e = jnp.asarray(entries)[(k >> shift).astype(jnp.int32)]
    mask = jnp.uint32((1 << shift) - 1)
    return (e >> shift).astype(jnp.int32) + ((e & mask) < (k & mask)).astype(jnp.int32)


def _midpoints(levels: tuple[float, ...]) -> tuple[float, ...]:
    lv = np.asarray(levels, np.float32)
    return tuple(float(m) for m in (lv[1:] + lv[:-1]) / np.float32(2.0))


@functools.cache
def _dyadic(levels: tuple[float, ...]) -> tuple[int, float] | None:
    """``(o, step)`` if the table is ``(i + o) * step`` with an integer ``o >= 0`` and a
    power-of-two ``step`` (the unsigned zero-free linear maps, ``(k + 1) / 2**bits``),
    else ``None``. Such tables encode by arithmetic; they still decode by table lookup,
    which ran faster than ``(code + o) * step`` in the fused update on XLA CPU."""
    lv = np.asarray(levels, np.float64)
    step = lv[1] - lv[0]
    if lv[0] < 0 or step <= 0 or np.frexp(step)[0] != 0.5:
        return None
    o = lv[0] / step
    if o != round(o) or not np.array_equal(lv, (np.arange(len(lv)) + o) * step):
        return None
    return round(o), float(step)


def _nearest_table(y: jax.Array, levels: tuple[float, ...]) -> jax.Array:
    """Index of the nearest level: the number of float32 midpoints below ``y`` (a value
    on a midpoint takes the lower level).

    A dyadic table (``_dyadic``) takes arithmetic: its midpoints are ``(2 i + 2 o + 1)
    step / 2``, so with ``Y = y * 2 / step`` (exact, a power of two) the count is
    ``ceil((Y - 2 o - 1) / 2)`` clipped to the table. ``Y - (2 o + 1)`` is exact wherever
    the ceiling can change (both are multiples of ``Y``'s ulp and the difference is no
    larger than ``Y``; for ``Y`` below ``2 o + 1`` the clipped result is 0 either way),
    so the codes are those of the comparison with the float32 midpoints."""
    grid = _dyadic(levels)
    if grid is None:
        return _count_below(y, _midpoints(levels), strict=True)
    o, step = grid
    z = y.astype(jnp.float32) * (2.0 / step) - (2 * o + 1)
    return jnp.clip(jnp.ceil(z * 0.5), 0, len(levels) - 1).astype(jnp.int32)


def _stochastic_table(y: jax.Array, levels: tuple[float, ...], u: jax.Array) -> jax.Array:
    """Index below y (clipped to the table) plus a Bernoulli step up: unbiased inside."""
    lv = jnp.asarray(levels, jnp.float32)
    below = _count_below(y, levels, strict=False).astype(jnp.int32) - 1
    lo = jnp.clip(below, 0, len(levels) - 2)
    l0, l1 = lv[lo], lv[lo + 1]
    p = jnp.clip((y - l0) / (l1 - l0), 0.0, 1.0)
    return lo + (u < p).astype(lo.dtype)


def round_to_table(
    y: jax.Array, levels: Any, rounding: Rounding = "nearest", u: jax.Array | None = None
) -> jax.Array:
    """Indices of ``levels`` for already-normalised values ``y`` (no block scale).

    ``nearest``: the closest level; ``stochastic``: one of the two neighbouring levels
    with probability proportional to linear distance (unbiased inside the table), using
    U[0, 1) noise ``u``. Used with a fixed scale, e.g. to study signal swamping.
    """
    levels = tuple(float(v) for v in np.asarray(levels, np.float32))
    if rounding == "nearest":
        return _nearest_table(y, levels)
    if rounding != "stochastic" or u is None:
        raise ValueError(
            f"round_to_table takes rounding 'nearest', or 'stochastic' with noise u; "
            f"got {rounding!r} (u given: {u is not None})"
        )
    return _stochastic_table(y, levels, u)


def _kth_smallest(x: jax.Array, k: int) -> jax.Array:
    """``jnp.sort(x, axis=-1)[..., k : k + 1]`` without a sort, for short last axes and
    small ``k``: the distinct values are visited in increasing order (``k + 1`` minima),
    each with the count of values at or below it; the first whose count exceeds ``k`` is
    the ``k``-th smallest. (On the blocks of an update this took 1/15 of a sort of 16 and
    half of a pairwise comparison of all 16 x 16.)"""
    inf = jnp.asarray(jnp.inf, x.dtype)
    value = jnp.min(x, axis=-1, keepdims=True)
    count = jnp.sum(x <= value, axis=-1, keepdims=True)
    result = value
    for _ in range(k):
        nxt = jnp.min(jnp.where(x > value, x, inf), axis=-1, keepdims=True)
        result = jnp.where(count > k, result, nxt)
        value = jnp.where(count > k, value, nxt)
        count = jnp.sum(x <= value, axis=-1, keepdims=True)
    return result


def _block_quantile(xb: jax.Array, q: float, sample: int) -> jax.Array:
    """Lower empirical quantile of each block, keepdims: exact (sort of the whole block)
    when ``sample`` is 0, else of an evenly strided subsample of ``sample`` values by
    ``_kth_smallest`` (measured on XLA CPU: sorting blocks of 128 took 550 ms per 4M
    values, of 16 34 ms)."""
    if sample:
        xb = xb[..., :: xb.shape[-1] // sample]
    k = math.floor(q * (xb.shape[-1] - 1))
    if sample:
        return _kth_smallest(xb, k)
    return jnp.sort(xb, axis=-1)[..., k : k + 1]


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer mixer (xor-shift-multiply, the "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0xD35A2D97)
    return x ^ (x >> 15)


def hash_uniform(
    key: jax.Array, shape: tuple[int, ...], rows: jax.Array | None = None
) -> jax.Array:
    """U[0, 1) float32 noise of ``shape`` from a PRNG key, by hashing each element's
    position with the key (counter-based, like threefry, but two 32-bit mixing rounds
    that XLA fuses into the code that uses the noise; a third made SOLO's update 1.6x as
    long). 24 random bits per value; tested for uniformity and for correlation along
    both axes and across keys.

    **Decision:** stochastic rounding needs one uniform per stored value per step, and
    ``jax.random.uniform`` (threefry, a loop of rounds per pair of values) cost several
    times ``optax.adamw``'s whole update of the same values on XLA CPU. Each value
    is a function of the key and its position only (its index along the first axis,
    ``rows[i]`` when ``rows`` gives the indices of a slice of a larger array, and its
    flat index over the other axes), so a slice, a shard or the whole array give the
    same noise at the same position.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = key.reshape(-1).astype(jnp.uint32)
    w0, w1 = words[0], words[-1]
    shape = tuple(shape)
    if not shape:
        shape, squeeze = (1,), True
    else:
        squeeze = False
    row = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    if rows is not None:
        row = jnp.broadcast_to(rows.astype(jnp.uint32).reshape(-1, *[1] * (len(shape) - 1)), shape)
    col = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, 0, -1):
        col = col + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    h = _mix32(col * jnp.uint32(0x9E3779B9) + w0)
    h = _mix32(h ^ (row * jnp.uint32(0x85EBCA6B) + w1))
    u = (h >> 8).astype(jnp.float32) * (1.0 / 2**24)
    return u[0] if squeeze else u


def uniform_noise(
    codec: Codec,
    key: jax.Array | None,
    shape: tuple[int, ...],
    rows: jax.Array | None = None,
) -> jax.Array | None:
    """U[0, 1) noise for stochastic rounding (``None`` for nearest rounding); see
    ``hash_uniform`` (``rows``: the first-axis indices of a slice)."""
    if codec.rounding == "nearest":
        return None
    if key is None:
        raise ValueError(f"rounding={codec.rounding!r} needs a PRNG key; pass key=...")
    return hash_uniform(key, shape, rows)


def _int_power(base: jax.Array, k: jax.Array, bits: int) -> jax.Array:
    """``base ** k`` for integer ``k`` in ``[0, 2**bits)`` by repeated squaring (``bits``
    multiplications and selects; a float ``pow`` is an exp and a log per value)."""
    k = k.astype(jnp.int32)
    out, power = jnp.ones_like(base * k), base
    for j in range(bits):
        out = jnp.where((k >> j) & 1 == 1, out * power, out)
        power = power * power
    return out


def encode_blocks(
    xb: jax.Array, codec: Codec, u: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Codes (unpacked uint8), scale and base of float32 blocks ``(..., nb, B)``.

    The scale (and base) come back keepdims ``(..., nb, 1)`` as float32 values already
    rounded to ``codec.scale_dtype``, so ``decode_blocks`` inverts exactly what was used.
    ``u`` is U[0, 1) noise of ``xb``'s shape for stochastic rounding.
    """
    sdt = jnp.dtype(codec.scale_dtype)
    as_stored = lambda a: a.astype(sdt).astype(jnp.float32)
    if codec.is_log:
        top = 2**codec.bits - 1
        xpos = jnp.maximum(xb, 0.0)
        d = as_stored(jnp.maximum(jnp.max(xpos, axis=-1, keepdims=True), _TINY))
        xq = _block_quantile(xpos, codec.quantile, codec.quantile_sample)
        ratio = jnp.clip(xq / d, _TINY, 1.0)
        base = as_stored(ratio ** (1.0 / top))
        log_a = jnp.log(base)
        # Exponent of x in base a; a == 1 (a constant block) maps every value to level 0.
        safe_log_a = jnp.where(log_a < 0, log_a, -1.0)
        e = jnp.where(log_a < 0, jnp.log(xpos / d) / safe_log_a, 0.0)
        e = jnp.nan_to_num(e, nan=float(top), posinf=float(top), neginf=0.0)
        if codec.rounding == "nearest":
            k = jnp.round(e)
        elif codec.rounding == "stochastic_log":
            k = jnp.floor(e + u)  # == round(e + u') with u' ~ U[-0.5, 0.5)
        else:  # unbiased: between the neighbouring levels, by linear distance
            k0 = jnp.clip(jnp.floor(e), 0, top - 1)
            upper = _int_power(base, k0, codec.bits)  # level k0 lies above level k0 + 1
            lower = upper * base
            p_lower = jnp.clip((upper - xpos / d) / (upper - lower), 0.0, 1.0)
            k = k0 + (u < p_lower)
        return jnp.clip(k, 0, top).astype(jnp.uint8), d, base
    scale = as_stored(jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), _TINY))
    y = xb / scale
    return round_to_table(y, codec.levels, codec.rounding, u).astype(jnp.uint8), scale, None


def decode_blocks(
    codes: jax.Array, scale: jax.Array | float, base: jax.Array | None, codec: Codec
) -> jax.Array:
    """Float32 blocks from unpacked codes and keepdims scale (and base)."""
    if codec.is_log:
        return scale * _int_power(base, codes, codec.bits)
    return jnp.asarray(codec.levels, jnp.float32)[codes] * scale


def quantize(x: jax.Array, codec: Codec, key: jax.Array | None = None) -> QuantizedArray:
    """Block-wise quantization of ``x`` along its last axis.

    Args:
      x: array of rank >= 1 (computed in float32). The log codec expects x >= 0.
      codec: the quantizer.
      key: PRNG key (typed or raw ``uint32`` key data), required for stochastic rounding.

    Returns:
      A ``QuantizedArray``; ``dequantize`` gives back an array of ``x.shape``.
    """
    if x.ndim == 0:
        raise ValueError("cannot quantize a scalar block-wise; keep it in float32")
    xb = to_blocks(x.astype(jnp.float32), codec.block_size)
    u = uniform_noise(codec, key, xb.shape)
    codes, scale, base = encode_blocks(xb, codec, u)
    sdt = jnp.dtype(codec.scale_dtype)
    return QuantizedArray(
        codes=pack(codes, codec.bits).reshape(*x.shape[:-1], -1),
        scales=scale[..., 0].astype(sdt),
        bases=None if base is None else base[..., 0].astype(sdt),
        codec=codec,
        shape=tuple(x.shape),
    )


def dequantize(q: QuantizedArray) -> jax.Array:
    """Float32 array of ``q.shape`` from a ``QuantizedArray``."""
    codec = q.codec
    lead, n = q.shape[:-1], q.shape[-1]
    codes = unpack(q.codes.reshape(*lead, codec.num_blocks(n), -1), codec.bits)
    base = None if q.bases is None else q.bases.astype(jnp.float32)[..., None]
    values = decode_blocks(codes, q.scales.astype(jnp.float32)[..., None], base, codec)
    return from_blocks(values, n)


def make_codec(
    bits: int,
    kind: str | Codec | np.ndarray,
    *,
    signed: bool,
    block_size: int = 128,
    rounding: str = "nearest",
    scale_dtype: str = "float32",
    quantile_sample: int = 0,
) -> Codec:
    """A codec from a map name (``dynamic``, ``linear``, ``linear_zero_free``, ``log``),
    a level table, or a ready ``Codec`` (returned as is).

    ``dynamic`` is bitsandbytes' dynamic tree at 8 bits and the dynamic-exponent map
    below; ``linear_zero_free`` is the 4-bit paper's unsigned map without a zero level;
    ``log`` is SOLO's logarithmic unsigned quantizer (second moment only).
    """
    if isinstance(kind, Codec):
        return kind
    if isinstance(kind, str):
        if kind not in MAPS:
            raise ValueError(f"unknown map {kind!r}; use one of {MAPS}, a level array or a Codec")
        if kind == "log":
            if signed:
                raise ValueError(
                    "the logarithmic map is unsigned (second moment only); "
                    "use 'dynamic' or 'linear' for the first moment"
                )
            return Codec(
                bits, None, block_size, rounding, scale_dtype, quantile_sample=quantile_sample
            )
        if kind == "dynamic":
            levels = dynamic_exponent_levels(bits, signed)
        elif kind == "linear":
            levels = linear_levels(bits, signed, zero=True)
        else:
            if signed:
                raise ValueError("'linear_zero_free' is an unsigned (second-moment) map")
            levels = linear_levels(bits, signed=False, zero=False)
    else:
        levels = np.asarray(kind, np.float32)
    return Codec(bits, tuple(float(v) for v in levels), block_size, rounding, scale_dtype)
