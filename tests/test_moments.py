"""The moment protocol (``lowbit_optax.moments``): Adam-like inner transforms expose
their moments and betas to wrappers that move them (``low_rank_projection``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_optax


def _grads(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def _stored(state, access, name):
    return tuple(getattr(state, f)[name] for f in access.fields)


def test_scale_by_adam_like_is_optax_adam_with_its_betas():
    tx, ref = lowbit_optax.scale_by_adam_like(0.8, 0.95, 1e-6), optax.scale_by_adam(0.8, 0.95, 1e-6)
    assert isinstance(tx, optax.GradientTransformation)
    assert (tx.moments.b1, tx.moments.b2, tx.moments.fields) == (0.8, 0.95, ("mu", "nu"))
    params = {"w": jnp.zeros((5, 3))}
    s, r = tx.init(params), ref.init(params)
    for g in _grads((5, 3), 4):
        (u, s), (v, r) = tx.update({"w": g}, s), ref.update({"w": g}, r)
        np.testing.assert_array_equal(u["w"], v["w"])
    jax.tree.map(np.testing.assert_array_equal, s, r)


def test_quantized_adam_moments_decode_to_the_float64_ema():
    """``get`` of the 8-bit state is Adam's EMAs (computed here in float64) within the
    codec's resolution; float32 leaves (below ``min_size``) exactly."""
    b1, b2 = 0.9, 0.99
    tx = lowbit_optax.scale_by_quantized_adam(b1, b2, block_size=64, min_size=256)
    acc = tx.moments
    assert (acc.b1, acc.b2) == (b1, b2)
    shapes = {"big": (32, 40), "small": (7,)}
    state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
    m = {k: np.zeros(s) for k, s in shapes.items()}
    v = {k: np.zeros(s) for k, s in shapes.items()}
    for t in range(5):
        g = {k: _grads(s, 1, seed=t)[0] * (1 + t) for k, s in shapes.items()}
        _, state = tx.update(g, state)
        for k in shapes:
            m[k] = b1 * m[k] + (1 - b1) * g[k].astype(np.float64)
            v[k] = b2 * v[k] + (1 - b2) * g[k].astype(np.float64) ** 2
    mu, nu = acc.get(_stored(state, acc, "big"), shapes["big"])
    assert mu.shape == nu.shape == shapes["big"]
    # dynamic 8-bit map: relative error within a block a few percent of its absmax
    np.testing.assert_allclose(mu, m["big"], atol=0.03 * np.abs(m["big"]).max())
    np.testing.assert_allclose(nu, v["big"], atol=0.03 * v["big"].max())
    mu, nu = acc.get(_stored(state, acc, "small"), shapes["small"])
    np.testing.assert_allclose(mu, m["small"], rtol=1e-5)
    np.testing.assert_allclose(nu, v["small"], rtol=1e-5)


@pytest.mark.parametrize("nu_bits", [8, 4])
def test_quantized_put_then_get_keeps_values_and_edge_cases_finite(nu_bits):
    tx = lowbit_optax.scale_by_quantized_adam(
        mu_bits=nu_bits, nu_bits=nu_bits, block_size=32, min_size=64
    )
    acc, shape = tx.moments, (4, 70)  # a padded last block
    state = tx.init({"w": jnp.zeros(shape)})
    stored = _stored(state, acc, "w")
    rng = np.random.default_rng(3)
    m = rng.standard_normal(shape).astype(np.float32)
    v = (rng.standard_normal(shape) ** 2).astype(np.float32)
    m[0], v[0] = 0.0, 0.0  # an all-zero row of blocks
    v[1, :5] = 3e38  # near float32's max: stored as sqrt, no overflow
    new = acc.put(stored, jnp.asarray(m), jnp.asarray(v))
    for a, b in zip(new, stored, strict=True):
        if hasattr(b, "shape"):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
    m2, v2 = acc.get(new, shape)
    assert np.all(np.isfinite(np.asarray(m2))) and np.all(np.asarray(v2) >= 0)
    np.testing.assert_array_equal(m2[0], 0.0)
    np.testing.assert_array_equal(v2[0], 0.0)
    step = 2.0 ** -(nu_bits - 2)  # coarser than any level gap of these maps, by row
    for r in (2, 3):
        np.testing.assert_allclose(m2[r], m[r], atol=step * np.abs(m[r]).max())
        np.testing.assert_allclose(v2[r], v[r], atol=step * v[r].max())
    assert np.isclose(float(v2[1, 0]), 3e38, rtol=0.02)


def _projected(inner, moments, steps=7):
    params = {"w": jnp.zeros((64, 96))}
    tx = lowbit_optax.low_rank_projection(
        inner, rank=8, min_dim=8, update_interval=2, projector="svd", moments=moments
    )
    state, update = tx.init(params), jax.jit(tx.update)
    out = []
    for t, g in enumerate(_grads((64, 96), steps)):
        u, state = update({"w": g * (1 + t % 3)}, state)
        out.append(np.asarray(u["w"]))
    return state, out


def test_rotation_of_a_quantized_inner_follows_the_float_rotation():
    """SubTrack++'s rotation through the quantized Adam's access tracks the same run
    with float32 moments (betas read from each inner, none passed to the wrapper)."""
    sf, of = _projected(lowbit_optax.scale_by_adam_like(), "rotate")
    quantized = lowbit_optax.scale_by_quantized_adam(block_size=64, min_size=64)
    sq, oq = _projected(quantized, "rotate")
    for a, b in zip(of, oq, strict=True):
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a)
    acc = quantized.moments
    mu, nu = acc.get(_stored(sq.inner_state, acc, "w"), sf.inner_state.mu["w"].shape)
    for got, want in ((mu, sf.inner_state.mu["w"]), (nu, sf.inner_state.nu["w"])):
        assert np.linalg.norm(got - want) <= 0.05 * np.linalg.norm(want)


def test_reset_zeroes_a_quantized_inner_at_each_event():
    quantized = lowbit_optax.scale_by_quantized_adam(block_size=64, min_size=64)
    # 5 steps, events at t = 0, 2, 4: the state after step 5 holds one step's moments
    state, _ = _projected(quantized, "reset", steps=5)
    acc = quantized.moments
    s = np.asarray(state.projectors["w"], np.float32)
    assert s.shape == (64, 8)  # the shorter side is projected: S^T G is 8 x 96
    g = _grads((64, 96), 5)[4] * (1 + 4 % 3)
    low = s.T @ g  # the last step's projected gradient
    mu, nu = acc.get(_stored(state.inner_state, acc, "w"), low.shape)
    np.testing.assert_allclose(mu, 0.1 * low, atol=0.03 * np.abs(0.1 * low).max())
    np.testing.assert_allclose(nu, 0.001 * low**2, atol=0.03 * (0.001 * low**2).max())


def test_betas_are_given_once():
    with pytest.raises(ValueError, match=r"carries its own betas \(b1=0.9, b2=0.999\)"):
        lowbit_optax.low_rank_projection(
            lowbit_optax.scale_by_adam_like(), rank=2, moments="rotate", moment_betas=(0.9, 0.99)
        )
    with pytest.raises(ValueError, match="scale_by_adam_like"):
        lowbit_optax.low_rank_projection(optax.scale_by_adam(), rank=2, moments="rotate")
    # a plain optax Adam with its betas given once still rotates
    lowbit_optax.low_rank_projection(
        optax.scale_by_adam(), rank=2, moments="rotate", moment_betas=(0.9, 0.999)
    )
