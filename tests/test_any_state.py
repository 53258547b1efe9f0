"""quantize_state (lowbit_optax.any_state): any optax transformation's state in low bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_optax
from lowbit_optax import _leafwise
from lowbit_optax import quantization as qz
from lowbit_optax.any_state import QuantizeStateState, quantize_state

PARAMS = {"w": jnp.zeros((64, 256)), "b": jnp.zeros((256,)), "v": jnp.zeros((32, 128))}


def _grads(seed, scale=1.0, params=PARAMS):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), params
    )


def _leaf(state, field, name):
    """A field's quantized entry for param ``name`` (e.g. ``mu``, ``w``)."""
    hits = [
        x
        for path, x in jax.tree_util.tree_leaves_with_path(
            state, is_leaf=lambda x: isinstance(x, qz.QuantizedArray)
        )
        if isinstance(x, qz.QuantizedArray)
        and jax.tree_util.keystr(path).endswith(f".{field}['{name}']")
    ]
    assert len(hits) == 1, hits
    return hits[0]


def _gap(codec):
    """Half the largest gap between neighbouring levels: nearest rounding's bound on the
    error relative to the block's scale."""
    return float(np.max(np.diff(np.asarray(codec.levels)))) / 2


def test_lion_second_step_matches_float64_on_the_decoded_state():
    """Step 2 of Lion from the decoded 8-bit momentum of step 1, in float64: the update
    is exact (computed before encoding) and the new stored momentum is within rounding
    of the float64 one."""
    lr, b1, b2 = 1e-3, 0.9, 0.99
    tx = quantize_state(optax.lion(lr, b1, b2), min_size=1000)
    state = tx.init(PARAMS)
    g1, g2 = _grads(0), _grads(1)
    _, state = tx.update(g1, state, PARAMS)
    q = _leaf(state, "mu", "w")
    mu1 = np.asarray(qz.dequantize(q), np.float64)
    # step 1 from zero: mu = (1 - b2) g, stored within rounding of its block's max
    ref1 = (1 - b2) * np.asarray(g1["w"], np.float64)
    scale = np.abs(ref1).reshape(64, 2, 128).max(-1, keepdims=True)
    err = np.abs(mu1 - ref1).reshape(64, 2, 128)
    assert np.all(err <= _gap(q.codec) * scale * 1.001 + 1e-12)
    updates, state = tx.update(g2, state, PARAMS)
    g = np.asarray(g2["w"], np.float64)
    ref_u = -lr * np.sign(b1 * mu1 + (1 - b1) * g)
    np.testing.assert_array_equal(np.asarray(updates["w"]), ref_u.astype(np.float32))
    ref_mu = b2 * mu1 + (1 - b2) * g
    q2 = _leaf(state, "mu", "w")
    mu2 = np.asarray(qz.dequantize(q2), np.float64)
    scale = np.abs(ref_mu).reshape(64, 2, 128).max(-1, keepdims=True)
    assert np.all(np.abs(mu2 - ref_mu).reshape(64, 2, 128) <= _gap(q2.codec) * scale * 1.001)
    # the small leaf stays float32 (256 < min_size)
    assert isinstance(state.inner_state[0].mu["b"], jax.Array)


def test_sgd_momentum_matches_float64_on_the_decoded_state():
    lr, m = 0.1, 0.9
    tx = quantize_state(optax.sgd(lr, momentum=m), bits=4, min_size=1000)
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(2), state, PARAMS)
    trace1 = np.asarray(qz.dequantize(_leaf(state, "trace", "v")), np.float64)
    g = _grads(3)
    updates, state = tx.update(g, state, PARAMS)
    ref = m * trace1 + np.asarray(g["v"], np.float64)
    np.testing.assert_allclose(np.asarray(updates["v"]), -lr * ref, rtol=1e-6, atol=1e-7)
    q = _leaf(state, "trace", "v")
    assert q.codec.bits == 4 and q.codes.size == 32 * 128 // 2  # two codes per byte


def test_stochastic_rounding_is_unbiased_and_sliced_like_the_whole_leaf():
    """``rounding='stochastic'``: the stored first momentum of one SGD step (exactly the
    gradient) decodes, on average over keys, to the gradient, where nearest rounding
    keeps its bias; the key is split every step; a leaf updated in row slices
    (``map_rows``) rounds as the same leaf updated whole (the noise is positional)."""
    params = {"w": jnp.zeros((1024, 512))}  # 2**19 values: two row slices
    g = _grads(4, params=params)
    tx = quantize_state(optax.sgd(1.0, momentum=0.9), bits=4, rounding="stochastic")
    whole = quantize_state(
        optax.sgd(1.0, momentum=0.9), bits=4, rounding="stochastic", leafwise=False
    )
    state = tx.init(params)
    assert state.key.dtype == jnp.uint32
    update = jax.jit(tx.update)
    draws = []
    for seed in range(48):
        s = state._replace(key=jax.random.key_data(jax.random.key(seed)))
        _, new = update(g, s, params)
        draws.append(np.asarray(qz.dequantize(_leaf(new, "trace", "w")), np.float64))
        if seed == 0:
            assert not np.array_equal(np.asarray(new.key), np.asarray(s.key))
            _, new_whole = jax.jit(whole.update)(g, s, params)
            np.testing.assert_array_equal(
                np.asarray(_leaf(new, "trace", "w").codes),
                np.asarray(_leaf(new_whole, "trace", "w").codes),
            )
    ref = np.asarray(g["w"], np.float64)
    near = quantize_state(optax.sgd(1.0, momentum=0.9), bits=4)
    _, s_near = near.update(g, near.init(params), params)
    bias_near = np.mean(np.abs(np.asarray(qz.dequantize(_leaf(s_near, "trace", "w"))) - ref))
    bias_sr = np.mean(np.abs(np.mean(draws, axis=0) - ref))
    assert bias_sr < 0.3 * bias_near, (bias_sr, bias_near)


@pytest.mark.parametrize(
    "inner",
    [
        optax.adam(1e-3),
        optax.lion(1e-4),
        optax.contrib.ademamix(1e-3),
        optax.adafactor(1e-3, momentum=0.9),
        optax.contrib.muon(1e-3),
    ],
    ids=["adam", "lion", "ademamix", "adafactor", "muon"],
)
def test_leaf_by_leaf_is_the_whole_tree_computation(inner):
    """The leafwise run evaluates inner's own equations per leaf: bit-identical to
    decoding everything and running ``inner.update`` on the whole tree."""
    runs = []
    for leafwise in (None, False):
        tx = quantize_state(inner, min_size=1000, leafwise=leafwise)
        state = tx.init(PARAMS)
        update = jax.jit(tx.update)
        for seed in range(3):
            updates, state = update(_grads(seed), state, PARAMS)
        runs.append((updates, state))
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_global_norm_inside_is_run_on_the_whole_tree():
    """``clip_by_global_norm`` inside the wrapper mixes leaves: the split says so, the
    default runs the whole tree (same result as ``leafwise=False``), and
    ``leafwise=True`` is an error that names the mixing."""
    inner = optax.chain(optax.clip_by_global_norm(1e-2), optax.lion(1e-3))
    state = jax.eval_shape(inner.init, PARAMS)
    closed, _ = _leafwise.trace(inner.update, PARAMS, state, PARAMS)
    from lowbit_optax.any_state import _split

    assert "mixes parameter leaves" in _split(closed, PARAMS, state, PARAMS, 3)
    outs = []
    for leafwise in (None, False):
        tx = quantize_state(inner, min_size=1000, leafwise=leafwise)
        s = tx.init(PARAMS)
        u, s = tx.update(_grads(4, 10.0), s, PARAMS)
        u, s = tx.update(_grads(5, 10.0), s, PARAMS)
        outs.append(u)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the clipping acted: the float32 inner on the same gradients agrees closely
    tx = quantize_state(inner, min_size=1000, leafwise=True)
    with pytest.raises(ValueError, match=r"leafwise=True.*mixes parameter leaves"):
        tx.update(_grads(4), tx.init(PARAMS), PARAMS)


def test_adam_wrapped_reproduces_scale_by_quantized_adam():
    """Both store mu with the signed dynamic map and nu with the unsigned one relative to
    its block's maximum; ``scale_by_quantized_adam`` keeps nu's scale as the square root
    of that maximum (overflow-safe arithmetic), so a code can round the other way where a
    value sits on a rounding boundary, and the two compute Adam's bias corrections in
    float32 differently (relative 1e-5). Over five steps the updates agree to 3e-5
    relative on over 99% of the values, and within 2% of ``lr`` everywhere."""
    a = quantize_state(optax.adam(1e-3), min_size=1000)
    b = optax.chain(
        lowbit_optax.scale_by_quantized_adam(eps=1e-8, min_size=1000),
        optax.scale_by_learning_rate(1e-3),
    )
    sa, sb = a.init(PARAMS), b.init(PARAMS)
    ua_, ub_ = jax.jit(a.update), jax.jit(b.update)
    for seed in range(5):
        g = _grads(10 + seed)
        ua, sa = ua_(g, sa, PARAMS)
        ub, sb = ub_(g, sb, PARAMS)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            assert np.max(np.abs(x - y)) <= 2e-5
            assert np.mean(np.abs(x - y) <= 3e-5 * np.abs(y)) > 0.99


def test_state_bytes_follow_the_formula():
    """Quantized leaves: bits / 8 + 4 / block_size bytes per value per field; the rest
    as float32 (count: 4 bytes)."""
    params = {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,))}
    for bits, inner, fields in [(8, optax.lion(1e-4), 1), (4, optax.adam(1e-3), 2)]:
        tx = quantize_state(inner, bits=bits, min_size=1000)
        got = lowbit_optax.state_bytes(jax.eval_shape(tx.init, params))
        want = fields * (256 * 512 * (bits / 8 + 4 / 128) + 512 * 4) + 4
        assert got == want, (bits, got, want)


@pytest.mark.parametrize(
    "grads",
    [
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda p: jax.tree.map(lambda x: jnp.full_like(x, 1e-30), p),
        lambda p: jax.tree.map(lambda x: jnp.full_like(x, 1e30), p),
        lambda p: _grads(6, 1e30, p),
    ],
    ids=["zeros", "tiny", "huge", "huge-mixed"],
)
@pytest.mark.parametrize("inner", [optax.adam(1e-3), optax.lion(1e-4)], ids=["adam", "lion"])
def test_edge_gradients_keep_the_state_finite(grads, inner):
    tx = quantize_state(inner, min_size=1000)
    state = tx.init(PARAMS)
    for _ in range(2):
        _, state = tx.update(grads(PARAMS), state, PARAMS)
    for x in jax.tree.leaves(state):
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(x)))
    for path, q in jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, qz.QuantizedArray)
    ):
        if isinstance(q, qz.QuantizedArray):
            assert bool(jnp.all(jnp.isfinite(qz.dequantize(q)))), path


def test_nan_gradients_under_apply_if_finite_keep_the_state():
    tx = optax.apply_if_finite(quantize_state(optax.lion(1e-4), min_size=1000), 3)
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(7), state, PARAMS)
    before = jax.tree.leaves(state.inner_state)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _grads(8))
    updates, state = tx.update(bad, state, PARAMS)
    for a, b in zip(before, jax.tree.leaves(state.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


def test_unknown_fields_are_an_error_and_codec_decides():
    """A state field the wrapper cannot classify is an error at init naming it;
    ``codec=`` a callable decides instead (``None`` keeps float32)."""

    def init(params):
        return {"weird": jax.tree.map(jnp.zeros_like, params)}

    def update(updates, state, params=None):
        del params
        return updates, {"weird": jax.tree.map(lambda w, g: 0.5 * w + g, state["weird"], updates)}

    inner = optax.GradientTransformation(init, update)
    with pytest.raises(ValueError, match=r"cannot tell.*'weird'.*codec="):
        quantize_state(inner, min_size=1000).init(PARAMS)
    signed = qz.make_codec(8, "linear", signed=True)
    tx = quantize_state(inner, min_size=1000, codec=lambda path, x: signed if x.ndim == 2 else None)
    state = tx.init(PARAMS)
    assert isinstance(state.inner_state["weird"]["w"], qz.QuantizedArray)
    assert isinstance(state.inner_state["weird"]["b"], jax.Array)
    assert isinstance(state, QuantizeStateState)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="bits must be 8, 4, 3 or 2"):
        quantize_state(optax.lion(1e-3), bits=5)
    with pytest.raises(ValueError, match="min_size must be a non-negative int"):
        quantize_state(optax.lion(1e-3), min_size=-1)
    with pytest.raises(ValueError, match="leafwise must be None, True or False"):
        quantize_state(optax.lion(1e-3), leafwise="yes")
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        quantize_state(optax.lion(1e-3), rounding="up")
    sr = qz.make_codec(8, "dynamic", signed=True, rounding="stochastic")
    with pytest.raises(ValueError, match="pass rounding='stochastic' to quantize_state"):
        quantize_state(optax.lion(1e-3), codec=sr).init(PARAMS)
    with pytest.raises(ValueError, match="key must be an int seed"):
        quantize_state(optax.lion(1e-3), rounding="stochastic", key=jax.random.key(0))


def test_leafwise_update_peak_is_below_the_whole_tree_and_float32():
    """Compile-only: the donated update of the wrapped Lion peaks below float32 Lion's
    and below the same wrapper run on the whole tree (which decodes every leaf first)."""
    params = {f"w{i}": jax.ShapeDtypeStruct((1024, 512), jnp.float32) for i in range(4)}
    peak = lambda tx: lowbit_optax.step_memory(tx, params).update.peak_bytes
    n = 4 * 1024 * 512
    f32, q, whole = (
        peak(optax.lion(1e-4)),
        peak(quantize_state(optax.lion(1e-4))),
        peak(quantize_state(optax.lion(1e-4), leafwise=False)),
    )
    assert q < f32 - 2.0 * n, (q / n, f32 / n)
    assert q < whole - 2.0 * n, (q / n, whole / n)


def _blocks_err(x, ref, codec, rows, block=128):
    """Whether ``x`` is within nearest rounding of ``ref`` in every block of ``block``
    values (error <= half the largest level gap times the block's absolute maximum)."""
    x, ref = np.asarray(x, np.float64).reshape(rows, -1, block), ref.reshape(rows, -1, block)
    scale = np.abs(ref).max(-1, keepdims=True)
    return np.all(np.abs(x - ref) <= _gap(codec) * scale * 1.001 + 1e-12)


def test_ademamix_8bit_matches_float64_on_the_decoded_state():
    """Step 2 of ``ademamix_8bit`` from its decoded 8-bit state of step 1, in float64
    (the AdEMAMix update: bias-corrected fast EMA plus ``alpha`` times the slow EMA,
    over the bias-corrected root second moment); the new moments are stored within
    rounding of the float64 ones."""
    lr, b1, b2, b3, alpha, eps = 1e-3, 0.9, 0.999, 0.9999, 5.0, 1e-8
    tx = lowbit_optax.ademamix_8bit(lr, b1, b2, b3, alpha, eps, min_size=1000)
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(20), state, PARAMS)
    dec = {
        f: np.asarray(qz.dequantize(_leaf(state, f, "w")), np.float64) for f in ("m1", "m2", "nu")
    }
    g = np.asarray(_grads(21)["w"], np.float64)
    updates, state = tx.update(_grads(21), state, PARAMS)
    m1 = b1 * dec["m1"] + (1 - b1) * g
    m2 = b3 * dec["m2"] + (1 - b3) * g
    nu = b2 * dec["nu"] + (1 - b2) * g**2
    t = 2
    ref = -lr * (m1 / (1 - b1**t) + alpha * m2) / (np.sqrt(nu / (1 - b2**t)) + eps)
    np.testing.assert_allclose(np.asarray(updates["w"]), ref, rtol=2e-5, atol=1e-9)
    for f, want in (("m1", m1), ("m2", m2), ("nu", nu)):
        q = _leaf(state, f, "w")
        assert q.codec.signed == (f != "nu"), f
        assert _blocks_err(qz.dequantize(q), want, q.codec, 64), f


def test_muon_8bit_momentum_in_float64_and_update_from_the_decoded_state():
    """``muon_8bit``: the stored momentum of a matrix follows ``mu = beta mu + (1 - beta)
    g`` in float64 from the decoded one, within rounding; the update is
    ``optax.contrib.muon``'s own on the decoded state (Newton-Schulz included); the
    vector leaf's Adam moments stay float32 below ``min_size`` and its update is Adam's."""
    lr, beta = 0.02, 0.95
    tx = lowbit_optax.muon_8bit(lr, beta=beta, min_size=1000)
    ref_tx = optax.contrib.muon(lr, beta=beta)
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(30), state, PARAMS)
    mu1 = qz.dequantize(_leaf(state, "mu", "w"))
    # the float32 muon from the same (decoded) state
    ref_state = jax.tree.map(
        lambda x: qz.dequantize(x) if isinstance(x, qz.QuantizedArray) else x,
        state.inner_state,
        is_leaf=lambda x: isinstance(x, qz.QuantizedArray),
    )
    g = _grads(31)
    updates, state = tx.update(g, state, PARAMS)
    ref_updates, _ = ref_tx.update(g, ref_state, PARAMS)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    want = beta * np.asarray(mu1, np.float64) + (1 - beta) * np.asarray(g["w"], np.float64)
    q = _leaf(state, "mu", "w")
    assert q.codec.signed and _blocks_err(qz.dequantize(q), want, q.codec, 64)
    assert not any(
        isinstance(x, qz.QuantizedArray)
        for x in jax.tree.leaves(
            state.inner_state.inner_states["adam"],
            is_leaf=lambda x: isinstance(x, qz.QuantizedArray),
        )
    )


@pytest.mark.parametrize(
    "make, inner, fields",
    [
        (lambda: lowbit_optax.lion_8bit(1e-4), lambda: optax.lion(1e-4), 1),
        (lambda: lowbit_optax.sgd_momentum_8bit(1e-2), lambda: optax.sgd(1e-2, 0.9), 1),
        (lambda: lowbit_optax.ademamix_8bit(1e-3), lambda: optax.contrib.ademamix(1e-3), 3),
    ],
    ids=["lion_8bit", "sgd_momentum_8bit", "ademamix_8bit"],
)
def test_recipes_state_bytes_and_donated_peak(make, inner, fields):
    """Compile-only on four 1024 x 512 matrices: the state is ``fields`` x (1 + 4/128)
    bytes per parameter (plus counts), and the donated update peaks below the float32
    optimizer's. (The bound params + grads + state + 1 B/param is the battery's check
    (k); on this model the per-leaf driver's update-alone programs keep two or more
    leaves' float32 updates, ``adamw_8bit``'s as well, the gradient being an argument.)"""
    params = {f"w{i}": jax.ShapeDtypeStruct((1024, 512), jnp.float32) for i in range(4)}
    n = 4 * 1024 * 512
    q, f32 = lowbit_optax.step_memory(make(), params), lowbit_optax.step_memory(inner(), params)
    assert abs(q.state_bytes / n - fields * (1 + 4 / 128)) < 1e-4, q.state_bytes / n
    assert q.update.peak_bytes < f32.update.peak_bytes, (
        q.update.peak_bytes / n,
        f32.update.peak_bytes / n,
    )
