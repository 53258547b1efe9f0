"""Quantized EMA state: Adam whose moments live block-wise quantized between steps.

Each step dequantizes the moments to float32, runs the EMA update in float32, takes the
parameter step with the fresh float32 moments (bias correction in float32), and
requantizes for storage (Dettmers et al. 2022; Li et al. 2023; Xu et al. 2025, SOLO).

The composition point is the codec: a ``lowbit_optax.quantization.Codec`` value (bits,
level table or SOLO's logarithmic quantizer, block size, rounding, scale dtype) passed as
``mu_map`` / ``nu_map``. Other transforms quantize their own EMA states with the same
codec functions (``encode_blocks`` / ``decode_blocks``), and ``low_rank_projection``
wraps ``scale_by_quantized_adam`` as any other inner transform.

The second moment is stored in units that cannot overflow: per block, the stored scale is
``sqrt`` of the block's largest ``nu`` and the EMA runs on ``nu / r**2`` with
``r = max(old scale, max |g|)``, so gradients up to float32's range (where ``g**2``
overflows above ~1.8e19 and ``optax.adamw`` stores ``inf``) keep a finite state. Leaves
kept in float32 (fewer than ``min_size`` elements, or scalars) store ``mu`` and
``sqrt(nu)`` the same way (an RMS update ``s * sqrt(b2 (w/s)**2 + (1-b2) (g/s)**2)``).

Non-finite gradients: a NaN or inf entry makes its whole block's scale non-finite (as
``optax.adamw`` makes that entry's moments non-finite). Wrap the optimizer in
``optax.apply_if_finite`` to skip such steps; the state is then left untouched (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_optax import quantization as qz
from lowbit_optax._driver import EMPTY, init_leaves, is_empty, map_rows, update_leaves
from lowbit_optax._util import static_arg
from lowbit_optax.moments import AdamLike, MomentAccess
from lowbit_optax.quantization import MAPS, make_codec  # noqa: F401 (re-exported)

__all__ = [
    "ScaleByQuantizedAdamState",
    "make_codec",
    "scale_by_quantized_adam",
]

_TINY = float(np.finfo(np.float32).tiny)


class ScaleByQuantizedAdamState(NamedTuple):
    """State of ``scale_by_quantized_adam``; every field but ``count`` and ``key`` is a
    tree shaped like the params.

    Attributes:
      count: int32 step count.
      key: raw ``uint32`` PRNG key data (checkpoint-safe), folded with the step.
      mu_codes: packed ``uint8`` codes of the first moment (quantized leaves) or the
        float32 first moment (leaves kept in float32).
      mu_scales: per-block absmax scales ``(..., ceil(n / block))``; ``MaskedNode`` for
        float32 leaves.
      nu_codes: packed codes of the second moment, or ``sqrt(nu)`` in float32.
      nu_scales: per-block ``sqrt(max nu)``; ``MaskedNode`` for float32 leaves.
      nu_bases: per-block log base (logarithmic codec only), else ``MaskedNode``.

    Example:
      A 4-bit state: the ``(64, 256)`` weight keeps 4-bit codes and one float32 scale
      per 128-value block; the 256-value bias is below ``min_size`` and stays float32.

      >>> from lowbit_optax import state_bytes
      >>> tx = scale_by_quantized_adam(mu_bits=4, nu_bits=4)
      >>> state = tx.init({"w": jnp.zeros((64, 256)), "b": jnp.zeros(256)})
      >>> state.mu_codes["w"].shape, state.mu_codes["w"].dtype, state.mu_scales["w"].shape
      ((64, 128), dtype('uint8'), (64, 2))
      >>> state.nu_codes["b"].dtype  # float32 leaf: sqrt(nu) itself
      dtype('float32')
      >>> w = 64 * 256 * (4 + 4) // 8 + 2 * 64 * 2 * 4  # codes + mu/nu scales
      >>> state_bytes(state) == w + 2 * 256 * 4 + 4 + 8  # + float32 bias, count, key
      True
    """

    count: jax.Array
    key: jax.Array
    mu_codes: optax.Updates
    mu_scales: optax.Updates
    nu_codes: optax.Updates
    nu_scales: optax.Updates
    nu_bases: optax.Updates


def scale_by_quantized_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mu_bits: int | None = None,
    nu_bits: int | None = None,
    mu_map: str | qz.Codec | np.ndarray = "dynamic",
    nu_map: str | qz.Codec | np.ndarray | None = None,
    block_size: int | None = None,
    rounding: str | tuple[str, str] = "nearest",
    scale_dtype: str = "float32",
    quantile_sample: int | None = None,
    min_size: int | None = None,
    key: int | None = None,
) -> AdamLike:
    """Adam with block-wise quantized moments.

    Args:
      b1, b2, eps: Adam's decay rates and denominator epsilon (outside the sqrt); traced
        hyperparameters under ``optax.inject_hyperparams``.
      mu_bits, nu_bits: code widths (8, 4, 3, 2; 1 allowed) of the two moments
        (default 8).
      mu_map: signed map of the first moment: ``dynamic``, ``linear``, a level table or
        a ``Codec``.
      nu_map: unsigned map of the second moment: ``dynamic``, ``linear_zero_free``,
        ``linear``, ``log`` (SOLO), a table or a ``Codec``. Default: ``dynamic`` at 8
        bits, else ``linear_zero_free`` (a zero level would make ``1/sqrt(nu)`` explode).
      block_size: values per block along the last axis (multiple of 8; default 128).
      rounding: ``nearest``, ``stochastic`` or ``stochastic_log`` (log map only); one
        name for both moments or a ``(mu, nu)`` pair.
      scale_dtype: ``float32`` or ``bfloat16`` per-block scales.
      quantile_sample: log map only: 0 (the default) takes each block's 10% quantile
        exactly (a sort of the block), ``k`` estimates it from every
        ``block_size // k``-th value.
      min_size: leaves with fewer elements (from the global shape), and scalars, stay
        float32 (default 4096).
      key: seed of the stochastic-rounding key stored in the state (default 0).

    The arguments that set the state's shapes default to ``None`` (the value given
    above), so ``optax.inject_hyperparams(scale_by_quantized_adam)()`` traces only
    ``b1``, ``b2`` and ``eps``; one passed as a number under it must be listed in
    ``static_args`` (the error says so).

    Returns:
      An ``AdamLike`` (an ``optax.GradientTransformation`` whose ``moments`` decode and
      encode its state one leaf at a time, see ``lowbit_optax.moments``); ``update``
      returns updates in the gradients' dtype.

    Memory per parameter (quantized leaves, block B, f32 scales): ``(mu_bits +
    nu_bits)/8 + 8/B`` bytes, plus ``4/B`` for the log map's bases (8-bit: 2.0625 at
    B = 128); float32 leaves 8 bytes.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_quantized_adam(mu_bits=4, nu_bits=4),
      ...                  optax.scale_by_learning_rate(1e-3))
      >>> state = tx.init({"w": jnp.zeros((256, 256))})
      >>> state[0].mu_codes["w"].shape  # two 4-bit codes per byte
      (256, 128)

    References:
      Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022.
      Li et al., Memory Efficient Optimizers with 4-bit States, NeurIPS 2023.
      Xu et al., Pushing the Limits of Low-Bit Optimizers: A Focus on EMA Dynamics,
      arXiv 2505.00347 (SOLO).
    """
    mu_bits, nu_bits = static_arg("mu_bits", mu_bits, 8), static_arg("nu_bits", nu_bits, 8)
    block_size = static_arg("block_size", block_size, 128)
    quantile_sample = static_arg("quantile_sample", quantile_sample, 0)
    min_size, key = static_arg("min_size", min_size, 4096), static_arg("key", key, 0)
    if not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    mu_round, nu_round = (rounding, rounding) if isinstance(rounding, str) else rounding
    if nu_map is None:
        nu_map = "dynamic" if nu_bits == 8 else "linear_zero_free"
    mu_codec = make_codec(
        mu_bits,
        mu_map,
        signed=True,
        block_size=block_size,
        rounding=mu_round,
        scale_dtype=scale_dtype,
    )
    nu_codec = make_codec(
        nu_bits,
        nu_map,
        signed=False,
        block_size=block_size,
        rounding=nu_round,
        scale_dtype=scale_dtype,
        quantile_sample=quantile_sample,
    )
    if nu_codec.signed:
        raise ValueError("nu_map must be an unsigned table (levels >= 0) or the log map")
    for name, v in (("b1", b1), ("b2", b2)):
        if isinstance(v, (int, float)) and not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")

    def quantized(p: Any) -> bool:
        return len(p.shape) >= 1 and int(np.prod(p.shape)) >= min_size

    def init_leaf(p) -> _Leaf:
        if not quantized(p):  # two distinct buffers (both may be donated), laid out
            # like the param on an Explicit mesh (zeros_like keeps its sharding type)
            mu, nu = jnp.zeros_like(p, jnp.float32), jnp.zeros_like(p, jnp.float32)
            return _Leaf(mu, EMPTY, nu, EMPTY, EMPTY)
        mq, nq = mu_codec.abstract(p.shape), nu_codec.abstract(p.shape)
        zeros = lambda a: jnp.zeros(a.shape, a.dtype)
        bases = EMPTY if nq.bases is None else jnp.ones(nq.bases.shape, nq.bases.dtype)
        return _Leaf(zeros(mq.codes), zeros(mq.scales), zeros(nq.codes), zeros(nq.scales), bases)

    def init_fn(params: optax.Params) -> ScaleByQuantizedAdamState:
        return ScaleByQuantizedAdamState(
            jnp.zeros([], jnp.int32),
            jax.random.key_data(jax.random.key(key)).astype(jnp.uint32),
            *init_leaves(init_leaf, params, _Leaf),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
        bc2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        hp = _Hyper(*(jnp.asarray(x, jnp.float32) for x in (b1, b2, eps)), bc1, bc2)

        def sliced(extra, g, *fields):
            key, hp = extra
            return map_rows(
                lambda c, _, rows: _quantized_leaf(*c, key, rows, mu_codec, nu_codec, hp),
                (g, *fields),
                materialize=nu_codec.is_log,  # SOLO heavier math (see map_rows)
            )

        def update_leaf(i, g, leaf: _Leaf, chain):
            if is_empty(leaf.mu_scales):  # a float32 leaf: elementwise, fused into apply
                return _float_leaf(g, leaf.mu_codes, leaf.nu_codes, hp)
            # quantized leaves one after another (bounded temporaries)
            u, *fields = chain.run(sliced, (jax.random.fold_in(step_key, i), hp), g, *leaf)
            return u, _Leaf(*fields)

        updates, fields = update_leaves(update_leaf, updates, state, _Leaf)
        return updates, ScaleByQuantizedAdamState(count, state.key, *fields)

    return AdamLike(init_fn, update_fn, _moment_access(mu_codec, nu_codec, b1, b2, eps))


def _moment_access(
    mu_codec: qz.Codec, nu_codec: qz.Codec, b1: Any, b2: Any, eps: Any
) -> MomentAccess:
    """The moment protocol of ``ScaleByQuantizedAdamState``: one leaf's codes decoded
    to float32 ``(mu, nu)``, and new moments encoded by nearest rounding, ``nu`` stored
    as its block-relative values and ``sqrt`` of the block maximum (the update's
    overflow-safe layout). Float32 leaves hold ``mu`` and ``sqrt(nu)``."""
    mu_near, nu_near = (dataclasses.replace(c, rounding="nearest") for c in (mu_codec, nu_codec))

    def get(stored, shape):
        mu_c, mu_s, nu_c, nu_s, nu_b = stored
        if is_empty(mu_s):
            return mu_c, nu_c * nu_c
        m = qz.decode(mu_c, mu_s, None, mu_codec)
        s = nu_s.astype(jnp.float32)[..., None]
        v = qz.decode(nu_c, 1.0, None if is_empty(nu_b) else nu_b, nu_codec) * s * s
        return qz.from_blocks(m, shape[-1]), qz.from_blocks(v, shape[-1])

    def put(stored, m, v):
        if is_empty(stored[1]):
            return m, stored[1], jnp.sqrt(jnp.maximum(v, 0.0)), stored[3], stored[4]
        w = qz.to_blocks(jnp.sqrt(jnp.maximum(v, 0.0)), nu_codec.block_size)
        r = jnp.maximum(jnp.max(w, axis=-1, keepdims=True), _TINY)
        nu = qz.encode((w / r) ** 2, nu_near)
        nu = nu._replace(scales=r * jnp.sqrt(nu.scales))
        mu_codes, mu_scale, _ = qz.encode(qz.to_blocks(m, mu_codec.block_size), mu_near).stored(
            mu_codec
        )
        nu_codes, nu_scale, nu_base = nu.stored(nu_codec)
        return mu_codes, mu_scale, nu_codes, nu_scale, EMPTY if nu_base is None else nu_base

    return MomentAccess(tuple(_Leaf._fields), get, put, b1, b2, eps)


class _Leaf(NamedTuple):
    """One leaf's entries of the state's per-parameter fields (``EMPTY`` where unused)."""

    mu_codes: jax.Array
    mu_scales: jax.Array
    nu_codes: jax.Array
    nu_scales: jax.Array
    nu_bases: jax.Array


class _Hyper(NamedTuple):
    """Float32 hyperparameters and this step's bias corrections."""

    b1: jax.Array
    b2: jax.Array
    eps: jax.Array
    bc1: jax.Array
    bc2: jax.Array


def _float_leaf(g, mu, w, hp: _Hyper):
    """Adam on a float32 leaf storing ``mu`` and ``w = sqrt(nu)`` (overflow-free)."""
    b1, b2, eps, bc1, bc2 = hp
    g32 = g.astype(jnp.float32)
    mu = b1 * mu + (1 - b1) * g32
    s = jnp.maximum(w, jnp.abs(g32))
    safe = jnp.where(s > 0, s, 1.0)
    w = jnp.where(s > 0, s * jnp.sqrt(b2 * (w / safe) ** 2 + (1 - b2) * (g32 / safe) ** 2), 0.0)
    u = (mu / bc1) / (w / jnp.sqrt(bc2) + eps)
    return u.astype(g.dtype), _Leaf(mu, EMPTY, w, EMPTY, EMPTY)


def _quantized_leaf(g, mu_c, mu_s, nu_c, nu_s, nu_b, key, rows, mu_codec, nu_codec, hp: _Hyper):
    """One quantized leaf (or row slice of one), in block view ``(..., nb, B)``; see the
    module docstring. ``key``: this leaf's stochastic-rounding key; ``rows``: the slice's
    rows of the leaf (``None``: the whole leaf), where the noise is drawn."""
    b1, b2, eps, bc1, bc2 = hp
    k_mu, k_nu = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    gb = qz.to_blocks(g.astype(jnp.float32), mu_codec.block_size)

    m = qz.decode(mu_c, mu_s, None, mu_codec)
    m = b1 * m + (1 - b1) * gb

    # nu in units of r**2 per block: y_old is nu_old / s_old**2 (the decoded values
    # relative to the block max), r bounds both terms, so nothing overflows.
    s_old = nu_s.astype(jnp.float32)[..., None]
    y_old = qz.decode(nu_c, 1.0, None if is_empty(nu_b) else nu_b, nu_codec)
    r = jnp.maximum(jnp.maximum(s_old, jnp.max(jnp.abs(gb), axis=-1, keepdims=True)), _TINY)
    vr = b2 * y_old * (s_old / r) ** 2 + (1 - b2) * (gb / r) ** 2

    u = (m / bc1) / (jnp.sqrt(vr) * r / jnp.sqrt(bc2) + eps)

    mu_new = qz.encode(m, mu_codec, qz.uniform_noise(mu_codec, k_mu, m.shape, rows))
    nu_new = qz.encode(vr, nu_codec, qz.uniform_noise(nu_codec, k_nu, vr.shape, rows))
    # the stored nu scale is sqrt of the block's largest nu: r * sqrt(max vr)
    nu_new = nu_new._replace(scales=r * jnp.sqrt(nu_new.scales))
    mu_codes, mu_scale, _ = mu_new.stored(mu_codec)
    nu_codes, nu_scale, nu_base = nu_new.stored(nu_codec)
    base = EMPTY if nu_base is None else nu_base
    return (
        qz.from_blocks(u, g.shape[-1]).astype(g.dtype),
        mu_codes,
        mu_scale,
        nu_codes,
        nu_scale,
        base,
    )
