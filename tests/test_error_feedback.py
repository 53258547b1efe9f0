"""Compressors and the error-feedback transform against explicit numpy references."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_optax as lo

# the module (lowbit_optax.error_feedback, the attribute, is the transform)
ef = importlib.import_module("lowbit_optax.error_feedback")

COMPRESSORS = {
    "top_k": ef.top_k(0.1),
    "top_k_block": ef.top_k(0.1, block_size=16),
    "random_k": ef.random_k(0.1),
    "low_rank": ef.low_rank(2),
    "sign": ef.quantizer(1, block_size=16),
    "int4": ef.quantizer(4, block_size=16),
}


def _params():
    return {
        "w": jnp.zeros((24, 10), jnp.float32),  # 240 values: 15 blocks of 16
        "b": jnp.zeros((37,), jnp.float32),  # odd: a partial last block
        "s": jnp.zeros((), jnp.float32),
    }


def _grads(step: int):
    keys = jax.random.split(jax.random.key(100 + step), 3)
    p = _params()
    return {k: jax.random.normal(kk, p[k].shape) for k, kk in zip(sorted(p), keys, strict=True)}


# --------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_error_feedback_conserves_the_gradient_sum(name):
    """sum_t c_t + xi_T == sum_t g_t (float64 sums of what went in and came out)."""
    tx = lo.error_feedback(COMPRESSORS[name])
    state = tx.init(_params())
    update = jax.jit(tx.update)
    sum_g = {k: 0.0 for k in _params()}
    sum_c = {k: 0.0 for k in _params()}
    for t in range(12):
        g = _grads(t)
        c, state = update(g, state)
        for k in g:
            sum_g[k] = sum_g[k] + np.asarray(g[k], np.float64)
            sum_c[k] = sum_c[k] + np.asarray(c[k], np.float64)
    for k in sum_g:
        np.testing.assert_allclose(
            sum_c[k] + np.asarray(state.error[k], np.float64), sum_g[k], atol=2e-5
        )
    # and it did compress: something is carried over
    assert float(jnp.sum(jnp.abs(state.error["w"]))) > 0


def test_bfloat16_accumulator_conserves_to_its_precision():
    tx = lo.error_feedback(ef.top_k(0.05), accumulator_dtype=jnp.bfloat16)
    state = tx.init(_params())
    assert state.error["w"].dtype == jnp.bfloat16
    sum_g, sum_c = 0.0, 0.0
    for t in range(12):
        g = _grads(t)
        c, state = tx.update(g, state)
        sum_g = sum_g + np.asarray(g["w"], np.float64)
        sum_c = sum_c + np.asarray(c["w"], np.float64)
    xi = np.asarray(state.error["w"].astype(jnp.float32), np.float64)
    # each step rounds the carried error to bfloat16 (relative 2**-9)
    np.testing.assert_allclose(sum_c + xi, sum_g, atol=12 * 2**-8 * np.abs(sum_g).max())
    assert state.error["w"].dtype == jnp.bfloat16


def test_error_feedback_top_k_sgd_reaches_the_sgd_minimum():
    """On a least-squares problem, EF top-k SGD (10%) ends near plain SGD's loss while
    top-k without feedback stalls far above."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((80, 40)) / np.sqrt(40), jnp.float32)
    b = jnp.asarray(rng.standard_normal(80), jnp.float32)
    loss = lambda p: 0.5 * jnp.sum((a @ p["x"] - b) ** 2)
    x_star = np.linalg.lstsq(np.asarray(a, np.float64), np.asarray(b, np.float64), rcond=None)[0]
    best = float(0.5 * np.sum((np.asarray(a, np.float64) @ x_star - np.asarray(b)) ** 2))

    def run(tx, steps=600):
        p = {"x": jnp.zeros(40)}
        s = tx.init(p)

        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        for _ in range(steps):
            p, s = step(p, s)
        return float(loss(p))

    sgd = run(optax.sgd(0.1))
    efk = run(optax.chain(lo.error_feedback(ef.top_k(0.1)), optax.sgd(0.1)))
    assert sgd - best < 1e-3
    assert efk - best < 1e-2
    # without error feedback, the same compressor is a biased, lossy update
    plain = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(lambda x: ef.top_k(0.1)(x)[0], u), s),
    )
    assert run(optax.chain(plain, optax.sgd(0.1))) - best > efk - best


def test_non_finite_gradient_keeps_the_accumulator():
    tx = lo.error_feedback(ef.low_rank(2))
    state = tx.init(_params())
    _, state = tx.update(_grads(0), state)
    bad = _grads(1)
    bad["w"] = bad["w"].at[2, 3].set(jnp.nan)
    u, state2 = jax.jit(tx.update)(bad, state)
    assert bool(jnp.isnan(u["w"]).any())  # the update shows it
    np.testing.assert_array_equal(state2.error["w"], state.error["w"])
    np.testing.assert_array_equal(state2.compressor_state["w"], state.compressor_state["w"])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state2))


# --------------------------------------------------------------------------------------
# Compressors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 37, 240])
def test_top_k_keeps_the_largest_magnitudes(n):
    x = np.asarray(jax.random.normal(jax.random.key(n), (n,)), np.float64)
    c = ef.top_k(0.1)
    k = max(1, round(0.1 * n))
    assert c.k(n) == k
    out, _ = c(jnp.asarray(x, jnp.float32))
    want = np.zeros(n)
    keep = np.argsort(-np.abs(x))[:k]
    want[keep] = x[keep]
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_top_k_per_block_with_a_partial_last_block():
    n, b = 37, 16  # blocks 16, 16, 5
    x = np.asarray(jax.random.normal(jax.random.key(3), (n,)), np.float64)
    c = ef.top_k(0.125, block_size=b)  # 2 per block
    payload, _ = c.compress(jnp.asarray(x, jnp.float32), (), None)
    assert payload.values.shape == payload.indices.shape == (6,)
    assert payload.indices.dtype == jnp.int32
    want = np.zeros(n)
    for start in range(0, n, b):
        blk = np.arange(start, min(n, start + b))
        keep = blk[np.argsort(-np.abs(x[blk]))[:2]]
        want[keep] = x[keep]
    np.testing.assert_allclose(c.decompress(payload, (n,)), want, rtol=1e-6)


def test_random_k_picks_distinct_entries_and_depends_on_the_key():
    x = jnp.arange(1.0, 201.0)
    c = ef.random_k(0.1)
    p1, _ = c.compress(x, (), jax.random.key(0))
    p2, _ = c.compress(x, (), jax.random.key(1))
    idx = np.asarray(p1.indices)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    np.testing.assert_array_equal(p1.values, np.asarray(x)[idx])
    assert set(idx.tolist()) != set(np.asarray(p2.indices).tolist())
    with pytest.raises(ValueError, match="needs a PRNG key"):
        c.compress(x, (), None)
    # every entry is kept with probability k / n = 0.1 (400 draws: ~40 each)
    counts = np.zeros(200)
    for i in range(400):
        counts[np.asarray(c.compress(x, (), jax.random.key(100 + i))[0].indices)] += 1
    assert counts.min() >= 15 and counts.max() <= 70, (counts.min(), counts.max())
    # n not a multiple of k: still k distinct indices in range
    p3, _ = ef.random_k(0.3).compress(jnp.arange(7.0), (), jax.random.key(2))
    idx3 = np.asarray(p3.indices)
    assert len(set(idx3.tolist())) == 2 and idx3.min() >= 0 and idx3.max() < 7


def test_low_rank_is_one_warm_started_power_iteration():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((30, 20))
    c = ef.low_rank(3)
    qt0 = np.asarray(c.init((30, 20)), np.float64)
    assert qt0.shape == (3, 20)  # the warm start is kept as Q^T, (r, n)
    out, qt1 = c(jnp.asarray(m, jnp.float32), c.init((30, 20)))
    p, _ = np.linalg.qr(m @ qt0.T)
    want_q = m.T @ p
    np.testing.assert_allclose(qt1, want_q.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out, p @ want_q.T, rtol=1e-4, atol=1e-4)
    # an exactly rank-3 matrix is recovered after a warm-started iteration or two
    lr = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))
    q = c.init((30, 20))
    for _ in range(3):
        rec, q = c(jnp.asarray(lr, jnp.float32), q)
    np.testing.assert_allclose(rec, lr, atol=1e-4)
    # vectors and small matrices pass through dense
    v = jnp.arange(5.0)
    np.testing.assert_array_equal(c(v, c.init((5,)))[0], v)
    small = jnp.ones((3, 8))
    np.testing.assert_array_equal(c(small, c.init((3, 8)))[0], small)


def test_one_bit_quantizer_is_the_scaled_sign():
    n, b = 37, 16
    x = np.asarray(jax.random.normal(jax.random.key(5), (n,)), np.float64)
    out, _ = ef.quantizer(1, block_size=b)(jnp.asarray(x, jnp.float32))
    want = np.empty(n)
    for start in range(0, n, b):
        blk = slice(start, min(n, start + b))
        want[blk] = np.mean(np.abs(x[blk])) * np.sign(x[blk])
    np.testing.assert_allclose(out, want, rtol=1e-5)


@pytest.mark.parametrize("name", ["top_k", "top_k_block", "sign", "int4"])
def test_compressors_are_contractive(name):
    """|C(x) - x|^2 <= (1 - delta) |x|^2 with delta > 0 (what error feedback needs)."""
    c = COMPRESSORS[name]
    for seed in range(5):
        x = jax.random.normal(jax.random.key(seed), (240,)) * jnp.exp(
            jax.random.normal(jax.random.key(seed + 50), (240,))
        )
        out, _ = c(x)
        err = float(jnp.sum((out - x) ** 2))
        assert err < float(jnp.sum(x**2)) * (1 - 0.05)


def test_compression_edge_cases_stay_finite():
    for name, c in COMPRESSORS.items():
        for x in (jnp.zeros((24, 10)), jnp.zeros((1,)), jnp.full((16,), 1e-30)):
            out, _ = c(x, c.init(x.shape), jax.random.key(0))
            assert out.shape == x.shape, name
            assert bool(jnp.all(jnp.isfinite(out))), name


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ef.top_k(0.0), "density"),
        (lambda: ef.top_k(1.5), "density"),
        (lambda: ef.top_k(0.1, block_size=0), "block_size"),
        (lambda: ef.random_k(-1), "density"),
        (lambda: ef.low_rank(0), "rank"),
        (lambda: ef.quantizer(5), "bits"),
        (lambda: ef.quantizer(4, "log"), "unsigned"),
        (lambda: lo.error_feedback("top_k"), "Compressor value"),
        (lambda: lo.error_feedback(ef.top_k(0.1), accumulator_dtype=jnp.float16), "float32"),
    ],
)
def test_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_low_rank_state_follows_the_param_sharding():
    """PowerSGD's warm start is kept as ``Q^T`` (r, n), so ``state_shardings`` lays it out
    like the param's last axis; a jitted update on a 2 x 4 mesh keeps that layout and
    matches one device and a numpy PowerSGD step (P = qr(M Q0), Q = M^T P, c = P Q^T)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"w": P("data", "model"), "b": P("model")}
    shapes = {"w": (64, 128), "b": (128,)}
    tx = lo.error_feedback(ef.low_rank(2))
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    grads = [
        {k: jax.random.normal(jax.random.key(10 * t + i), shapes[k]) for i, k in enumerate(shapes)}
        for t in range(2)
    ]
    params = jax.device_put({k: jnp.zeros(s) for k, s in shapes.items()}, shardings)
    state = lo.sharded_init(tx, params)
    qt = state.compressor_state["w"]
    assert qt.shape == (2, 128) and qt.sharding.spec == P("data", "model")
    assert qt.addressable_shards[0].data.shape == (1, 32)
    assert state.error["w"].sharding.spec == P("data", "model")

    ref_state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
    np.testing.assert_array_equal(qt, ref_state.compressor_state["w"])
    m = np.asarray(grads[0]["w"], np.float64)
    p, _ = np.linalg.qr(m @ np.asarray(qt, np.float64).T)
    want_c, want_qt = p @ (m.T @ p).T, (m.T @ p).T

    update = jax.jit(tx.update)  # no out_shardings: propagation must keep the layout
    ref_update = jax.jit(tx.update)
    for t, g in enumerate(grads):
        c, state = update(jax.device_put(g, shardings), state)
        ref_c, ref_state = ref_update(g, ref_state)
        assert state.compressor_state["w"].sharding.spec == P("data", "model")
        assert state.error["w"].sharding.spec == P("data", "model")
        assert c["w"].sharding.spec == P("data", "model")
        got, want = jax.tree.leaves((c, state)), jax.tree.leaves((ref_c, ref_state))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        if t == 0:
            np.testing.assert_allclose(c["w"], want_c, atol=1e-4)
            np.testing.assert_allclose(state.compressor_state["w"], want_qt, atol=1e-4)
            np.testing.assert_allclose(c["b"], g["b"])  # a vector passes through dense
