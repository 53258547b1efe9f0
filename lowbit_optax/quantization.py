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
pattern plus one integer comparison (see ``_codes``; arithmetic for the dyadic
zero-free linear tables): exactly what a binary search over the midpoints gives, for
every float32. SOLO's sampled block quantile is a selection (``_kth_smallest``), its
levels are decoded by repeated squaring, and stochastic rounding draws its noise from a
positional hash of the key (``hash_uniform``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_optax._codes import (
    PACKABLE_BITS,
    Rounding,
    block_quantile,
    check_bits,
    hash_uniform,
    int_power,
    pack,
    round_to_table,
    unpack,
)

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
ROUNDINGS = ("nearest", "stochastic", "stochastic_log")
_TINY = float(np.finfo(np.float32).tiny)


# ------------------------------------------------------------------------------------
# Level tables
# ------------------------------------------------------------------------------------


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

    Example:
      >>> linear_levels(2, signed=True)
      array([-1.,  0.,  1.], dtype=float32)
      >>> linear_levels(2, signed=False, zero=False)  # (k + 1) / 4
      array([0.25, 0.5 , 0.75, 1.  ], dtype=float32)
    """
    check_bits(bits)
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

    Returns:
      Sorted float32 array of 256 levels in [-1, 1] (signed) or [0, 1] (unsigned).

    Example:
      >>> levels = dynamic_tree_levels(8, signed=True)
      >>> levels.shape, levels.dtype, float(levels[-1])
      ((256,), dtype('float32'), 1.0)
      >>> bool(levels.min() > -1.0) and 0.0 in levels
      True
    """
    if bits != 8:
        raise ValueError(
            f"the dynamic tree map is 8-bit, got bits={bits!r}; use "
            "dynamic_exponent_levels(bits, signed) for 2..7 bits"
        )
    return _dynamic_map(signed, exponent_bits=7, total_bits=8)


def dynamic_exponent_levels(bits: int, signed: bool = True) -> np.ndarray:
    """Dynamic-exponent map at ``bits`` (2..8).

    The dynamic construction with ``bits - 1`` exponent levels. 4-bit signed: 0,
    ±0.0055, ±0.0325, ±0.0775, ±0.2125, ±0.4375, ±0.6625, ±0.8875, 1; 3-bit: 0, ±0.055,
    ±0.325, ±0.775, 1; 2-bit: 0, ±0.55, 1. At 8 bits it equals ``dynamic_tree_levels``.

    Args:
      bits: code width, 2..8; the table has ``2**bits`` levels.
      signed: levels in [-1, 1] (first moments) or [0, 1] (second moments).

    Returns:
      Sorted float32 array of ``2**bits`` levels.

    Example:
      >>> dynamic_exponent_levels(2).round(2)
      array([-0.55,  0.  ,  0.55,  1.  ], dtype=float32)
      >>> dynamic_exponent_levels(4, signed=False).size
      16
      >>> bool((dynamic_exponent_levels(8) == dynamic_tree_levels(8)).all())
      True
    """
    check_bits(bits, range(2, 9))
    return _dynamic_map(signed, exponent_bits=bits - 1, total_bits=bits)


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
        estimate without a sort).

    Example:
      A 4-bit codec on the symmetric linear table, blocks of 64 values:

      >>> codec = Codec(bits=4, levels=tuple(linear_levels(4, signed=True).tolist()),
      ...               block_size=64)
      >>> q = codec.abstract((2, 100))  # shapes only: two blocks per row
      >>> q.codes.shape, q.scales.shape  # 128 codes of 4 bits = 64 bytes per row
      ((2, 64), (2, 2))

      SOLO's logarithmic unsigned codec (``levels=None``) also stores a base per block:

      >>> Codec(bits=2).abstract((256,)).bases.shape
      (2,)
    """

    bits: int
    levels: tuple[float, ...] | None = None
    block_size: int = 128
    rounding: Rounding = "nearest"
    scale_dtype: str = "float32"
    quantile: float = 0.1
    quantile_sample: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits, PACKABLE_BITS)
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
    meta_fields=["codec", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A block-wise quantized array: packed codes, per-block scales (and log bases).

    A pytree whose leaves are ``codes`` (uint8, packed), ``scales`` and, for the log
    codec, ``bases``; ``codec``, the original ``shape`` and the dtype ``dequantize``
    returns (a name, ``float32`` unless set) are static.

    Attributes:
      codes: ``uint8`` codes packed along the last axis, ``(..., nb * block_size *
        bits / 8)`` for ``nb = ceil(shape[-1] / block_size)`` blocks.
      scales: per-block absmax scales (log codec: the block max), ``(..., nb)`` in the
        codec's ``scale_dtype``.
      bases: log codec only, the per-block base ``a`` of the levels ``D * a**k``,
        ``(..., nb)``; ``None`` for table codecs.
      codec: the ``Codec`` that produced it (static).
      shape: the shape of the original array (static).
      dtype: dtype name ``dequantize`` returns (static; ``float32`` by default).

    Example:
      >>> codec = Codec(bits=4, levels=tuple(linear_levels(4, signed=True).tolist()),
      ...               block_size=64)
      >>> q = quantize(jnp.linspace(-1.0, 1.0, 200).reshape(2, 100), codec)
      >>> q.shape, q.codes.shape, q.scales.shape  # 2 blocks of 64 4-bit codes per row
      ((2, 100), (2, 64), (2, 2))
      >>> [leaf.shape for leaf in jax.tree_util.tree_leaves(q)]  # a pytree: no bases
      [(2, 64), (2, 2)]
    """

    codes: jax.Array
    scales: jax.Array
    bases: jax.Array | None
    codec: Codec
    shape: tuple[int, ...]
    dtype: str = "float32"


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
        xq = block_quantile(xpos, codec.quantile, codec.quantile_sample)
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
            upper = int_power(base, k0, codec.bits)  # level k0 lies above level k0 + 1
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
        return scale * int_power(base, codes, codec.bits)
    return jnp.asarray(codec.levels, jnp.float32)[codes] * scale


class Encoded(NamedTuple):
    """``encode``'s result: packed codes laid out like the leaf (``(..., packed)``) and
    the float32 per-block scale (and log base) keepdims ``(..., nb, 1)``, already
    rounded to ``codec.scale_dtype`` (``stored`` casts them for the state)."""

    codes: jax.Array
    scales: jax.Array
    bases: jax.Array | None

    def stored(self, codec: Codec) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """``(codes, scales, bases)`` as a state stores them: ``(..., nb)`` in the
        codec's scale dtype."""
        sdt = jnp.dtype(codec.scale_dtype)
        cast = lambda a: None if a is None else a[..., 0].astype(sdt)
        return self.codes, cast(self.scales), cast(self.bases)


def encode(xb: jax.Array, codec: Codec, noise: jax.Array | None = None) -> Encoded:
    """Quantizes float32 blocks ``(..., nb, B)`` (``to_blocks``) for storage: the one
    route every technique stores a quantized tensor by. ``noise``: U[0, 1) of ``xb``'s
    shape for stochastic rounding (``uniform_noise``)."""
    codes, scale, base = encode_blocks(xb, codec, noise)
    return Encoded(pack(codes, codec.bits).reshape(*xb.shape[:-2], -1), scale, base)


def decode(
    codes: jax.Array, scales: jax.Array | float, bases: jax.Array | None, codec: Codec
) -> jax.Array:
    """Float32 blocks ``(..., nb, B)`` from stored packed codes ``(..., packed)`` and
    stored per-block scales ``(..., nb)`` (and log bases) in any dtype; a float
    ``scales`` (1.0) decodes the values relative to their block's scale."""
    nb = codes.shape[-1] * 8 // (codec.bits * codec.block_size)
    unpacked = unpack(codes.reshape(*codes.shape[:-1], nb, -1), codec.bits)
    if not isinstance(scales, float):
        scales = scales.astype(jnp.float32)[..., None]
    base = None if bases is None else bases.astype(jnp.float32)[..., None]
    return decode_blocks(unpacked, scales, base, codec)


def quantize(x: jax.Array, codec: Codec, key: jax.Array | None = None) -> QuantizedArray:
    """Block-wise quantization of ``x`` along its last axis.

    Args:
      x: array of rank >= 1 (computed in float32). The log codec expects x >= 0.
      codec: the quantizer.
      key: PRNG key (typed or raw ``uint32`` key data), required for stochastic rounding.

    Returns:
      A ``QuantizedArray``; ``dequantize`` gives back an array of ``x.shape``.

    Example:
      >>> codec = Codec(bits=4, levels=tuple(linear_levels(4, signed=True).tolist()),
      ...               block_size=64)
      >>> x = jnp.linspace(-1.0, 1.0, 200).reshape(2, 100)
      >>> q = quantize(x, codec)
      >>> q.codes.shape, q.codes.dtype, q.scales.shape  # 2 blocks of 32 bytes per row
      ((2, 64), dtype('uint8'), (2, 2))
      >>> float(jnp.abs(dequantize(q) - x).max()) <= 1 / 14  # half a level step
      True

      Stochastic rounding needs a key:

      >>> sr = Codec(bits=4, levels=codec.levels, block_size=64, rounding="stochastic")
      >>> quantize(x, sr, key=jax.random.key(0)).codes.shape
      (2, 64)
    """
    if x.ndim == 0:
        raise ValueError("cannot quantize a scalar block-wise; keep it in float32")
    xb = to_blocks(x.astype(jnp.float32), codec.block_size)
    stored = encode(xb, codec, uniform_noise(codec, key, xb.shape)).stored(codec)
    return QuantizedArray(*stored, codec=codec, shape=tuple(x.shape))


def dequantize(q: QuantizedArray) -> jax.Array:
    """The array of ``q.shape`` (in ``q.dtype``) from a ``QuantizedArray``.

    Args:
      q: the result of ``quantize`` (or a ``QuantizedArray`` read from a state).

    Returns:
      The decoded array: each value is its level times its block's scale (log codec:
      ``D * a**k``); the padding of the last block is dropped.

    Example:
      >>> codec = Codec(bits=4, levels=tuple(linear_levels(4, signed=True).tolist()),
      ...               block_size=64)
      >>> x = jnp.linspace(-1.0, 1.0, 200).reshape(2, 100)
      >>> y = dequantize(quantize(x, codec))
      >>> y.shape, y.dtype
      ((2, 100), dtype('float32'))
      >>> y[0, :3].tolist()  # block scale 1.0, levels k / 7: -0.99 and -0.98 round to -1
      [-1.0, -1.0, -1.0]
      >>> len(np.unique(np.asarray(y[0, :64]))) <= 15  # at most 2**4 - 1 levels a block
      True
    """
    x = from_blocks(decode(q.codes, q.scales, q.bases, q.codec), q.shape[-1])
    return x if q.dtype == "float32" else x.astype(q.dtype)


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
