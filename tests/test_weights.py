"""stochastic_rounding (lowbit_optax.weights): bf16/fp16 params updated like float32 ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from lowbit_optax.weights import (
    StochasticRoundingState,
    round_stochastically,
    stochastic_rounding,
)


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``dtype`` at or below and at or above each float64 ``x`` (numpy and
    ml_dtypes, independent of the code under test)."""
    near = x.astype(np.float32).astype(dtype)
    nf = near.astype(np.float64)
    up = np.nextafter(near, np.array(np.inf, dtype)).astype(np.float64)
    down = np.nextafter(near, np.array(-np.inf, dtype)).astype(np.float64)
    below = np.where(nf <= x, nf, down)
    above = np.where(nf >= x, nf, up)
    return below, above


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_unbiased_where_nearest_rounding_stalls(dtype):
    """An update of a quarter of the weight's unit in the last place: nearest rounding
    keeps every weight, stochastic rounding moves a quarter of them one unit up, so
    the mean is p + u (within 5 standard errors)."""
    n = 100_000
    p = {"w": jnp.ones((n,), dtype)}
    ulp = float(
        np.spacing(
            np.array(1.0, ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float16)
        ).astype(np.float64)
    )
    u = {"w": jnp.full((n,), ulp / 4, jnp.float32)}
    assert np.all(np.asarray(optax.apply_updates(p, u)["w"]) == 1.0)  # the stall
    tx = stochastic_rounding(key=3)
    updates, _ = jax.jit(tx.update)(u, tx.init(p), p)
    assert updates["w"].dtype == jnp.float32
    new = np.asarray(optax.apply_updates(p, updates)["w"], np.float64)
    assert set(np.unique(new)) == {1.0, 1.0 + ulp}
    se = ulp * np.sqrt(0.25 * 0.75 / n)
    assert abs(new.mean() - (1.0 + ulp / 4)) < 5 * se


def test_lands_between_the_neighbours_of_the_float32_sum_with_the_right_odds():
    """Over magnitudes 1e-30 .. 1e30: apply_updates(p, u') is one of the two bf16 values
    around p + u (exactly p + u when representable), and over 400 keys the share
    rounded up matches (p + u - below) / (above - below)."""
    rng = np.random.default_rng(0)
    m = 64
    mag = 10.0 ** rng.uniform(-30, 30, m)
    p0 = (rng.standard_normal(m) * mag).astype(ml_dtypes.bfloat16)
    u0 = (rng.standard_normal(m) * mag * 0.01).astype(np.float32)
    u0[:4] = 0.0  # representable sums stay as they are
    p = {"w": jnp.asarray(p0)}
    u = {"w": jnp.asarray(u0)}
    x = p0.astype(np.float64) + u0.astype(np.float64)
    x32 = (p0.astype(np.float32) + u0).astype(np.float64)  # the float32 sum the code rounds
    below, above = _neighbours(x32, ml_dtypes.bfloat16)
    tx = stochastic_rounding()
    update = jax.jit(tx.update)
    state = tx.init(p)
    ups = np.zeros(m)
    for _ in range(400):
        updates, state = update(u, state, p)
        new = np.asarray(optax.apply_updates(p, updates)["w"], np.float64)
        assert np.all((new == below) | (new == above))
        ups += new == above
    np.testing.assert_array_equal(new[:4], p0[:4].astype(np.float64))
    gap = above - below
    inside = gap > 0
    want = np.where(inside, (x32 - below) / np.where(inside, gap, 1.0), 0.0)
    assert np.all(np.abs(ups[inside] / 400 - want[inside]) < 5 * np.sqrt(0.25 / 400) + 1e-9)
    assert np.allclose(x32, x, rtol=1e-6)  # the float32 sum is the sum


def test_float32_params_pass_through_and_the_key_moves():
    p = {"w": jnp.ones((8, 8), jnp.float32), "b": jnp.ones((8,), jnp.bfloat16)}
    u = {"w": jnp.full((8, 8), 1e-3), "b": jnp.full((8,), 1e-3)}
    tx = optax.chain(optax.sgd(1.0), stochastic_rounding())
    state = tx.init(p)
    assert isinstance(state[1], StochasticRoundingState) and state[1].key.dtype == jnp.uint32
    updates, new_state = tx.update(u, state, p)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.full((8, 8), -1e-3, np.float32))
    assert not np.array_equal(np.asarray(new_state[1].key), np.asarray(state[1].key))
    again, _ = tx.update(u, state, p)  # same state, same rounding (a resumed run)
    np.testing.assert_array_equal(np.asarray(again["b"]), np.asarray(updates["b"]))


def test_non_finite_updates_are_not_hidden():
    p = {"w": jnp.ones((4,), jnp.bfloat16)}
    u = {"w": jnp.asarray([np.nan, np.inf, -np.inf, 1e-3], jnp.float32)}
    tx = stochastic_rounding()
    updates, state = tx.update(u, tx.init(p), p)
    new = np.asarray(optax.apply_updates(p, updates)["w"], np.float64)
    assert np.isnan(new[0]) and new[1] == np.inf and new[2] == -np.inf and np.isfinite(new[3])
    assert np.all(np.isfinite(np.asarray(state.key, np.float64)))


def test_bad_use_is_a_clear_error():
    with pytest.raises(ValueError, match="key must be an int seed"):
        stochastic_rounding(key=1.5)
    tx = stochastic_rounding()
    p = {"w": jnp.ones((4,), jnp.bfloat16)}
    with pytest.raises(ValueError, match="stochastic_rounding needs the params"):
        tx.update(p, tx.init(p))


def test_checkpoint_resume_with_bf16_params_is_bit_exact(tmp_path):
    """bf16 params, adamw then stochastic rounding: 3 steps, an orbax checkpoint of
    (params, state), 3 more from the restored copy equal 6 uninterrupted steps bit for
    bit (the key is in the state); and the rounding did move the params."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(0)
    params0 = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)}
    tx = optax.chain(optax.adamw(1e-4), stochastic_rounding(key=7))
    target = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.sum((p["w"].astype(jnp.float32) - target) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def train(params, state, n):
        for _ in range(n):
            params, state = step(params, state)
        return params, state

    full, _ = train(params0, tx.init(params0), 6)
    mid = train(params0, tx.init(params0), 3)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "ckpt", args=ocp.args.StandardSave(mid))
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mid)
        restored = ckptr.restore(tmp_path / "ckpt", args=ocp.args.StandardRestore(like))
    resumed, _ = train(*restored, 3)
    assert resumed["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(full["w"]))
    # 6 steps of lr 1e-4 are below half a bf16 ulp for most weights: nearest rounding
    # would leave them, stochastic rounding moves some
    assert np.any(np.asarray(full["w"]) != np.asarray(params0["w"]))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bf16", "f16"])
def test_round_stochastically_picks_a_neighbour_with_the_right_odds(dtype):
    """The general rounding (``round_stochastically``, which fp16 params use; bf16 params
    take a bit-level form of it): one of the two neighbours of x, above with probability
    (x - below) / (above - below), for evenly spread u."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(256).astype(np.float32) * np.float32(3.0)
    below, above = _neighbours(x.astype(np.float64), dtype)
    u = (np.arange(1000) + 0.5) / 1000  # evenly spread: the share above is exact to 1e-3
    got = np.asarray(
        round_stochastically(
            jnp.asarray(np.repeat(x[None], len(u), 0)),
            jnp.dtype(dtype),
            jnp.asarray(np.repeat(u[:, None], len(x), 1), jnp.float32),
        ),
        np.float64,
    )
    assert np.all((got == below) | (got == above))
    gap = np.where(above > below, above - below, 1.0)
    want = np.where(above > below, (x - below) / gap, 0.0)
    np.testing.assert_allclose((got == above).mean(0), want, atol=2e-3)
