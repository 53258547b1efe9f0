"""Codes: the integer side of the block-wise codecs (internal).

Bit packing of codes along the last axis, the exact nearest (and stochastic) level of a
sorted level table without a search, the block quantile of SOLO's logarithmic map, the
positional noise of stochastic rounding, and integer powers. ``quantization`` builds the
codecs from these and re-exports the public ones (``pack``, ``unpack``,
``round_to_table``, ``hash_uniform``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PACKABLE_BITS = (1, 2, 3, 4, 8)
Rounding = Literal["nearest", "stochastic", "stochastic_log"]


def check_bits(bits: int, allowed=range(1, 9)) -> None:
    if not isinstance(bits, (int, np.integer)) or bits not in allowed:
        raise ValueError(
            f"bits must be an int in {list(allowed)}, got {bits!r}; pass e.g. bits=8, 4, 3 or 2"
        )


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
    check_bits(bits, PACKABLE_BITS)
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
    check_bits(bits, PACKABLE_BITS)
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


def block_quantile(xb: jax.Array, q: float, sample: int) -> jax.Array:
    """Lower empirical quantile of each block, keepdims: exact (sort of the whole block)
    when ``sample`` is 0, else of an evenly strided subsample of ``sample`` values by
    ``_kth_smallest`` (no sort: a sort of every block dominated SOLO's update on XLA
    CPU)."""
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
    key: jax.Array,
    shape: tuple[int, ...],
    rows: jax.Array | None = None,
    *,
    bits_only: bool = False,
) -> jax.Array:
    """U[0, 1) float32 noise of ``shape`` from a PRNG key, by hashing each element's
    position with the key (counter-based, like threefry, but two 32-bit mixing rounds
    that XLA fuses into the code that uses the noise; a third made SOLO's update
    markedly longer). 24 random bits per value; tested for uniformity and for correlation along
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
    if bits_only:
        return h[0] if squeeze else h
    u = (h >> 8).astype(jnp.float32) * (1.0 / 2**24)
    return u[0] if squeeze else u


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The uint32 hash words behind ``hash_uniform(key, shape)`` (32 random bits per
    position)."""
    return hash_uniform(key, shape, bits_only=True)


def int_power(base: jax.Array, k: jax.Array, bits: int) -> jax.Array:
    """``base ** k`` for integer ``k`` in ``[0, 2**bits)`` by repeated squaring (``bits``
    multiplications and selects; a float ``pow`` is an exp and a log per value)."""
    k = k.astype(jnp.int32)
    out, power = jnp.ones_like(base * k), base
    for j in range(bits):
        out = jnp.where((k >> j) & 1 == 1, out * power, out)
        power = power * power
    return out
