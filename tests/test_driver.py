"""The per-leaf driver: row slices, leaf sequencing, and what they must not change."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_optax
from lowbit_optax import _driver as drv


def test_gate_is_an_exact_identity():
    x = jnp.array([1.5, -0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, 1e-45, -3e38], jnp.float32)
    token = drv.token_of(jnp.array([jnp.nan, 2.0]))  # a NaN probe still gives +0.0
    assert float(token) == 0.0 and not np.signbit(np.asarray(token))
    y = drv.gate(x, token)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), np.asarray(x).view(np.uint32))
    for dt in (jnp.bfloat16, jnp.uint8, jnp.int32):
        z = jnp.arange(5).astype(dt)
        assert drv.gate(z, token).dtype == dt
        np.testing.assert_array_equal(drv.gate(z, token), z)


@pytest.mark.parametrize(
    ("shape", "budget", "devices", "expected"),
    [
        ((4096, 1024), 2**18, 1, 16),  # 4M values in slices of 2**18
        ((4096, 1024), 2**30, 1, 1),  # fits the budget: one slice
        ((4096,), 16, 1, 1),  # rank 1: never sliced
        ((50257, 768), 2**18, 1, 1733),  # 50257 = 29 * 1733: slices of 29 rows
        ((96, 8), 64, 8, 12),  # 8 devices: k divides 96 / 8 = 12, slices of 8 rows
        ((6, 4, 100), 100, 4, 3),  # 6 / gcd(6, 4) = 3: at most 3 slices
    ],
)
def test_num_slices(shape, budget, devices, expected, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    k = drv.num_slices(shape, budget)
    assert k == expected
    assert shape[0] % k == 0
    if len(shape) >= 2:  # every possible shard count of the leading axis divides a slice
        assert (shape[0] // k) % math.gcd(shape[0], devices) == 0


KEY = jax.random.key(3)


def _row_fn(carried, readonly, rows):
    """Per-row math with a reduction over the last axis and positional noise."""
    g, s = carried
    (w,) = readonly
    noise = lowbit_optax.quantization.hash_uniform(KEY, g.shape, rows)
    m = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
    return (g / m * w + noise, s + m[..., 0])


@pytest.mark.parametrize("budget", [64, 256, 10**9])
def test_map_rows_slices_give_the_unsliced_result(budget):
    g = jax.random.normal(jax.random.key(0), (32, 16))
    s = jnp.zeros((32,))
    w = jax.random.normal(jax.random.key(1), (32, 1))
    out = drv.map_rows(_row_fn, (g, s), (w,), budget=budget)
    # 8 devices (conftest): k divides 32 / 8 = 4
    assert drv.num_slices(g.shape, budget) == {64: 4, 256: 2, 10**9: 1}[budget]
    # the whole leaf at once: the same values, the noise included (it is positional);
    # XLA compiles the slice's arithmetic on its own, which may round differently in
    # the last bit (e.g. a division as a reciprocal), never more
    ref = _row_fn((g, s), (w,), None)
    np.testing.assert_allclose(out[0], ref[0], rtol=2.5e-7, atol=1.2e-7)
    np.testing.assert_array_equal(out[1], ref[1])


def test_hash_uniform_is_uniform_and_positional():
    key = jax.random.key(7)
    u = np.asarray(lowbit_optax.quantization.hash_uniform(key, (256, 1024)))
    assert u.min() >= 0.0 and u.max() < 1.0
    counts, _ = np.histogram(u, bins=64, range=(0, 1))
    expected = u.size / 64
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 120, chi2  # 63 degrees of freedom: p ~ 1e-5 at 120
    # neighbours and the next key are uncorrelated
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01
    u2 = np.asarray(lowbit_optax.quantization.hash_uniform(jax.random.fold_in(key, 1), u.shape))
    assert abs(np.corrcoef(u.ravel(), u2.ravel())[0, 1]) < 0.01
    # a value depends on its position only: rows 5, 9, ... of the array are those rows
    rows = jnp.arange(5, 256, 4)
    sub = np.asarray(lowbit_optax.quantization.hash_uniform(key, (len(rows), 1024), rows))
    np.testing.assert_array_equal(sub, u[5::4])


TXS = {
    "adamw_8bit": lambda: lowbit_optax.adamw_8bit(1e-2),
    "adamw_4bit": lambda: lowbit_optax.adamw_4bit(1e-2),
    "solo_adamw": lambda: lowbit_optax.solo_adamw(1e-2),
    "slim_adamw_mu4": lambda: lowbit_optax.slim_adamw(
        1e-2, rules=lowbit_optax.flax_default_rules, mu_bits=4, min_size=64
    ),
    "galore_adamw": lambda: lowbit_optax.galore_adamw(1e-2, min_dim=16, update_interval=2),
    "subtrack_recover": lambda: optax.chain(
        lowbit_optax.low_rank_projection(
            optax.scale_by_adam(),
            rank=0.25,
            min_dim=16,
            update_interval=2,
            projector="subtrack",
            moments="rotate",
            recover=True,
            moment_betas=(0.9, 0.999),
        ),
        optax.scale_by_learning_rate(1e-2),
    ),
}


def _params():
    return {
        "dense": {"kernel": 0.1 * jax.random.normal(jax.random.key(0), (96, 256))},
        "proj": {"kernel": 0.1 * jax.random.normal(jax.random.key(1), (64, 48))},
        "bias": jnp.zeros((4096,)),
    }


def _run(tx, params, steps=3):
    state = tx.init(params)
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    for t in range(steps):
        g = jax.tree.map(
            lambda x, t=t: jax.random.normal(jax.random.key(10 + t), x.shape) * 10.0 ** (t - 1),
            params,
        )
        params, state = step(params, state, g)
    return params, state


@pytest.mark.parametrize("name", list(TXS))
def test_row_slices_do_not_change_the_result(name, monkeypatch):
    """The same steps with every large leaf whole and in slices of 1024 values: the same
    math, stochastic rounding included (its noise is positional). XLA compiles a slice's
    arithmetic on its own and may round a float differently in the last bit, so floats
    agree to float32 precision and a code can flip where a value sits on a midpoint:
    at most 0.2% of the codes."""
    params = _params()
    monkeypatch.setattr(drv, "SLICE_ELEMENTS", 10**9)
    whole = _run(TXS[name](), params)
    monkeypatch.setattr(drv, "SLICE_ELEMENTS", 1024)
    sliced = _run(TXS[name](), params)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced), strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        elif a.dtype == jnp.uint8:  # packed codes: compare the bytes
            assert np.mean(np.asarray(a) != np.asarray(b)) <= 2e-3
        else:
            np.testing.assert_array_equal(a, b)


def test_update_temporaries_are_bounded_by_a_slice():
    """adamw_8bit on one 4M-value leaf: XLA's planned temporaries are the update (one
    leaf, the gradient is not donated here) and a slice's working set, not the several
    float32 copies of the leaf a whole-leaf computation needs."""
    params = {"w": jax.ShapeDtypeStruct((4096, 1024), jnp.float32)}
    tx = lowbit_optax.adamw_8bit(1e-3)
    mem = lowbit_optax.step_memory(tx, params)
    leaf = 4096 * 1024 * 4
    assert mem.update.temp_bytes < leaf + 20 * 4 * drv.SLICE_ELEMENTS, mem
