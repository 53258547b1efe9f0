"""The moment protocol: how a wrapper that changes an Adam-like optimizer's coordinates
reaches that optimizer's first and second moments, its step count and its betas.

``low_rank_projection(..., moments='reset' | 'rotate')`` changes the basis its inner
transform works in; the inner moments must follow (zeroed, or rotated after bias
correction, which needs the betas that biased them). An inner transform takes part by
being an ``AdamLike``: an ``optax.GradientTransformation`` that also carries
``moments``, a ``MomentAccess``:

* ``fields``: the names of the state's per-parameter fields that hold the two moments
  (each a tree shaped like the params the transform sees);
* ``get(stored, shape) -> (mu, nu)``: one parameter's entries of those fields (a tuple,
  in ``fields`` order) as float arrays of that parameter's ``shape``;
* ``put(stored, mu, nu) -> stored``: the entries holding new moments;
* ``b1``, ``b2``: the betas (numbers, or traced scalars under ``inject_hyperparams``);
* ``eps``: the epsilon added to ``sqrt(nu_hat)`` in the denominator (``None``: unknown).

The step count is the state's one scalar integer ``count`` field (else the wrapper's).
Per-parameter access keeps a wrapper's work leaf by leaf: a quantized state is decoded
and encoded one leaf at a time, and only when a leaf's basis changes.

``scale_by_adam_like`` (``optax.scale_by_adam``, same numerics) and
``scale_by_quantized_adam`` are ``AdamLike``. Any other state with one float ``mu`` and
one float ``nu`` field (``optax.ScaleByAdamState``) is read by those names
(``field_access``); it carries no betas, so a rotation gets them once from the wrapper's
caller (``low_rank_projection(moment_betas=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["AdamLike", "MomentAccess", "field_access", "scale_by_adam_like"]


class MomentAccess(NamedTuple):
    """How to read and write an Adam-like state's moments, one parameter at a time.

    See ``lowbit_optax.moments``' module docstring for the protocol.

    Attributes:
      fields: names of the state's per-parameter fields that hold the two moments.
      get: ``get(stored, shape) -> (mu, nu)``: one parameter's entries of ``fields`` (a
        tuple, in ``fields`` order) decoded to float arrays of ``shape``.
      put: ``put(stored, mu, nu) -> stored``: the entries that hold new moments.
      b1: first-moment decay rate (a number or a traced scalar; ``None``: unknown).
      b2: second-moment decay rate.
      eps: the epsilon added to ``sqrt(nu_hat)`` (``None``: unknown).

    Example:
      A quantized Adam's moments span five fields, decoded and encoded by ``get`` and
      ``put``:

      >>> from lowbit_optax import scale_by_quantized_adam
      >>> scale_by_quantized_adam().moments.fields
      ('mu_codes', 'mu_scales', 'nu_codes', 'nu_scales', 'nu_bases')

      ``scale_by_adam_like``'s are optax's float ``mu`` and ``nu``:

      >>> tx = scale_by_adam_like(b2=0.95)
      >>> access = tx.moments
      >>> access.fields, access.b2
      (('mu', 'nu'), 0.95)
      >>> g = {"w": jnp.full((2, 3), 2.0)}
      >>> _, state = jax.jit(tx.update)(g, tx.init(g))
      >>> stored = tuple(getattr(state, f)["w"] for f in access.fields)
      >>> mu, nu = access.get(stored, (2, 3))
      >>> round(float(mu[0, 0]), 4), round(float(nu[0, 0]), 4)  # (1 - b1) g, (1 - b2) g**2
      (0.2, 0.2)
      >>> stored = access.put(stored, jnp.zeros_like(mu), nu)  # reset mu
      >>> float(access.get(stored, (2, 3))[0].max())
      0.0
    """

    fields: tuple[str, ...]
    get: Callable[[tuple[Any, ...], tuple[int, ...]], tuple[Any, Any]]
    put: Callable[[tuple[Any, ...], Any, Any], tuple[Any, ...]]
    b1: Any = None
    b2: Any = None
    eps: Any = None


class AdamLike(optax.GradientTransformation):
    """An ``optax.GradientTransformation`` of an Adam-like optimizer that also carries
    ``moments``, the ``MomentAccess`` of its state. It is used wherever a
    ``GradientTransformation`` is (``optax.chain`` etc.); wrappers that move moments
    (``low_rank_projection``) read ``moments``.

    Args:
      init: the transform's ``init`` function.
      update: the transform's ``update`` function.
      moments: the ``MomentAccess`` of the state ``init`` makes.

    Example:
      >>> base = optax.scale_by_adam(b1=0.9, b2=0.99)
      >>> tx = AdamLike(base.init, base.update, field_access(0.9, 0.99))
      >>> isinstance(tx, optax.GradientTransformation), tx.moments.fields, tx.moments.b2
      (True, ('mu', 'nu'), 0.99)
      >>> state = optax.chain(tx, optax.scale(-1e-3)).init({"w": jnp.zeros(3)})
    """

    moments: MomentAccess

    def __new__(cls, init, update, moments: MomentAccess):
        tx = super().__new__(cls, init, update)
        tx.moments = moments  # a NamedTuple subclass without __slots__ has a __dict__
        return tx


def field_access(b1: Any = None, b2: Any = None, eps: Any = None) -> MomentAccess:
    """The access of a state whose moments are float fields named ``mu`` and ``nu``.

    Such as ``optax.ScaleByAdamState``; ``get`` and ``put`` pass the arrays through.

    Args:
      b1: the first-moment decay rate (``None``: unknown).
      b2: the second-moment decay rate (``None``: unknown).
      eps: the denominator epsilon (``None``: unknown).

    Returns:
      A ``MomentAccess`` with ``fields == ("mu", "nu")``.

    Example:
      >>> access = field_access(0.9, 0.999)
      >>> access.fields, access.b1, access.eps
      (('mu', 'nu'), 0.9, None)
      >>> mu, nu = jnp.ones(3), jnp.zeros(3)
      >>> access.get((mu, nu), (3,))[0] is mu
      True
    """
    return MomentAccess(
        ("mu", "nu"), lambda stored, shape: stored, lambda _, m, v: (m, v), b1, b2, eps
    )


def inner_count(inner_state: Any, fallback: jax.Array) -> jax.Array:
    """The inner state's step count if it has exactly one scalar integer ``count``
    field (``optax.scale_by_adam``'s), else ``fallback`` (the wrapper's)."""
    found = optax.tree_utils.tree_get_all_with_path(inner_state, "count")
    if len(found) == 1:
        c = found[0][1]
        if isinstance(c, jax.Array) and c.ndim == 0 and jnp.issubdtype(c.dtype, jnp.integer):
            return c
    return fallback


def scale_by_adam_like(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, **kwargs: Any
) -> AdamLike:
    """``optax.scale_by_adam(b1, b2, eps, **kwargs)`` (the same state and numerics) as an
    ``AdamLike``, so that a wrapper that rotates its moments reads the betas from it.

    Args:
      b1, b2, eps: Adam's decay rates and epsilon.
      **kwargs: ``optax.scale_by_adam``'s other keywords (``eps_root``, ``mu_dtype``,
        ``nesterov``).

    Example:
      >>> import lowbit_optax
      >>> adam = scale_by_adam_like(b1=0.9, b2=0.95)
      >>> adam.moments.b2  # what a rotating wrapper reads
      0.95
      >>> tx = lowbit_optax.low_rank_projection(adam, rank=8, moments="rotate")
      >>> g = {"w": jnp.array([1.0, -2.0])}
      >>> updates, _ = jax.jit(adam.update)(g, adam.init(g))  # optax.scale_by_adam's
      >>> print(updates["w"].round(4))
      [ 1. -1.]
    """
    tx = optax.scale_by_adam(b1, b2, eps, **kwargs)
    return AdamLike(tx.init, tx.update, field_access(b1, b2, eps))
