"""SlimAdam's transform: Adam whose second moment of a leaf is averaged over an axis
set ``K`` chosen per leaf (``keepdims``)::

    nu <- b2 * nu + (1 - b2) * mean_K(g**2)
    u   = mhat / (sqrt(vhat) + eps)          (vhat broadcast over K, eps outside sqrt)

With no compression anywhere it is ``optax.adamw`` bit for bit. ``mu_bits`` stores the
first moment block-wise quantized (the quantized-EMA codecs), ``nu_bits`` the reduced
second moment where it is still large.

References:
  Kalra et al., When Can You Get Away with Low Memory Adam?, arXiv 2503.01843.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowbit_optax import quantization as qz
from lowbit_optax._driver import EMPTY, fields_of, init_leaves, map_rows, update_leaves
from lowbit_optax._util import forwarding_signature, leaves_with_paths, static_arg, zeros_for
from lowbit_optax.slim.rules import PathRules, Rules, resolve_rules
from lowbit_optax.slim.stats import Axes, SNRCalibrationState

__all__ = ["ScaleBySlimAdamState", "scale_by_slim_adam", "slim_state_from_adam"]


class ScaleBySlimAdamState(NamedTuple):
    """State of ``scale_by_slim_adam``; every field but ``count`` is shaped like the params.

    Attributes:
      count: int32 step count.
      mu: first moment (``mu_dtype``), or its packed ``uint8`` codes when ``mu_bits`` is
        set and the leaf has at least ``min_size`` elements.
      mu_scales: per-block scales of quantized ``mu`` leaves, else ``MaskedNode``.
      nu: second moment reduced with ``keepdims`` over each leaf's axes (the params'
        dtype), or, when ``nu_bits`` is set and it has ``min_size`` elements, the codes
        of that array laid out as ``(1, ..., 1, size)`` (blocks along its values).
      nu_scales: per-block scales of quantized ``nu`` leaves, else ``MaskedNode``.

    Example:
      >>> from lowbit_optax import state_bytes
      >>> tx = scale_by_slim_adam(rules={"w": (1,), "b": None})
      >>> state = tx.init({"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)})
      >>> state.nu["w"].shape, state.nu["b"].shape  # w's nu averaged over axis 1
      ((64, 1), (32,))
      >>> state_bytes(state.nu) == (64 + 32) * 4  # instead of (64 * 32 + 32) * 4
      True
      >>> tx = scale_by_slim_adam(rules={"w": (1,)}, mu_bits=8)
      >>> state = tx.init({"w": jnp.zeros((64, 256))})
      >>> state.mu["w"].dtype, state.mu_scales["w"].shape  # 8-bit mu, 2 blocks a row
      (dtype('uint8'), (64, 2))
    """

    count: jax.Array
    mu: optax.Updates
    mu_scales: optax.Updates
    nu: optax.Updates
    nu_scales: optax.Updates


def _reduced_shape(shape: tuple[int, ...], axes: Axes) -> tuple[int, ...]:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a quantized reduced ``nu`` is stored in: all its values along the last
    axis, the rank kept (a ``(vocab, 1)`` column becomes ``(1, vocab)``, so its blocks run
    along real data instead of padding each single value to a block)."""
    return (1,) * (len(shape) - 1) + (math.prod(shape),) if shape else (1,)


def _mean_sq(g: jax.Array, axes: Axes) -> jax.Array:
    sq = g**2
    return jnp.mean(sq, axis=axes, keepdims=True).astype(sq.dtype) if axes else sq


class _Plan(NamedTuple):
    """Static per-leaf layout: axes, and which moments are quantized."""

    axes: Axes
    mu_q: bool
    nu_q: bool


def _static(mu_bits, nu_bits, block_size, min_size):
    """The quantization arguments with their defaults resolved (block 128, 4096)."""
    return (
        static_arg("mu_bits", mu_bits, None),
        static_arg("nu_bits", nu_bits, None),
        static_arg("block_size", block_size, 128),
        static_arg("min_size", min_size, 4096),
    )


def _check_config(b1, b2, eps, mu_bits, nu_bits, min_size):
    for name, v in (("b1", b1), ("b2", b2)):
        if isinstance(v, (int, float)) and not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    for name, v in (("mu_bits", mu_bits), ("nu_bits", nu_bits)):
        if v is not None and v not in (2, 3, 4, 8):
            raise ValueError(f"{name} must be None (float), 8, 4, 3 or 2, got {v!r}")
    if not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")


def _codecs(mu_bits, nu_bits, mu_map, nu_map, block_size) -> tuple[Any, Any]:
    mu_codec = (
        None
        if mu_bits is None
        else qz.make_codec(mu_bits, mu_map, signed=True, block_size=block_size)
    )
    if nu_bits is None:
        return mu_codec, None
    nu_codec = qz.make_codec(
        nu_bits,
        nu_map or ("dynamic" if nu_bits == 8 else "linear_zero_free"),
        signed=False,
        block_size=block_size,
    )
    if nu_codec.signed or nu_codec.is_log:
        raise ValueError(
            "nu_map must be an unsigned level table ('dynamic', 'linear_zero_free'), "
            f"got {nu_map!r}"
        )
    return mu_codec, nu_codec


def _leaf_plans(rules, tree, mu_codec, nu_codec, min_size) -> list[_Plan]:
    out = []
    for axes, (_, x) in zip(resolve_rules(rules, tree), leaves_with_paths(tree), strict=True):
        shape = tuple(x.shape)
        big = lambda n, shape=shape: len(shape) >= 1 and n >= min_size
        out.append(
            _Plan(
                axes,
                mu_codec is not None and big(math.prod(shape)),
                nu_codec is not None and big(math.prod(_reduced_shape(shape, axes))),
            )
        )
    return out


def scale_by_slim_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    rules: Rules,
    mu_dtype: Any = None,
    mu_bits: int | None = None,
    nu_bits: int | None = None,
    mu_map: str | qz.Codec = "dynamic",
    nu_map: str | qz.Codec | None = None,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """Adam whose second moment is averaged over a per-leaf axis set (SlimAdam).

    ``nu <- b2 nu + (1 - b2) mean_K(g**2)`` (``keepdims``), ``u = mhat / (sqrt(vhat +
    eps_root) + eps)`` with ``vhat`` broadcast over ``K``. A leaf with ``K = ()`` is
    ``optax.scale_by_adam`` exactly (same operations, bit-equal results).

    Args:
      b1, b2, eps, eps_root: as ``optax.scale_by_adam`` (traced under
        ``optax.inject_hyperparams``).
      rules: per-leaf averaging axes: a nested mapping keyed like the params (or flat
        with ``/``-joined paths) of axis tuples / ``None``, or a callable ``(path, leaf)
        -> axes | None`` such as ``flax_default_rules``. Resolved at ``init`` from the
        param paths (every param needs an entry).
      mu_dtype: dtype of a float first moment (as ``optax.scale_by_adam``).
      mu_bits: store the first moment block-wise quantized at this width (8/4/3/2, the
        quantized-EMA codecs, nearest rounding) on leaves with >= ``min_size`` elements.
      nu_bits: quantize the reduced second moment where it still has >= ``min_size``
        elements (unsigned map: 8-bit dynamic tree, else zero-free linear).
      mu_map, nu_map: map names or ``Codec`` values for the two moments.
      block_size: quantization block along the last axis (default 128).
      min_size: smallest leaf (elements) that is quantized (default 4096).

    Returns:
      An ``optax.GradientTransformation``.

    Memory per parameter: ``mu`` 4 bytes (``mu_bits``: ``mu_bits/8 + 4/block_size`` per
    padded element: a last axis shorter than ``block_size`` is padded to a full block,
    so narrow layers want a smaller ``block_size``) plus ``nu`` 4 bytes times the kept
    fraction ``prod(reduced shape) / size``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.zeros((64, 32))}}
      >>> tx = optax.chain(scale_by_slim_adam(rules={"dense": {"kernel": (1,)}}),
      ...                  optax.scale_by_learning_rate(1e-3))
      >>> state = tx.init(params)
      >>> state[0].nu["dense"]["kernel"].shape
      (64, 1)

    References:
      Kalra et al., When Can You Get Away with Low Memory Adam?, arXiv 2503.01843.
    """
    mu_bits, nu_bits, block_size, min_size = _static(mu_bits, nu_bits, block_size, min_size)
    _check_config(b1, b2, eps, mu_bits, nu_bits, min_size)
    if rules is None or not (callable(rules) or isinstance(rules, Mapping | PathRules)):
        raise ValueError(
            "rules must be a mapping of parameter paths to axis tuples (rules_from_snr, "
            f"rules_from_json), a callable (path, leaf) -> axes, or PathRules(callable); "
            f"got {rules!r}"
        )
    mu_codec, nu_codec = _codecs(mu_bits, nu_bits, mu_map, nu_map, block_size)
    plans = lambda tree: _leaf_plans(rules, tree, mu_codec, nu_codec, min_size)

    def init_leaf(x, plan: _Plan) -> _Leaf:
        if plan.mu_q:
            q = mu_codec.abstract(tuple(x.shape))
            mu, mu_s = (
                jnp.zeros(q.codes.shape, q.codes.dtype),
                jnp.zeros(q.scales.shape, q.scales.dtype),
            )
        else:
            dtype = mu_dtype if mu_dtype is not None else x.dtype
            if mu_codec is not None:
                dtype = jnp.float32
            mu, mu_s = jnp.zeros_like(x, dtype), EMPTY
        rshape = _reduced_shape(tuple(x.shape), plan.axes)
        if plan.nu_q:
            q = nu_codec.abstract(_squeezed(rshape))
            nu, nu_s = (
                jnp.zeros(q.codes.shape, q.codes.dtype),
                jnp.zeros(q.scales.shape, q.scales.dtype),
            )
        else:
            nu = jnp.zeros_like(x) if not plan.axes else zeros_for(x, rshape, x.dtype)
            nu_s = EMPTY
        return _Leaf(mu, mu_s, nu, nu_s)

    def init_fn(params: optax.Params) -> ScaleBySlimAdamState:
        fields = init_leaves(init_leaf, params, _Leaf, plans(params))
        return ScaleBySlimAdamState(jnp.zeros([], jnp.int32), *fields)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        leaf_plans = plans(updates)
        hyper = (b1, b2, eps, eps_root, count)

        def sliced(plan, extra, g, *fields):  # plan: static, bound before auto_axes
            g_stats, *hp = extra
            return _quantized_leaf(g, *fields, plan, mu_codec, nu_codec, *hp, g_stats=g_stats)

        # Float leaves go through optax's own tree functions together, as in
        # optax.scale_by_adam: XLA compiles a shared bias correction differently for one
        # leaf and for several, and only the same grouping gives the same bits.
        grads, treedef = jax.tree.flatten(updates)
        floats = [i for i, p in enumerate(leaf_plans) if not (p.mu_q or p.nu_q)]
        pick = lambda tree: [treedef.flatten_up_to(tree)[i] for i in floats]
        done = _float_leaves(
            [grads[i] for i in floats],
            _Leaf(pick(state.mu), None, pick(state.nu), None),
            [leaf_plans[i].axes for i in floats],
            *hyper,
            mu_dtype,
        )
        done = dict(zip(floats, done, strict=True))

        def update_leaf(i, g, leaf: _Leaf, chain):
            if i in done:
                return done[i]
            # quantized leaves one after another (bounded temporaries); the statistics
            # read the gradient as given, the slices write the update over its gated
            # copy (one reader of each, so XLA copies neither)
            fn = functools.partial(sliced, leaf_plans[i])
            u, *fields = chain.run(fn, (g, *hyper), g, *leaf)
            return u, _Leaf(*fields)

        updates, fields = update_leaves(update_leaf, updates, state, _Leaf)
        return updates, ScaleBySlimAdamState(count, *fields)

    return optax.GradientTransformation(init_fn, update_fn)


def _decoded(codes, scales, codec, shape) -> jax.Array:
    """A stored moment (no log bases) as float32 values of ``shape``."""
    return qz.from_blocks(qz.decode(codes, scales, None, codec), shape[-1])


def _encoded(x, codec) -> tuple[jax.Array, jax.Array]:
    """``(codes, scales)`` of ``x`` as stored (nearest rounding)."""
    codes, scales, _ = qz.encode(
        qz.to_blocks(x.astype(jnp.float32), codec.block_size), codec
    ).stored(codec)
    return codes, scales


def _zeros(a: jax.ShapeDtypeStruct) -> jax.Array:
    return jnp.zeros(a.shape, a.dtype)


class _Leaf(NamedTuple):
    """One leaf's entries of the state's per-parameter fields (``EMPTY`` where unused)."""

    mu: jax.Array
    mu_scales: jax.Array
    nu: jax.Array
    nu_scales: jax.Array


def _float_leaves(gs, leaves: _Leaf, axes, b1, b2, eps, eps_root, count, mu_dtype):
    """``optax.scale_by_adam``'s tree operations on lists of float leaves (``leaves``:
    lists of their ``mu`` and ``nu``), with ``g**2`` averaged over each leaf's axes.
    Returns ``(update, _Leaf)`` per leaf."""
    mus = optax.tree.update_moment(gs, leaves.mu, b1, 1)
    nus = [(1 - b2) * _mean_sq(g, k) + b2 * v for g, v, k in zip(gs, leaves.nu, axes, strict=True)]
    mu_hat = optax.tree.bias_correction(mus, b1, count)
    nu_hat = optax.tree.bias_correction(nus, b2, count)
    us = [
        (m / (jnp.sqrt(v + eps_root) + eps)).astype(g.dtype)
        for m, v, g in zip(mu_hat, nu_hat, gs, strict=True)
    ]
    mus = optax.tree.cast(mus, mu_dtype)
    return [
        (u, _Leaf(m, EMPTY, v.astype(nu.dtype), EMPTY))
        for u, m, v, nu in zip(us, mus, nus, leaves.nu, strict=True)
    ]


def _quantized_leaf(
    g, mu, mu_s, nu, nu_s, plan, mu_codec, nu_codec, b1, b2, eps, eps_root, count, g_stats=None
):
    """A leaf with a quantized first and/or reduced second moment, in float32
    (``g_stats``: the same gradient, read for the reduced second moment).

    The reduced second moment (``mean_K(g**2)`` and the update's denominator) is small
    and computed whole; the first moment and the update run over row slices of the leaf
    (``map_rows``), with the update written over the gradient. With no averaging axes
    and a float second moment, the second moment runs in the slices too; a quantized
    second moment of full size (no averaging axes) runs whole."""
    shape = tuple(g.shape)
    rshape = _reduced_shape(shape, plan.axes)
    t = count.astype(jnp.float32)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    full_nu = not plan.axes  # second moment of the leaf's own shape
    if plan.nu_q:
        qshape = _squeezed(rshape)
        v = _decoded(nu, nu_s, nu_codec, qshape).reshape(rshape)
    elif not full_nu:
        v = nu.astype(jnp.float32)
    if not full_nu or plan.nu_q:
        g_stats = g if g_stats is None else g_stats
        v = b2 * v + (1 - b2) * _mean_sq(g_stats.astype(jnp.float32), plan.axes)
        den = jnp.sqrt(v / bc2 + eps_root) + eps
        if plan.nu_q:
            nu, nu_s = _encoded(v.reshape(_squeezed(rshape)), nu_codec)
        else:
            nu, nu_s = v.astype(nu.dtype), EMPTY

    def rows(carried, readonly, _):
        g, mu, mu_s, *nu_rows = carried
        g32 = g.astype(jnp.float32)
        if plan.mu_q:
            m = _decoded(mu, mu_s, mu_codec, g.shape)
        else:
            m = mu.astype(jnp.float32)
        m = b1 * m + (1 - b1) * g32
        if nu_rows:  # full-size float second moment, sliced with the leaf
            v = b2 * nu_rows[0].astype(jnp.float32) + (1 - b2) * g32**2
            d = jnp.sqrt(v / bc2 + eps_root) + eps
            nu_rows = [v.astype(nu_rows[0].dtype)]
        else:
            d = readonly if sliced_den else den
        u = (m / bc1) / d
        if plan.mu_q:
            mu, mu_s = _encoded(m, mu_codec)
        else:
            mu = m.astype(mu.dtype)
        return (u.astype(g.dtype), mu, mu_s, *nu_rows)

    carried = (g, mu, mu_s, *((nu,) if full_nu and not plan.nu_q else ()))
    sliced_den = not full_nu and 0 not in plan.axes  # row-aligned: read by slice
    readonly = den if sliced_den else ()
    if full_nu and plan.nu_q:  # pragma: no cover - quantized Adam is scale_by_quantized_adam
        out = rows(carried, readonly, None)
    else:
        out = map_rows(rows, carried, readonly)
    u, mu, mu_s, *nu_rows = out
    if nu_rows:
        nu, nu_s = nu_rows[0], EMPTY
    return u, mu, mu_s, nu, nu_s


def slim_state_from_adam(adam_state: Any, rules: Rules, **quantization: Any) -> Any:
    """Turns Adam state into SlimAdam state, to continue training without a restart.

    Every ``optax.ScaleByAdamState`` inside ``adam_state`` (e.g. ``optax.adamw``'s
    chain state, or the inner state of ``snr_calibration``) is replaced by the
    ``ScaleBySlimAdamState`` that ``scale_by_slim_adam(rules=rules, ...)`` with the same
    quantization arguments would hold: ``count`` and ``mu`` carried over (quantized if
    ``mu_bits``), ``nu`` averaged over each leaf's axes. The rest of the chain state is
    kept, so ``optax.adamw``'s state continues under ``slim_adamw`` with the same
    ``learning_rate`` schedule position. (An ``SNRCalibrationState`` wrapper is
    unwrapped to its inner state.)

    Since ``mean_K`` commutes with the EMA, the result equals the state SlimAdam would
    have reached on the same gradients.

    Args:
      adam_state: an optimizer state containing ``optax.ScaleByAdamState`` (or an
        ``SNRCalibrationState``).
      rules: the averaging axes, as ``scale_by_slim_adam`` takes them.
      mu_bits: as ``scale_by_slim_adam``.
      nu_bits: as ``scale_by_slim_adam``.
      mu_map: as ``scale_by_slim_adam``.
      nu_map: as ``scale_by_slim_adam``.
      block_size: as ``scale_by_slim_adam``.
      min_size: as ``scale_by_slim_adam``.

    Returns:
      ``adam_state`` with each ``ScaleByAdamState`` replaced by a
      ``ScaleBySlimAdamState``.

    Example:
      >>> from lowbit_optax import slim_adamw
      >>> params = {"w": jnp.ones((4, 8))}
      >>> grads = {"w": jnp.arange(32.0).reshape(4, 8)}
      >>> adamw = optax.adamw(1e-3)
      >>> _, state = jax.jit(adamw.update)(grads, adamw.init(params), params)
      >>> slim = slim_state_from_adam(state, {"w": (1,)})
      >>> slim[0].nu["w"].shape
      (4, 1)
      >>> tx = slim_adamw(1e-3, rules={"w": (1,)})  # what SlimAdam would have reached
      >>> update = jax.jit(tx.update)
      >>> _, direct = update(grads, tx.init(params), params)
      >>> bool(jnp.allclose(direct[0].nu["w"], slim[0].nu["w"]))
      True
      >>> updates, slim = update(grads, slim, params)  # training continues
      >>> int(slim[0].count)
      2
    """
    unknown = set(quantization) - set(_QUANTIZATION)
    if unknown:
        raise TypeError(
            f"slim_state_from_adam got {sorted(unknown)}; it takes rules and "
            f"scale_by_slim_adam's quantization arguments {list(_QUANTIZATION)}"
        )
    q = {**_QUANTIZATION, **quantization}
    mu_bits, nu_bits, block_size, min_size = _static(
        q["mu_bits"], q["nu_bits"], q["block_size"], q["min_size"]
    )
    _check_config(0.9, 0.999, 0.0, mu_bits, nu_bits, min_size)
    mu_codec, nu_codec = _codecs(mu_bits, nu_bits, q["mu_map"], q["nu_map"], block_size)
    is_adam = lambda x: isinstance(x, (optax.ScaleByAdamState, SNRCalibrationState))

    def convert(s: Any) -> Any:
        if isinstance(s, SNRCalibrationState):
            return jax.tree.map(convert, s.inner_state, is_leaf=is_adam)
        if not isinstance(s, optax.ScaleByAdamState):
            return s
        leaves, treedef = jax.tree.flatten(s.nu)
        mus = treedef.flatten_up_to(s.mu)
        plans = _leaf_plans(rules, s.nu, mu_codec, nu_codec, min_size)
        per_leaf = [convert_leaf(*a) for a in zip(leaves, mus, plans, strict=True)]
        return ScaleBySlimAdamState(s.count, *fields_of(treedef, _Leaf, per_leaf))

    def convert_leaf(nu, mu, plan: _Plan) -> _Leaf:
        v = jnp.mean(nu, axis=plan.axes, keepdims=True).astype(nu.dtype) if plan.axes else nu
        if plan.mu_q:
            mu, mu_s = _encoded(mu, mu_codec)
        else:
            mu, mu_s = (mu.astype(jnp.float32) if mu_bits is not None else mu), EMPTY
        if plan.nu_q:
            return _Leaf(mu, mu_s, *_encoded(v.reshape(_squeezed(v.shape)), nu_codec))
        return _Leaf(mu, mu_s, v, EMPTY)

    return jax.tree.map(convert, adam_state, is_leaf=is_adam)


# slim_state_from_adam's keywords: scale_by_slim_adam's quantization arguments
_QUANTIZATION = {
    name: p.default
    for name, p in inspect.signature(scale_by_slim_adam).parameters.items()
    if name in ("mu_bits", "nu_bits", "mu_map", "nu_map", "block_size", "min_size")
}
slim_state_from_adam.__signature__ = forwarding_signature(
    slim_state_from_adam, scale_by_slim_adam, drop=("mu_dtype",)
)
