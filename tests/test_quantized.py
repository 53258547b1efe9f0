"""Quantized Adam: numerics against float64 references, swamping, SOLO, edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_optax
from lowbit_optax import quantization as qz
from lowbit_optax.aliases import SOLO_B1
from lowbit_optax.quantized import scale_by_quantized_adam

ALIASES = {
    "adamw_8bit": lambda lr, **kw: lowbit_optax.adamw_8bit(lr, **kw),
    "adamw_4bit": lambda lr, **kw: lowbit_optax.adamw_4bit(lr, **kw),
    "solo_4_2": lambda lr, **kw: lowbit_optax.solo_adamw(lr, bits=(4, 2), **kw),
    "solo_3_3": lambda lr, **kw: lowbit_optax.solo_adamw(lr, bits=(3, 3), **kw),
    "solo_2_2": lambda lr, **kw: lowbit_optax.solo_adamw(lr, bits=(2, 2), **kw),
}


# ------------------------------------------------------------------------------------
# Numerics against float64 references
# ------------------------------------------------------------------------------------


def _np_blockwise_nearest(x: np.ndarray, levels: np.ndarray, block: int = 128) -> np.ndarray:
    """Independent float64 block-wise absmax quantize + dequantize (nearest level)."""
    n = x.shape[-1]
    pad = (-n) % block
    xp = np.concatenate([x, np.repeat(x[..., -1:], pad, axis=-1)], axis=-1)
    xb = xp.reshape(*x.shape[:-1], -1, block)
    scale = np.maximum(np.abs(xb).max(-1, keepdims=True), np.finfo(np.float32).tiny)
    idx = np.abs((xb / scale)[..., None] - levels.astype(np.float64)).argmin(-1)
    return (levels[idx] * scale).reshape(xp.shape)[..., :n]


def _np_quantized_adam(grads, mu_levels, nu_levels, b1=0.9, b2=0.999, eps=1e-8):
    """Float64 Adam whose moments are quantized (nearest) after every step."""
    m = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
        m = _np_blockwise_nearest(m, mu_levels)
        v = _np_blockwise_nearest(v, nu_levels)
    return out


@pytest.mark.parametrize(
    ("bits", "mu_levels", "nu_levels", "nu_map"),
    [
        (8, qz.dynamic_tree_levels(8, True), qz.dynamic_tree_levels(8, False), "dynamic"),
        (4, qz.dynamic_exponent_levels(4, True), qz.linear_levels(4, False, False), None),
    ],
    ids=["8bit", "4bit"],
)
def test_matches_float64_quantized_adam_reference(bits, mu_levels, nu_levels, nu_map):
    rng = np.random.default_rng(0)
    shape = (32, 300)  # 3 blocks per row, the last one padded
    grads = [rng.standard_normal(shape) * np.exp(rng.standard_normal(shape)) for _ in range(4)]
    tx = scale_by_quantized_adam(mu_bits=bits, nu_bits=bits, nu_map=nu_map, min_size=0)
    state = tx.init(jnp.zeros(shape))
    update = jax.jit(tx.update)
    ref = _np_quantized_adam(
        [g.astype(np.float32).astype(np.float64) for g in grads], mu_levels, nu_levels
    )
    for t, (g, r) in enumerate(zip(grads, ref, strict=True)):
        u, state = update(jnp.asarray(g, jnp.float32), state)
        got = np.asarray(u, np.float64)
        if t == 0:  # the first step uses fresh float32 moments: exactly Adam's
            np.testing.assert_allclose(got, r, rtol=1e-5)
        else:  # codes may differ at rounding ties only
            close = np.isclose(got, r, rtol=1e-4, atol=1e-6)
            assert close.mean() > 0.999, (t, close.mean())


def test_float32_leaves_equal_float64_adam():
    params = {"b": jnp.zeros((100,)), "s": jnp.zeros(())}
    tx = scale_by_quantized_adam()  # min_size 4096: both leaves stay float32
    state = tx.init(params)
    m = {k: np.zeros(p.shape) for k, p in params.items()}
    v = {k: np.zeros(p.shape) for k, p in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, 6):
        g = {k: np.cos(np.arange(p.size).reshape(p.shape) * 0.7 + t) for k, p in params.items()}
        u, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state)
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            ref = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            np.testing.assert_allclose(u[k], ref, rtol=2e-5, atol=1e-6)
    assert isinstance(state.mu_scales["b"], optax.MaskedNode)
    np.testing.assert_allclose(state.nu_codes["b"] ** 2, v["b"], rtol=1e-4)  # stores sqrt(nu)


@pytest.mark.parametrize("name", list(ALIASES))
def test_minimises_a_quantized_parabola(name):
    target = jax.random.normal(jax.random.key(0), (64, 128))
    tx = ALIASES[name](3e-2, weight_decay=0.0)
    params = jnp.zeros((64, 128))
    state = tx.init(params)
    assert not isinstance(state[0].mu_scales, optax.MaskedNode)  # really quantized

    @jax.jit
    def step(params, state):
        g = jax.grad(lambda p: jnp.sum((p - target) ** 2))(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for _ in range(400):
        params, state = step(params, state)
    err = float(jnp.sqrt(jnp.mean((params - target) ** 2)))
    assert err < 0.05, err


# ------------------------------------------------------------------------------------
# Signal swamping and SOLO (ALGORITHMS.md section 2)
# ------------------------------------------------------------------------------------


def _fixed_scale_moves(bits: int, b: float, steps: int = 2000, seed: int = 0) -> bool:
    """Signed linear map, fixed scale 1, state at level -1, signals U[0, 1]."""
    levels = qz.linear_levels(bits, signed=True, zero=False)

    def body(code, s):
        x = b * jnp.asarray(levels)[code] + (1 - b) * s
        return qz.round_to_table(x, levels), None

    signals = jax.random.uniform(jax.random.key(seed), (steps,))
    final, _ = jax.lax.scan(body, jnp.int32(0), signals)
    return bool(final != 0)


@pytest.mark.parametrize(("bits", "moves", "frozen"), [(4, 0.966, 0.968), (2, 0.832, 0.834)])
def test_signal_swamping_thresholds(bits, moves, frozen):
    # Threshold: (1 - b) * 2 = half the spacing 2 / (2**bits - 1): 0.9667 and 0.8333.
    assert _fixed_scale_moves(bits, moves)
    assert not any(_fixed_scale_moves(bits, frozen, seed=s) for s in range(5))


def _synthetic(codec: qz.Codec, steps: int = 120, b: float = 0.9) -> float:
    """The SOLO paper's experiment: 1000-d state from 1.0, U[0,1] signals, requantized."""
    key = jax.random.key(0)
    state = qz.quantize(jnp.ones((1000,)), codec, key)
    for t in range(steps):
        k_sig, k_round = jax.random.split(jax.random.fold_in(key, t))
        x = b * qz.dequantize(state) + (1 - b) * jax.random.uniform(k_sig, (1000,))
        state = qz.quantize(x, codec, k_round)
    return float(qz.dequantize(state).mean())


def test_synthetic_experiment_linear_and_de_freeze_solo_tracks():
    linear = qz.Codec(2, tuple(qz.linear_levels(2, signed=True, zero=False).tolist()))
    de = qz.Codec(2, tuple(qz.dynamic_exponent_levels(2, signed=True).tolist()))
    assert _synthetic(linear) > 0.95
    assert _synthetic(de) > 0.95
    solo = _synthetic(qz.Codec(2, None, rounding="stochastic_log"))
    unbiased = _synthetic(qz.Codec(2, None, rounding="stochastic"))
    sampled = _synthetic(qz.Codec(2, None, rounding="stochastic_log", quantile_sample=16))
    assert abs(solo - 0.5) < 0.06, solo
    assert abs(unbiased - 0.5) < 0.06, unbiased
    assert abs(sampled - 0.5) < 0.06, sampled  # the solo_adamw default estimate


def test_solo_defaults_and_validation():
    assert SOLO_B1 == {4: 0.8, 3: 0.7, 2: 0.6}
    params = {"w": jnp.zeros((64, 128))}
    hp = optax.inject_hyperparams(
        lowbit_optax.solo_adamw,
        static_args=("bits", "block_size", "min_size", "key", "quantile_sample"),
    )
    for bits in ((4, 2), (3, 3), (2, 2)):
        s = lowbit_optax.solo_adamw(1e-3, bits=bits).init(params)
        assert s[0].mu_codes["w"].shape == (64, 128 * bits[0] // 8)
        assert s[0].nu_codes["w"].shape == (64, 128 * bits[1] // 8)
    g1 = {"w": jax.random.normal(jax.random.key(0), (64, 128))}
    g2 = {"w": jax.random.normal(jax.random.key(1), (64, 128))}

    def two_steps(tx, state):  # the first Adam step is sign(g) whatever b1 is
        _, state = tx.update(g1, state, params)
        return tx.update(g2, state, params)[0]["w"]

    for bits, b1 in (((4, 2), 0.8), ((2, 2), 0.6)):
        default = lowbit_optax.solo_adamw(1e-3, bits=bits)
        explicit = hp(learning_rate=1e-3, b1=b1, bits=bits)
        s = explicit.init(params)
        u_default = two_steps(default, default.init(params))
        u_explicit = two_steps(explicit, s)
        u_other = two_steps(explicit, s._replace(hyperparams={**s.hyperparams, "b1": 0.95}))
        np.testing.assert_allclose(u_default, u_explicit, rtol=1e-6)  # the table's b1
        assert not np.allclose(u_default, u_other)  # and b1 is a live hyperparameter
    with pytest.raises(ValueError, match=r"bits must be \(4, 2\), \(3, 3\) or \(2, 2\)"):
        lowbit_optax.solo_adamw(1e-3, bits=(8, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mu_bits=5), "bits must be"),
        (dict(nu_map="log", nu_bits=2, mu_map="log"), "unsigned"),
        (dict(nu_map=qz.linear_levels(4, signed=True), nu_bits=4), "unsigned"),
        (dict(min_size=-1), "min_size"),
        (dict(b1=1.0), "b1 must be"),
        (dict(block_size=100), "block_size"),
        (dict(mu_map="tree"), "unknown map"),
        (dict(rounding="stochastic_log"), "logarithmic codec"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scale_by_quantized_adam(**kwargs)


# ------------------------------------------------------------------------------------
# Edge cases: zero, tiny, huge and non-finite gradients; bf16; keys
# ------------------------------------------------------------------------------------


def _finite_tree(tree) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    )


@pytest.mark.parametrize("name", list(ALIASES))
@pytest.mark.parametrize("value", [0.0, 1e-30, 1e30, -1e30], ids=["zero", "tiny", "huge", "-huge"])
def test_extreme_gradients_keep_state_finite(name, value):
    params = {
        "w": jnp.ones((32, 256)),
        "b": jnp.ones((8,)),
        "w16": jnp.ones((16, 384), jnp.bfloat16),
    }
    tx = ALIASES[name](1e-3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    normal = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), params)
    extreme = jax.tree.map(lambda p: jnp.full(p.shape, value, jnp.float32).astype(p.dtype), params)
    mixed = jax.tree.map(  # an all-extreme block next to ordinary ones
        lambda p: p.at[..., :128].set(jnp.asarray(value, p.dtype)) if p.shape[-1] >= 256 else p,
        normal,
    )
    for grads in (normal, extreme, mixed, normal):
        u, state = update(grads, state, params)
        assert _finite_tree(u), "updates"
        assert _finite_tree(state), "state"
        jax.tree.map(lambda a, g: None if a.dtype == g.dtype else pytest.fail("dtype"), u, grads)


def test_nan_gradient_under_apply_if_finite_leaves_state_untouched():
    params = {"w": jnp.ones((32, 256))}
    tx = optax.apply_if_finite(lowbit_optax.solo_adamw(1e-3), max_consecutive_errors=5)
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update({"w": jnp.full((32, 256), 0.1)}, state, params)
    before = state.inner_state
    bad = {"w": jnp.full((32, 256), 0.1).at[3, 7].set(jnp.nan)}
    u, state = update(bad, state, params)
    assert int(state.notfinite_count) == 1
    np.testing.assert_array_equal(u["w"], 0.0)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_key_same_result_other_key_differs():
    params = {"w": jnp.ones((32, 256))}
    g = {"w": jax.random.normal(jax.random.key(1), (32, 256))}

    def run(key):
        tx = lowbit_optax.solo_adamw(1e-3, key=key)
        s = tx.init(params)
        for _ in range(3):
            u, s = jax.jit(tx.update)(g, s, params)
        return u, s

    (u1, s1), (u2, s2), (_, s3) = run(0), run(0), run(1)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(s1[0].nu_codes["w"], s3[0].nu_codes["w"])


def test_bytes_per_param_on_large_tensors():
    params = {"a": jax.ShapeDtypeStruct((4096, 1024), jnp.float32)}
    expected = {  # (mu_bits + nu_bits)/8 + scales 4 bytes per 128 values per scale
        "adamw_8bit": 2 + 8 / 128,
        "adamw_4bit": 1 + 8 / 128,
        "solo_4_2": 0.75 + 12 / 128,
        "solo_3_3": 0.75 + 12 / 128,
        "solo_2_2": 0.5 + 12 / 128,
    }
    for name, bpp in expected.items():
        state = jax.eval_shape(ALIASES[name](1e-3).init, params)
        got = lowbit_optax.memory_report(state, params).bytes_per_param
        assert got == pytest.approx(bpp, abs=1e-5), name
