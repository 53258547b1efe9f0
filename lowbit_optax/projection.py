"""Low-rank gradient projection: one wrapper, three projectors (GaLore, COAP, SubTrack-Grad).

``low_rank_projection(inner, rank=..., projector=...)`` runs any inner transform (Adam,
quantized Adam, ...) on low-rank projections of the 2-D gradients and projects its
updates back (Zhao et al. 2024, GaLore). For an ``(m, n)`` leaf the side is chosen
statically from the shape: ``m >= n`` projects on the right (``P`` is ``r x n``, the inner
state is ``m x r``), ``m < n`` on the left (``P`` is ``m x r``, the inner state
``r x n``). Internally both cases are one: with ``K = min(m, n)``, ``M = max(m, n)`` and
``Gk`` the gradient oriented ``K x M`` (``G.T`` on the right, ``G`` on the left), a
projector is an orthonormal ``S`` of shape ``K x r``, the projected gradient is
``A = S^T Gk`` (``r x M``; the inner transform sees ``A.T`` on the right, ``A`` on the
left), and an inner update ``U`` returns as ``scale * S U`` (re-oriented). ``S`` is what
the state stores (``P = S^T`` on the right, ``P = S`` on the left). The inner state keeps
the parameter's axis order (``m`` first on the right), so a parameter's sharding maps onto
it axis by axis.

Projectors are values (``projector=``), each with its own event schedule on the
pre-increment step count ``t`` (``t = 0, T, 2T, ...``, ``T = update_interval``):

* ``SVDProjector`` (GaLore): ``S`` = top-``r`` left singular vectors of ``Gk``, a full
  float32 SVD at every event.
* ``COAPProjector`` (Xiao et al.): a randomized range finder at ``t = 0``; every
  ``T * reproject_factor`` steps the same warm-started from the old ``S`` (one block power
  iteration); at the other events one SGD step on ``S`` of the paper's loss
  ``L(S) = mean((S S^T Gk - Gk)**2) * (1 - mean_j cos(S Mk_j, Gk_j))`` (``Mk``: the inner
  first moment in ``A``'s orientation; columns of ``Gk`` are the rows of ``G`` in the
  paper's right case), gradient clipped to norm 1, learning rate 0.1, no
  re-orthonormalisation. ``scale_aware=True`` evaluates the loss on ``Gk / rms(Gk)``:
  at real gradient scales the paper's step barely moves ``S`` (``L`` is mean-reduced and
  quadratic in ``|G|``: we measured ``|dS|`` from ~1e-11 to ~1e-6 depending on the
  gradient scale and the matrix size), see the notebook and the tests.
* ``SubTrackProjector`` (Rajabi et al.): ``S`` from an SVD at ``t = 0``, then one
  Grassmannian geodesic step per event along the descent direction of
  ``F(S) = |Gk - S S^T Gk|^2``: ``A = S^T Gk``, ``R = Gk - S A``, tangent ``-2 R A^T``
  with top singular triplet ``(sigma, u, v)``,
  ``S <- (S v cos(theta) - u sin(theta)) v^T + S (I - v v^T)`` (keeps ``S``
  orthonormal). **Decision:** ``theta = step_size * sigma / |Gk|_F**2`` (the paper's
  ``eta * sigma`` scales with ``|G|**2``), and the math of the paper rather than the
  official code (its tangent vanishes for ``m >= n``; it moved uphill). The step changes
  ``S`` by rank 1, so an event updates the step's projected gradient ``S^T Gk`` by
  rank 1 instead of recomputing it.

``moments``: what happens to the inner state when ``S`` changes: ``keep`` (GaLore, COAP),
``reset`` (zero the inner ``mu``/``nu`` of that leaf) or ``rotate`` (SubTrack++: with
``C = S_new^T S_old``, the mean rotates as ``M <- C M`` and the second moment as
mean-square = variance + mean**2, the variance rotated with ``C**2``).
``reset``/``rotate`` need an inner state with float ``mu`` and ``nu`` fields (e.g.
``optax.scale_by_adam``). **Decision (rotate):** the paper writes
``V <- max(0, C**2 (V - M**2) + (C M)**2)`` on Adam's raw moments. Those are biased
differently (``(1 - b1**t)`` and ``(1 - b2**t)``): after ``t`` steps of a steady gradient
``g``, ``V - M**2 = ((1 - b2**t) - (1 - b1**t)**2) g**2``, strongly negative early in
training, so ``C**2`` mixes negative "variances" into coordinates and can drive ``V`` to
~0 under a large ``M``: the next Adam step blows up (we saw an 8-step loss go 2.6 -> 0.7
-> 4.0 with an event every 2 steps). We rotate the bias-corrected moments
(``moment_betas=(b1, b2)``, the inner Adam's, with its step count ``t``): with
``rho = (1 - b2**t) / (1 - b1**t)**2``, ``M <- C M`` and
``V <- C**2 max(0, V - rho M**2) + rho (C M)**2``, i.e. ``v_hat <- C**2 max(0, v_hat -
m_hat**2) + (C m_hat)**2``. A steady gradient then has zero variance and rotates to
exactly the moments of a steady gradient in the new basis, and every rotated coordinate
keeps ``m_hat**2 <= v_hat`` (Adam's step at most 1 there).

Robustness: a leaf whose gradient has a non-finite entry skips its projector update
(the old ``S`` is kept); the SVD never sees NaN/inf.

References:
  Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection,
  ICML 2024 (arXiv 2403.03507).
  Xiao et al., COAP: Memory-Efficient Training with Correlation-Aware Gradient
  Projection, arXiv 2412.00071.
  Rajabi et al., SubTrack your Grad: Gradient Subspace Tracking for Memory and Time
  Efficient Full-Parameter LLM Training, arXiv 2502.01586 (and SubTrack++).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowbit_optax._driver import Chain, map_rows
from lowbit_optax._util import adamw_chain, auto_axes_like_inputs, unflatten_like

__all__ = [
    "COAPProjector",
    "LowRankProjectionState",
    "SVDProjector",
    "SubTrackProjector",
    "coap_adamw",
    "galore_adamw",
    "low_rank_projection",
    "subtrack_adamw",
]

MOMENTS = ("keep", "reset", "rotate")


# ------------------------------------------------------------------------------------
# Projectors: the math on one oriented gradient Gk (K x M, K <= M), S (K x r)
# ------------------------------------------------------------------------------------


def top_subspace(gk: jax.Array, r: int) -> jax.Array:
    """Top-``r`` left singular vectors of ``gk`` (float32 SVD)."""
    return top_subspace_projected(gk, r)[0]


def top_subspace_projected(gk: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """``(S, S^T Gk)`` for the top-``r`` singular subspace; ``S^T Gk = Sigma_r V_r^T``
    comes from the SVD itself (no ``K x M x r`` product)."""
    u, sv, vt = jnp.linalg.svd(gk, full_matrices=False)
    return u[:, :r], sv[:r, None] * vt[:r]


def range_finder(gk: jax.Array, sketch: jax.Array) -> jax.Array:
    """One-pass randomized range finder: ``Q = qr(Gk Omega)``, then the SVD of the small
    ``Q^T Gk`` rotates ``Q`` onto the top singular directions (Halko et al.). (An eigh of
    the ``w x w`` Gram of ``Q^T Gk`` is ~7x cheaper on XLA CPU, but its basis moved
    between sharded and single-device runs beyond the battery's tolerance.)"""
    return range_finder_projected(gk, gk @ sketch, gk.shape[0])[0]


def range_finder_projected(gk: jax.Array, y: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """``range_finder`` from the sketched range ``Y = Gk Omega`` (``K x w``), kept to
    ``r`` columns, with the new projection: ``(S, S^T Gk)``, ``S^T Gk = Ub_r^T (Q^T Gk)``
    from the small matrix already formed (no ``K x M x r`` product)."""
    q, _ = jnp.linalg.qr(y)
    b = q.T @ gk
    ub, _, _ = jnp.linalg.svd(b, full_matrices=False)
    ub = ub[:, :r]
    return q @ ub, ub.T @ b


def coap_loss(s: jax.Array, gk: jax.Array, mk: jax.Array) -> jax.Array:
    """COAP's projection loss ``mean((S S^T Gk - Gk)**2) * (1 - mean_j cos(S Mk_j, Gk_j))``
    (columns ``j`` of ``Gk`` are the rows of ``G`` in the paper's right case)."""
    err = s @ (s.T @ gk) - gk
    a = s @ mk
    sa, sg = jnp.sum(a**2, axis=0), jnp.sum(gk**2, axis=0)
    ok = (sa > 0) & (sg > 0)  # a zero column has cosine 0 (and a finite gradient)
    norms = jnp.sqrt(jnp.where(ok, sa, 1.0)) * jnp.sqrt(jnp.where(ok, sg, 1.0))
    cos = jnp.where(ok, jnp.sum(a * gk, axis=0) / norms, 0.0)
    return jnp.mean(err**2) * (1.0 - jnp.mean(cos))


def coap_loss_grad(
    s: jax.Array, gk: jax.Array, mk: jax.Array, a: jax.Array | None = None
) -> jax.Array:
    """Analytic gradient of ``coap_loss`` with respect to ``S``, in two ``K x M x r``
    products (``A = S^T Gk``, or the ``a`` given, and one ``Gk X``); a direct evaluation
    takes eight.

    With ``A = S^T Gk``, ``P = S^T S`` and ``E = S A - Gk``:
    ``|E|^2 = <P, A A^T> - 2 |A|^2 + |Gk|^2`` and its gradient
    ``2 (E A^T + Gk E^T S) = 2 (S A A^T + Gk A^T (P - 2 I))``. The cosine of column ``j``,
    ``c_j = m_j.A_j / (|a_j| |g_j|)`` with ``a_j = S m_j`` and ``|a_j|^2 = m_j^T P m_j``,
    has mean gradient ``(1/M) (Gk W1 Mk^T - S Mk W2 Mk^T)`` with
    ``W1 = diag(1 / (|a_j||g_j|))`` and ``W2 = diag(c_j / |a_j|^2)`` (a zero column
    contributes 0). The ``Gk``-products of both parts share one ``Gk X``, the
    ``S``-products one ``S Y``. (Tested against ``jax.grad`` of ``coap_loss``.)
    """
    k, m = gk.shape
    r = s.shape[1]
    a = s.T @ gk if a is None else a  # r x M
    p = s.T @ s
    aat = a @ a.T
    sg = jnp.sum(gk**2, axis=0)
    mse = jnp.maximum(jnp.sum(p * aat) - 2.0 * jnp.sum(a**2) + jnp.sum(sg), 0.0) / (k * m)
    sa = jnp.sum(mk * (p @ mk), axis=0)  # |a_j|^2
    ok = (sa > 0) & (sg > 0)  # a zero column has cosine 0 (and a finite gradient)
    na, ng = jnp.sqrt(jnp.where(ok, sa, 1.0)), jnp.sqrt(jnp.where(ok, sg, 1.0))
    cos = jnp.where(ok, jnp.sum(mk * a, axis=0) / (na * ng), 0.0)
    w1 = jnp.where(ok, 1.0 / (na * ng), 0.0)
    w2 = jnp.where(ok, cos / na**2, 0.0)
    c_mse = 2.0 * (1.0 - jnp.mean(cos)) / (k * m)
    c_cos = mse / m
    x = c_mse * (a.T @ (p - 2.0 * jnp.eye(r, dtype=p.dtype))) - c_cos * (mk * w1).T
    y = c_mse * aat + c_cos * ((mk * w2) @ mk.T)
    return gk @ x + s @ y


def geodesic_step(s: jax.Array, gk: jax.Array, step_size: float | jax.Array) -> jax.Array:
    """One SubTrack step on the Grassmannian, downhill on ``|Gk - S S^T Gk|^2``, with the
    scale-free angle ``step_size * sigma / |Gk|_F^2``. Keeps ``S`` orthonormal."""
    return _geodesic(s, gk, s.T @ gk, step_size)[0]


def geodesic_step_projected(
    s: jax.Array, gk: jax.Array, a: jax.Array, step_size: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``geodesic_step`` given ``A = S^T Gk``; also returns ``S_new^T Gk``.

    The step is a rank-1 update ``S_new = S + w v^T`` with
    ``w = S v (cos(theta) - 1) - u sin(theta)``, so
    ``S_new^T Gk = A + v ((cos(theta) - 1) v^T A - sin(theta) u^T Gk)``: one ``K x M``
    matrix-vector product instead of a ``K x M x r`` product.
    """
    s_new, v, q = _geodesic(s, gk, a, step_size)
    return s_new, a + jnp.outer(v, q)


def _geodesic(s, gk, a, step_size):
    """``(S_new, v, q)`` of the geodesic step, with ``S_new^T Gk = A + v q^T``."""
    # Riemannian gradient of the loss, K x r: -2 R A^T with R = Gk - S A, evaluated as
    # -2 (Gk A^T - S (A A^T)), one K x M x r product fewer
    tangent = -2.0 * (gk @ a.T - s @ (a @ a.T))
    # top singular triplet from the r x r Gram matrix (an r x r eigh instead of a K x r
    # SVD, much cheaper on XLA CPU): v the top eigenvector, sigma = sqrt(lambda), u = T v / sigma
    evals, evecs = jnp.linalg.eigh(tangent.T @ tangent)
    v1 = evecs[:, -1]
    s1 = jnp.sqrt(jnp.maximum(evals[-1], 0.0))
    tv = tangent @ v1
    u1 = jnp.where(s1 > 0, tv / jnp.where(s1 > 0, s1, 1.0), 0.0)
    energy = jnp.sum(gk**2)
    theta = jnp.where(energy > 0, step_size * s1 / jnp.where(energy > 0, energy, 1.0), 0.0)
    cos1, sin = jnp.cos(theta) - 1.0, jnp.sin(theta)
    s_new = s + jnp.outer((s @ v1) * cos1 - u1 * sin, v1)
    return s_new, v1, cos1 * (v1 @ a) - sin * (u1 @ gk)


def _low_projection(s: jax.Array, gk: jax.Array, right: bool) -> jax.Array:
    """``S^T Gk`` in the inner state's orientation (``Gk^T S``, i.e. ``G S``, on the
    right), written as the product XLA lays out row-major in that shape."""
    return gk.T @ s if right else s.T @ gk


class Projector:
    """Interface of a projector value: ``refresh(s, gk, mk, count, interval, key) -> s``
    computes the new ``S`` (``K x r``) at an event (``count % interval == 0``, count before
    the increment) from the oriented float32 gradient ``gk`` (``K x M``), the inner first
    moment ``mk`` in ``A``'s orientation (``r x M``; the projected gradient when the inner
    state has none) and a PRNG key. ``count == 0`` is the first event: ``s`` is then the
    placeholder ``init`` made (the first ``r`` columns of the identity). The wrapper calls
    ``refresh_projected``, which also returns the new projected gradient."""

    def refresh(self, s, gk, mk, count, interval, key):  # pragma: no cover - interface
        raise NotImplementedError

    def refresh_projected(self, s, gk, low, mk, count, interval, key, right):
        """``refresh``, also returning the new projected gradient: given ``low``, the
        current ``S^T Gk`` in the inner state's orientation (its transpose if ``right``;
        computed on every step anyway), returns the new ``S`` and the new ``low``
        (float32). The default recomputes the product; a projector whose step is a cheap
        update of ``S`` (SubTrack's rank-1 geodesic step) overrides it to reuse ``low``."""
        s_new = self.refresh(s, gk, mk, count, interval, key).astype(jnp.float32)
        return s_new, _low_projection(s_new, gk, right)


@dataclasses.dataclass(frozen=True)
class SVDProjector(Projector):
    """GaLore: the top-``r`` singular subspace from a full float32 SVD at every event."""

    def refresh(self, s, gk, mk, count, interval, key):
        del mk, count, interval, key
        return top_subspace(gk, s.shape[1])

    def refresh_projected(self, s, gk, low, mk, count, interval, key, right):
        del low, mk, count, interval, key
        s_new, a_new = top_subspace_projected(gk, s.shape[1])
        return s_new, a_new.T if right else a_new


@dataclasses.dataclass(frozen=True)
class COAPProjector(Projector):
    """COAP: randomized range finder at ``t = 0``, warm-started recalibration every
    ``update_interval * reproject_factor`` steps, one SGD step on ``S`` of the
    correlation-aware loss at the other events.

    Attributes:
      reproject_factor: ``rho``; events between two recalibrations are SGD steps.
      lr: SGD learning rate on ``S`` (paper: 0.1); the gradient is clipped to norm 1.
      scale_aware: evaluate the loss on ``Gk / rms(Gk)`` and ``Mk / rms(Mk)`` so the
        step does not vanish at small gradient scales (the paper's form: ``False``).
      oversample: extra sketch columns of the range finder (``r + oversample`` kept to
        ``r`` after the small SVD).
      power_iters: block power iterations of the first range finder (``t = 0``), each
        ``Y <- Gk Gk^T qr(Y)``; the paper's one-pass finder is ``0``.
    """

    reproject_factor: int = 5
    lr: float = 0.1
    scale_aware: bool = False
    oversample: int = 0
    power_iters: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.reproject_factor, int) or self.reproject_factor < 1:
            raise ValueError(
                f"reproject_factor must be a positive int, got {self.reproject_factor!r}"
            )
        if not isinstance(self.oversample, int) or self.oversample < 0:
            raise ValueError(f"oversample must be a non-negative int, got {self.oversample!r}")
        if not isinstance(self.power_iters, int) or self.power_iters < 0:
            raise ValueError(f"power_iters must be a non-negative int, got {self.power_iters!r}")

    def p_step(
        self, s: jax.Array, gk: jax.Array, mk: jax.Array, a: jax.Array | None = None
    ) -> jax.Array:
        """One clipped SGD step on the COAP loss (``a``: ``S^T Gk`` if already formed)."""
        if self.scale_aware:
            rms = lambda x: jnp.sqrt(jnp.mean(x**2))
            g_rms = jnp.maximum(rms(gk), 1e-30)
            gk = gk / g_rms
            a = None if a is None else a / g_rms
            mk = mk / jnp.maximum(rms(mk), 1e-30)
        grad = coap_loss_grad(s, gk, mk, a)
        norm = jnp.linalg.norm(grad)
        grad = grad * jnp.minimum(1.0, 1.0 / jnp.maximum(norm, 1e-30))
        return s - self.lr * grad

    def refresh(self, s, gk, mk, count, interval, key):
        return self.refresh_projected(s, gk, s.T @ gk, mk, count, interval, key, False)[0]

    def refresh_projected(self, s, gk, low, mk, count, interval, key, right):
        r = s.shape[1]
        width = min(r + self.oversample, gk.shape[0])
        a = low.T if right else low  # S^T Gk, r x M

        def first():
            sketch = jax.random.normal(key, (gk.shape[1], width), jnp.float32)
            y = gk @ sketch
            for _ in range(self.power_iters):
                y = gk @ (gk.T @ jnp.linalg.qr(y)[0])
            return range_finder_projected(gk, y, r)

        def warm():  # one block power iteration from the old subspace: Y = Gk Gk^T S
            return range_finder_projected(gk, gk @ a.T, r)

        def step():
            s_new = self.p_step(s, gk, mk, a)
            return s_new, s_new.T @ gk

        big = interval * self.reproject_factor
        index = jnp.where(count == 0, 0, jnp.where(count % big == 0, 1, 2))
        s_new, a_new = jax.lax.switch(index, [first, warm, step])
        return s_new, a_new.T if right else a_new


@dataclasses.dataclass(frozen=True)
class SubTrackProjector(Projector):
    """SubTrack-Grad: an SVD at ``t = 0``, then one Grassmannian geodesic step per event.

    Attributes:
      step_size: scale-free step; the rotation angle is ``step_size * sigma / |G|_F^2``
        with ``sigma`` the top singular value of the tangent ``-2 R A^T``
        (``sigma / |G|^2 <= 1``).
    """

    step_size: float = 1.0

    def refresh(self, s, gk, mk, count, interval, key):
        return self.refresh_projected(s, gk, s.T @ gk, mk, count, interval, key, False)[0]

    def refresh_projected(self, s, gk, low, mk, count, interval, key, right):
        del mk, interval, key

        def first():
            s_new, a_new = top_subspace_projected(gk, s.shape[1])
            return s_new, a_new.T if right else a_new

        def track():
            s_new, v, q = _geodesic(s, gk, low.T if right else low, self.step_size)
            return s_new, low + (jnp.outer(q, v) if right else jnp.outer(v, q))

        return jax.lax.cond(count == 0, first, track)


_NAMED = {
    "svd": SVDProjector,
    "galore": SVDProjector,
    "coap": COAPProjector,
    "subtrack": SubTrackProjector,
}


def _projector(p: Any) -> Projector:
    if isinstance(p, Projector):
        return p
    if isinstance(p, str) and p in _NAMED:
        return _NAMED[p]()
    raise ValueError(
        f"projector must be a Projector value (SVDProjector(), COAPProjector(...), "
        f"SubTrackProjector(...)) or one of {sorted(_NAMED)}, got {p!r}"
    )


# ------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------


class LowRankProjectionState(NamedTuple):
    """State of ``low_rank_projection``.

    Attributes:
      count: int32 steps taken.
      key: raw ``uint32`` PRNG key data (randomized range finder), folded with the step.
      projectors: tree like the params: ``S`` (``K x r``, ``proj_dtype``) for projected
        leaves, ``MaskedNode`` for the others.
      inner_state: the inner transform's state on the projected tree (projected leaves
        in their low-rank shape: ``m x r`` on the right, ``r x n`` on the left).
      residual_norms: with ``recover=True``, per projected leaf the float32 norm of the
        last recovered residual term (Fira's norm-growth limiter); ``MaskedNode``
        elsewhere, and for every leaf without ``recover``.
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    inner_state: optax.OptState
    residual_norms: Any = None


class _Leaf(NamedTuple):
    """Static layout of one leaf: projected or not, the 2-D view and the rank."""

    projected: bool
    shape: tuple[int, ...]
    m: int = 0
    n: int = 0
    rank: int = 0

    @property
    def right(self) -> bool:
        return self.m >= self.n

    @property
    def k(self) -> int:
        return min(self.m, self.n)

    @property
    def big(self) -> int:
        return max(self.m, self.n)

    @property
    def low_shape(self) -> tuple[int, int]:
        return (self.m, self.rank) if self.right else (self.rank, self.n)


def _plan(shape, selected, rank, min_dim, reshape) -> _Leaf:
    shape = tuple(shape)
    if not selected or len(shape) < 2 or (len(shape) > 2 and not reshape):
        return _Leaf(False, shape)
    m, n = math.prod(shape[:-1]), shape[-1]
    if min(m, n) < min_dim:
        return _Leaf(False, shape)
    k = min(m, n)
    r = rank if isinstance(rank, int) else max(1, round(rank * k))
    return _Leaf(True, shape, m, n, min(r, k))


def _to_a(x: jax.Array, leaf: _Leaf) -> jax.Array:
    """An inner-state/low-rank array (low shape) in ``A``'s ``r x M`` orientation (the
    transpose on the right; its own inverse)."""
    return x.T if leaf.right else x


def low_rank_projection(
    inner: optax.GradientTransformation,
    *,
    rank: int | float,
    projector: Projector | str = "svd",
    update_interval: int = 200,
    scale: float = 0.25,
    min_dim: int = 128,
    mask: optax.MaskOrFn = None,
    moments: str = "keep",
    proj_dtype: Any = jnp.float32,
    reshape: bool = True,
    recover: bool = False,
    recover_limit: float = 1.01,
    key: int = 0,
    moment_betas: tuple[float, float] | None = None,
) -> optax.GradientTransformation:
    """Runs ``inner`` on low-rank projections of the large 2-D gradients.

    Args:
      inner: any transform (e.g. ``optax.scale_by_adam()``, a quantized Adam). It gets
        ``params=None`` (keep weight decay outside, after this wrapper).
      rank: an int (that many directions), or a float in (0, 1] as a fraction of
        ``min(m, n)`` (note ``rank=1`` keeps one direction, ``rank=1.0`` all of them).
      projector: ``SVDProjector()`` (GaLore), ``COAPProjector(...)``,
        ``SubTrackProjector(...)``, or their names.
      update_interval: ``T``, steps between projector events (on the step count before
        the increment: ``t = 0, T, 2T, ...``).
      scale: ``alpha``, the factor on back-projected updates (0.25 in the papers).
      min_dim: leaves with ``min(m, n) < min_dim`` are not projected.
      mask: optax mask (tree or callable) of leaves that may be projected.
      moments: ``keep``, ``reset`` or ``rotate`` the inner moments when ``S`` changes.
      proj_dtype: storage dtype of ``S`` (``float32`` or ``bfloat16``); math in float32.
      reshape: leaves of rank > 2 are viewed as ``(prod(shape[:-1]), shape[-1])`` (e.g.
        a conv kernel ``(h, w, in, out)`` as ``(h w in, out)``); ``False`` leaves them
        unprojected.
      recover: add back the discarded gradient ``R = Gk - S A`` scaled by
        ``|U| / |A|`` (Fira's recovery, SubTrack++'s option), with Fira's norm-growth
        limiter: when the norm of that term grows by more than ``recover_limit`` times
        over the last step, it is scaled down to ``recover_limit`` times the last norm.
      recover_limit: Fira's ``gamma`` (1.01).
      key: seed of the randomized range finder (COAP).
      moment_betas: ``(b1, b2)`` of the inner Adam, required by ``moments='rotate'``,
        which bias-corrects the moments before rotating them (see the module docstring).
        The step count ``t`` is the inner state's ``count`` field if it has exactly one,
        else this wrapper's.

    Returns:
      An ``optax.GradientTransformation``; updates in the gradients' dtype.

    Memory per projected ``(m, n)`` leaf: ``K r`` for ``S`` (in ``proj_dtype``) plus the
    inner state on ``m r`` (right) or ``r n`` (left) values instead of ``m n`` (plus one
    float32 with ``recover``).
    """
    proj = _projector(projector)
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
    if not isinstance(update_interval, int) or update_interval < 1:
        raise ValueError(f"update_interval must be a positive int, got {update_interval!r}")
    if isinstance(rank, bool) or not (
        (isinstance(rank, int) and rank >= 1) or (isinstance(rank, float) and 0 < rank <= 1)
    ):
        raise ValueError(
            f"rank must be a positive int or a fraction in (0, 1] of min(m, n), got {rank!r}"
        )
    if jnp.dtype(proj_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"proj_dtype must be float32 or bfloat16, got {proj_dtype!r}")
    if not isinstance(min_dim, int) or min_dim < 1:
        raise ValueError(f"min_dim must be a positive int, got {min_dim!r}")
    if not recover_limit > 1.0:
        raise ValueError(f"recover_limit must be > 1 (Fira's gamma, 1.01), got {recover_limit!r}")
    if moment_betas is not None and not (
        isinstance(moment_betas, tuple | list)
        and len(moment_betas) == 2
        and all(
            (isinstance(b, numbers.Real) and not isinstance(b, bool) and 0.0 <= b < 1.0)
            or (isinstance(b, jax.Array) and b.ndim == 0)  # under inject_hyperparams
            for b in moment_betas
        )
    ):
        raise ValueError(
            "moment_betas must be the inner Adam's (b1, b2), two numbers in [0, 1), "
            f"got {moment_betas!r}"
        )
    if moments == "rotate" and moment_betas is None:
        raise ValueError(
            "moments='rotate' needs moment_betas=(b1, b2), the inner Adam's betas, to "
            "bias-correct its moments before rotating them; got moment_betas=None. Pass "
            "e.g. moment_betas=(0.9, 0.999) for optax.scale_by_adam()."
        )

    def plans(tree: Any) -> list[_Leaf]:
        leaves = jax.tree.leaves(tree)
        if mask is None:
            selected = [True] * len(leaves)
        else:
            m = mask(tree) if callable(mask) else mask
            selected = [bool(x) for x in jax.tree.structure(tree).flatten_up_to(m)]
        return [
            _plan(x.shape, sel, rank, min_dim, reshape)
            for x, sel in zip(leaves, selected, strict=True)
        ]

    def low_tree(tree: Any, values: list[Any]) -> Any:
        return unflatten_like(tree, values)

    def init_fn(params: optax.Params) -> LowRankProjectionState:
        leaves = jax.tree.leaves(params)
        layout = plans(params)
        low = [
            jnp.zeros(lf.low_shape, x.dtype) if lf.projected else x
            for x, lf in zip(leaves, layout, strict=True)
        ]
        inner_state = inner.init(low_tree(params, low))
        if moments != "keep":
            _float_moments(inner_state, what=f"moments={moments!r}")
        s = [
            jnp.eye(lf.k, lf.rank, dtype=proj_dtype) if lf.projected else optax.MaskedNode()
            for lf in layout
        ]
        norms = [
            jnp.zeros([], jnp.float32) if recover and lf.projected else optax.MaskedNode()
            for lf in layout
        ]
        return LowRankProjectionState(
            jnp.zeros([], jnp.int32),
            jax.random.key_data(jax.random.key(key)).astype(jnp.uint32),
            low_tree(params, s),
            inner_state,
            low_tree(params, norms),
        )

    def update_fn(updates, state, params=None):
        del params
        return auto_axes_like_inputs(body, updates, state)

    def body(updates, state):
        count = state.count
        leaves, treedef = jax.tree.flatten(updates)
        layout = plans(updates)
        s_old = treedef.flatten_up_to(state.projectors)
        event = count % update_interval == 0
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        mus = _inner_mu(state.inner_state, treedef)
        if moments != "keep":
            mu_all = treedef.flatten_up_to(optax.tree_utils.tree_get(state.inner_state, "mu"))
            nu_all = treedef.flatten_up_to(optax.tree_utils.tree_get(state.inner_state, "nu"))
            new_mu, new_nu = list(mu_all), list(nu_all)
        rho = None
        if moments == "rotate":
            rho = _bias_ratio(_inner_count(state.inner_state, count), *moment_betas)

        # Projected leaves one after another (``Chain``), largest first: an event's
        # decompositions work on K x M temporaries, best paid while few of the low-rank
        # gradients the inner transform needs are alive yet. The back-projections below
        # run in the reverse order, largest last, when most low-rank arrays are freed.
        n_leaves = len(leaves)
        new_s, low, low32 = [None] * n_leaves, [None] * n_leaves, [None] * n_leaves
        by_size = sorted(range(n_leaves), key=lambda i: -math.prod(leaves[i].shape))
        chain = Chain()
        for i in by_size:
            g, lf, s = leaves[i], layout[i], s_old[i]
            if not lf.projected:
                new_s[i], low[i] = s, g
                continue
            g2 = g.reshape(lf.m, lf.n).astype(jnp.float32)
            # leaves one after another: an event's decompositions work on K x M copies
            s32 = chain.gate(s.astype(jnp.float32))
            # the projected gradient while S stays, in the inner state's orientation
            # (G S on the right, S^T G on the left: no transposed copy of G)
            low_g = g2 @ s32 if lf.right else s32.T @ g2
            key_i = jax.random.fold_in(step_key, i)
            moved = () if moments == "keep" else (mu_all[i], nu_all[i])
            mu_i = mus[i] if mus is not None else low_g

            # One conditional per leaf for the projector, the projected gradient and
            # (SubTrack++) the moments: the r x r x M rotation is paid only at a change,
            # and so are the oriented gradient, its finiteness check and Mk (steps
            # without an event only pass the operands through).
            def changed(s32=s32, g2=g2, low_g=low_g, mu_i=mu_i, key_i=key_i, moved=moved, lf=lf):
                gk = g2.T if lf.right else g2
                mk = _to_a(mu_i.astype(jnp.float32), lf)

                def refresh():
                    sn, low_n = proj.refresh_projected(
                        s32, gk, low_g, mk, count, update_interval, key_i, lf.right
                    )
                    sn = sn.astype(jnp.float32)
                    return sn, low_n, _moved_moments(moved, s32, sn, lf, moments, rho)

                # a non-finite gradient keeps the old projector (the SVD never sees it)
                return jax.lax.cond(jnp.all(jnp.isfinite(g2)), refresh, lambda: (s32, low_g, moved))

            s_new, low_g, moved = jax.lax.cond(
                event, changed, lambda s32=s32, low_g=low_g, moved=moved: (s32, low_g, moved)
            )
            # stored at once (its float32 value would stay alive until the back-projection
            # otherwise, for every leaf); the back-projection reads the stored S, which
            # differs from the float32 one only on event steps with a low-precision S
            new_s[i] = chain.close(s_new.astype(proj_dtype))
            low32[i] = low_g
            if moments != "keep":
                new_mu[i], new_nu[i] = moved
            low[i] = low_g.astype(g.dtype)

        inner_state = state.inner_state
        if moments != "keep":
            inner_state = optax.tree_utils.tree_set(
                inner_state, mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu)
            )
        low_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None)
        out, norms = (
            list(treedef.flatten_up_to(low_updates)),
            treedef.flatten_up_to(state.residual_norms),
        )
        for i in reversed(by_size):
            lf = layout[i]
            if lf.projected:
                back = lambda g, *a, lf=lf: _back_projected(
                    g, lf, *a, scale, recover, recover_limit
                )
                s32 = new_s[i].astype(jnp.float32)
                out[i], norms[i] = chain(back, leaves[i], out[i], s32, low32[i], norms[i])
        projectors = treedef.unflatten(
            [
                s if not lf.projected else s.astype(proj_dtype)
                for s, lf in zip(new_s, layout, strict=True)
            ]
        )
        return treedef.unflatten(out), LowRankProjectionState(
            optax.safe_increment(count),
            state.key,
            projectors,
            inner_state,
            treedef.unflatten(norms),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _back_projected(g, lf, u_low, s_new, low_g, last_norm, scale, recover, limit):
    """The full-size update of a projected leaf, ``scale * S U`` (re-oriented), plus
    Fira's recovered term with ``recover``, computed in row slices of the parameter's
    ``m x n`` view written over the gradient (``map_rows``): one slice of the ``K x M``
    product is alive at a time. Returns the update (the gradient's shape and dtype) and
    the recovered term's norm (``last_norm`` without recovery)."""
    u_low = u_low.astype(jnp.float32)
    g2 = g.reshape(lf.m, lf.n)
    # on the right the rows of the update are the columns of S U, i.e. rows of the inner
    # update (m x r); on the left they are rows of S (m x r)
    by_rows = u_low if lf.right else s_new

    def product(rows):
        return (s_new @ rows.T).T if lf.right else rows @ u_low

    phi = factor = None
    if recover:
        ua, a = _to_a(u_low, lf), _to_a(low_g, lf)
        na = jnp.linalg.norm(a)
        phi = jnp.where(na > 0, jnp.linalg.norm(ua) / jnp.where(na > 0, na, 1.0), 0.0)
        low_rows = low_g if lf.right else s_new

        def residual(g_rows, low):  # rows of R = Gk - S A in the parameter's orientation
            return g_rows.astype(jnp.float32) - ((s_new @ low.T).T if lf.right else low @ low_g)

        def squares(carried, readonly, _):
            g_rows, low = readonly
            return jnp.sum((phi * residual(g_rows, low)) ** 2, axis=-1)

        sums = map_rows(squares, jnp.zeros((lf.m,), jnp.float32), (g2, low_rows), shape=g2.shape)
        norm = jnp.sqrt(jnp.sum(sums))
        cap = limit * last_norm
        shrink = (last_norm > 0) & (norm > cap)
        factor = jnp.where(shrink, cap / jnp.where(norm > 0, norm, 1.0), 1.0)
        ok = jnp.isfinite(norm)  # a non-finite gradient leaves the limiter's memory alone
        last_norm = jnp.where(ok, norm * factor, last_norm)

    def rows(g_rows, readonly, _):
        full = product(readonly[0])
        if recover:
            full = full + (phi * residual(g_rows, readonly[1])) * factor
        return (scale * full).astype(g_rows.dtype)

    ro = (by_rows, low_rows) if recover else (by_rows,)
    u = map_rows(rows, g2, ro)
    return u.reshape(lf.shape), last_norm


def _float_moments(inner_state: Any, what: str) -> None:
    for name in ("mu", "nu"):
        found = optax.tree_utils.tree_get_all_with_path(inner_state, name)
        if len(found) != 1:
            raise ValueError(
                f"{what} needs an inner state with exactly one float '{name}' field "
                f"(e.g. optax.scale_by_adam); found {len(found)}. Use moments='keep' with "
                "this inner transform."
            )


def _inner_mu(inner_state: Any, treedef: Any) -> list[Any] | None:
    """The inner first moment per leaf, if the inner state has one float ``mu`` tree."""
    found = optax.tree_utils.tree_get_all_with_path(inner_state, "mu")
    if len(found) != 1:
        return None
    try:
        leaves = treedef.flatten_up_to(found[0][1])
    except (ValueError, TypeError):
        return None
    if not all(isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) for x in leaves):
        return None
    return leaves


def _inner_count(inner_state: Any, fallback: jax.Array) -> jax.Array:
    """The inner state's step count if it has exactly one scalar integer ``count``
    field (``optax.scale_by_adam``'s), else ``fallback`` (this wrapper's)."""
    found = optax.tree_utils.tree_get_all_with_path(inner_state, "count")
    if len(found) == 1:
        c = found[0][1]
        if isinstance(c, jax.Array) and c.ndim == 0 and jnp.issubdtype(c.dtype, jnp.integer):
            return c
    return fallback


def _bias_ratio(t: jax.Array, b1: float, b2: float) -> jax.Array:
    """``rho = (1 - b2**t) / (1 - b1**t)**2``: ``V - rho M**2`` is ``(1 - b2**t)`` times
    the bias-corrected variance ``v_hat - m_hat**2``; 1 at ``t = 0`` (zero moments)."""
    tf = t.astype(jnp.float32)

    def one_minus_power(b):  # 1 - b^t without float32's cancellation near b = 1
        if isinstance(b, numbers.Real):  # log in float64 (b may be a traced hyperparameter)
            return -jnp.expm1(tf * math.log(b)) if b > 0 else jnp.ones_like(tf)
        return -jnp.expm1(tf * jnp.log(jnp.asarray(b, jnp.float32)))  # t > 0: b = 0 gives 1

    bc1, bc2 = one_minus_power(b1), one_minus_power(b2)
    return jnp.where(t > 0, bc2 / jnp.where(t > 0, bc1 * bc1, 1.0), 1.0)


def _moved_moments(moved, s_old, s_new, lf, moments, rho=None):
    """The inner ``(mu, nu)`` of a projected leaf after its projector changed from
    ``s_old`` to ``s_new``: zeroed (``reset``) or rotated into the new subspace
    (``rotate``: ``mu <- C mu``, ``nu <- C^2 max(0, nu - rho mu^2) + rho (C mu)^2`` with
    ``C = S_new^T S_old`` and ``rho`` from ``_bias_ratio``); ``()`` passes through
    (``keep``)."""
    if moments == "keep":
        return moved
    m, v = moved
    m32, v32 = m.astype(jnp.float32), v.astype(jnp.float32)
    if moments == "reset":
        m2, v2 = jnp.zeros_like(m32), jnp.zeros_like(v32)
    else:
        # in the state's own (parameter) orientation: no transposed copies of the moments
        c = s_new.T @ s_old
        rot = (lambda x, c: x @ c.T) if lf.right else (lambda x, c: c @ x)
        m2 = rot(m32, c)
        variance = jnp.maximum(0.0, v32 - rho * m32**2)  # (1 - b2^t) (v_hat - m_hat^2)
        v2 = rot(variance, c**2) + rho * m2**2
    return m2.astype(m.dtype), v2.astype(v.dtype)


# ------------------------------------------------------------------------------------
# Aliases
# ------------------------------------------------------------------------------------


_adamw = adamw_chain


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rank: int | float = 0.25,
    update_interval: int = 200,
    scale: float = 0.25,
    min_dim: int = 128,
    proj_dtype: Any = jnp.float32,
    projection_mask: optax.MaskOrFn = None,
) -> optax.GradientTransformation:
    """GaLore AdamW: Adam on SVD-projected gradients (projector refreshed every 200 steps,
    moments kept), weight decay and learning rate outside the projection.

    References:
      Zhao et al., GaLore, ICML 2024 (arXiv 2403.03507).
    """
    return _adamw(
        low_rank_projection(
            optax.scale_by_adam(b1, b2, eps),
            rank=rank,
            projector=SVDProjector(),
            update_interval=update_interval,
            scale=scale,
            min_dim=min_dim,
            mask=projection_mask,
            proj_dtype=proj_dtype,
        ),
        learning_rate,
        weight_decay,
        mask,
    )


def coap_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rank: int | float = 0.25,
    update_interval: int = 32,
    reproject_factor: int = 5,
    scale: float = 0.25,
    scale_aware: bool = True,
    power_iters: int = 2,
    min_dim: int = 128,
    proj_dtype: Any = jnp.float32,
    projection_mask: optax.MaskOrFn = None,
    inner: optax.GradientTransformation | None = None,
    key: int = 0,
) -> optax.GradientTransformation:
    """COAP AdamW: correlation-aware projection updates (every 32 steps; recalibration
    every 160), moments kept. **Decisions:** ``scale_aware=True`` by default, since the
    paper's P step is numerically a no-op at real gradient scales (``False`` restores
    it); ``power_iters=2``: the first range finder (``t = 0`` only) takes two block
    power iterations, since the paper's one-pass sketch caught ~69% of the best rank-r
    energy on a slowly decaying spectrum (~95% with two) and COAP keeps that first
    subspace, moved only by small P steps, until its first recalibration. On ``lm`` at
    a shared interval of 50 this lowered the eval loss on each of six seeds, by
    0.01-0.13% (``benchmarks/projection_interval``); ``0`` restores the paper's form.
    ``inner`` replaces the inner Adam (e.g. 8-bit moments, the 8-bit COAP recipe).

    References:
      Xiao et al., COAP, arXiv 2412.00071.
    """
    return _adamw(
        low_rank_projection(
            inner if inner is not None else optax.scale_by_adam(b1, b2, eps),
            rank=rank,
            projector=COAPProjector(
                reproject_factor, scale_aware=scale_aware, power_iters=power_iters
            ),
            update_interval=update_interval,
            scale=scale,
            min_dim=min_dim,
            mask=projection_mask,
            proj_dtype=proj_dtype,
            key=key,
        ),
        learning_rate,
        weight_decay,
        mask,
    )


def subtrack_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rank: int | float = 0.25,
    update_interval: int = 50,
    step_size: float = 1.0,
    scale: float = 0.25,
    moments: str = "rotate",
    recover: bool = False,
    min_dim: int = 128,
    proj_dtype: Any = jnp.float32,
    projection_mask: optax.MaskOrFn = None,
) -> optax.GradientTransformation:
    """SubTrack++ AdamW: Grassmannian subspace tracking every 50 steps, Adam moments
    rotated into the new subspace at each change, optional recovery of the discarded
    gradient.

    References:
      Rajabi et al., SubTrack your Grad, arXiv 2502.01586 (and SubTrack++).
    """
    return _adamw(
        low_rank_projection(
            optax.scale_by_adam(b1, b2, eps),
            rank=rank,
            projector=SubTrackProjector(step_size),
            update_interval=update_interval,
            scale=scale,
            min_dim=min_dim,
            mask=projection_mask,
            moments=moments,
            proj_dtype=proj_dtype,
            recover=recover,
            moment_betas=(b1, b2),
        ),
        learning_rate,
        weight_decay,
        mask,
    )
