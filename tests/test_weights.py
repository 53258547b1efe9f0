"""lowbit_optax.weights: bf16/fp16 params updated like float32 ones (stochastic_rounding,
compensated, eco)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import lowbit_optax
from lowbit_optax._driver import is_empty
from lowbit_optax.weights import (
    StochasticRoundingState,
    compensated,
    eco,
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


# ---- compensated (Kahan) -------------------------------------------------------------


def test_compensated_follows_the_float64_sum_where_nearest_stalls():
    """400 updates of -1e-4 on bf16 weights of 1 (each below half a unit in the last
    place, 2**-9): nearest rounding never moves, the compensated weight ends at the
    bf16 value nearest 1 - 0.04 (float64), and p + c is off by at most what rounding
    c to bf16 loses, 2**-9 of |c| <= 2**-9 (half a unit of p), per step."""
    p0 = {"w": jnp.ones((3,), jnp.bfloat16), "f": jnp.ones((3,), jnp.float32)}
    u = {"w": jnp.full((3,), -1e-4, jnp.float32), "f": jnp.full((3,), -1e-4, jnp.float32)}
    tx = compensated()
    state = tx.init(p0)
    assert state.compensation["w"].dtype == jnp.bfloat16 and is_empty(state.compensation["f"])
    step = jax.jit(tx.update)
    params, plain = p0, p0
    for _ in range(400):
        updates, state = step(u, state, params)
        assert updates["w"].dtype == jnp.float32
        params = optax.apply_updates(params, updates)
        plain = optax.apply_updates(plain, u)
    assert np.all(np.asarray(plain["w"]) == 1.0)  # the stall
    exact = 1.0 - 400 * np.float64(np.float32(-1e-4)) * -1
    want = np.float64(np.array(exact).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(np.asarray(params["w"], np.float64), want)
    total = np.asarray(params["w"], np.float64) + np.asarray(state.compensation["w"], np.float64)
    assert np.all(np.abs(total - exact) <= 400 * 2.0**-9 * 2.0**-9)
    # float32 params: the update passes through untouched
    np.testing.assert_array_equal(np.asarray(params["f"]), np.asarray(plain["f"]))


def test_compensated_keeps_the_state_finite_on_non_finite_updates():
    p = {"w": jnp.ones((4,), jnp.bfloat16)}
    u = {"w": jnp.asarray([np.nan, np.inf, -np.inf, 1e-4], jnp.float32)}
    tx = compensated()
    updates, state = tx.update(u, tx.init(p), p)
    new = np.asarray(optax.apply_updates(p, updates)["w"], np.float64)
    assert np.isnan(new[0]) and new[1] == np.inf and new[2] == -np.inf and new[3] == 1.0
    c = np.asarray(state.compensation["w"], np.float64)
    assert np.all(np.isfinite(c)) and c[3] == np.float64(
        np.float32(1e-4).astype(ml_dtypes.bfloat16)
    )
    with pytest.raises(ValueError, match="compensated needs the params"):
        tx.update(u, tx.init(p))


# ---- eco -----------------------------------------------------------------------------


def _quadratic_grads(target):
    return jax.jit(jax.grad(lambda p: 0.5 * jnp.sum((p["w"].astype(jnp.float32) - target) ** 2)))


def test_eco_on_float32_params_is_adamw():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}
    target = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    grads = _quadratic_grads(target)
    sched = optax.linear_schedule(1e-2, 1e-3, 5)
    ref_tx = optax.adamw(sched, weight_decay=0.1)
    tx = eco(lowbit_optax.scale_by_adam_like(), sched, weight_decay=0.1)
    p_ref, s_ref, p, s = params, ref_tx.init(params), params, tx.init(params)
    for _ in range(5):
        u_ref, s_ref = ref_tx.update(grads(p_ref), s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u_ref)
        u, s = tx.update(grads(p), s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(p_ref["w"]), rtol=1e-6, atol=1e-7)


def test_eco_injects_the_rounding_error_into_the_first_moment():
    """One step from zero moments, against the docstring's formula in float64 (numpy
    and ml_dtypes): m = (1 - b1) g - (1 - b1)(1 - b1**2) d e / (eta b1), e the bf16
    nearest-rounding error of p + u, weight decay in float32."""
    b1, b2, eps, eta, wd = 0.9, 0.99, 1e-8, 3e-3, 0.1
    rng = np.random.default_rng(2)
    p = (rng.standard_normal(256) * 2.0).astype(ml_dtypes.bfloat16)
    g = rng.standard_normal(256).astype(np.float32) * np.float32(10.0) ** rng.uniform(-3, 1, 256)
    tx = eco(lowbit_optax.scale_by_adam_like(b1, b2, eps), eta, weight_decay=wd)
    params = {"w": jnp.asarray(p)}
    updates, state = tx.update({"w": jnp.asarray(g)}, tx.init(params), params)
    pf, g64 = p.astype(np.float64), g.astype(np.float64)
    m, v = (1 - b1) * g64, (1 - b2) * g64**2
    x = pf - eta * (m / (1 - b1) / (np.sqrt(v / (1 - b2)) + eps) + wd * pf)
    # optax.scale_by_adam's update uses the float32 nu; its state keeps nu in the
    # params' dtype (bfloat16 here), and that stored nu is what ECO reads
    v = v.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    d = np.sqrt(v / (1 - b2)) + eps
    new = x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    e = x - new
    want_m = m - (1 - b1) * (1 - b1**2) * d * e / (eta * b1)
    got_new = np.asarray(optax.apply_updates(params, updates)["w"], np.float64)
    np.testing.assert_array_equal(got_new, new)
    assert np.any(e != 0)
    np.testing.assert_allclose(np.asarray(state.inner_state.mu["w"]), want_m, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("inner", ["float32", "8bit"])
def test_eco_follows_master_weights_where_nearest_stalls(inner):
    """Adam on a quadratic with bf16 weights in [0.13, 0.24] (unit in the last place
    2**-10) at lr 2e-4, below half a unit: nearest rounding never moves; ECO lags
    Adam with float32 master weights by a bounded amount (about half a unit over
    1 - b1, which the momentum must hold before a step survives rounding), so after 200
    steps (up to 40 units of travel) it is several times closer to the masters."""
    rng = np.random.default_rng(3)
    shape = (64, 128)
    p0 = jnp.asarray(rng.uniform(0.13, 0.24, shape), jnp.float32)
    target = p0 + jnp.asarray(rng.uniform(-0.05, 0.05, shape), jnp.float32)
    grads = _quadratic_grads(target)
    lr = 2e-4

    def adam():
        if inner == "8bit":
            return lowbit_optax.scale_by_quantized_adam(b2=0.99)
        return lowbit_optax.scale_by_adam_like(b2=0.99)

    def run(tx, params):
        state = tx.init(params)
        step = jax.jit(lambda p, s: tx.update(grads(p), s, p))
        for _ in range(200):
            u, state = step(params, state)
            params = optax.apply_updates(params, u)
        return np.asarray(params["w"], np.float64), state

    master, _ = run(optax.chain(adam(), optax.scale(-lr)), {"w": p0})
    nearest, _ = run(optax.chain(adam(), optax.scale(-lr)), {"w": p0.astype(jnp.bfloat16)})
    eco_w, state = run(eco(adam(), lr), {"w": p0.astype(jnp.bfloat16)})
    err_nearest = np.mean(np.abs(nearest - master))
    err_eco = np.mean(np.abs(eco_w - master))
    assert err_eco < 0.3 * err_nearest, (err_eco, err_nearest)
    assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in jax.tree.leaves(state))


def test_eco_bad_use_is_a_clear_error():
    with pytest.raises(ValueError, match="needs an AdamLike inner"):
        eco(optax.scale_by_adam(), 1e-3)
    with pytest.raises(ValueError, match="0 < b1 < 1"):
        eco(lowbit_optax.scale_by_adam_like(b1=0.0), 1e-3)
    with pytest.raises(ValueError, match="rounding must be"):
        eco(lowbit_optax.scale_by_adam_like(), 1e-3, rounding="up")
    tx = eco(lowbit_optax.scale_by_adam_like(), 1e-3)
    p = {"w": jnp.ones((4,), jnp.bfloat16)}
    with pytest.raises(ValueError, match="eco needs the params"):
        tx.update(p, tx.init(p))


def test_eco_and_compensation_resume_bit_exactly_from_an_orbax_checkpoint(tmp_path):
    """compensated and ECO (stochastic, 8-bit moments) on bf16 params: 3 steps, a
    checkpoint, 3 more equal 6 uninterrupted steps bit for bit."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(4)
    params0 = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.bfloat16)}
    target = jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)
    grads = _quadratic_grads(target)
    for i, tx in enumerate(
        [
            optax.chain(optax.adamw(1e-4), compensated()),
            eco(lowbit_optax.scale_by_quantized_adam(min_size=0), 1e-4, rounding="stochastic"),
        ]
    ):
        step = jax.jit(lambda p, s, tx=tx: tx.update(grads(p), s, p))

        def train(params, state, n, step=step):
            for _ in range(n):
                u, state = step(params, state)
                params = optax.apply_updates(params, u)
            return params, state

        full, _ = train(params0, tx.init(params0), 6)
        mid = train(params0, tx.init(params0), 3)
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(tmp_path / f"ckpt{i}", args=ocp.args.StandardSave(mid))
            like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mid)
            restored = ckptr.restore(tmp_path / f"ckpt{i}", args=ocp.args.StandardRestore(like))
        resumed, _ = train(*restored, 3)
        np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(full["w"]))
        assert np.any(np.asarray(full["w"]) != np.asarray(params0["w"]))


def test_inject_hyperparams_with_defaults():
    """The weight transforms under optax.inject_hyperparams with no static_args."""
    p = {"w": jnp.ones((4,), jnp.bfloat16)}
    g = {"w": jnp.ones((4,), jnp.bfloat16)}
    for factory in (stochastic_rounding, compensated):
        tx = optax.inject_hyperparams(factory)()
        tx.update(g, tx.init(p), p)
    tx = optax.inject_hyperparams(eco)(lowbit_optax.scale_by_adam_like(), learning_rate=1e-3)
    u, _ = tx.update(g, tx.init(p), p)
    plain = eco(lowbit_optax.scale_by_adam_like(), learning_rate=1e-3)
    want, _ = plain.update(g, plain.init(p), p)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(want["w"]))
