"""Low-rank projection (lowbit_optax.projection): identities, projectors, moments, robustness.

References are float64 numpy linear algebra and ``jax.grad`` of the written-out loss.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_optax
from lowbit_optax import projection as pj
from lowbit_optax import projectors

SIDES = [(96, 48), (48, 96)]  # m >= n (right) and m < n (left)


def _g(shape, seed=0, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _orient64(g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, np.float64)
    return g.T if g.shape[0] >= g.shape[1] else g


def _captured(s: np.ndarray, gk: np.ndarray) -> float:
    """Fraction of the gradient energy inside span(S)."""
    s, gk = np.asarray(s, np.float64), np.asarray(gk, np.float64)
    return float(np.sum((s.T @ gk) ** 2) / np.sum(gk**2))


# --------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SIDES)
@pytest.mark.parametrize(
    "projector", [pj.SVDProjector(), pj.COAPProjector(), pj.SubTrackProjector()]
)
def test_full_rank_projected_sgd_equals_sgd(shape, projector):
    params = {"w": jnp.zeros(shape)}
    k = min(shape)
    tx = optax.chain(
        pj.low_rank_projection(
            optax.identity(),
            rank=k,
            projector=projector,
            scale=1.0,
            min_dim=1,
            update_interval=3,
        ),
        optax.scale(-0.1),
    )
    ref = optax.sgd(0.1)
    state, ref_state = tx.init(params), ref.init(params)
    for i in range(7):
        g = {"w": _g(shape, i)}
        u, state = tx.update(g, state)
        r, ref_state = ref.update(g, ref_state)
        np.testing.assert_allclose(u["w"], r["w"], atol=2e-6)


@pytest.mark.parametrize("shape", SIDES)
def test_projection_and_back_projection_identities(shape):
    g = _g(shape, 1)
    r = 12
    tx = pj.low_rank_projection(optax.identity(), rank=r, scale=1.0, min_dim=1)
    state = tx.init({"w": g})
    u, state = tx.update({"w": g}, state)
    s = np.asarray(state.projectors["w"], np.float64)  # K x r
    k = min(shape)
    assert s.shape == (k, r)
    np.testing.assert_allclose(s.T @ s, np.eye(r), atol=1e-5)
    gk = _orient64(g)
    # identity inner: the update is the orthogonal projection S S^T Gk, re-oriented
    want = s @ (s.T @ gk)
    want = want.T if shape[0] >= shape[1] else want
    np.testing.assert_allclose(u["w"], want, atol=1e-5)
    # the inner transform saw the low-rank shape (m x r right, r x n left)
    low_seen = {}
    spy = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (low_seen.setdefault("shape", u["w"].shape) and u, s),
    )
    tx2 = pj.low_rank_projection(spy, rank=r, min_dim=1)
    tx2.update({"w": g}, tx2.init({"w": g}))
    assert low_seen["shape"] == ((shape[0], r) if shape[0] >= shape[1] else (r, shape[1]))
    # projecting the back-projection of a low-rank array gives it back
    a = np.random.default_rng(0).standard_normal((r, max(shape)))
    np.testing.assert_allclose(s.T @ (s @ a), a, atol=1e-5)


@pytest.mark.parametrize("shape", SIDES)
@pytest.mark.parametrize(
    "projector",
    [pj.SVDProjector(), pj.COAPProjector(reproject_factor=2), pj.SubTrackProjector(5.0)],
)
def test_update_is_the_projection_onto_the_new_subspace_at_every_event(shape, projector):
    """At each step, events included (SubTrack's reuses the old projection and updates it
    by rank 1), the identity-inner update is ``S S^T Gk`` with the ``S`` stored after
    that step (float64 reference)."""
    r = 6
    tx = jax.jit(
        pj.low_rank_projection(
            optax.identity(),
            rank=r,
            projector=projector,
            scale=1.0,
            min_dim=1,
            update_interval=1,
        ).update
    )
    init = pj.low_rank_projection(optax.identity(), rank=r, min_dim=1).init
    state = init({"w": jnp.zeros(shape)})
    moved = 0.0
    for i in range(5):
        g = _g(shape, 20 + i) + 3.0 * _g(shape, 19)  # a shared part keeps S meaningful
        s_before = np.asarray(state.projectors["w"], np.float64)
        u, state = tx({"w": g}, state)
        s = np.asarray(state.projectors["w"], np.float64)
        if i:
            moved = max(moved, float(np.abs(s - s_before).max()))
        gk = _orient64(g)
        want = s @ (s.T @ gk)
        want = want.T if shape[0] >= shape[1] else want
        np.testing.assert_allclose(u["w"], want, atol=2e-5 * np.abs(want).max())
    assert moved > 1e-3  # the events after step 0 did change S


@pytest.mark.parametrize("shape", SIDES)
def test_svd_projector_spans_the_top_singular_subspace(shape):
    rng = np.random.default_rng(2)
    u0, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v0, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    sv = np.geomspace(10.0, 0.01, min(shape))
    g = (u0[:, : len(sv)] * sv) @ v0[:, : len(sv)].T
    r = 8
    s = np.asarray(pj.top_subspace(jnp.asarray(_orient64(g), jnp.float32), r), np.float64)
    uref = np.linalg.svd(_orient64(g))[0][:, :r]
    cosines = np.linalg.svd(s.T @ uref, compute_uv=False)  # cosines of principal angles
    np.testing.assert_allclose(cosines, 1.0, atol=1e-4)


# --------------------------------------------------------------------------------------
# SubTrack
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SIDES)
def test_subtrack_keeps_s_orthonormal_over_1000_steps(shape):
    k, r = min(shape), 8
    s0 = pj.top_subspace(_orient64(_g(shape, 3)).astype(np.float32), r)

    def body(i, s):
        gk = jnp.asarray(_orient_jax(_g(shape, 0) + jnp.sin(i * 0.01) * _g(shape, 1)))
        return pj.geodesic_step(s, gk, 1.0)

    s = jax.jit(lambda s: jax.lax.fori_loop(0, 1000, body, s))(jnp.asarray(s0))
    err = float(jnp.max(jnp.abs(s.T @ s - jnp.eye(r))))
    assert s.shape == (k, r) and err < 1e-5, err


def _orient_jax(g):
    return g.T if g.shape[0] >= g.shape[1] else g


def _drifting(shape, steps, rank=4, seed=0):
    """Low-rank gradients whose column space rotates slowly (in Gk orientation)."""
    rng = np.random.default_rng(seed)
    k, m = min(shape), max(shape)
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    gen = rng.standard_normal((k, k)) * 0.002  # about 0.02 rad per step
    rot = np.linalg.matrix_power(np.eye(k) + gen - gen.T, 1)
    out = []
    b = basis[:, :rank]
    for _ in range(steps):
        b, _ = np.linalg.qr(rot @ b)
        gk = b @ rng.standard_normal((rank, m)) + 0.01 * rng.standard_normal((k, m))
        out.append(gk.T if shape[0] >= shape[1] else gk)  # back to the (m, n) layout
    return out


@pytest.mark.parametrize("shape", SIDES)
def test_subtrack_tracks_a_drifting_subspace(shape):
    grads = _drifting(shape, 60)
    r = 4
    tx = pj.low_rank_projection(
        optax.identity(),
        rank=r,
        projector=pj.SubTrackProjector(1.0),
        update_interval=1,
        min_dim=1,
    )
    frozen = pj.low_rank_projection(
        optax.identity(), rank=r, projector="svd", update_interval=10**6, min_dim=1
    )
    g0 = {"w": jnp.asarray(grads[0], jnp.float32)}
    st, sf = tx.init(g0), frozen.init(g0)
    upd, updf = jax.jit(tx.update), jax.jit(frozen.update)
    tracked, fixed = [], []
    for g in grads:
        gk = _orient64(g)
        _, st = upd({"w": jnp.asarray(g, jnp.float32)}, st)
        _, sf = updf({"w": jnp.asarray(g, jnp.float32)}, sf)
        tracked.append(_captured(st.projectors["w"], gk))
        fixed.append(_captured(sf.projectors["w"], gk))
    # the fixed subspace loses the drifting gradient; tracking keeps most of its energy
    assert fixed[-1] < 0.7 * fixed[0]
    assert np.mean(tracked[-10:]) > 0.9, tracked[-10:]
    assert np.mean(tracked[-10:]) > np.mean(fixed[-10:]) + 0.2
    # and every single step moves downhill (captures at least as much of that gradient)
    s = jnp.asarray(pj.top_subspace(jnp.asarray(_orient64(grads[0]), jnp.float32), r))
    for g in grads[1:20]:
        gk = jnp.asarray(_orient64(g), jnp.float32)
        s2 = pj.geodesic_step(s, gk, 0.5)
        assert _captured(s2, gk) >= _captured(s, gk) - 1e-6
        s = s2


def test_subtrack_step_is_invariant_to_the_gradient_scale():
    g = _orient_jax(_g((64, 32), 5))
    s = pj.top_subspace(_orient_jax(_g((64, 32), 6)), 4)
    a = pj.geodesic_step(s, g, 0.5)
    b = pj.geodesic_step(s, 1e-4 * g, 0.5)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("shape", SIDES)
def test_subtrack_step_updates_the_projected_gradient(shape):
    """The rank-1 update of ``A`` that the step returns equals ``S_new^T Gk`` (float64
    product of the returned ``S_new``), for a large step and a subspace far from ``Gk``'s."""
    gk = _orient_jax(_g(shape, 7))
    s = pj.top_subspace(_orient_jax(_g(shape, 8)), 6)
    s_new, a_new = pj.geodesic_step_projected(s, gk, s.T @ gk, 20.0)
    ref = np.asarray(s_new, np.float64).T @ np.asarray(gk, np.float64)
    assert float(jnp.max(jnp.abs(s_new - s))) > 0.05  # the step moved S
    np.testing.assert_allclose(a_new, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(s_new, pj.geodesic_step(s, gk, 20.0), atol=1e-6)


@pytest.mark.parametrize("step_size", [1.0, None])
@pytest.mark.parametrize("directions", [1, 3, 6])
def test_rank_k_geodesic_keeps_s_orthonormal_and_a_exact(directions, step_size):
    gk = _orient_jax(_g((96, 48), 9))
    s = pj.top_subspace(_orient_jax(_g((96, 48), 10)), 6)
    s_new, a_new = pj.geodesic_step_projected(s, gk, s.T @ gk, step_size, directions)
    s64 = np.asarray(s_new, np.float64)
    np.testing.assert_allclose(s64.T @ s64, np.eye(6), atol=2e-6)
    ref = s64.T @ np.asarray(gk, np.float64)
    np.testing.assert_allclose(a_new, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # the new subspace captures at least as much of Gk as the old one
    assert _captured(s_new, gk) >= _captured(s, gk) - 1e-6


def test_whole_geodesic_stays_orthonormal_on_a_low_rank_gradient():
    """A rank-2 gradient and r = 8: the tangent has 2 directions and 6 of numerical noise;
    those must not turn (their float32 triplets are noise), or S loses orthonormality."""
    left = np.asarray(_g((64, 2), 14), np.float64)
    gk = jnp.asarray(left @ np.asarray(_g((2, 96), 15), np.float64), jnp.float32)  # K x M
    s = pj.top_subspace(_g((64, 96), 16), 8)
    for step_size in (None, 1.0):
        s_new = s
        for _ in range(3):
            s_new = pj.geodesic_step(s_new, gk, step_size, 8)
        s64 = np.asarray(s_new, np.float64)
        np.testing.assert_allclose(s64.T @ s64, np.eye(8), atol=1e-5)
    assert _captured(s_new, gk) >= _captured(s, gk) - 1e-6


def test_best_angle_is_the_maximum_along_each_direction():
    """With ``step_size=None`` one direction turns by the angle that captures the most of
    ``Gk``: checked against a float64 grid of angles in the step's plane."""
    gk = _orient_jax(_g((64, 40), 11))
    s = pj.top_subspace(_orient_jax(_g((64, 40), 12)), 4)
    best = _captured(pj.geodesic_step(s, gk, None, 1), gk)
    # the plane of the step: x = S v, u = H v / |H v| (H the tangent), v its top direction
    s64, g64 = np.asarray(s, np.float64), np.asarray(gk, np.float64)
    a = s64.T @ g64
    h = -2.0 * (g64 @ a.T - s64 @ (a @ a.T))
    _, vecs = np.linalg.eigh(h.T @ h)
    v = vecs[:, -1]
    x, u = s64 @ v, h @ v / np.linalg.norm(h @ v)
    rest = s64 - np.outer(x, v)  # S without its x component
    grid = []
    for theta in np.linspace(-np.pi / 2, np.pi / 2, 2001):
        s_theta = rest + np.outer(np.cos(theta) * x - np.sin(theta) * u, v)
        grid.append(_captured(s_theta, g64))
    assert best >= max(grid) - 1e-5
    assert best > _captured(pj.geodesic_step(s, gk, 1.0, 1), gk) + 1e-3  # it moved further


def test_whole_geodesic_with_best_angles_approaches_the_svd():
    """All ``r`` directions at their best angles: a few steps from a random subspace come
    within 5% of the best rank-``r`` residual (the SVD's); the paper's rule barely moves."""
    g = np.asarray(_g((128, 160), 13), np.float64) @ np.diag(np.linspace(3.0, 0.1, 160))
    gk = _orient_jax(jnp.asarray(g, jnp.float32))
    r = 16
    s0 = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (gk.shape[0], r)))[0]
    sv = np.linalg.svd(np.asarray(gk, np.float64), compute_uv=False)
    best = float(np.sum(sv[r:] ** 2))
    resid = lambda s: float(np.sum(np.asarray(gk - s @ (s.T @ gk), np.float64) ** 2))
    s = s0
    for _ in range(5):
        s = pj.geodesic_step(s, gk, None, r)
    assert resid(s) <= 1.05 * best, (resid(s), best, resid(s0))
    assert resid(pj.geodesic_step(s0, gk, 1.0, r)) > 0.9 * resid(s0)


def test_subtrack_whole_geodesic_follows_a_moved_subspace_the_paper_step_cannot():
    """``subtrack_adamw`` with every direction at its best angle (``directions >= r``,
    ``step_size=None``) against the paper's rank-1 step (``directions=1``,
    ``step_size=1.0``): after the SVD of step 0 the gradient moves to another rank-8
    subspace. Three events bring the whole geodesic's ``S`` to most of the new gradient's
    energy; the rank-1 step turns one direction per event (at most 1/8 of the subspace
    each) by a small angle."""
    k, m, r = 48, 96, 8
    old = np.linalg.qr(np.asarray(_g((k, r), 20), np.float64))[0]
    new = np.linalg.qr(np.asarray(_g((k, r), 21), np.float64))[0]
    spread = np.diag(np.linspace(2.0, 1.0, r))
    grad = lambda basis, seed: jnp.asarray(  # (m, n) = (96, 48), so Gk = G^T is K x M
        (basis @ spread @ np.asarray(_g((r, m), seed), np.float64)).T, jnp.float32
    )
    captured = {}
    whole, paper = dict(directions=r, step_size=None), dict(directions=1, step_size=1.0)
    for label, kwargs in [("whole", whole), ("paper", paper)]:
        tx = lowbit_optax.subtrack_adamw(1e-3, rank=r, update_interval=1, min_dim=8, **kwargs)
        params = {"w": jnp.zeros((m, k))}
        state = tx.init(params)
        update = jax.jit(tx.update)
        _, state = update({"w": grad(old, 30)}, state, params)
        for step in range(3):
            g = grad(new, 31 + step)
            _, state = update({"w": g}, state, params)
        captured[label] = _captured(state[0].projectors["w"], _orient64(grad(new, 40)))
    assert captured["whole"] > 0.9, captured
    assert captured["paper"] < 0.5, captured


@pytest.mark.parametrize("bad", [0, -1, True, 0.0, 1.5, "all"])
def test_subtrack_directions_are_validated(bad):
    with pytest.raises(ValueError, match="directions must be None"):
        pj.SubTrackProjector(directions=bad)


@pytest.mark.parametrize(
    ("directions", "r", "turned"),
    [(None, 64, 64), (1, 64, 1), (100, 64, 64), (0.5, 64, 32), (0.25, 6, 2), (0.01, 6, 1)],
)
def test_subtrack_directions_count(directions, r, turned):
    """An int is a count (at most ``r``), a float a fraction of ``r`` (at least one)."""
    assert pj.SubTrackProjector(directions=directions).turned(r) == turned


def test_orthonormalized_matches_a_float64_qr_and_falls_back_when_singular():
    """The Cholesky QR of a nearly orthonormal block with a zero (not turning) column:
    float64 QR's ``Q`` with a positive ``R`` diagonal, the zero column kept zero. A
    rank-deficient block (two equal columns; its Gram matrix has no Cholesky factor) still
    comes out orthonormal and finite, through the Householder fallback."""
    base = np.linalg.qr(np.asarray(_g((80, 6), 50), np.float64))[0]
    w = base @ (np.eye(6) + 0.05 * np.asarray(_g((6, 6), 51), np.float64))  # near-orthonormal
    w[:, 5] = 0.0
    ok = jnp.asarray([True] * 5 + [False])
    q = np.asarray(projectors._orthonormalized(jnp.asarray(w, jnp.float32), ok), np.float64)
    q64, r64 = np.linalg.qr(w[:, :5])
    q64 = q64 * np.sign(np.diag(r64))
    np.testing.assert_allclose(q[:, :5], q64, atol=2e-6)
    np.testing.assert_array_equal(q[:, 5], 0.0)
    singular = w.copy()
    singular[:, 1] = singular[:, 0]
    q = np.asarray(projectors._orthonormalized(jnp.asarray(singular, jnp.float32), ok), np.float64)
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=2e-6)


# --------------------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SIDES)
def test_moment_rotation_matches_float64_formula(shape):
    r = 6
    tx = pj.low_rank_projection(
        optax.scale_by_adam(),
        rank=r,
        projector=pj.SVDProjector(),
        update_interval=2,
        moments="rotate",
        moment_betas=(0.9, 0.999),
        min_dim=1,
    )
    g0, g1, g2 = (_g(shape, i) for i in (10, 11, 12))
    state = tx.init({"w": g0})
    _, state = tx.update({"w": g0}, state)  # t=0: S0 from g0
    _, state = tx.update({"w": g1}, state)  # t=1: no event
    s_old = np.asarray(state.projectors["w"], np.float64)
    mu = np.asarray(state.inner_state.mu["w"], np.float64)
    nu = np.asarray(state.inner_state.nu["w"], np.float64)
    _, state = tx.update({"w": g2}, state)  # t=2: S changes to g2's subspace, rotate
    s_new = np.asarray(state.projectors["w"], np.float64)
    right = shape[0] >= shape[1]
    ma, va = (mu.T, nu.T) if right else (mu, nu)
    c = s_new.T @ s_old
    # bias-corrected moments after t = 2 updates, variance clipped at 0, rotated, and
    # back to Adam's raw scale
    m_hat, v_hat = ma / (1 - 0.9**2), va / (1 - 0.999**2)
    m_rot = c @ ma
    v_rot = (1 - 0.999**2) * ((c**2) @ np.maximum(0.0, v_hat - m_hat**2) + (c @ m_hat) ** 2)
    # then Adam's EMA with the projected g2
    a = s_new.T @ _orient64(g2)
    m_want = 0.9 * m_rot + 0.1 * a
    v_want = 0.999 * v_rot + 0.001 * a**2
    got_m = np.asarray(state.inner_state.mu["w"], np.float64)
    got_v = np.asarray(state.inner_state.nu["w"], np.float64)
    got_m, got_v = (got_m.T, got_v.T) if right else (got_m, got_v)
    np.testing.assert_allclose(got_m, m_want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_v, v_want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", SIDES)
def test_rotation_of_a_steady_gradient_is_the_steady_gradient_in_the_new_basis(shape):
    """A steady gradient has zero variance: after the rotation Adam holds exactly the
    moments of t steps of the rotated projected gradient ``C a``. (The paper's formula on
    raw moments, ``max(0, C^2 (V - M^2) + (C M)^2)``, does not: ``V - M^2`` is
    ``((1 - b2^t) - (1 - b1^t)^2) a^2 < 0`` early on, and mixing it drives some ``V`` far
    below ``M^2``, an Adam step of many times the usual size there.)"""
    b1, b2, t = 0.9, 0.999, 3
    tx = pj.low_rank_projection(
        optax.scale_by_adam(b1, b2),
        rank=6,
        projector=pj.SVDProjector(),
        update_interval=t,
        moments="rotate",
        moment_betas=(b1, b2),
        min_dim=1,
    )
    g0, g1 = _g(shape, 20), _g(shape, 21)
    state = tx.init({"w": g0})
    for _ in range(t):  # t = 0 (S0 from g0), 1, 2: a steady g0
        _, state = tx.update({"w": g0}, state)
    s_old = np.asarray(state.projectors["w"], np.float64)
    _, state = tx.update({"w": g1}, state)  # t = 3: S changes to g1's subspace
    s_new = np.asarray(state.projectors["w"], np.float64)
    c = s_new.T @ s_old
    ca = c @ (s_old.T @ _orient64(g0))  # the steady projected gradient, rotated
    a1 = s_new.T @ _orient64(g1)
    m_want = b1 * (1 - b1**t) * ca + (1 - b1) * a1
    v_want = b2 * (1 - b2**t) * ca**2 + (1 - b2) * a1**2
    right = shape[0] >= shape[1]
    got_m = np.asarray(state.inner_state.mu["w"], np.float64)
    got_v = np.asarray(state.inner_state.nu["w"], np.float64)
    got_m, got_v = (got_m.T, got_v.T) if right else (got_m, got_v)
    np.testing.assert_allclose(got_m, m_want, rtol=1e-4, atol=1e-6)
    # float32 cancellation in V - rho M^2 (~1e-7 of V) is mixed in by C^2
    np.testing.assert_allclose(got_v, v_want, rtol=1e-4, atol=1e-5 * v_want.max())

    # the paper's raw formula on the same moments, in float64
    m_raw, v_raw = (
        (1 - b1**t) * (s_old.T @ _orient64(g0)),
        (1 - b2**t) * (s_old.T @ _orient64(g0)) ** 2,
    )
    v_paper = np.maximum(0.0, (c**2) @ (v_raw - m_raw**2) + (c @ m_raw) ** 2)
    step_paper = np.abs(c @ m_raw / (1 - b1**t)) / np.sqrt(v_paper / (1 - b2**t) + 1e-30)
    assert step_paper.max() > 10.0  # what the bias correction avoids


def test_rotation_keeps_adam_steps_bounded():
    """For any moments with ``nu >= 0`` (some below ``mu**2``) and orthonormal ``S_old``,
    ``S_new``, the rotated moments have ``nu >= 0`` and ``m_hat**2 <= v_hat`` in every
    coordinate (so Adam's next step is at most 1 there): the bias-corrected variance is
    clipped at 0 before the rotation and the rotated mean's square is added back."""
    rng = np.random.default_rng(0)
    b1, b2 = 0.9, 0.999
    for t, right in [(1, True), (2, False), (7, True), (500, False)]:
        k, r, m = 40, 5, 50  # K = 40 <= M = 50
        s_old = np.linalg.qr(rng.normal(size=(k, r)))[0]
        s_new = np.linalg.qr(s_old + 0.5 * rng.normal(size=(k, r)))[0]
        shape = (m, r) if right else (r, m)
        mu = rng.normal(size=shape) * rng.uniform(0.1, 10, size=shape)
        nu = mu**2 * rng.uniform(0, 2, size=shape)  # some coordinates below mu^2
        lf = pj._Leaf(True, (m, k) if right else (k, m), *((m, k) if right else (k, m)), r)
        rho = pj._bias_ratio(jnp.int32(t), b1, b2)
        np.testing.assert_allclose(float(rho), (1 - b2**t) / (1 - b1**t) ** 2, rtol=1e-5)
        m2, v2 = pj._moved_moments(
            (jnp.asarray(mu, jnp.float32), jnp.asarray(nu, jnp.float32)),
            jnp.asarray(s_old, jnp.float32),
            jnp.asarray(s_new, jnp.float32),
            lf,
            "rotate",
            rho,
        )
        m2, v2 = np.asarray(m2, np.float64), np.asarray(v2, np.float64)
        assert np.all(v2 >= 0)
        m_hat2, v_hat = (m2 / (1 - b1**t)) ** 2, v2 / (1 - b2**t)
        assert np.all(m_hat2 <= v_hat * (1 + 1e-5) + 1e-12)


def test_rotate_needs_the_inner_betas():
    with pytest.raises(ValueError, match="moment_betas"):
        pj.low_rank_projection(optax.scale_by_adam(), rank=2, moments="rotate")
    with pytest.raises(ValueError, match=r"moment_betas must be .*got \(0.9, 1.0\)"):
        pj.low_rank_projection(
            optax.scale_by_adam(), rank=2, moments="rotate", moment_betas=(0.9, 1.0)
        )
    with pytest.raises(ValueError, match="moment_betas must be"):
        pj.low_rank_projection(optax.scale_by_adam(), rank=2, moments="rotate", moment_betas=0.9)
    # numpy scalars are fine, and give the same rho as Python floats
    pj.low_rank_projection(
        optax.scale_by_adam(), rank=2, moments="rotate", moment_betas=(np.float32(0.9), 0.999)
    )
    np.testing.assert_allclose(
        float(pj._bias_ratio(jnp.int32(3), np.float32(0.9), np.float64(0.999))),
        (1 - 0.999**3) / (1 - 0.9**3) ** 2,
        rtol=1e-5,
    )


def test_moment_reset_zeroes_at_the_change_only():
    tx = pj.low_rank_projection(
        optax.scale_by_adam(), rank=4, update_interval=3, moments="reset", min_dim=1
    )
    g = {"w": _g((32, 16), 0)}
    state = tx.init(g)
    for _ in range(3):
        _, state = tx.update(g, state)
    # after t=2 (no event) mu holds 3 EMA steps; at t=3 it is reset, then one EMA step
    _, state = tx.update(g, state)
    a = np.asarray(state.projectors["w"]).T @ _orient64(g["w"])
    np.testing.assert_allclose(np.asarray(state.inner_state.mu["w"]), 0.1 * a.T, atol=1e-5)


def test_rotate_needs_float_moments():
    with pytest.raises(ValueError, match="moments='rotate'"):
        pj.low_rank_projection(
            optax.sgd(0.1, momentum=0.9), rank=2, moments="rotate", moment_betas=(0.9, 0.9)
        ).init({"w": jnp.zeros((256, 256))})


# --------------------------------------------------------------------------------------
# COAP
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("orthonormal", [True, False])
def test_coap_gradient_matches_autodiff_in_float64(orthonormal):
    """The analytic gradient (Gram-matrix form) against ``jax.grad`` of the loss as the
    paper writes it, for an orthonormal ``S`` and one moved off the manifold (as the
    P steps leave it)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        s = np.linalg.qr(rng.standard_normal((20, 5)))[0]
        if not orthonormal:
            s = s + 0.3 * rng.standard_normal((20, 5))
        s = jnp.asarray(s)
        gk = jnp.asarray(rng.standard_normal((20, 30)))
        mk = jnp.asarray(rng.standard_normal((5, 30)))
        mk = mk.at[:, 3].set(0.0)  # a zero column: cosine defined as 0, no NaN
        gk = gk.at[:, 7].set(0.0)  # a zero gradient column too
        want = jax.grad(pj.coap_loss)(s, gk, mk)
        got = pj.coap_loss_grad(s, gk, mk)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_coap_gradient_float32_close_to_float64():
    """In float32 at real gradient scales and a subspace capturing most of the energy
    (where ``|E|^2 = <P, A A^T> - 2|A|^2 + |G|^2`` cancels most), within 1e-4 relative of
    the float64 autodiff reference."""
    rng = np.random.default_rng(2)
    k, m, r = 64, 256, 8
    u = np.linalg.qr(rng.standard_normal((k, r)))[0]
    g = 1e-3 * (u @ rng.standard_normal((r, m)) + 0.05 * rng.standard_normal((k, m)))
    s = np.linalg.qr(u + 0.01 * rng.standard_normal((k, r)))[0]
    mk = s.T @ g + 1e-5 * rng.standard_normal((r, m))
    with jax.enable_x64(True):
        want = np.asarray(jax.grad(pj.coap_loss)(*(jnp.asarray(x) for x in (s, g, mk))))
    got = np.asarray(pj.coap_loss_grad(*(jnp.asarray(x, jnp.float32) for x in (s, g, mk))))
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_coap_p_step_size_paper_vs_scale_aware():
    """The finding behind ``scale_aware``: at real gradient scales (entries ~1e-3) the
    paper's clipped SGD step on S moves it by ~1e-11; the scale-aware step moves it."""
    rng = np.random.default_rng(1)
    s = jnp.asarray(np.linalg.qr(rng.standard_normal((256, 16)))[0], jnp.float32)
    gk = jnp.asarray(1e-3 * rng.standard_normal((256, 1024)), jnp.float32)
    mk = s.T @ gk + 1e-4 * jnp.asarray(rng.standard_normal((16, 1024)), jnp.float32)
    paper = pj.COAPProjector(scale_aware=False).p_step(s, gk, mk)
    aware = pj.COAPProjector(scale_aware=True).p_step(s, gk, mk)
    assert float(jnp.linalg.norm(paper - s)) < 1e-8
    assert float(jnp.linalg.norm(aware - s)) > 1e-3
    # the scale-aware step lowers the loss
    assert float(pj.coap_loss(aware, gk, mk)) < float(pj.coap_loss(s, gk, mk))


@pytest.mark.parametrize("shape", SIDES)
def test_coap_range_finder_captures_a_low_rank_gradient(shape):
    g = {"w": jnp.asarray(_drifting(shape, 1, rank=4)[0], jnp.float32)}
    captured = {}
    for oversample in (0, 8):
        proj = pj.COAPProjector(oversample=oversample)
        tx = pj.low_rank_projection(optax.identity(), rank=4, projector=proj, min_dim=1)
        _, state = tx.update(g, tx.init(g))
        captured[oversample] = _captured(state.projectors["w"], _orient64(g["w"]))
    # the paper's sketch (width r) is one-pass and approximate; oversampling tightens it
    assert captured[0] > 0.9 and captured[8] > 0.99, captured


@pytest.mark.parametrize("shape", SIDES)
def test_coap_power_iterations_approach_the_top_subspace(shape):
    """On a slowly decaying spectrum (singular values 1/sqrt(i), no gap after r) the
    one-pass sketch misses much of the best rank-r energy; block power iterations at
    t = 0 close most of that gap. Reference: the float64 SVD's top-r energy."""
    rng = np.random.default_rng(5)
    k = min(shape)
    u0, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    v0, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    g = (u0 / np.sqrt(np.arange(1, k + 1))) @ v0.T
    r = 8
    gk = _orient64(g)
    sv = np.linalg.svd(gk, compute_uv=False)
    best = float(np.sum(sv[:r] ** 2) / np.sum(sv**2))
    got = {}
    for q in (0, 1, 3):
        tx = pj.low_rank_projection(
            optax.identity(), rank=r, projector=pj.COAPProjector(power_iters=q), min_dim=1
        )
        g32 = {"w": jnp.asarray(g, jnp.float32)}
        _, state = tx.update(g32, tx.init(g32))
        s = np.asarray(state.projectors["w"], np.float64)
        np.testing.assert_allclose(s.T @ s, np.eye(r), atol=1e-5)
        got[q] = _captured(s, gk) / best
    assert got[0] < 0.85 and got[0] < got[1] < got[3] and got[3] > 0.97, got


# --------------------------------------------------------------------------------------
# Fira-style recovery of the discarded gradient
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SIDES)
def test_recovery_adds_the_scaled_residual_with_the_norm_growth_limiter(shape):
    """Reference in float64: u = scale * (S U + phi R) with R = Gk - S S^T Gk,
    phi = |U| / |S^T Gk|, and phi R capped at 1.01 x the previous step's (capped) norm."""
    r, gamma, alpha = 4, 1.01, 0.25
    tx = pj.low_rank_projection(
        optax.identity(), rank=r, update_interval=100, scale=alpha, min_dim=1, recover=True
    )
    state = tx.init({"w": jnp.zeros(shape)})
    # gradient scales: the residual term grows 10x at step 2 and shrinks at step 3
    scales = [1.0, 1.0, 10.0, 0.5, 0.5]
    last = 0.0
    for i, c in enumerate(scales):
        g = _g(shape, 40 + i, scale=c)
        u, state = tx.update({"w": g}, state)
        s = np.asarray(state.projectors["w"], np.float64)
        gk = _orient64(g)
        a = s.T @ gk
        resid = gk - s @ a
        phi = 1.0  # identity inner: |U| = |A|
        term = phi * resid
        norm = np.linalg.norm(term)
        if last > 0 and norm > gamma * last:
            term *= gamma * last / norm
            norm = gamma * last
        last = norm
        want = alpha * (s @ a + term)
        want = want.T if shape[0] >= shape[1] else want
        np.testing.assert_allclose(u["w"], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(state.residual_norms["w"]), last, rtol=1e-4)
    # at the 10x step the cap was active: the recovered part grew by exactly 1.01x
    assert last < np.linalg.norm(_orient64(_g(shape, 42, scale=10.0)))


def test_recovery_ignores_a_non_finite_gradient_in_the_limiter():
    tx = pj.low_rank_projection(optax.identity(), rank=4, min_dim=1, recover=True)
    g = {"w": _g((32, 16), 0)}
    state = tx.init(g)
    _, state = tx.update(g, state)
    before = float(state.residual_norms["w"])
    _, state = jax.jit(tx.update)({"w": g["w"].at[1, 2].set(jnp.nan)}, state)
    assert float(state.residual_norms["w"]) == before > 0
    assert bool(jnp.all(jnp.isfinite(state.projectors["w"])))


# --------------------------------------------------------------------------------------
# Robustness, layout, validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["svd", "coap", "subtrack"])
def test_non_finite_gradient_keeps_the_old_projector(projector):
    tx = pj.low_rank_projection(
        optax.scale_by_adam(), rank=4, projector=projector, update_interval=1, min_dim=1
    )
    g = {"w": _g((32, 16), 0)}
    state = tx.init(g)
    _, state = tx.update(g, state)
    s_before = state.projectors["w"]
    bad = {"w": g["w"].at[3, 4].set(jnp.nan)}
    _, state2 = jax.jit(tx.update)(bad, state)
    chex.assert_trees_all_equal(state2.projectors["w"], s_before)
    inf = {"w": g["w"].at[0, 0].set(jnp.inf)}
    _, state3 = jax.jit(tx.update)(inf, state)
    chex.assert_trees_all_equal(state3.projectors["w"], s_before)
    assert bool(jnp.all(jnp.isfinite(state3.projectors["w"])))


def test_layout_rank_fraction_min_dim_mask_and_reshape():
    params = {
        "big": jnp.zeros((512, 256)),
        "wide": jnp.zeros((128, 1024)),
        "small": jnp.zeros((64, 256)),
        "conv": jnp.zeros((3, 3, 64, 256)),
        "bias": jnp.zeros((256,)),
    }
    tx = pj.low_rank_projection(
        optax.scale_by_adam(),
        rank=0.25,
        min_dim=128,
        mask=lambda p: {k: k != "wide" for k in p},
    )
    state = tx.init(params)
    s = state.projectors
    assert s["big"].shape == (256, 64)  # right: K = n = 256, r = 64
    assert isinstance(s["wide"], optax.MaskedNode)  # masked out
    assert isinstance(s["small"], optax.MaskedNode)  # min(m, n) = 64 < 128
    assert s["conv"].shape == (256, 64)  # (3*3*64, 256) = (576, 256): right
    assert isinstance(s["bias"], optax.MaskedNode)
    mu = state.inner_state.mu
    assert mu["big"].shape == (512, 64) and mu["conv"].shape == (576, 64)
    assert mu["wide"].shape == (128, 1024) and mu["bias"].shape == (256,)
    g = jax.tree.map(lambda x: jnp.ones_like(x), params)
    u, _ = tx.update(g, state)
    chex.assert_trees_all_equal_shapes(u, params)
    tx_b = pj.low_rank_projection(optax.scale_by_adam(), rank=8, proj_dtype=jnp.bfloat16)
    assert tx_b.init(params).projectors["big"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rank=0), "rank must be"),
        (dict(rank=1.5), "rank must be"),
        (dict(rank=4, projector="pca"), "projector must be"),
        (dict(rank=4, moments="rotated"), "moments must be"),
        (dict(rank=4, update_interval=0), "update_interval"),
        (dict(rank=4, proj_dtype=jnp.float16), "proj_dtype"),
        (dict(rank=4, recover=True, recover_limit=1.0), "recover_limit"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pj.low_rank_projection(optax.scale_by_adam(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(reproject_factor=0), "reproject_factor must be a positive int, got 0"),
        (dict(oversample=-1), "oversample must be a non-negative int, got -1"),
        (dict(power_iters=1.5), "power_iters must be a non-negative int, got 1.5"),
    ],
)
def test_bad_coap_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pj.COAPProjector(**kwargs)
