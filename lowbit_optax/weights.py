"""Low-precision weights: a bf16 (or fp16) parameter step that behaves like a float32 one.

``optax.apply_updates`` adds a float32 update to a bfloat16 parameter and rounds the sum
to the nearest bfloat16: an update smaller than half a unit in the last place of the
weight (``2**-9`` of it for bfloat16) is lost, every step, and training stalls. This is
signal swamping in the weights (SOLO's analysis of the optimizer state, one level up).
Three remedies, each without a float32 master copy of the weights:

* ``stochastic_rounding()`` goes last in a chain (it reads ``params``) and replaces each
  update of a low-precision parameter by ``SR(p + u) - p``: ``SR`` rounds the float32
  sum to one of the two neighbouring values of the parameter's dtype, up with
  probability proportional to the distance from the lower one, so
  ``E[p_new] = p + u`` (unbiased). No extra state but a key.
* ``compensated()`` (Kahan summation) keeps what rounding lost in a buffer of the
  parameter's dtype (+2 bytes per bfloat16 parameter) and adds it back next step:
  ``x = p + (u + c)``, ``p_new = RN(x)``, ``c_new = x - p_new``. Deterministic; the pair
  ``(p, c)`` carries about 16 significant bits.
* ``eco(inner, learning_rate)`` (ECO) folds the rounding error into the first moment of
  an Adam-like ``inner`` transform, at no extra state, so that the following steps put
  it back into the weights (the equations are in ``eco``'s docstring).

Each emits float32 updates equal to ``p_new - p`` exactly (the difference of two
neighbouring-range values of a narrower dtype), so ``apply_updates``' own nearest
rounding lands on ``p_new``. Float32 (and float64) parameters pass through untouched.

References: Zamirai et al., "Revisiting BFloat16 Training" (arXiv 2010.06192);
arXiv 2502.20566 (bf16 with stochastic rounding matching mixed precision up to 6.7B);
Kahan, "Further remarks on reducing truncation errors" (CACM 1965); Nikdan et al., "ECO:
Quantized Training without Full-Precision Master Weights" (arXiv 2601.22101).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowbit_optax._codes import hash_bits, hash_uniform
from lowbit_optax._driver import EMPTY, Chain, is_empty
from lowbit_optax._util import static_arg
from lowbit_optax.moments import AdamLike, inner_count

__all__ = [
    "CompensatedState",
    "EcoState",
    "StochasticRoundingState",
    "compensated",
    "eco",
    "round_stochastically",
    "stochastic_rounding",
]


class StochasticRoundingState(NamedTuple):
    """State of ``stochastic_rounding``.

    Attributes:
      key: raw ``uint32`` PRNG key data, split every step (checkpoint-safe).

    Example:
      >>> state = stochastic_rounding(key=3).init({"w": jnp.ones(2, jnp.bfloat16)})
      >>> state.key.dtype, state.key.shape  # no per-parameter state
      (dtype('uint32'), (2,))
    """

    key: jax.Array


def round_stochastically(x: jax.Array, dtype: Any, u: jax.Array) -> jax.Array:
    """``x`` (float32) rounded stochastically to ``dtype``, unbiased.

    To the neighbour above with probability ``(x - below) / (above - below)`` given
    uniform ``u`` in ``[0, 1)``, else below. Values of ``dtype`` come back as they are;
    non-finite values round to nearest (NaN stays NaN, infinities stay infinite).

    Args:
      x: the values (computed in float32).
      dtype: the narrower floating dtype to round to (``jnp.bfloat16``,
        ``jnp.float16``).
      u: uniform noise in ``[0, 1)`` of ``x``'s shape.

    Returns:
      ``x`` rounded, in ``dtype``.

    Example:
      ``1 + 2**-9`` lies a quarter of the way from 1 to the next bfloat16, ``1 + 2**-7``:
      it rounds up when ``u < 0.25``.

      >>> x = jnp.full((4,), 1.0 + 2**-9)
      >>> u = jnp.array([0.0, 0.25, 0.5, 0.75])  # evenly spread noise
      >>> r = round_stochastically(x, jnp.bfloat16, u)
      >>> r.dtype, r.astype(jnp.float32).tolist()  # up where u < 0.25
      (dtype(bfloat16), [1.0078125, 1.0, 1.0, 1.0])
      >>> float(r.astype(jnp.float32).mean()) == 1.0 + 2**-9  # unbiased: the mean is x
      True
    """
    x = x.astype(jnp.float32)
    near = x.astype(dtype)
    nearf = near.astype(jnp.float32)
    up = nearf < x  # the nearest value is below x: the other neighbour is above
    other = jnp.nextafter(near, jnp.where(up, jnp.inf, -jnp.inf).astype(dtype))
    otherf = other.astype(jnp.float32)
    below = jnp.where(up, nearf, otherf)
    above = jnp.where(up, otherf, nearf)
    # exact: neighbouring values of a narrower dtype and x between them, in float32
    p_above = (x - below) / (above - below)
    rounded = jnp.where(u < p_above, above, below).astype(dtype)
    keep = ~jnp.isfinite(x) | ~jnp.isfinite(otherf) | (nearf == x)
    return jnp.where(keep, near, rounded)


def _round_bf16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """``round_stochastically(x, bfloat16, u)`` for float32 ``x`` by bits: a bfloat16 is
    the top half of a float32, so adding 16 random bits to the bottom half carries into
    the top with probability (bottom half) / 2**16, the distance to the lower neighbour
    (in magnitude) over the gap; truncating the bottom half then rounds up with that
    probability. Non-finite values round to nearest."""
    x = x.astype(jnp.float32)
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    up = (raw + (bits >> 16)) & jnp.uint32(0xFFFF0000)
    rounded = jax.lax.bitcast_convert_type(up, jnp.float32).astype(jnp.bfloat16)
    return jnp.where(jnp.isfinite(x), rounded, x.astype(jnp.bfloat16))


def _sr(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """Float32 ``x`` rounded stochastically to ``dtype`` with noise from ``key``."""
    if jnp.dtype(dtype) == jnp.bfloat16:  # by bits: a tenth of the general form's cost
        return _round_bf16(x, hash_bits(key, x.shape))
    return round_stochastically(x, dtype, hash_uniform(key, x.shape))


def _nearest_bf16(x: jax.Array) -> jax.Array:
    """Float32 ``x`` rounded to the nearest bfloat16 (ties to even), as float32, by bits:
    the same values as ``x.astype(bfloat16)`` for finite ``x``."""
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    lsb = (raw >> 16) & jnp.uint32(1)
    up = (raw + jnp.uint32(0x7FFF) + lsb) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(up, jnp.float32)


def _seed(key: Any) -> int:
    key = static_arg("key", key, 0)
    if not isinstance(key, int) or isinstance(key, bool):
        raise ValueError(f"key must be an int seed, got {key!r}")
    return key


def _narrow(p: Any) -> bool:
    return (
        hasattr(p, "dtype")
        and jnp.issubdtype(p.dtype, jnp.floating)
        and jnp.finfo(p.dtype).bits < 32
    )


def _needs_params(name: str, params: Any) -> None:
    if params is None:
        raise ValueError(
            f"{name} needs the params (it rounds p + u): call "
            "tx.update(updates, state, params), with this transform last in the chain"
        )


def stochastic_rounding(key: int | None = None) -> optax.GradientTransformation:
    """Makes ``optax.apply_updates`` round low-precision params stochastically.

    Goes last in a chain: ``optax.chain(optax.adamw(lr), stochastic_rounding())``. For
    each parameter stored in fewer than 32 bits (bfloat16, float16) the update ``u``
    becomes ``SR(p + u) - p`` in float32, with ``SR`` unbiased rounding to the
    parameter's dtype (``round_stochastically``), so ``apply_updates(p, u')`` is
    exactly ``SR(p + u)`` and ``E[p_new] = p + u``. Updates of float32 params pass
    through. The noise is a positional hash of a key kept in the state (split every
    step, folded with the leaf's index), so a resumed checkpoint rounds as the
    uninterrupted run.

    Args:
      key: seed of the key in the state (default 0).

    Returns:
      A ``GradientTransformation`` whose state is a ``StochasticRoundingState``; its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
      >>> tx = optax.chain(optax.sgd(1e-3), stochastic_rounding())
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones((4, 4), jnp.bfloat16)}
      >>> u, state = jax.jit(tx.update)(grads, state, params)
      >>> new = optax.apply_updates(params, u)["w"]  # 1 - 1e-3: up or down, unbiased
      >>> bool(jnp.all((new == 1.0) | (new == 0.99609375)))
      True

    References:
      Zamirai et al., "Revisiting BFloat16 Training", arXiv 2010.06192.
    """
    key = _seed(key)

    def init_fn(params: optax.Params) -> StochasticRoundingState:
        del params
        return StochasticRoundingState(jax.random.key_data(jax.random.key(key)))

    def update_fn(updates, state, params=None):
        _needs_params("stochastic_rounding", params)
        step_key, next_key = jax.random.split(jax.random.wrap_key_data(state.key))
        leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        out = []
        for i, (u, p) in enumerate(zip(leaves, p_leaves, strict=True)):
            if u is None or not _narrow(p):
                out.append(u)
                continue
            pf = p.astype(jnp.float32)
            new = _sr(pf + u.astype(jnp.float32), p.dtype, jax.random.fold_in(step_key, i))
            out.append(new.astype(jnp.float32) - pf)
        new_state = StochasticRoundingState(jax.random.key_data(next_key))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


class CompensatedState(NamedTuple):
    """State of ``compensated``.

    Attributes:
      compensation: a tree shaped like the params; for each low-precision param what
        rounding lost so far, in the param's dtype (``EMPTY`` for float32 params).

    Example:
      >>> from lowbit_optax import state_bytes
      >>> params = {"w": jnp.ones(4, jnp.bfloat16), "b": jnp.ones(4)}
      >>> state = compensated().init(params)
      >>> state.compensation["w"].dtype, state.compensation["b"]  # float32: nothing
      (dtype(bfloat16), MaskedNode())
      >>> state_bytes(state) == 4 * 2  # 2 bytes per bfloat16 parameter
      True
    """

    compensation: Any


def compensated() -> optax.GradientTransformation:
    """Kahan-compensated updates of low-precision params (bfloat16, float16).

    Goes last in a chain: ``optax.chain(optax.adamw(lr), compensated())``. For each
    parameter ``p`` stored in fewer than 32 bits, with ``c`` its compensation (same
    dtype, starts at 0) and ``u`` the update, in float32::

        x     = p + (u + c)
        p_new = RN(x)          # round to nearest in p's dtype
        c_new = RN(x - p_new)  # what rounding lost; x - p_new is exact in float32

    and the emitted update is ``p_new - p`` (exact), so ``optax.apply_updates`` lands on
    ``p_new``. Each step the pair ``(p, c)`` loses only the rounding of ``c`` (for
    bfloat16, 2**-9 of at most half a unit in the last place of ``p``) where plain
    rounding loses up to half a unit: the weights follow a float32 master copy at half
    its memory. Float32 params pass through; a non-finite ``x`` leaves the
    compensation at 0.

    **When it beats stochastic rounding:** when most updates are far below half a unit
    in the last place of the weight for many steps (small learning rates, late in a
    decayed schedule, large weights). Stochastic rounding is unbiased there but adds a
    random walk of about ``ulp * sqrt(steps)`` around the sum; compensation carries the
    small updates exactly. It costs 2 bytes per bfloat16 parameter, which
    ``stochastic_rounding`` does not.

    Returns:
      A ``GradientTransformation`` whose state is a ``CompensatedState``; its ``update``
      needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((4,), jnp.bfloat16)}
      >>> tx = optax.chain(optax.sgd(1e-3), compensated())
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(8):  # each step's -1e-3 alone rounds back to 1.0
      ...     u, state = update({"w": jnp.ones((4,), jnp.bfloat16)}, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> float(params["w"][0])  # 1 - 8e-3 to bfloat16's precision
      0.9921875

    References:
      Kahan, "Further remarks on reducing truncation errors", CACM 8(1), 1965;
      Zamirai et al., "Revisiting BFloat16 Training", arXiv 2010.06192.
    """

    def init_fn(params: optax.Params) -> CompensatedState:
        return CompensatedState(
            jax.tree.map(lambda p: jnp.zeros_like(p) if _narrow(p) else EMPTY, params)
        )

    def update_fn(updates, state, params=None):
        _needs_params("compensated", params)
        leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        c_leaves = treedef.flatten_up_to(state.compensation)
        out, comp = [], []
        for u, p, c in zip(leaves, p_leaves, c_leaves, strict=True):
            if u is None or is_empty(c):
                out.append(u)
                comp.append(c)
                continue
            pf = p.astype(jnp.float32)
            x = pf + (u.astype(jnp.float32) + c.astype(jnp.float32))
            new = x.astype(p.dtype).astype(jnp.float32)
            # the same rounding written another way for the compensation, so that XLA
            # recomputes it there instead of keeping the rounded sum of every leaf
            near = _nearest_bf16(x) if p.dtype == jnp.bfloat16 else new
            lost = jnp.where(jnp.isfinite(x) & jnp.isfinite(near), x - near, 0.0).astype(c.dtype)
            # 0 * lost (finite, so exactly 0) makes the new weight read the new
            # compensation: XLA then computes the compensation first, while the donated
            # weight is still there, instead of copying the weight to read it later
            out.append((new - pf) + 0.0 * lost.astype(jnp.float32))
            comp.append(lost)
        return treedef.unflatten(out), CompensatedState(treedef.unflatten(comp))

    return optax.GradientTransformation(init_fn, update_fn)


class EcoState(NamedTuple):
    """State of ``eco``.

    Attributes:
      count: int32 steps taken (the learning-rate schedule's step).
      key: raw ``uint32`` PRNG key data with ``rounding='stochastic'``, else ``EMPTY``.
      inner_state: the Adam-like inner transform's state (its first moment carries the
        weights' rounding error).

    Example:
      >>> from lowbit_optax import scale_by_adam_like
      >>> tx = eco(scale_by_adam_like(), learning_rate=1e-3)
      >>> state = tx.init({"w": jnp.ones(4, jnp.bfloat16)})
      >>> int(state.count), state.key  # nearest rounding: no key
      (0, MaskedNode())
      >>> state.inner_state.mu["w"].dtype  # no state beyond the inner Adam's own
      dtype(bfloat16)
    """

    count: jax.Array
    key: Any
    inner_state: Any


def eco(
    inner: AdamLike,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    mask: optax.MaskOrFn = None,
    *,
    rounding: str = "nearest",
    key: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """ECO: the weights' rounding error fed back into an Adam-like first moment.

    A whole optimizer around an ``AdamLike`` ``inner`` (``scale_by_adam_like``,
    ``scale_by_quantized_adam``): it applies the weight decay and the learning rate
    itself, rounds each low-precision parameter's new value, and folds what rounding
    lost into ``inner``'s first moment, so that the next steps apply it. No state is
    added. Float32 params get plain AdamW updates.

    **Equations.** With ``D_t = inner's update = m_t / (1 - b1**t) / (sqrt(nu_hat_t) +
    eps)``, learning rate ``eta_t`` and weight decay ``lam``, per parameter::

        x       = p + u,          u = -eta_t (D_t + lam p)
        p_new   = q(x)            # round to p's dtype: nearest or stochastic
        e       = x - p_new       # what rounding lost
        m_t    <- m_t - (1 - b1) (1 - b1**(t+1)) (sqrt(nu_hat_t) + eps) e / (eta_t b1)

    A change ``dm`` of ``m_t`` reaches the update of step ``t + 1 + k`` as
    ``-eta b1**(k+1) dm / ((1 - b1**(t+1+k)) (sqrt(nu_hat) + eps))``; summed over
    ``k >= 0`` (with that step's denominators held) that is ``e``: the lost displacement
    comes back in full, spread over the momentum's memory. The paper (arXiv 2601.22101)
    injects ``e`` into the momentum of SGD with momentum and of Adam with the same aim
    (the master-weight trajectory without the master weights). Following that trajectory
    exactly would need ``m <- m - e_t / (eta b1) + e_(t-1) / eta`` (with SGD's momentum
    ``W <- W - eta m``): the previous step's error, a buffer of the weights' size.
    **Decisions:** the gain returns ``e`` once in total (no buffer); with nearest rounding
    a displacement then waits in the momentum until a step exceeds half a unit in the
    last place (a lag of about that over ``1 - b1`` units), stochastic rounding releases it
    on average at once; the gain uses the denominator and bias correction at the step of
    injection (the next steps' values are not known yet, and move slowly); steps with
    ``eta_t = 0`` inject nothing; a non-finite ``e`` injects nothing; quantized moments
    are decoded, corrected and encoded again by ``inner``'s ``MomentAccess`` (one more
    pass over the state per step).

    Args:
      inner: an ``AdamLike`` transform (its ``moments`` give the first moment, the
        second moment, ``b1`` and ``eps``), e.g. ``scale_by_adam_like()`` or
        ``scale_by_quantized_adam()``.
      learning_rate: the learning rate or schedule.
      weight_decay: decoupled weight decay (AdamW's).
      mask: which params decay (as ``optax.add_decayed_weights``).
      rounding: ``"nearest"`` or ``"stochastic"`` (the paper's best results use both
        ECO and stochastic rounding).
      key: seed of the stochastic-rounding key (default 0; ``rounding='stochastic'``).

    Returns:
      A ``GradientTransformationExtraArgs`` whose state is an ``EcoState``; its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import lowbit_optax
      >>> params = {"w": jnp.ones((8, 8), jnp.bfloat16)}
      >>> tx = eco(lowbit_optax.scale_by_adam_like(), learning_rate=1e-3)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones((8, 8), jnp.bfloat16)}
      >>> u, state = jax.jit(tx.update)(grads, state, params)
      >>> params = optax.apply_updates(params, u)
      >>> params["w"].dtype, float(params["w"][0, 0])  # the 1e-3 step was rounded away
      (dtype(bfloat16), 1.0)
      >>> float(state.inner_state.mu["w"][0, 0]) > 0.1  # ... and waits in mu (Adam: 0.1)
      True

    References:
      Nikdan et al., "ECO: Quantized Training without Full-Precision Master Weights",
      arXiv 2601.22101.
    """
    access = getattr(inner, "moments", None)
    if access is None:
        raise ValueError(
            "eco needs an AdamLike inner transform (one that carries its MomentAccess), "
            f"such as lowbit_optax.scale_by_adam_like() or scale_by_quantized_adam(); got "
            f"{type(inner).__name__}"
        )
    if access.b1 is None or access.eps is None:
        raise ValueError(
            "eco needs the inner transform's b1 and eps (its MomentAccess has "
            f"b1={access.b1!r}, eps={access.eps!r}); use lowbit_optax.scale_by_adam_like "
            "in place of optax.scale_by_adam"
        )
    if isinstance(access.b1, numbers.Real) and not 0 < access.b1 < 1:
        raise ValueError(
            f"eco folds the rounding error into the first moment, so it needs 0 < b1 < 1; "
            f"the inner transform has b1={access.b1!r}"
        )
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    seed = _seed(key)
    inner_tx = optax.with_extra_args_support(inner)

    def init_fn(params):
        key_data = jax.random.key_data(jax.random.key(seed)) if rounding == "stochastic" else EMPTY
        return EcoState(jnp.zeros([], jnp.int32), key_data, inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        _needs_params("eco", params)
        direction, inner_state = inner_tx.update(updates, state.inner_state, params, **extra_args)
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        eta = jnp.asarray(eta, jnp.float32)
        b1 = jnp.asarray(access.b1, jnp.float32)
        b2 = jnp.asarray(access.b2, jnp.float32)
        eps = jnp.asarray(access.eps, jnp.float32)
        t = inner_count(inner_state, state.count + 1).astype(jnp.float32)
        bc2 = 1.0 - b2**t
        # (1 - b1) (1 - b1^(t+1)) / (eta b1); 0 where eta = 0
        safe_eta = jnp.where(eta != 0, eta, 1.0)
        gain = jnp.where(eta != 0, (1.0 - b1) * (1.0 - b1 ** (t + 1.0)) / (safe_eta * b1), 0.0)

        key_data, step_key = EMPTY, None
        if rounding == "stochastic":
            step_key, next_key = jax.random.split(jax.random.wrap_key_data(state.key))
            key_data = jax.random.key_data(next_key)

        leaves, treedef = jax.tree.flatten(direction)
        p_leaves = treedef.flatten_up_to(params)
        if mask is None:
            decays = [True] * len(leaves)
        else:
            decays = treedef.flatten_up_to(mask(params) if callable(mask) else mask)
        fields = [
            treedef.flatten_up_to(optax.tree_utils.tree_get(inner_state, name))
            for name in access.fields
        ]

        def narrow_leaf(extra, d, p, *stored):
            """One low-precision leaf: the rounded step, its error into the moment."""
            (eta, gain, bc2, eps), decay, leaf_key = extra
            pf = p.astype(jnp.float32)
            # the decay in float32 (optax's would round weight_decay * p to bf16)
            x = pf - eta * (d.astype(jnp.float32) + decay * pf)
            if rounding == "stochastic":
                new = _sr(x, p.dtype, leaf_key).astype(jnp.float32)
            else:
                new = x.astype(p.dtype).astype(jnp.float32)
            lost = jnp.where(jnp.isfinite(x) & jnp.isfinite(new), x - new, 0.0)
            mu, nu = access.get(stored, p.shape)
            denom = jnp.sqrt(jnp.maximum(nu.astype(jnp.float32), 0.0) / bc2) + eps
            mu_new = mu.astype(jnp.float32) - gain * denom * lost
            return (new - pf, p, *access.put(stored, mu_new.astype(mu.dtype), nu))

        scalars = (eta, gain, bc2, eps)
        out, chain = [], Chain()
        for i, (d, p, decays_i) in enumerate(zip(leaves, p_leaves, decays, strict=True)):
            decay = weight_decay if decays_i else 0.0
            if not _narrow(p):
                u = -eta * (d.astype(jnp.float32) + decay * p.astype(jnp.float32))
                out.append(u.astype(d.dtype))
                continue
            # leaves one after another (bounded temporaries), Explicit mesh axes made Auto
            leaf_key = None if step_key is None else jax.random.fold_in(step_key, i)
            stored = tuple(f[i] for f in fields)
            u, _, *stored = chain.run(narrow_leaf, (scalars, decay, leaf_key), d, p, *stored)
            for f, value in zip(fields, stored, strict=True):
                f[i] = value
            out.append(u)
        inner_state = optax.tree_utils.tree_set(
            inner_state,
            **{name: treedef.unflatten(f) for name, f in zip(access.fields, fields, strict=True)},
        )
        new_state = EcoState(optax.safe_increment(state.count), key_data, inner_state)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
