"""Projectors of ``low_rank_projection``: how the subspace ``S`` of a gradient moves.

Everything here works on one gradient oriented ``Gk`` (``K x M``, ``K <= M``) and an
orthonormal ``S`` (``K x r``); ``low_rank_projection`` (``projection.py``) orients the
parameter's gradient and calls ``Projector.refresh`` at each event. The three projectors,
their papers and decisions are described in ``projection``'s module docstring.

References:
  Zhao et al., GaLore, ICML 2024 (arXiv 2403.03507).
  Xiao et al., COAP, arXiv 2412.00071.
  Rajabi et al., SubTrack your Grad, arXiv 2502.01586 (and SubTrack++).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "COAPProjector",
    "Projector",
    "SVDProjector",
    "SubTrackProjector",
    "coap_loss",
    "coap_loss_grad",
    "geodesic_step",
    "geodesic_step_projected",
    "projector_of",
    "top_subspace",
]


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


def range_finder_projected(gk: jax.Array, y: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """Randomized range finder (Halko et al.) from the sketched range ``Y = Gk Omega``
    (``K x w``): ``Q = qr(Y)``, then the SVD of the small ``Q^T Gk`` rotates ``Q`` onto
    the top singular directions, kept to ``r`` columns. Returns ``(S, S^T Gk)``, with
    ``S^T Gk = Ub_r^T (Q^T Gk)`` from the small matrix already formed (no ``K x M x r``
    product). (An eigh of the ``w x w`` Gram of ``Q^T Gk`` is cheaper on XLA CPU, but its
    basis moved between sharded and single-device runs beyond the battery's tolerance.)"""
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


def geodesic_step(
    s: jax.Array, gk: jax.Array, step_size: float | jax.Array, directions: int = 1
) -> jax.Array:
    """One SubTrack step on the Grassmannian, downhill on ``|Gk - S S^T Gk|^2``, along the
    top ``directions`` singular triplets of the tangent, each turned by the scale-free
    angle ``step_size * sigma_i / |Gk|_F^2``. Keeps ``S`` orthonormal."""
    return _geodesic(s, gk, s.T @ gk, step_size, directions)[0]


def geodesic_step_projected(
    s: jax.Array, gk: jax.Array, a: jax.Array, step_size: float | jax.Array, directions: int = 1
) -> tuple[jax.Array, jax.Array]:
    """``geodesic_step`` given ``A = S^T Gk``; also returns ``S_new^T Gk``.

    The step is a rank-``k`` update ``S_new = S + W V^T`` (``k = directions``) with
    ``W = S V (cos(Theta) - I) - U sin(Theta)``, so
    ``S_new^T Gk = A + V ((cos(Theta) - I) V^T A - sin(Theta) U^T Gk)``: ``k`` ``K x M``
    matrix-vector products instead of a ``K x M x r`` product.
    """
    s_new, v, q = _geodesic(s, gk, a, step_size, directions)
    return s_new, a + v @ q


def _geodesic(s, gk, a, step_size, directions):
    """``(S_new, V, Q)`` of the geodesic step, with ``S_new^T Gk = A + V Q``.

    The exact Grassmann geodesic from ``S`` along the tangent ``H = U Sigma V^T`` is
    ``S V cos(Sigma t) V^T + U sin(Sigma t) V^T`` (Edelman et al. 1998); this takes the
    part along the top ``k`` triplets (``k = 1``: SubTrack's rank-1 step, ``k = r``: the
    whole geodesic), each with its own angle ``theta_i = step_size * sigma_i / |Gk|^2``.
    """
    # Riemannian gradient of the loss, K x r: -2 R A^T with R = Gk - S A, evaluated as
    # -2 (Gk A^T - S (A A^T)), one K x M x r product fewer; S^T H = 0
    tangent = -2.0 * (gk @ a.T - s @ (a @ a.T))
    # top-k singular triplets from the r x r Gram matrix (an r x r eigh instead of a K x r
    # SVD, much cheaper on XLA CPU): V its top eigenvectors, sigma = sqrt(lambda),
    # U = H V / sigma
    evals, evecs = jnp.linalg.eigh(tangent.T @ tangent)
    v = evecs[:, ::-1][:, :directions]  # the top k, largest first
    sigma = jnp.sqrt(jnp.maximum(evals[::-1][:directions], 0.0))
    # the Gram matrix's small eigenvalues are noise in float32 (absolute error ~ eps
    # lambda_max): directions with sigma below 1e-3 sigma_max do not turn
    ok = sigma > 1e-3 * sigma[0]
    u = jnp.where(ok, (tangent @ v) / jnp.where(ok, sigma, 1.0), 0.0)
    if directions > 1:
        # U orthonormal and orthogonal to S to working precision (S_new's columns are
        # then orthonormal): a QR of its part outside S, largest first so the directions
        # that do not turn (zero columns, last) cannot bend the others; signs kept
        u = jnp.where(ok, _orthonormalized(u - s @ (s.T @ u), ok), 0.0)
    va, ug = v.T @ a, u.T @ gk  # (S V)^T Gk and U^T Gk, k x M
    if step_size is None:
        # the best angle of each direction: S v_i turned towards u_i by theta captures
        # e(theta) = |cos(theta) x - sin(theta) y|^2 of Gk's energy (x = v_i^T A,
        # y = u_i^T Gk), and the turned directions stay orthonormal, so the energy the
        # new subspace captures is a sum of independent e(theta_i): each is maximal at
        # theta_i = atan2(-2 x.y, |x|^2 - |y|^2) / 2
        xy = jnp.sum(va * ug, axis=1)
        theta = 0.5 * jnp.arctan2(-2.0 * xy, jnp.sum(va**2, axis=1) - jnp.sum(ug**2, axis=1))
        theta = jnp.where(ok, theta, 0.0)
    else:
        energy = jnp.sum(gk**2)
        theta = jnp.where(energy > 0, step_size * sigma / jnp.where(energy > 0, energy, 1.0), 0.0)
        theta = jnp.where(ok, theta, 0.0)
    cos1, sin = jnp.cos(theta) - 1.0, jnp.sin(theta)
    s_new = s + ((s @ v) * cos1 - u * sin) @ v.T
    return s_new, v, cos1[:, None] * va - sin[:, None] * ug


def _orthonormalized(w: jax.Array, ok: jax.Array) -> jax.Array:
    """``w``'s columns orthonormalized in order, signs kept (``Q`` of ``w = Q R`` with a
    positive diagonal); columns outside ``ok`` are zero and stay zero.

    ``w`` is orthonormal up to float32 error in the eigenvectors (``U = H V / sigma``),
    so one Cholesky QR pass (``Q = w L^-T`` with ``L L^T = w^T w``: a Gram product and a
    triangular solve, a third of a Householder QR's time on XLA CPU) is exact to working
    precision. A block far from orthonormal (a pivot below 0.1, the columns' norms being
    about 1, or a Gram matrix Cholesky cannot factor at all) falls back to the Householder
    QR: Cholesky QR loses ``eps cond(w)^2`` of orthogonality."""
    gram = w.T @ w + jnp.diag(jnp.where(ok, 0.0, 1.0))  # zero columns: a unit pivot
    chol = jnp.linalg.cholesky(gram)
    good = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diag(chol) > 0.1)

    def cholesky_qr():
        return jax.scipy.linalg.solve_triangular(chol, w.T, lower=True).T

    def householder():
        q, r = jnp.linalg.qr(w)
        return q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0)

    return jax.lax.cond(good, cholesky_qr, householder)


class Projector(abc.ABC):
    """A projector value: how ``S`` (``K x r``, orthonormal columns) changes at an event
    (``count % interval == 0``, ``count`` before the increment)."""

    @abc.abstractmethod
    def refresh(
        self,
        *,
        s: jax.Array,
        gk: jax.Array,
        a: jax.Array,
        mk: jax.Array,
        count: jax.Array,
        interval: int,
        key: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """The new ``S`` and the new projected gradient ``S_new^T Gk``.

        Args:
          s: the current ``S`` (float32); at ``count == 0``, the first event, the
            placeholder ``init`` made (the first ``r`` columns of the identity).
          gk: the gradient oriented ``K x M`` (float32).
          a: ``S^T Gk`` (``r x M``), which the step formed anyway.
          mk: the inner first moment in ``A``'s orientation (``r x M``; ``a`` when the
            inner state has none).
          count: the step count before the increment.
          interval: steps between events (``update_interval``).
          key: a PRNG key for this leaf and step.

        Returns:
          ``(S_new, S_new^T Gk)``, float32, ``K x r`` and ``r x M``.
        """


@dataclasses.dataclass(frozen=True)
class SVDProjector(Projector):
    """GaLore: the top-``r`` singular subspace from a full float32 SVD at every event.

    No settings: pass ``SVDProjector()`` (or ``"svd"``) as ``low_rank_projection``'s
    ``projector``.

    Example:
      >>> import numpy as np
      >>> import optax
      >>> from lowbit_optax import low_rank_projection
      >>> tx = low_rank_projection(optax.scale_by_adam(), rank=2, min_dim=4,
      ...                          projector=SVDProjector(), update_interval=1)
      >>> grads = {"w": jnp.arange(32.0).reshape(8, 4) % 5}
      >>> state = tx.init(grads)
      >>> _, state = jax.jit(tx.update)(grads, state)
      >>> s = state.projectors["w"]  # orthonormal columns
      >>> s.shape, bool(np.allclose(s.T @ s, np.eye(2), atol=1e-5))
      ((4, 2), True)
    """

    def refresh(self, *, s, gk, a, mk, count, interval, key):
        del a, mk, count, interval, key
        return top_subspace_projected(gk, s.shape[1])


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

    Example:
      >>> import numpy as np
      >>> import optax
      >>> from lowbit_optax import low_rank_projection
      >>> coap = COAPProjector(reproject_factor=2, scale_aware=True)
      >>> tx = low_rank_projection(optax.scale_by_adam(), rank=2, min_dim=4,
      ...                          projector=coap, update_interval=1)
      >>> grads = {"w": jnp.arange(32.0).reshape(8, 4) % 5}
      >>> state = tx.init(grads)
      >>> update = jax.jit(tx.update)
      >>> updates, state = update(grads, state)  # t = 0: range finder
      >>> updates, state = update(grads, state)  # t = 1: one SGD step on S
      >>> state.projectors["w"].shape, int(np.linalg.matrix_rank(updates["w"]))
      ((4, 2), 2)
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

    def refresh(self, *, s, gk, a, mk, count, interval, key):
        r = s.shape[1]
        width = min(r + self.oversample, gk.shape[0])

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
        return jax.lax.switch(index, [first, warm, step])


@dataclasses.dataclass(frozen=True)
class SubTrackProjector(Projector):
    """SubTrack-Grad: an SVD at ``t = 0``, then one Grassmannian geodesic step per event.

    Attributes:
      step_size: scale-free step; the rotation angle of a direction is
        ``step_size * sigma / |G|_F^2`` with ``sigma`` its singular value of the tangent
        ``-2 R A^T`` (``sigma / |G|^2 <= 1``). ``None``: each direction turns by the
        angle that captures the most of ``G``'s energy (an exact line search along it).
      directions: how many of the tangent's top singular directions one step turns:
        an int (1, the paper's rank-1 step, at most ``1 / r`` of the subspace distance
        per event; ``r`` or more, the whole geodesic), a float in (0, 1] as a fraction
        of ``r`` (at least one), or ``None``: all ``r``.

    Example:
      >>> from lowbit_optax import scale_by_adam_like
      >>> from lowbit_optax import low_rank_projection
      >>> import numpy as np
      >>> sub = SubTrackProjector(step_size=0.5, directions=None)
      >>> sub.turned(4)  # None turns every direction of a rank-4 subspace
      4
      >>> tx = low_rank_projection(scale_by_adam_like(), rank=2, min_dim=4,
      ...                          projector=sub, update_interval=1, moments="rotate")
      >>> grads = {"w": jnp.arange(32.0).reshape(8, 4) % 5}
      >>> state = tx.init(grads)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(2):  # an SVD, then one geodesic step
      ...     _, state = update(grads, state)
      >>> s = state.projectors["w"]  # the geodesic keeps S orthonormal
      >>> bool(np.allclose(s.T @ s, np.eye(2), atol=1e-5))
      True
    """

    step_size: float = 1.0
    directions: int | float | None = 1

    def __post_init__(self) -> None:
        d = self.directions
        if d is not None and (
            isinstance(d, bool)
            or not ((isinstance(d, int) and d >= 1) or (isinstance(d, float) and 0.0 < d <= 1.0))
        ):
            raise ValueError(
                f"directions must be None (all r), a positive int (1: the paper's rank-1 "
                f"step) or a fraction in (0, 1] of the rank r, got {d!r}"
            )

    def turned(self, r: int) -> int:
        """How many directions one step turns in a rank-``r`` subspace."""
        d = self.directions
        if d is None:
            return r
        return min(d, r) if isinstance(d, int) else max(1, round(d * r))

    def refresh(self, *, s, gk, a, mk, count, interval, key):
        del mk, interval, key
        r = s.shape[1]
        k = self.turned(r)

        # The two branches take Gk as two operands: the SVD reads Gk^T, which LAPACK
        # (column-major) reads as the row-major Gk lies, and the geodesic's products read
        # Gk. With one shared operand, layout assignment gives it the SVD's layout and the
        # geodesic branch copies the K x M gradient at every event.
        def first(gt, g):
            v, sv, ut = jnp.linalg.svd(gt, full_matrices=False)  # Gk^T = V Sigma U^T
            return ut[:r].T, sv[:r, None] * v[:, :r].T

        def geodesic(gt, g):
            return geodesic_step_projected(s, g, a, self.step_size, k)

        return jax.lax.cond(count == 0, first, geodesic, gk.T, gk)


NAMED = {
    "svd": SVDProjector,
    "galore": SVDProjector,
    "coap": COAPProjector,
    "subtrack": SubTrackProjector,
}


def projector_of(p: Any) -> Projector:
    """``p`` if a ``Projector``, else the projector named ``p`` with its defaults."""
    if isinstance(p, Projector):
        return p
    if isinstance(p, str) and p in NAMED:
        return NAMED[p]()
    raise ValueError(
        f"projector must be a Projector value (SVDProjector(), COAPProjector(...), "
        f"SubTrackProjector(...)) or one of {sorted(NAMED)}, got {p!r}"
    )
