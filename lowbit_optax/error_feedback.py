"""Compressors and the error-feedback transform.

A compressor is a frozen, hashable value with one interface (``Compressor``):
``compress(x, state, key) -> (payload, state)`` turns an array into a fixed-shape
representation (its shapes depend only on ``x.shape`` and the compressor's settings) and
``decompress(payload, shape)`` rebuilds the dense float32 array. Compressors with a
per-array memory (PowerSGD's warm start) keep it in ``state`` (``init(shape)``).

* ``top_k(density, block_size=None)``: the ``k = round(density * n)`` entries of largest
  magnitude, globally or ``round(density * block_size)`` per block; payload ``Sparse``
  (float32 values and int32 indices into the flattened array).
* ``random_k(density)``: ``k`` distinct random entries (one uniform pick in each of ``k``
  equal strata, so every entry is kept with probability ``k / n``), unscaled (the
  contractive form error feedback needs; the ``n / k``-scaled form is unbiased but not
  contractive). Payload ``Sparse``.
* ``low_rank(rank)``: PowerSGD (Vogels et al. 2019) on 2-D arrays (rank > 2 viewed as
  ``(prod(shape[:-1]), shape[-1])``): ``P = orth(M Q)``, ``Q = M^T P``, payload
  ``(P, Q)``, ``M ~ P Q^T``; ``Q`` is kept as the next step's warm start, stored
  transposed (``Q^T``, ``(r, n)``: its last axis is the array's, so it is sharded like
  the array's last axis). Arrays with ``min(m, n) <= rank`` (and 1-D ones) are sent dense.
* ``quantizer(bits, kind="linear", block_size=128)``: block-wise quantization with the
  library's codecs (``lowbit_optax.quantization``). ``bits=1`` is the scaled sign
  ``mean(|x|) * sign(x)`` per block (Karimireddy et al. 2019): the codec's two-level
  table ``{-1, +1}`` with the block's mean magnitude in place of its absmax, which makes
  it contractive (an absmax-scaled sign is not).

``error_feedback(compressor)`` keeps the accumulator ``xi`` per leaf and emits
``c = C(xi + g)``, ``xi <- xi + g - c`` (Seide et al. 2014; Karimireddy et al. 2019;
Modoranu et al. 2023 for preconditioners). Chain it before any optax transform:
``optax.chain(error_feedback(top_k(0.01)), optax.sgd(lr))`` is error-feedback top-k SGD.

References:
  Seide et al., 1-Bit Stochastic Gradient Descent and its Application to Data-Parallel
  Distributed Training of Speech DNNs, Interspeech 2014.
  Karimireddy et al., Error Feedback Fixes SignSGD and other Gradient Compression
  Schemes, ICML 2019.
  Vogels et al., PowerSGD: Practical Low-Rank Gradient Compression for Distributed
  Optimization, NeurIPS 2019.
  Modoranu et al., Error Feedback Can Accurately Compress Preconditioners, arXiv 2306.06098.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from lowbit_optax import quantization as qz
from lowbit_optax._driver import EMPTY, init_leaves, map_rows, update_leaves
from lowbit_optax._util import auto_axes_like_inputs, static_arg

__all__ = [
    "Compressor",
    "ErrorFeedbackState",
    "LowRank",
    "LowRankCompressor",
    "QuantizeCompressor",
    "RandomKCompressor",
    "Sparse",
    "TopKCompressor",
    "error_feedback",
    "low_rank",
    "quantizer",
    "random_k",
    "top_k",
]


# ------------------------------------------------------------------------------------
# Payloads
# ------------------------------------------------------------------------------------


class Sparse(NamedTuple):
    """``k`` values of a flattened array and their int32 positions (``indices >= n``
    mark padding of a partial last block; they hold 0 and are dropped on decompression)."""

    values: jax.Array
    indices: jax.Array


class LowRank(NamedTuple):
    """PowerSGD factors: the array (viewed 2-D, ``m x n``) is ``p @ q.T``."""

    p: jax.Array
    q: jax.Array


def _check_density(density: Any) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"density must be a float in (0, 1], got {density!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (0.01 keeps 1%), got {density!r}")


class Compressor:
    """Interface of a compressor value (frozen dataclass, hashable).

    ``init(shape)`` is the per-array state (``EMPTY`` when there is none);
    ``compress(x, state, key)`` returns ``(payload, state)``, the payload's shapes a
    function of ``x.shape`` only; ``decompress(payload, shape)`` the dense float32 array.
    ``sparse`` compressors return ``Sparse`` payloads, which windows of compressed
    gradients store as values and indices (``lowbit_optax.scale_by_mfac``). Calling a
    compressor, ``compressor(x, state=None, key=None)``, returns the compressed array
    dense (float32) and the new state. Build one with ``top_k``, ``random_k``,
    ``low_rank`` or ``quantizer``.

    Attributes:
      sparse: whether payloads are ``Sparse`` (values and int32 indices): ``top_k`` and
        ``random_k``.

    Example:
      >>> c = top_k(0.25)  # keep 2 of 8 entries
      >>> isinstance(c, Compressor), c.sparse
      (True, True)
      >>> x = jnp.array([0.1, -3.0, 0.2, 2.0, 0.0, -0.5, 1.0, 0.3])
      >>> payload, state = c.compress(x, c.init(x.shape), None)
      >>> payload.values.tolist(), payload.indices.tolist()
      ([-3.0, 2.0], [1, 3])
      >>> c.decompress(payload, x.shape).tolist()
      [0.0, -3.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    """

    sparse: bool = False

    def init(self, shape: tuple[int, ...]) -> Any:
        del shape
        return EMPTY

    def compress(self, x, state, key):  # pragma: no cover - interface
        raise NotImplementedError

    def decompress(self, payload, shape):  # pragma: no cover - interface
        raise NotImplementedError

    def compress_rows(self, rows: jax.Array, key: jax.Array) -> Sparse:
        """A sparse compressor on every row of the 2-D ``rows`` at once (stateless):
        ``Sparse`` values and indices of shape ``(len(rows), k)``, the indices positions
        along the row. The windows of ``scale_by_mfac`` select per row this way."""
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows.shape[0]))
        return jax.vmap(lambda row, k: self.compress(row, EMPTY, k)[0])(rows, keys)

    def __call__(self, x: jax.Array, state: Any = None, key: jax.Array | None = None):
        """``decompress(compress(x))`` and the new state: the compressed array, dense."""
        state = EMPTY if state is None else state
        payload, state = self.compress(x, state, key)
        return self.decompress(payload, tuple(x.shape)).astype(jnp.float32), state


@functools.partial(custom_partitioning, static_argnums=(1,))
def row_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` of every row of the 2-D ``x`` (values and positions along the row),
    partitioned by rows under a mesh: each device selects in its own rows (only a split
    last axis is gathered, a row at a time being whole). XLA's own partitioning of the
    ``TopK`` custom call gathers the whole array on every device first."""
    return jax.lax.top_k(x, k)


def _by_rows(mesh: Any, arg_shapes: Any) -> NamedSharding:
    spec = (*arg_shapes[0].sharding.spec, None)
    return NamedSharding(mesh, PartitionSpec(spec[0], None))


row_top_k.def_partition(
    infer_sharding_from_operands=lambda k, mesh, args, result: [_by_rows(mesh, args)] * 2,
    partition=lambda k, mesh, args, result: (
        mesh,
        lambda x: tuple(jax.lax.top_k(x, k)),
        [_by_rows(mesh, args)] * 2,
        (_by_rows(mesh, args),),
    ),
    sharding_rule="i j -> i k, i k",
)


def _scatter(payload: Sparse, shape: tuple[int, ...]) -> jax.Array:
    n = math.prod(shape)
    dense = jnp.zeros((n,), jnp.float32).at[payload.indices].add(payload.values, mode="drop")
    return dense.reshape(shape)


@dataclasses.dataclass(frozen=True)
class TopKCompressor(Compressor):
    """Top-k by magnitude; see ``top_k``."""

    density: float
    block_size: int | None = None
    sparse = True

    def __post_init__(self) -> None:
        _check_density(self.density)
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"block_size must be None (global) or a positive int, got {b!r}")

    def k(self, n: int) -> int:
        """Entries kept of an array of ``n`` values."""
        if self.block_size is None:
            return min(n, max(1, round(self.density * n)))
        nb = -(-n // self.block_size)
        return nb * min(self.block_size, max(1, round(self.density * self.block_size)))

    def compress(self, x, state, key):
        del key
        flat = x.reshape(-1).astype(jnp.float32)
        n = flat.shape[0]
        if self.block_size is None:
            _, idx = jax.lax.top_k(jnp.abs(flat), self.k(n))
        else:
            b = self.block_size
            kb = min(b, max(1, round(self.density * b)))
            nb = -(-n // b)
            mag = jnp.pad(jnp.abs(flat), (0, nb * b - n), constant_values=-1.0)
            _, local = jax.lax.top_k(mag.reshape(nb, b), kb)
            idx = (local + (jnp.arange(nb) * b)[:, None]).reshape(-1)
        idx = idx.astype(jnp.int32)
        values = jnp.take(flat, idx, mode="fill", fill_value=0.0)
        return Sparse(values, idx), state

    def compress_rows(self, rows, key):
        if self.block_size is not None:  # blocks within a row: as any compressor
            return super().compress_rows(rows, key)
        x = rows.astype(jnp.float32)
        _, idx = row_top_k(jnp.abs(x), self.k(x.shape[-1]))
        return Sparse(jnp.take_along_axis(x, idx, axis=1), idx.astype(jnp.int32))

    def decompress(self, payload, shape):
        return _scatter(payload, shape)


@dataclasses.dataclass(frozen=True)
class RandomKCompressor(Compressor):
    """``k`` distinct random entries, unscaled; see ``random_k``."""

    density: float
    sparse = True

    def __post_init__(self) -> None:
        _check_density(self.density)

    def k(self, n: int) -> int:
        return min(n, max(1, round(self.density * n)))

    def compress(self, x, state, key):
        if key is None:
            raise ValueError("random_k needs a PRNG key: compress(x, state, key)")
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        flat = x.reshape(-1).astype(jnp.float32)
        n = flat.shape[0]
        k = self.k(n)
        # stratified: one uniform index in each of k equal strata of [0, n): distinct,
        # every entry kept with probability k/n, and O(k) (a shuffle of n, as
        # jax.random.choice(replace=False) does, took ~3x top_k's time on XLA CPU)
        u = jax.random.uniform(key, (k,), jnp.float32)
        edges = jnp.arange(k + 1, dtype=jnp.float32) * (n / k)
        lo_, hi = jnp.ceil(edges[:-1]), jnp.ceil(edges[1:])
        idx = jnp.minimum(lo_ + jnp.floor(u * (hi - lo_)), hi - 1).astype(jnp.int32)
        return Sparse(flat[idx], idx), state

    def decompress(self, payload, shape):
        return _scatter(payload, shape)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) < 2:
        return None
    return math.prod(shape[:-1]), shape[-1]


@dataclasses.dataclass(frozen=True)
class LowRankCompressor(Compressor):
    """PowerSGD with a warm-started ``Q`` (the state is ``Q^T``, ``(r, n)``); see
    ``low_rank``."""

    rank: int
    seed: int = 0

    def __post_init__(self) -> None:
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank must be a positive int, got {r!r}")

    def _compressed(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        mn = _matrix_shape(shape)
        return mn if mn is not None and min(mn) > self.rank else None

    def init(self, shape):
        mn = self._compressed(tuple(shape))
        if mn is None:
            return EMPTY
        # a fixed Gaussian start (PowerSGD); later steps reuse the last Q. Kept as Q^T,
        # (r, n): its last axis is the param's, so it is sharded like the param's last
        # axis (lowbit_optax.state_shardings aligns axes from the last)
        q = jax.random.normal(jax.random.key(self.seed), (mn[1], self.rank), jnp.float32)
        return q.T

    def compress(self, x, state, key):
        del key
        mn = self._compressed(tuple(x.shape))
        if mn is None:
            return x.astype(jnp.float32), state
        mat = x.reshape(mn).astype(jnp.float32)
        # M is never gathered, only (m, r) and (r, n) products cross devices: with the
        # param split along n, M Q ends in an all-reduce of the (m, r) partial sums and
        # P^T M comes out split like Q^T with none; split along m, the (m, r) product
        # is gathered for the QR and P^T M ends in an all-reduce of its (r, n) partials
        p, _ = jnp.linalg.qr(mat @ state.T)
        qt = p.T @ mat  # Q^T = (M^T P)^T, (r, n)
        # a non-finite input must not poison the warm start
        qt_next = jnp.where(jnp.all(jnp.isfinite(qt)), qt, state)
        return LowRank(p, qt.T), qt_next

    def decompress(self, payload, shape):
        if self._compressed(tuple(shape)) is None:
            return payload.astype(jnp.float32)
        return (payload.p @ payload.q.T).reshape(shape)


@dataclasses.dataclass(frozen=True)
class QuantizeCompressor(Compressor):
    """Block-wise quantization with a library codec; see ``quantizer``."""

    bits: int
    kind: str = "linear"
    block_size: int = 128
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.bits not in qz.PACKABLE_BITS:
            raise ValueError(f"bits must be one of {qz.PACKABLE_BITS}, got {self.bits!r}")
        _ = self.codec  # validates kind, block size and rounding at construction

    @property
    def codec(self) -> qz.Codec:
        if self.bits == 1:  # the scaled sign: levels {-1, +1}, scales replaced below
            levels = np.array([-1.0, 1.0], np.float32)
            return qz.make_codec(1, levels, signed=True, block_size=self.block_size)
        return qz.make_codec(
            self.bits, self.kind, signed=True, block_size=self.block_size, rounding=self.rounding
        )

    def compress(self, x, state, key):
        x2 = x.reshape(-1).astype(jnp.float32) if x.ndim == 0 else x.astype(jnp.float32)
        q = qz.quantize(x2, self.codec, key)
        if self.bits == 1:
            # the mean magnitude of each block's real entries (padding excluded)
            n, b = x2.shape[-1], self.block_size
            nb = -(-n // b)
            mag = jnp.pad(jnp.abs(x2), [(0, 0)] * (x2.ndim - 1) + [(0, nb * b - n)])
            counts = jnp.minimum(b, n - jnp.arange(nb) * b).astype(jnp.float32)
            mean = jnp.sum(mag.reshape(*x2.shape[:-1], nb, b), axis=-1) / counts
            q = dataclasses.replace(q, scales=mean.astype(q.scales.dtype))
        return q, state

    def decompress(self, payload, shape):
        return qz.dequantize(payload).reshape(shape)


def top_k(density: float, block_size: int | None = None) -> TopKCompressor:
    """Keeps the ``round(density * n)`` entries of largest magnitude (at least one), over
    the whole array or, with ``block_size``, ``round(density * block_size)`` per block of
    the flattened array (cheaper to select, and spread over the array).

    Payload: ``Sparse(values float32 (k,), indices int32 (k,))``: ``8 k`` bytes.

    Args:
      density: fraction of the entries kept, in (0, 1] (0.01 keeps 1%).
      block_size: ``None`` selects over the whole flattened array; an int selects
        ``round(density * block_size)`` entries in each block of that many values.

    Returns:
      A ``Compressor`` (sparse).

    Example:
      >>> x = jnp.array([0.1, -3.0, 0.2, 2.0, 0.0, -0.5, 1.0, 0.3])
      >>> dense, _ = top_k(0.25)(x)  # the 2 largest magnitudes
      >>> dense.tolist()
      [0.0, -3.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
      >>> dense, _ = top_k(0.25, block_size=4)(x)  # the largest of each half
      >>> dense.tolist()
      [0.0, -3.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    """
    return TopKCompressor(density, block_size)


def random_k(density: float) -> RandomKCompressor:
    """``round(density * n)`` distinct random entries, one uniform pick per stratum.

    Each of the ``k`` strata of ``n / k`` consecutive entries contributes one entry
    (unscaled: the contractive form error feedback needs). Payload ``Sparse``; needs a
    PRNG key (``error_feedback`` supplies one per step).

    Args:
      density: fraction of the entries kept, in (0, 1].

    Returns:
      A ``Compressor`` (sparse).

    Example:
      >>> c = random_k(0.5)
      >>> x = jnp.arange(1.0, 9.0)
      >>> payload, _ = jax.jit(c.compress)(x, c.init(x.shape), jax.random.key(0))
      >>> (payload.indices // 2).tolist()  # one index in each pair of entries
      [0, 1, 2, 3]
      >>> bool((payload.values == x[payload.indices]).all())  # unscaled
      True
    """
    return RandomKCompressor(density)


def low_rank(rank: int, seed: int = 0) -> LowRankCompressor:
    """PowerSGD: one warm-started power iteration per call on 2-D arrays (rank > 2 as
    ``(prod(shape[:-1]), shape[-1])``); ``(m + n) r`` floats instead of ``m n``. Arrays
    with ``min(m, n) <= rank`` or fewer than 2 dimensions pass through dense. The state
    (``init(shape)``) is the warm start ``Q^T``, ``(r, n)``.

    Args:
      rank: the rank ``r`` of the factors.
      seed: seed of the random initial ``Q``.

    Returns:
      A ``Compressor`` whose payload is the factor pair ``(p (m, r), q (n, r))``.

    Example:
      >>> c = low_rank(2)
      >>> m = jnp.outer(jnp.arange(1.0, 5.0), jnp.arange(1.0, 7.0))  # (4, 6), rank 1
      >>> state = c.init(m.shape)  # the warm start Q^T
      >>> state.shape
      (2, 6)
      >>> payload, state = jax.jit(c.compress)(m, state, None)
      >>> payload.p.shape, payload.q.shape  # (4 + 6) * 2 floats instead of 24
      ((4, 2), (6, 2))
      >>> bool(np.allclose(payload.p @ payload.q.T, m, atol=1e-4))  # exact at rank 1
      True
    """
    return LowRankCompressor(rank, seed)


def quantizer(
    bits: int, kind: str = "linear", *, block_size: int = 128, rounding: str = "nearest"
) -> QuantizeCompressor:
    """Block-wise quantization along the last axis with a library codec.

    ``bits=1`` is the scaled sign ``mean(|x|) sign(x)`` per block. Payload: a
    ``QuantizedArray`` (``bits`` per value plus one float32 scale per block).

    Args:
      bits: code width (1, 2, 3, 4 or 8).
      kind: the signed level table, ``linear`` or ``dynamic`` (see ``linear_levels``,
        ``dynamic_exponent_levels``).
      block_size: values per block along the last axis (a multiple of 8).
      rounding: ``nearest`` or ``stochastic`` (needs a key; ``error_feedback``
        supplies one per step).

    Returns:
      A ``Compressor``.

    Example:
      >>> c = quantizer(1, block_size=8)
      >>> x = jnp.array([0.5, -3.0, 0.5, 2.0, 0.5, -0.5, 0.5, 0.5])
      >>> payload = jax.eval_shape(c.compress, x, c.init(x.shape), None)[0]
      >>> payload.codes.shape, payload.scales.shape  # 8 1-bit codes: one byte
      ((1,), (1,))
      >>> dense, _ = jax.jit(c)(x)  # the scaled sign, mean(|x|) = 1
      >>> dense.tolist()
      [1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0]
    """
    return QuantizeCompressor(bits, kind, block_size, rounding)


# ------------------------------------------------------------------------------------
# The error-feedback transform
# ------------------------------------------------------------------------------------


def _leaf(compressor: Compressor, g, xi, cs, key, dt):
    """``(c, xi', state')`` of one leaf. A compressor that works block by block along
    the last axis (``quantizer``) runs in row slices (``map_rows``), the compressed
    gradient written over the gradient and the error in place; the others see the leaf
    whole (their selection or factorization spans it)."""
    ok = jnp.all(jnp.isfinite(g))
    if isinstance(compressor, QuantizeCompressor) and g.ndim >= 2:

        def rows(carried, _, __):
            g, xi = carried
            a = xi.astype(jnp.float32) + g.astype(jnp.float32)
            c, _ = compressor(a, EMPTY, None)
            err = jnp.where(ok, a - c, xi.astype(jnp.float32))
            return c.astype(g.dtype), err.astype(dt)

        if compressor.rounding == "nearest":
            c, err = map_rows(rows, (g, xi))
            return c, err, cs
    a = xi.astype(jnp.float32) + g.astype(jnp.float32)
    c, cs2 = compressor(a, cs, key)
    err = jnp.where(ok, a - c, xi.astype(jnp.float32)).astype(dt)
    cs2 = jax.tree.map(lambda n, o: jnp.where(ok, n, o), cs2, cs)
    return c.astype(g.dtype), err, cs2


class _Leaf(NamedTuple):
    """One leaf's entries of the state's per-parameter fields."""

    error: jax.Array
    compressor_state: Any


class ErrorFeedbackState(NamedTuple):
    """State of ``error_feedback``.

    Attributes:
      count: int32 steps taken.
      key: raw ``uint32`` PRNG key data (random_k, stochastic rounding), folded with the
        step and the leaf index.
      error: the accumulator ``xi``, a tree like the params in ``accumulator_dtype``.
      compressor_state: per leaf the compressor's state (PowerSGD's warm start ``Q^T``,
        ``(r, n)`` for a leaf viewed as ``m x n``, laid out like the leaf's last axis;
        ``EMPTY`` where there is none).

    Example:
      >>> from lowbit_optax import state_bytes
      >>> tx = error_feedback(low_rank(2), accumulator_dtype=jnp.bfloat16)
      >>> state = tx.init({"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)})
      >>> state.error["w"].dtype, state.compressor_state["w"].shape  # Q^T is (r, n)
      (dtype(bfloat16), (2, 8))
      >>> state_bytes(state.error) == (16 * 8 + 8) * 2  # two bytes per parameter
      True
    """

    count: jax.Array
    key: jax.Array
    error: Any
    compressor_state: Any


def error_feedback(
    compressor: Compressor, *, accumulator_dtype: Any = None, key: int | None = None
) -> optax.GradientTransformation:
    """Error feedback around a compressor, per leaf: ``a = xi + g``, ``c = C(a)``,
    ``xi <- a - c``; emits ``c`` (dense, in the gradient's dtype).

    Chain it first: ``optax.chain(error_feedback(top_k(0.01)), optax.sgd(lr))``. Over
    any number of steps the emitted ``c`` plus the final ``xi`` sum to the sum of the
    gradients (exactly up to float rounding with a float32 accumulator).

    Args:
      compressor: a ``Compressor`` value (``top_k``, ``random_k``, ``low_rank``,
        ``quantizer``).
      accumulator_dtype: storage of ``xi`` (``float32``, the default, or ``bfloat16``;
        bfloat16 halves it at the cost of rounding the carried error to 8 bits of
        mantissa).
      key: seed of the per-step keys (random_k, stochastic rounding; default 0).

    A leaf whose gradient has a non-finite entry keeps its old ``xi`` (the emitted
    update shows the NaN/inf; the state stays finite).

    Memory per parameter: one ``accumulator_dtype`` value (4 or 2 bytes) plus the
    compressor's state (PowerSGD: ``n r`` float32 values per ``m x n`` leaf, ``Q^T``,
    sharded like the leaf's last axis).

    Returns:
      A ``GradientTransformation`` whose state is an ``ErrorFeedbackState``.

    Example:
      Top-50% error feedback: what is not sent is carried to the next step.

      >>> tx = error_feedback(top_k(0.5))
      >>> g = {"w": jnp.array([1.0, -4.0, 0.5, 2.0])}
      >>> state = tx.init(g)
      >>> update = jax.jit(tx.update)
      >>> c1, state = update(g, state)
      >>> c1["w"].tolist(), state.error["w"].tolist()
      ([0.0, -4.0, 0.0, 2.0], [1.0, 0.0, 0.5, 0.0])
      >>> c2, state = update(g, state)  # 1.0 + 1.0 now makes the cut
      >>> c2["w"].tolist(), state.error["w"].tolist()
      ([2.0, -4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0])
      >>> (c1["w"] + c2["w"] + state.error["w"]).tolist()  # == g + g
      [2.0, -8.0, 1.0, 4.0]

      Chained before any optax transform: error-feedback top-k SGD.

      >>> tx = optax.chain(error_feedback(top_k(0.01)), optax.sgd(1e-2))
    """
    if not isinstance(compressor, Compressor):
        raise ValueError(
            "compressor must be a Compressor value (top_k(0.01), random_k(...), "
            f"low_rank(...), quantizer(...)), got {compressor!r}"
        )
    key = static_arg("key", key, 0)
    dt = jnp.dtype(static_arg("accumulator_dtype", accumulator_dtype, jnp.float32))
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(
            f"accumulator_dtype must be float32 or bfloat16, got {accumulator_dtype!r}"
        )

    def init_leaf(p) -> _Leaf:
        return _Leaf(jnp.zeros(p.shape, dt), compressor.init(tuple(p.shape)))

    def init_fn(params: optax.Params) -> ErrorFeedbackState:
        return ErrorFeedbackState(
            jnp.zeros([], jnp.int32),
            jax.random.key_data(jax.random.key(key)).astype(jnp.uint32),
            *init_leaves(init_leaf, params, _Leaf),
        )

    def update_fn(updates, state, params=None):
        del params
        return auto_axes_like_inputs(body, updates, state)

    def body(updates, state):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)

        def update_leaf(i, g, leaf: _Leaf, chain):
            # leaves one after another: one leaf's temporaries at a time
            key = jax.random.fold_in(step_key, i)
            c, err, cs = chain(lambda *a: _leaf(compressor, *a, key, dt), g, *leaf)
            return c, _Leaf(err, cs)

        updates, fields = update_leaves(update_leaf, updates, state, _Leaf)
        return updates, ErrorFeedbackState(optax.safe_increment(state.count), state.key, *fields)

    return optax.GradientTransformation(init_fn, update_fn)
