"""Compressed full-matrix preconditioners over a window of gradients (EFCP).

Both transforms work on the flattened parameter vector ``x`` (length ``d``, every leaf
raveled in tree order, float32) and keep a ring buffer of the last ``m`` gradients, the
window ``G`` (``m x d``; slot ``t mod m``), with its ``m x m`` Gram matrix
``K = G G^T`` updated by one row and column per step.

* ``scale_by_mfac`` (M-FAC, Frantar et al. 2021): the inverse of the empirical Fisher
  ``F = lam I + (1/m) sum_i g_i g_i^T`` (``m`` fixed, also while the window fills) applied
  to ``x``, in the closed form ``F^{-1} x = (1/lam) (x - G^T (lam m I + K)^{-1} G x)``.
* ``scale_by_ggt`` (GGT, Agarwal et al. 2019): windowed full-matrix AdaGrad,
  ``((G^T G)^{1/2} + eps I)^{-1} x`` from the eigendecomposition of the small
  ``K + 1e-6 I = V S^2 V^T``: with ``U = G^T V S^{-1}``,
  ``U (S + eps)^{-1} U^T x + (x - U U^T x) / eps``.

With a ``compressor`` (error feedback built in, as in Modoranu et al.): ``a = xi + g``,
``c = C(a)``, ``xi <- a - c``; ``c`` enters the window and is the vector preconditioned.
A sparse compressor (``top_k``, ``random_k``) makes the window sparse: ``m x k`` float32
values and ``m x k`` int32 indices instead of ``m x d`` floats (``8 m k`` vs ``4 m d``
bytes: ~50x less at 1% density).

**Decision (precision):** the vector preconditioned is always the newest window row
(``x = G^T e_s``, slot ``s``), so both closed forms are evaluated in their
cancellation-free forms, exactly equal in exact arithmetic:
``F^{-1} x = m G^T (lam m I + K)^{-1} e_s`` (from ``G x = K e_s``), and
``G^T V (S + eps)^{-1} V^T e_s`` for GGT (``x`` lies in the span of ``U``). The paper's
forms subtract two nearly equal vectors and divide by ``lam`` (or ``eps``), which in
float32 costs up to ``eps_f32 / lam`` relative error; the general forms are available as
``mfac_apply`` and ``ggt_apply`` (tests check all four against explicit ``d x d``
inverses in float64). For M-FAC, when ``damping <= 1e-6`` the ``m x m`` system is solved
in float64 if ``jax_enable_x64`` is on; with x64 off (JAX's default) it is solved in
float32 and a warning at construction says so.

References:
  Frantar, Kurtic, Alistarh, M-FAC: Efficient Matrix-Free Approximations of Second-Order
  Information, NeurIPS 2021.
  Agarwal et al., Efficient Full-Matrix Adaptive Regularization, ICML 2019.
  Modoranu et al., Error Feedback Can Accurately Compress Preconditioners, arXiv 2306.06098.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import optax

from lowbit_optax._driver import EMPTY
from lowbit_optax._util import auto_axes_like_inputs, static_arg
from lowbit_optax.error_feedback import Compressor

__all__ = ["ScaleByWindowState", "ggt_apply", "mfac_apply", "scale_by_ggt", "scale_by_mfac"]

HIGH_PRECISION_DAMPING = 1e-6


class ScaleByWindowState(NamedTuple):
    """State of ``scale_by_mfac`` / ``scale_by_ggt``.

    Attributes:
      count: int32 steps taken (the next slot is ``count % m``).
      key: raw ``uint32`` PRNG key data (random compressors), folded with the step.
      values: the window: ``(m, d)`` float32 dense, or ``(m, k)`` float32 values.
      indices: ``(m, k)`` int32 positions of ``values`` in the flattened vector (sparse
        windows); ``()`` for dense windows.
      gram: ``(m, m)`` float32 ``K = G G^T`` (zero rows/columns for empty slots).
      error: ``(d,)`` error-feedback accumulator (with a compressor), else ``()``.
    """

    count: jax.Array
    key: jax.Array
    values: jax.Array
    indices: Any
    gram: jax.Array
    error: Any


# ------------------------------------------------------------------------------------
# The math on one window
# ------------------------------------------------------------------------------------


def _gx(values, indices, x):
    """``G x`` (``m``)."""
    if isinstance(indices, tuple):
        return values @ x.astype(values.dtype)
    return jnp.sum(values * jnp.take(x, indices, mode="fill", fill_value=0).astype(values.dtype), 1)


def _gty(values, indices, y, d):
    """``G^T y`` (``d``)."""
    if isinstance(indices, tuple):
        return y.astype(values.dtype) @ values
    contrib = (values * y[:, None].astype(values.dtype)).reshape(-1)
    return jnp.zeros((d,), contrib.dtype).at[indices.reshape(-1)].add(contrib, mode="drop")


def _damped_gram(gram, damping, m, dtype):
    """M-FAC's small system ``lam m I + K`` in ``dtype``."""
    k = gram.astype(dtype)
    return damping * m * jnp.eye(k.shape[0], dtype=dtype) + k


def _gram_eig(gram, floor):
    """GGT's ``K + floor I = V S^2 V^T``: ``(S, V)`` with ``S >= sqrt(floor)``."""
    lam, v = jnp.linalg.eigh(gram + floor * jnp.eye(gram.shape[0], dtype=gram.dtype))
    return jnp.sqrt(jnp.maximum(lam, floor)), v


def mfac_apply(values, indices, gram, x, damping, num_grads=None):
    """The paper's closed form ``(1/lam)(x - G^T (lam m I + K)^{-1} G x)`` for any ``x``,
    in the dtype of its inputs (pass float64 arrays for a float64 evaluation)."""
    m = values.shape[0] if num_grads is None else num_grads
    d = x.shape[0]
    y = jnp.linalg.solve(_damped_gram(gram, damping, m, gram.dtype), _gx(values, indices, x))
    return (x - _gty(values, indices, y, d)) / damping


def ggt_apply(values, indices, gram, x, eps, floor=1e-6):
    """The paper's ``U (S + eps)^{-1} U^T x + (x - U U^T x) / eps`` for any ``x``, with
    ``K + floor I = V S^2 V^T`` and ``U = G^T V S^{-1}``."""
    d = x.shape[0]
    s, v = _gram_eig(gram, floor)
    utx = (v.T @ _gx(values, indices, x)) / s
    ux1 = _gty(values, indices, v @ (utx / (s + eps) / s), d)
    uux = _gty(values, indices, v @ (utx / s), d)
    return ux1 + (x - uux) / eps


def _mfac_newest(values, indices, gram, slot, damping, m, d, solve_dtype):
    """``F^{-1} x`` for the newest row ``x = G^T e_slot``: ``m G^T (lam m I + K)^{-1} e_s``."""
    e = jax.nn.one_hot(slot, gram.shape[0], dtype=solve_dtype)
    # lam m I + K is symmetric positive definite: Cholesky
    lhs = _damped_gram(gram, damping, m, solve_dtype)
    z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(lhs), e)
    return m * _gty(values, indices, z.astype(jnp.float32), d)


def _ggt_newest(values, indices, gram, slot, eps, d, floor=1e-6):
    """``((G^T G)^{1/2} + eps I)^{-1} x`` for the newest row: ``G^T V (S + eps)^{-1} V^T e_s``."""
    s, v = _gram_eig(gram, floor)
    return _gty(values, indices, v @ (v[slot] / (s + eps)), d)


# ------------------------------------------------------------------------------------
# The transforms
# ------------------------------------------------------------------------------------


def _check(num_grads: Any, compressor: Any) -> None:
    if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads < 1:
        raise ValueError(f"num_grads must be a positive int (the window size m), got {num_grads!r}")
    if compressor is not None and not (isinstance(compressor, Compressor) and compressor.sparse):
        raise ValueError(
            "the window stores sparse compressed gradients: compressor must be None (dense) "
            f"or a sparse Compressor (top_k(density), random_k(density)), got {compressor!r}"
        )


def _windowed(num_grads, compressor, key, apply_newest) -> optax.GradientTransformation:
    m = num_grads

    def init_fn(params):
        d = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
        if compressor is None:
            values, indices, error = jnp.zeros((m, d), jnp.float32), (), ()
        else:
            kk = compressor.k(d)
            values = jnp.zeros((m, kk), jnp.float32)
            indices = jnp.full((m, kk), d, jnp.int32)  # out of range: empty
            error = jnp.zeros((d,), jnp.float32)
        return ScaleByWindowState(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.key_data(jax.random.key(key)).astype(jnp.uint32),
            values=values,
            indices=indices,
            gram=jnp.zeros((m, m), jnp.float32),
            error=error,
        )

    def update_fn(updates, state, params=None):
        del params
        return auto_axes_like_inputs(body, updates, state)

    def body(updates, state):
        leaves, treedef = jax.tree.flatten(updates)
        flat = jnp.concatenate([g.reshape(-1).astype(jnp.float32) for g in leaves])
        d = flat.shape[0]
        slot = state.count % m
        ok = jnp.all(jnp.isfinite(flat))
        # a non-finite gradient leaves the window, Gram and accumulator as they were: only
        # the new row (and the Gram's row/column) is selected, not the whole m x d window
        keep = lambda new, old: jnp.where(ok, new, old)
        if compressor is None:
            values = state.values.at[slot].set(keep(flat, state.values[slot]))
            indices, error = (), ()
            row_dense = flat
        else:
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
            a = state.error + flat
            payload, _ = compressor.compress(a, EMPTY, step_key)
            row_dense = compressor.decompress(payload, (d,))
            error = keep(a - row_dense, state.error)
            values = state.values.at[slot].set(keep(payload.values, state.values[slot]))
            indices = state.indices.at[slot].set(keep(payload.indices, state.indices[slot]))
        # the new Gram row/column: G x with the new row in place (K[s, s] = |x|^2)
        row = keep(_gx(values, indices, row_dense), state.gram[slot])
        gram = state.gram.at[slot, :].set(row).at[:, slot].set(row)
        u = apply_newest(values, indices, gram, slot, d)
        new_state = ScaleByWindowState(
            optax.safe_increment(state.count), state.key, values, indices, gram, error
        )
        u = jnp.where(ok, u, flat)  # the update shows the NaN/inf itself
        out, start = [], 0
        for g in leaves:
            out.append(u[start : start + g.size].reshape(g.shape).astype(g.dtype))
            start += g.size
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_mfac(
    num_grads: int | None = None,
    damping: float | None = None,
    *,
    compressor: Compressor | None = None,
    key: int | None = None,
) -> optax.GradientTransformation:
    """M-FAC: the gradient (or, with a compressor, the error-feedback compressed
    accumulator) times the inverse of ``lam I + (1/m) sum_i g_i g_i^T`` over a ring
    buffer of the last ``m = num_grads`` (compressed) gradients.

    Args:
      num_grads: window size ``m`` (default 1024, as the papers); ``1/m`` stays fixed
        while it fills.
      damping: ``lam`` (default 1e-4); static (it picks the solve's precision). At
        ``lam <= 1e-6`` the ``m x m`` system is solved in float64 when
        ``jax_enable_x64`` is on (else in float32, with a warning here).
      compressor: ``None`` (dense window) or a sparse compressor (``top_k(0.01)``);
        error feedback is then built in.
      key: seed for random compressors (default 0).

    Memory: ``4 m d`` bytes dense, ``8 m k`` sparse (+ ``4 d`` for the accumulator), plus
    ``4 m^2`` for the Gram matrix.

    Choosing the learning rate and ``lam``: along gradients the window holds, ``F^{-1} g``
    has a length of about ``1 / |g|`` (an empirical Fisher grows with ``g**2``), so the
    step shrinks as the gradients grow, unlike Adam's unit-scale step, and a rate that
    suits Adam can barely move a problem with large gradients. Along directions the window
    has not seen, and near a minimum once the window holds only vanishing gradients, the
    step is ``g / lam``: with a curvature ``h`` there, iterates overshoot the minimum when
    ``lr * h / lam > 2`` and oscillate or diverge (a small quadratic at ``lr = 0.1``
    with the default ``lam = 1e-4`` does). Tune the two together, and on small or
    well-conditioned problems raise ``lam`` towards the squared gradient scale.

    References:
      Frantar et al., M-FAC, NeurIPS 2021; Modoranu et al., arXiv 2306.06098.
    """
    num_grads, key = static_arg("num_grads", num_grads, 1024), static_arg("key", key, 0)
    damping = static_arg("damping", damping, 1e-4)
    _check(num_grads, compressor)
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (1e-4 in the papers), got {damping!r}")
    high = damping <= HIGH_PRECISION_DAMPING
    if high and not jax.config.jax_enable_x64:
        warnings.warn(
            f"scale_by_mfac(damping={damping}): damping <= {HIGH_PRECISION_DAMPING} wants the "
            "m x m system solved in float64, but jax_enable_x64 is off; solving in float32 "
            "(enable it with jax.config.update('jax_enable_x64', True) before creating arrays)",
            stacklevel=2,
        )

    def apply_newest(values, indices, gram, slot, d):
        dt = jnp.float64 if high and jax.config.jax_enable_x64 else jnp.float32
        return _mfac_newest(values, indices, gram, slot, damping, num_grads, d, dt)

    return _windowed(num_grads, compressor, key, apply_newest)


def scale_by_ggt(
    num_grads: int | None = None,
    eps: float = 1e-5,
    *,
    compressor: Compressor | None = None,
    key: int | None = None,
) -> optax.GradientTransformation:
    """GGT: windowed full-matrix AdaGrad, ``((G^T G)^{1/2} + eps I)^{-1}`` applied to the
    gradient (or the error-feedback compressed accumulator) over the last
    ``r = num_grads`` (compressed) gradients, through the eigendecomposition of the
    ``r x r`` Gram matrix.

    Args:
      num_grads: window size ``r`` (default 100, as the EFCP linear-probing runs).
      eps: ``eps`` (1e-5).
      compressor: ``None`` or a sparse compressor; error feedback is then built in.
      key: seed for random compressors (default 0).

    References:
      Agarwal et al., GGT, ICML 2019; Modoranu et al., arXiv 2306.06098.
    """
    num_grads, key = static_arg("num_grads", num_grads, 100), static_arg("key", key, 0)
    _check(num_grads, compressor)
    if isinstance(eps, (int, float)) and not eps > 0:  # may be traced (inject_hyperparams)
        raise ValueError(f"eps must be > 0, got {eps!r}")

    def apply_newest(values, indices, gram, slot, d):
        return _ggt_newest(values, indices, gram, slot, eps, d)

    return _windowed(num_grads, compressor, key, apply_newest)
