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

**Decision (layout):** the window is kept per param (``ScaleByWindowState``): each
param's slice of ``G`` has the param's axes, so the window shards along ``d`` as the
params do (``lowbit_optax.state_shardings``), and ``G x`` is a sum of per-param partial
dot products (an all-reduce of ``m`` floats under a mesh) while ``G^T z`` stays local.
The ``m x m`` Gram matrix and its algebra are replicated. For the same reason a sparse
compressor selects on every *row* of a param (along its last axis: ``k = round(density *
cols)`` entries per row, the paper's per-block Top-K with the row as the block), not
over the whole model: no selection needs to span shards of a row-split param (below).
``init`` checks that one device's share of the window fits the device's memory, before
allocating.

Measured collectives of the donated update (compiled by XLA CPU for 8 devices on a 2 x 4
mesh, ``w`` ``(64, 128)`` split ``("data", "model")``, ``b`` ``(128,)`` split
``"model"``, ``m = 8``; ``tests/test_sharding.py`` checks them): a dense window is never
moved. The all-reduces are of the ``m`` partial dot products (``f32[8]`` per param,
fused into tuples with the ``|x|^2`` partial sums, scalars) and of the finiteness flags
(``pred`` scalars); nothing is gathered (``|x|^2`` is ``jnp.sum(x * x)``: ``jnp.vdot``
ravels the gradient, and XLA gathered half of ``w`` to flatten it). A sparse window
selects in each row with ``row_top_k`` (``error_feedback``), partitioned by rows: with
``w`` split along rows only (FSDP) its update adds nothing but small all-reduces either
(XLA's own partitioning of ``lax.top_k`` gathered ``w`` whole on every device). With the
last axis split, each row is gathered whole for the selection (``w``: ``f32[32,32] ->
f32[32,128]``) and the picks ``x[indices]`` along a split row are masked local gathers
summed across the shards: all-reduces of ``m x rows x k`` values (``f32[32,8,6]`` for
``w``), and the new row's ``rows x k`` values (``f32[32,6]``) the same way.

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
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import optax

from lowbit_optax._driver import EMPTY, fields_of, init_leaves, is_empty
from lowbit_optax._util import auto_axes_like_inputs, static_arg, zeros_for
from lowbit_optax.error_feedback import Compressor

__all__ = ["ScaleByWindowState", "ggt_apply", "mfac_apply", "scale_by_ggt", "scale_by_mfac"]

HIGH_PRECISION_DAMPING = 1e-6


class ScaleByWindowState(NamedTuple):
    """State of ``scale_by_mfac`` / ``scale_by_ggt``.

    The window is kept per param: the rows of ``G`` restricted to one param are that
    param's slice of the window, laid out with the param's own axes, so the ``(m, d)``
    window shards along ``d`` exactly as the params do (``lowbit_optax.state_shardings``)
    and only the small ``m x m`` algebra is replicated.

    Attributes:
      count: int32 steps taken (the next slot is ``count % m``).
      key: raw ``uint32`` PRNG key data (random compressors), folded with the step.
      values: a tree like the params: ``(m, *p.shape)`` float32 (dense windows), or
        ``(m, *p.shape[:-1], k)`` float32, the ``k`` entries each row of ``p`` (along
        its last axis) kept by the compressor (sparse windows).
      indices: a tree like the params: ``(m, *p.shape[:-1], k)`` int32 positions of
        ``values`` along the param's last axis (``>= p.shape[-1]``: empty); ``EMPTY``
        leaves for dense windows.
      gram: ``(m, m)`` float32 ``K = G G^T`` (zero rows/columns for empty slots).
      error: a tree like the params: the error-feedback accumulator (with a
        compressor), else ``EMPTY`` leaves.

    Example:
      A sparse window of ``m = 8`` top-25% gradients of a ``(16, 32)`` param keeps 8
      values and 8 indices per row and step:

      >>> from lowbit_optax import state_bytes
      >>> from lowbit_optax import top_k
      >>> tx = scale_by_mfac(num_grads=8, compressor=top_k(0.25))
      >>> state = tx.init({"w": jnp.zeros((16, 32))})
      >>> state.values["w"].shape, state.indices["w"].shape, state.gram.shape
      ((8, 16, 8), (8, 16, 8), (8, 8))
      >>> window = 2 * 8 * 16 * 8 * 4 + 8 * 8 * 4  # values, indices, gram
      >>> state_bytes(state) == window + 16 * 32 * 4 + 4 + 8  # + error, count, key
      True
    """

    count: jax.Array
    key: jax.Array
    values: Any
    indices: Any
    gram: jax.Array
    error: Any


class _Leaf(NamedTuple):
    """One param's slice of the window's per-parameter fields."""

    values: jax.Array
    indices: Any
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


def _mfac_newest(gram, slot, damping, m, solve_dtype):
    """The coefficients ``z`` of ``F^{-1} x = G^T z`` for the newest row ``x = G^T e_s``:
    ``z = m (lam m I + K)^{-1} e_s``."""
    e = jax.nn.one_hot(slot, gram.shape[0], dtype=solve_dtype)
    # lam m I + K is symmetric positive definite: Cholesky
    lhs = _damped_gram(gram, damping, m, solve_dtype)
    z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(lhs), e)
    return m * z.astype(jnp.float32)


def _ggt_newest(gram, slot, eps, floor=1e-6):
    """The coefficients ``z`` of ``((G^T G)^{1/2} + eps I)^{-1} x = G^T z`` for the
    newest row: ``z = V (S + eps)^{-1} V^T e_s``."""
    s, v = _gram_eig(gram, floor)
    return v @ (v[slot] / (s + eps))


# ------------------------------------------------------------------------------------
# One param's slice of the window
# ------------------------------------------------------------------------------------


def _rows_of(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """A param viewed as rows along its last axis: ``(shape[:-1], shape[-1])`` (a scalar
    is one row of one)."""
    return (tuple(shape[:-1]), shape[-1]) if shape else ((), 1)


def _compress_rows(compressor: Compressor, a: jax.Array, key: jax.Array):
    """The compressor on every row of ``a`` (its last axis): ``(values, indices)``, each
    ``(*rows, k)``, the indices positions along the row."""
    rows, cols = _rows_of(a.shape)
    payload = compressor.compress_rows(a.reshape(-1, cols), key)
    k = payload.values.shape[-1]
    return payload.values.reshape(*rows, k), payload.indices.reshape(*rows, k)


def _scatter_rows(values: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``sum_i`` of the sparse rows ``values[i]`` (``(n, *rows, k)`` at ``indices``) as a
    dense ``shape`` array; out-of-range indices (empty entries) are dropped."""
    _, cols = _rows_of(shape)
    n, k = values.shape[0], values.shape[-1]
    v, i = values.reshape(n, -1, k), indices.reshape(n, -1, k)
    one = lambda vr, ir: (
        jnp.zeros((cols,), vr.dtype).at[ir.reshape(-1)].add(vr.reshape(-1), mode="drop")
    )
    return jax.vmap(one, in_axes=(1, 1))(v, i).reshape(shape)


def _dots(values: jax.Array, indices: Any, x: jax.Array) -> jax.Array:
    """This param's part of ``G x`` (``m`` partial dot products; summed over params)."""
    if is_empty(indices):
        return jnp.tensordot(values, x, axes=x.ndim)
    _, cols = _rows_of(x.shape)
    m, k = values.shape[0], values.shape[-1]
    xr, ir = x.reshape(-1, cols), indices.reshape(m, -1, k)
    take = lambda xrow, irow: jnp.take(xrow, irow, mode="fill", fill_value=0)
    picked = jax.vmap(take, in_axes=(0, 1), out_axes=1)(xr, ir)
    return jnp.sum(values.reshape(m, -1, k) * picked, axis=(1, 2))


def _transposed(values: jax.Array, indices: Any, z: jax.Array, shape) -> jax.Array:
    """This param's part of ``G^T z``."""
    if is_empty(indices):
        return jnp.tensordot(z, values, axes=1)
    return _scatter_rows(values * z.reshape(-1, *(1,) * (values.ndim - 1)), indices, shape)


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


def _window_leaf_bytes(shape: tuple[int, ...], m: int, compressor: Compressor | None) -> int:
    """Bytes of one param's slice of the window (values, indices, accumulator)."""
    if compressor is None:
        return 4 * m * math.prod(shape)
    rows, cols = _rows_of(shape)
    return 8 * m * math.prod(rows) * compressor.k(cols) + 4 * math.prod(shape)


def _share(p: Any) -> float:
    """The fraction of ``p`` one device holds: from its sharding where known (an array,
    or a traced value with an Explicit-axes sharding), else ``1 / device_count`` (a
    traced value may be sharded over every device; the check stays a lower bound)."""
    sharding = getattr(p, "sharding", None)
    if sharding is None or isinstance(p, jax.core.Tracer):
        try:
            sharding = jax.typeof(p).sharding
        except (AttributeError, TypeError):
            sharding = None
        if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.empty:
            return 1.0 / jax.device_count()
    if not p.shape:
        return 1.0
    try:
        return math.prod(sharding.shard_shape(p.shape)) / math.prod(p.shape)
    except (AttributeError, TypeError, ValueError):
        return 1.0 / jax.device_count()


def _device_capacity() -> tuple[int | None, str]:
    """The memory of one device as JAX reports it (``bytes_limit``), else, for CPU
    devices, the host's physical memory shared by its local devices."""
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"bytes_limit of {dev}"
    if dev.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None, ""
        n = jax.local_device_count()
        return host // n, f"the host's {host / 2**30:.1f} GiB over {n} CPU device(s)"
    return None, ""


def _check_fits(name: str, params: Any, m: int, compressor: Compressor | None) -> None:
    """Fails before any allocation when one device's share of the window cannot fit."""
    leaves = jax.tree.leaves(params)
    d = sum(math.prod(p.shape) for p in leaves)
    per_device = sum(_window_leaf_bytes(p.shape, m, compressor) * _share(p) for p in leaves)
    per_device += 4 * m * m
    capacity, source = _device_capacity()
    if capacity is None or per_device <= capacity:
        return
    kind = "dense (4 m d bytes)" if compressor is None else "sparse (8 m k + 4 d bytes)"
    raise ValueError(
        f"{name}: the {kind} window of m={m} gradients over d={d:,} parameters needs "
        f"{per_device / 1e9:.2f} GB per device, more than the {capacity / 1e9:.2f} GB "
        f"available ({source}). Options: a sparse window (sparse_mfac / sparse_ggt, or "
        "compressor=top_k(0.01): about 50x smaller), a smaller num_grads, or params "
        "sharded over a mesh (the window shards with them: lowbit_optax.state_shardings)"
    )


def _windowed(name, num_grads, compressor, key, coefficients) -> optax.GradientTransformation:
    m = num_grads

    def init_leaf(p) -> _Leaf:
        if compressor is None:
            return _Leaf(zeros_for(p, (m, *p.shape), jnp.float32), EMPTY, EMPTY)
        rows, cols = _rows_of(p.shape)
        k = compressor.k(cols)
        values = zeros_for(p, (m, *rows, k), jnp.float32)
        indices = zeros_for(p, (m, *rows, k), jnp.int32) + cols  # out of range: empty
        return _Leaf(values, indices, zeros_for(p, p.shape, jnp.float32))

    def init_fn(params):
        _check_fits(name, params, m, compressor)
        return ScaleByWindowState(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.key_data(jax.random.key(key)).astype(jnp.uint32),
            gram=jnp.zeros((m, m), jnp.float32),
            **init_leaves(init_leaf, params, _Leaf)._asdict(),
        )

    def update_fn(updates, state, params=None):
        del params
        return auto_axes_like_inputs(body, updates, state)

    def body(updates, state):
        leaves, treedef = jax.tree.flatten(updates)
        fields = [treedef.flatten_up_to(getattr(state, f)) for f in _Leaf._fields]
        slot = state.count % m
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
        newest = jnp.arange(m) == slot
        # Every read is of the old window: G' x = G x off the slot and |x|^2 at it, and
        # G'^T z = G^T (z off the slot) + z_s x. The new row is written last, in place,
        # and the write depends on the directions (it is taken only when they are finite),
        # which orders it after every read: XLA then never copies the window.
        rows, new = [], []
        row = jnp.zeros((m,), jnp.float32)
        for i, (g, *leaf) in enumerate(zip(leaves, *fields, strict=True)):
            values, indices, error = leaf
            x = g.astype(jnp.float32)
            if compressor is None:
                entry = (x, EMPTY)
            else:
                a = error + x
                kept, where = _compress_rows(compressor, a, jax.random.fold_in(step_key, i))
                x = _scatter_rows(kept[None], where[None], g.shape)  # the window's new row
                error, entry = a - x, (kept, where)
            # this param's part of the new Gram row/column
            row = row + jnp.where(newest, jnp.sum(x * x), _dots(values, indices, x))
            rows.append((x, entry))
            new.append(_Leaf(values, indices, error))
        row = jnp.where(ok, row, state.gram[slot])
        gram = state.gram.at[slot, :].set(row).at[:, slot].set(row)
        z = coefficients(gram, slot)  # the m x m algebra, replicated
        z_old = jnp.where(newest, 0.0, z)
        directions = [
            _transposed(n.values, n.indices, z_old, g.shape) + z[slot] * x
            for g, n, (x, _) in zip(leaves, new, rows, strict=True)
        ]
        # a non-finite gradient, or a direction that is not finite (a failed solve), leaves
        # the window, Gram and accumulator as they were; only the new row is selected
        take = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in directions]))
        keep = lambda new, old: jnp.where(take, new, old)
        out = [
            jnp.where(ok, d, g).astype(g.dtype) for g, d in zip(leaves, directions, strict=True)
        ]  # a non-finite update shows the NaN/inf itself

        def write(n: _Leaf, old_error, entry) -> _Leaf:
            values, indices = entry
            n = n._replace(values=n.values.at[slot].set(keep(values, n.values[slot])))
            if compressor is None:
                return n
            return n._replace(
                indices=n.indices.at[slot].set(keep(indices, n.indices[slot])),
                error=keep(n.error, old_error),
            )

        new = [
            write(n, old, entry) for n, old, (_, entry) in zip(new, fields[2], rows, strict=True)
        ]
        gram = keep(gram, state.gram)
        new_state = ScaleByWindowState(
            count=optax.safe_increment(state.count),
            key=state.key,
            gram=gram,
            **fields_of(treedef, _Leaf, new)._asdict(),
        )
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

    Returns:
      A ``GradientTransformation`` whose state is a ``ScaleByWindowState``; chain a
      learning rate after it (``lowbit_optax.mfac`` does).

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

    Example:
      With one gradient in the window, ``F = lam I + g g^T / m`` and ``F^{-1} g =
      g / (lam + |g|^2 / m)``: here ``g / (1 + 4 / 4)``.

      >>> import numpy as np
      >>> tx = scale_by_mfac(num_grads=4, damping=1.0)
      >>> g = {"w": jnp.array([2.0, 0.0, 0.0, 0.0])}
      >>> state = tx.init(g)
      >>> updates, state = jax.jit(tx.update)(g, state)
      >>> print(np.asarray(updates["w"]).round(4))
      [1. 0. 0. 0.]
      >>> float(state.gram[0, 0])  # g . g
      4.0

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

    def coefficients(gram, slot):
        dt = jnp.float64 if high and jax.config.jax_enable_x64 else jnp.float32
        return _mfac_newest(gram, slot, damping, num_grads, dt)

    return _windowed("scale_by_mfac", num_grads, compressor, key, coefficients)


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

    Returns:
      A ``GradientTransformation`` whose state is a ``ScaleByWindowState``; chain a
      learning rate after it (``lowbit_optax.ggt`` does).

    Memory: as ``scale_by_mfac``, with ``r`` in place of ``m``.

    Example:
      With one gradient in the window, ``(g g^T)^{1/2} = g g^T / |g|``, so the first
      step is ``g / (|g| + eps)``, a unit vector:

      >>> import numpy as np
      >>> tx = scale_by_ggt(num_grads=3)
      >>> g = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(g)
      >>> updates, state = jax.jit(tx.update)(g, state)
      >>> print(np.asarray(updates["w"]).round(4))
      [0.6 0.8]
      >>> state.values["w"].shape  # the window: r rows of the param's shape
      (3, 2)

    References:
      Agarwal et al., GGT, ICML 2019; Modoranu et al., arXiv 2306.06098.
    """
    num_grads, key = static_arg("num_grads", num_grads, 100), static_arg("key", key, 0)
    _check(num_grads, compressor)
    if isinstance(eps, (int, float)) and not eps > 0:  # may be traced (inject_hyperparams)
        raise ValueError(f"eps must be > 0, got {eps!r}")

    def coefficients(gram, slot):
        return _ggt_newest(gram, slot, eps)

    return _windowed("scale_by_ggt", num_grads, compressor, key, coefficients)
