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
    """How to read and write an Adam-like state's moments, one parameter at a time (see
    the module docstring)."""

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
    (``low_rank_projection``) read ``moments``."""

    moments: MomentAccess

    def __new__(cls, init, update, moments: MomentAccess):
        tx = super().__new__(cls, init, update)
        tx.moments = moments  # a NamedTuple subclass without __slots__ has a __dict__
        return tx


def field_access(b1: Any = None, b2: Any = None, eps: Any = None) -> MomentAccess:
    """The access of a state whose moments are float fields named ``mu`` and ``nu``
    (``optax.ScaleByAdamState``), with the given betas and epsilon (``None``: unknown)."""
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
      >>> tx = lowbit_optax.low_rank_projection(
      ...     scale_by_adam_like(b1=0.9, b2=0.95), rank=8, moments="rotate")
    """
    tx = optax.scale_by_adam(b1, b2, eps, **kwargs)
    return AdamLike(tx.init, tx.update, field_access(b1, b2, eps))
