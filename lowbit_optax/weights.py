"""Low-precision weights: a bf16 (or fp16) parameter step that behaves like a float32 one.

``optax.apply_updates`` adds a float32 update to a bfloat16 parameter and rounds the sum
to the nearest bfloat16: an update smaller than half a unit in the last place of the
weight (``2**-9`` of it for bfloat16) is lost, every step, and training stalls. This is
signal swamping in the weights (SOLO's analysis of the optimizer state, one level up).

``stochastic_rounding()`` goes last in a chain (it reads ``params``) and replaces each
update of a low-precision parameter by ``SR(p + u) - p``: ``SR`` rounds the float32 sum
to one of the two neighbouring values of the parameter's dtype, up with probability
proportional to the distance from the lower one, so ``E[p_new] = p + u`` (unbiased).
The emitted update is float32 and exact (the difference of two neighbouring-range
bfloat16 values), so ``apply_updates``' own nearest rounding lands exactly on the
stochastically rounded value. Float32 (and float64) parameters pass through untouched.

Reference: Zamirai et al., "Revisiting BFloat16 Training" (arXiv 2010.06192);
arXiv 2502.20566 (bf16 with stochastic rounding matching mixed precision up to 6.7B).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowbit_optax._codes import hash_bits, hash_uniform

__all__ = ["StochasticRoundingState", "round_stochastically", "stochastic_rounding"]


class StochasticRoundingState(NamedTuple):
    """``key``: raw ``uint32`` PRNG key data, split every step (checkpoint-safe)."""

    key: jax.Array


def round_stochastically(x: jax.Array, dtype: Any, u: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to ``dtype``: to the neighbour above with probability
    ``(x - below) / (above - below)`` given uniform ``u`` in ``[0, 1)``, else below.
    Values of ``dtype`` come back as they are; non-finite values round to nearest
    (NaN stays NaN, infinities stay infinite)."""
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


def _narrow(p: Any) -> bool:
    return (
        hasattr(p, "dtype")
        and jnp.issubdtype(p.dtype, jnp.floating)
        and jnp.finfo(p.dtype).bits < 32
    )


def stochastic_rounding(key: int = 0) -> optax.GradientTransformation:
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
      key: seed of the key in the state.

    Returns:
      A ``GradientTransformation`` whose state is a ``StochasticRoundingState``; its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
      >>> tx = optax.chain(optax.sgd(1e-3), stochastic_rounding())
      >>> state = tx.init(params)
      >>> u, state = tx.update({"w": jnp.ones((4, 4), jnp.bfloat16)}, state, params)
      >>> new = optax.apply_updates(params, u)["w"]  # 1 - 1e-3: up or down, unbiased
      >>> bool(jnp.all((new == 1.0) | (new == 0.99609375)))
      True

    References:
      Zamirai et al., "Revisiting BFloat16 Training", arXiv 2010.06192.
    """
    if not isinstance(key, int) or isinstance(key, bool):
        raise ValueError(f"key must be an int seed, got {key!r}")

    def init_fn(params: optax.Params) -> StochasticRoundingState:
        del params
        return StochasticRoundingState(jax.random.key_data(jax.random.key(key)))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "stochastic_rounding needs the params (it rounds p + u): call "
                "tx.update(updates, state, params), with this transform last in the chain"
            )
        step_key, next_key = jax.random.split(jax.random.wrap_key_data(state.key))
        leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        out = []
        for i, (u, p) in enumerate(zip(leaves, p_leaves, strict=True)):
            if u is None or not _narrow(p):
                out.append(u)
                continue
            leaf_key = jax.random.fold_in(step_key, i)
            pf = p.astype(jnp.float32)
            x = pf + u.astype(jnp.float32)
            if p.dtype == jnp.bfloat16:  # by bits: a tenth of the general form's cost
                new = _round_bf16(x, hash_bits(leaf_key, p.shape))
            else:
                new = round_stochastically(x, p.dtype, hash_uniform(leaf_key, p.shape))
            out.append(new.astype(jnp.float32) - pf)
        new_state = StochasticRoundingState(jax.random.key_data(next_key))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
