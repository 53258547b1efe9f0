"""SlimAdam (lowbit_optax.snr): SNR statistics, calibration, rules and the transform.

References are independent of the code under test: float64 numpy formulas for the SNR
and for Adam with an averaged second moment, ``optax.adamw`` itself for the
no-compression case, and plain Adam runs for the calibration records.
"""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit_optax as lo
from lowbit_optax._util import path_str

# --------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------


def snr_ref(v: np.ndarray, axes: tuple[int, ...]) -> float:
    """The paper's SNR in float64: mean over the other axes of mean_K**2 / var_K
    (population variance), non-finite ratios dropped."""
    v = np.asarray(v, np.float64)
    mean = v.mean(axis=axes)
    var = v.var(axis=axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mean**2 / var
    finite = ratio[np.isfinite(ratio)]
    if finite.size:
        return float(finite.mean())
    return float("inf") if np.any(ratio == np.inf) else float("nan")


def slim_adam_ref(grads, axes, b1=0.9, b2=0.999, eps=1e-8, lr=1e-2, wd=0.0, p0=None):
    """SlimAdam in float64 numpy: nu <- b2 nu + (1-b2) mean_K g**2; AdamW step."""
    p = np.asarray(p0, np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros(tuple(1 if i in axes else d for i, d in enumerate(p.shape)) if axes else p.shape)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        g2 = (g**2).mean(axis=axes, keepdims=True) if axes else g**2
        v = b2 * v + (1 - b2) * g2
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        p = p - lr * (u + wd * p)
    return p, m, v


def rng_grads(shape, n, seed=0, scale=None):
    rng = np.random.default_rng(seed)
    scale = np.ones(shape) if scale is None else scale
    return [(rng.standard_normal(shape) * scale).astype(np.float32) for _ in range(n)]


# --------------------------------------------------------------------------------------
# snr / snr_table / candidate_axes
# --------------------------------------------------------------------------------------


def test_candidate_axes_are_all_nonempty_subsets():
    assert lo.candidate_axes(1) == ((0,),)
    assert lo.candidate_axes(2) == ((0,), (1,), (0, 1))
    cands = lo.candidate_axes(3)
    assert len(cands) == 7 and len(set(cands)) == 7
    assert cands[:3] == ((0,), (1,), (2,)) and cands[-1] == (0, 1, 2)


@pytest.mark.parametrize(
    "shape,axes",
    [((64, 32), (0,)), ((64, 32), (1,)), ((64, 32), (0, 1)), ((4, 6, 8), (0, 2)), ((9,), (0,))],
)
def test_snr_matches_float64_reference(shape, axes):
    rng = np.random.default_rng(1)
    v = rng.gamma(2.0, 1.0, size=shape) * rng.uniform(
        0.5, 2.0, size=shape[:1] + (1,) * (len(shape) - 1)
    )
    got = float(lo.snr(jnp.asarray(v, jnp.float32), axes))
    np.testing.assert_allclose(got, snr_ref(v, axes), rtol=2e-4)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    axis=st.sampled_from([(0,), (1,), (0, 1), (-1,)]),
    seed=st.integers(0, 2**16),
)
def test_snr_property_matches_reference(rows, cols, axis, seed):
    rng = np.random.default_rng(seed)
    v = rng.exponential(1.0, size=(rows, cols)) ** 2
    v[rng.random((rows, cols)) < 0.2] = 0.0  # dead entries: some 0/0 slices
    want = snr_ref(v, tuple(a % 2 for a in axis))
    got = float(lo.snr(jnp.asarray(v, jnp.float32), axis))
    if np.isnan(want):
        assert np.isnan(got)
    elif np.isinf(want):
        assert got == np.inf or got > 1e6
    else:
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_snr_drops_non_finite_ratios():
    v = np.ones((4, 8))
    v[0] = 0.0  # 0/0 -> nan, dropped
    v[1] = 3.0  # constant row: x/0 -> inf, dropped
    v[2] = np.arange(1, 9)
    v[3] = np.arange(1, 9) ** 2
    want = snr_ref(v[2:], (1,))
    np.testing.assert_allclose(float(lo.snr(jnp.asarray(v), (1,))), want, rtol=1e-5)
    # only constant slices left: infinite; only zero slices: nan
    assert float(lo.snr(jnp.full((3, 5), 2.0), (1,))) == np.inf
    assert np.isnan(float(lo.snr(jnp.zeros((3, 5)), (1,))))


def test_snr_structured_second_moments():
    rng = np.random.default_rng(0)
    rows = 10.0 ** rng.uniform(-4, 1, size=(128, 1))  # rows on very different scales
    constant_rows = np.broadcast_to(rows, (128, 64)) * (1 + 1e-4 * rng.standard_normal((128, 64)))
    table = lo.snr_table({"w": jnp.asarray(constant_rows, jnp.float32)})["w"]
    assert table[(1,)] > 1e6  # constant along each row: "infinite-like" along axis 1
    assert table[(0,)] < 1.0 < table[(1,)]
    noise = rng.standard_normal((128, 64)) ** 2  # i.i.d. chi-square(1): SNR 1/2
    t2 = lo.snr_table({"w": jnp.asarray(noise, jnp.float32)})["w"]
    assert all(v < 1.0 for v in t2.values()), t2
    np.testing.assert_allclose(t2[(0, 1)], 0.5, atol=0.1)


def test_snr_table_paths_and_scalars():
    tree = {"blocks": [{"kernel": jnp.ones((3, 4)) + jnp.arange(4)}], "scale": jnp.ones(())}
    table = lo.snr_table(tree)
    assert set(table) == {"blocks/0/kernel", "scale"}
    assert table["scale"] == {}
    assert set(table["blocks/0/kernel"]) == {(0,), (1,), (0, 1)}


def test_snr_rejects_bad_axes():
    with pytest.raises(ValueError, match="distinct axes"):
        lo.snr(jnp.ones((3, 4)), (2,))
    with pytest.raises(ValueError, match="distinct axes"):
        lo.snr(jnp.ones((3, 4)), (0, 0))
    with pytest.raises(ValueError, match="scalar"):
        lo.snr(jnp.ones(()), (0,))


# --------------------------------------------------------------------------------------
# rules_from_snr, JSON, defaults
# --------------------------------------------------------------------------------------


def _table(**leaves):
    return {k.replace("__", "/"): v for k, v in leaves.items()}


def test_rules_pick_highest_mean_snr_above_threshold():
    records = [
        _table(
            a__kernel={(0,): 3.0, (1,): 5.0, (0, 1): 0.5},
            b__kernel={(0,): 0.9, (1,): 0.2, (0, 1): 0.1},
            c={(0,): 10.0},
            blocks__0__w={(0,): 2.0, (1,): 2.0, (0, 1): 2.0},
        ),
        _table(
            a__kernel={(0,): 3.0, (1,): 0.5, (0, 1): 0.5},  # mean (1,) = 2.75 < 3.0
            b__kernel={(0,): 1.0, (1,): 0.2, (0, 1): float("nan")},
            c={(0,): 10.0},
            blocks__0__w={(0,): 2.0, (1,): 2.0, (0, 1): 2.0},
        ),
    ]
    rules = lo.rules_from_snr(records)
    assert rules["a"]["kernel"] == (0,)  # averaged over records, not the last one
    assert rules["b"]["kernel"] is None  # best mean 0.95 <= 1
    assert rules["c"] is None  # 1-D: never compressed by default
    assert rules["blocks"][0]["w"] == (0,)  # ties: the first (smallest) candidate
    rules_low = lo.rules_from_snr(records, threshold=0.9)
    assert rules_low["b"]["kernel"] == (0,)
    assert lo.rules_from_snr(records, no_compress=None)["c"] == (0,)


def test_rules_force_norm_parameters_uncompressed():
    records = [{"norm1/scale2d": {(0,): 9.0, (1,): 9.0, (0, 1): 9.0}}]
    assert lo.rules_from_snr(records)["norm1"]["scale2d"] is None


def test_rules_json_round_trip_with_paths():
    rules = {
        "blocks": {0: {"attn": {"q": {"kernel": (0,)}, "v": {"kernel": (1,)}}}},
        "embed": {"embedding": (1,)},
        "norm": {"scale": None},
    }
    text = lo.rules_to_json(rules)
    data = json.loads(text)
    assert data == {
        "blocks/0/attn/q/kernel": [0],
        "blocks/0/attn/v/kernel": [1],
        "embed/embedding": [1],
        "norm/scale": None,
    }
    assert lo.rules_from_json(text) == rules


def test_flax_default_rules_on_nnx_models():
    from flax import nnx

    from lowbit_optax.bench import models

    model = models.TransformerLM(models.LMConfig(width=32, depth=1, seq_len=8), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = {
        p: lo.flax_default_rules(p, x)
        for p, x in ((path_str(k), x) for k, x in jax.tree_util.tree_flatten_with_path(params)[0])
    }
    # Flax (in, out): q/k fan-in = axis 0; v, o, MLP fan-out = axis 1; embeddings one
    # value per token row (average over the model dim); LM head (d, vocab) over d = 0.
    assert got["blocks/0/attn/q/kernel"] == (0,)
    assert got["blocks/0/attn/k/kernel"] == (0,)
    assert got["blocks/0/attn/v/kernel"] == (1,)
    assert got["blocks/0/attn/o/kernel"] == (1,)
    assert got["blocks/0/mlp/up/kernel"] == (1,)
    assert got["blocks/0/mlp/down/kernel"] == (1,)
    assert got["embed/embedding"] == (1,)
    assert got["pos"] == (1,)
    assert got["lm_head/kernel"] == (0,)
    assert got["blocks/0/norm1/scale"] is None and got["blocks/0/mlp/up/bias"] is None
    # nnx.MultiHeadAttention's LinearGeneral kernels: (in, heads, head_dim) and
    # (heads, head_dim, out)
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    assert lo.flax_default_rules("attn/query/kernel", shape(32, 4, 8)) == (0,)
    assert lo.flax_default_rules("attn/value/kernel", shape(32, 4, 8)) == (1, 2)
    assert lo.flax_default_rules("attn/out/kernel", shape(4, 8, 32)) == (2,)


def test_removed_fraction():
    params = {"w": jnp.zeros((100, 10)), "b": jnp.zeros((10,))}
    rules = {"w": (1,), "b": None}
    assert lo.removed_fraction(params, rules) == pytest.approx(1 - (100 + 10) / 1010)
    assert lo.removed_fraction(params, {"w": None, "b": None}) == 0.0


# --------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------

PARAMS = {
    "embed": {"embedding": jnp.full((64, 32), 0.1)},
    "dense": {"kernel": jnp.full((32, 48), 0.1), "bias": jnp.zeros((48,))},
    "scalar": jnp.ones(()),
}
NONE = {"embed": {"embedding": None}, "dense": {"kernel": None, "bias": None}, "scalar": None}


def _run(tx, params, grads_seq, jit=True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads_seq:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _grads(params, n, seed=0, dtype=None):
    out = []
    for i in range(n):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed * 1000 + i), len(leaves))
        out.append(
            treedef.unflatten(
                [
                    jax.random.normal(k, x.shape, dtype or x.dtype)
                    for k, x in zip(keys, leaves, strict=False)
                ]
            )
        )
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("rules", [NONE, lambda path, leaf: None])
def test_no_compression_equals_optax_adamw_bit_for_bit(dtype, jit, rules):
    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    grads = _grads(params, 6)
    kw = dict(learning_rate=3e-3, b1=0.8, b2=0.99, eps=1e-7, eps_root=1e-12, weight_decay=1e-3)
    pa, sa = _run(optax.adamw(**kw), params, grads, jit)
    pb, sb = _run(lo.slim_adamw(**kw, rules=rules), params, grads, jit)
    chex.assert_trees_all_equal(pa, pb)
    chex.assert_trees_all_equal(sa[0].mu, sb[0].mu)
    chex.assert_trees_all_equal(sa[0].nu, sb[0].nu)


def test_no_compression_equals_optax_with_mu_dtype():
    grads = _grads(PARAMS, 4)
    pa, sa = _run(optax.adamw(1e-2, mu_dtype=jnp.bfloat16), PARAMS, grads)
    pb, sb = _run(lo.slim_adamw(1e-2, mu_dtype=jnp.bfloat16, rules=NONE), PARAMS, grads)
    chex.assert_trees_all_equal(pa, pb)
    chex.assert_trees_all_equal_dtypes(sa[0].mu, sb[0].mu)


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 1)])
def test_compressed_leaf_matches_float64_reference(axes):
    p0 = np.asarray(jax.random.normal(jax.random.key(3), (24, 40)), np.float32)
    scale = np.linspace(0.1, 3.0, 24)[:, None] * np.linspace(1.0, 2.0, 40)[None]
    grads = rng_grads((24, 40), 20, seed=4, scale=scale)
    tx = lo.slim_adamw(1e-2, weight_decay=1e-3, rules={"w": axes})
    params, state = _run(tx, {"w": jnp.asarray(p0)}, [{"w": jnp.asarray(g)} for g in grads])
    p_ref, m_ref, v_ref = slim_adam_ref(grads, axes, lr=1e-2, wd=1e-3, p0=p0)
    assert state[0].nu["w"].shape == v_ref.shape
    np.testing.assert_allclose(state[0].nu["w"], v_ref, rtol=1e-5)
    np.testing.assert_allclose(state[0].mu["w"], m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["w"], p_ref, rtol=1e-5, atol=1e-6)


def test_state_shapes_follow_rules_and_keep_rank():
    rules = {"embed": {"embedding": (1,)}, "dense": {"kernel": (0,), "bias": (0,)}, "scalar": None}
    state = lo.scale_by_slim_adam(rules=rules).init(PARAMS)
    assert state.nu["embed"]["embedding"].shape == (64, 1)
    assert state.nu["dense"]["kernel"].shape == (1, 48)
    assert state.nu["dense"]["bias"].shape == (1,)
    assert state.nu["scalar"].shape == ()
    assert state.mu["dense"]["kernel"].shape == (32, 48)


def test_rules_resolve_by_path_for_nnx_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 4, rngs=rngs)

    model = Net(nnx.Rngs(0))
    rules = lo.rules_from_json(
        json.dumps({"l1/kernel": [1], "l1/bias": None, "l2/kernel": [0], "l2/bias": None})
    )
    opt = nnx.Optimizer(model, lo.slim_adamw(1e-2, rules=rules), wrt=nnx.Param)
    nu = nnx.to_pure_dict(nnx.state(opt, nnx.OptState))["opt_state"][0]["nu"]
    assert nu["l1"]["kernel"].shape == (8, 1) and nu["l2"]["kernel"].shape == (1, 4)

    @nnx.jit
    def step(model, opt, x):
        grads = nnx.grad(lambda m: jnp.mean(m.l2(m.l1(x)) ** 2))(model)
        opt.update(model, grads)

    step(model, opt, jnp.ones((2, 8)))


def test_bad_rules_fail_at_init_with_clear_errors():
    with pytest.raises(ValueError, match="no entry for 1 parameter"):
        lo.slim_adamw(
            1e-3, rules={"embed": {"embedding": None}, "dense": {"kernel": None}, "scalar": None}
        ).init(PARAMS)
    bad = {**NONE, "dense": {"kernel": (2,), "bias": None}}
    with pytest.raises(ValueError, match=r"dense/kernel.*\(32, 48\)"):
        lo.slim_adamw(1e-3, rules=bad).init(PARAMS)
    with pytest.raises(ValueError, match="tuple of ints or None"):
        lo.slim_adamw(1e-3, rules=lambda p, x: "rows").init(PARAMS)
    with pytest.raises(ValueError, match="rules must be"):
        lo.scale_by_slim_adam(rules=None)
    with pytest.raises(ValueError, match="rules must be"):
        lo.slim_adamw(1e-3, rules=3)
    with pytest.raises(ValueError, match="mu_bits"):
        lo.slim_adamw(1e-3, rules=NONE, mu_bits=5)
    with pytest.raises(ValueError, match="b2"):
        lo.scale_by_slim_adam(b2=1.0, rules=NONE)


def test_edge_cases_keep_state_finite():
    rules = {"w": (1,), "odd": (0,), "t": None}
    params = {"w": jnp.zeros((16, 8)), "odd": jnp.zeros((3, 5), jnp.bfloat16), "t": jnp.zeros((1,))}
    tx = lo.slim_adamw(1e-3, rules=rules)
    zeros = jax.tree.map(jnp.zeros_like, params)
    p, state = _run(tx, params, [zeros] * 3)
    for leaf in jax.tree.leaves((p, state)):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    chex.assert_trees_all_equal(p, params)  # zero gradients, zero params: nothing moves
    # non-finite gradients: apply_if_finite skips the step and keeps the state clean
    safe = optax.apply_if_finite(tx, max_consecutive_errors=5)
    s = safe.init(params)
    bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    u, s2 = jax.jit(safe.update)(bad, s, params)
    chex.assert_trees_all_equal(s2.inner_state, s.inner_state)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


# --------------------------------------------------------------------------------------
# Calibration and switch-over
# --------------------------------------------------------------------------------------


def test_calibration_records_the_adam_state_snr_at_the_right_steps():
    params = {"w": jnp.zeros((12, 10)), "b": jnp.zeros((10,)), "s": jnp.zeros(())}
    scale = {"w": np.linspace(0.5, 4.0, 12)[:, None] * np.ones((1, 10)), "b": np.ones(10), "s": 1.0}
    grads = [
        {
            k: jnp.asarray(
                np.asarray(v) * np.random.default_rng(i).standard_normal(np.shape(v)), jnp.float32
            )
            for k, v in scale.items()
        }
        for i in range(9)
    ]
    inner = optax.adamw(1e-3)
    tx = lo.snr_calibration(inner, every=4, max_records=2)
    # independent reference: plain adamw, snapshot nu after steps 1, 4, 8
    snaps, state = [], inner.init(params)
    p = params
    for t, g in enumerate(grads, start=1):
        u, state = inner.update(g, state, p)
        p = optax.apply_updates(p, u)
        if t == 1 or t % 4 == 0:
            snaps.append(jax.tree.map(np.asarray, state[0].nu))
    p2, cstate = _run(tx, params, grads)
    chex.assert_trees_all_close(p2, p, rtol=1e-5, atol=1e-9)  # the inner optimizer's updates
    assert int(cstate.num_records) == 3
    records = lo.snr_records(cstate)
    assert len(records) == 2  # ring of 2: the records of steps 4 and 8
    steps, tables = lo.snr_records(cstate, with_steps=True)
    assert steps == [4, 8] and tables == records
    for rec, nu in zip(records, snaps[1:], strict=True):
        for axes, value in rec["w"].items():
            np.testing.assert_allclose(value, snr_ref(nu["w"], axes), rtol=1e-4)
        np.testing.assert_allclose(rec["b"][(0,)], snr_ref(nu["b"], (0,)), rtol=1e-4)
        assert rec["s"] == {}
    rules = lo.rules_from_snr(cstate)  # straight from the optimizer state
    assert set(rules) == {"w", "b", "s"} and rules["b"] is None


def test_calibration_state_stays_finite_with_dead_units():
    params = {"w": jnp.zeros((4, 6))}
    tx = lo.snr_calibration(optax.adam(1e-3), every=1)
    _, state = _run(tx, params, [{"w": jnp.zeros((4, 6))}] * 2)  # SNR 0/0 everywhere
    assert bool(jnp.all(jnp.isfinite(state.records["w"])))
    assert all(np.isnan(v) for v in lo.snr_records(state)[0]["w"].values())


def test_calibration_needs_an_adam_state():
    with pytest.raises(ValueError, match="'nu'"):
        lo.snr_calibration(optax.sgd(1e-2)).init(PARAMS)
    with pytest.raises(ValueError, match="every"):
        lo.snr_calibration(optax.adam(1e-2), every=0)
    with pytest.raises(ValueError, match="SNRCalibrationState"):
        lo.snr_records(optax.adam(1e-2).init(PARAMS))


def test_switch_from_adam_continues_exactly_as_slim_adam():
    """SlimAdam's nu is linear in g**2, so averaging Adam's nu over K after N steps
    gives SlimAdam's nu after N steps on the same gradients: continuing from the
    converted state equals SlimAdam from step 0 (on a fixed gradient sequence)."""
    rules = {
        "embed": {"embedding": (1,)},
        "dense": {"kernel": (0, 1), "bias": None},
        "scalar": None,
    }
    grads = _grads(PARAMS, 10, seed=7)
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    adam, slim = optax.adamw(sched), lo.slim_adamw(sched, rules=rules)
    # SlimAdam from scratch, 10 steps
    ref_state = slim.init(PARAMS)
    for g in grads:
        _, ref_state = slim.update(g, ref_state, PARAMS)
    # Adam for 6 steps (wrapped in the calibration recorder), convert, SlimAdam for 4
    cal = lo.snr_calibration(adam, every=2)
    state = cal.init(PARAMS)
    for g in grads[:6]:
        _, state = cal.update(g, state, PARAMS)
    state = lo.slim_state_from_adam(state, rules)
    chex.assert_trees_all_equal_structs(state, slim.init(PARAMS))
    for g in grads[6:]:
        _u, state = slim.update(g, state, PARAMS)
    _u_ref, _ = slim.update(grads[-1], jax.tree.map(lambda x: x, ref_state), PARAMS)
    chex.assert_trees_all_close(state[0].nu, ref_state[0].nu, rtol=1e-6)
    chex.assert_trees_all_close(state[0].mu, ref_state[0].mu, rtol=1e-6)
    assert int(state[0].count) == 10 and int(state[2].count) == 10  # schedule position


# --------------------------------------------------------------------------------------
# Composition with quantized moments
# --------------------------------------------------------------------------------------


def test_quantized_mu_tracks_float_slim_adam():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 256)) * 0.1}
    rules = {"w": (1,)}
    grads = _grads(params, 30, seed=2)
    pf, _ = _run(lo.slim_adamw(1e-3, rules=rules), params, grads)
    p8, s8 = _run(lo.slim_adamw(1e-3, rules=rules, mu_bits=8, min_size=1024), params, grads)
    assert s8[0].mu["w"].dtype == jnp.uint8 and s8[0].mu_scales["w"].shape == (64, 2)
    moved = float(jnp.linalg.norm(pf["w"] - params["w"]))
    assert float(jnp.linalg.norm(p8["w"] - pf["w"])) < 0.05 * moved


def test_quantized_reduced_nu_and_bytes():
    params = {"w": jnp.zeros((512, 64))}
    rules = {"w": (1,)}  # nu (512, 1): 512 values
    tx = lo.scale_by_slim_adam(rules=rules, mu_bits=4, nu_bits=8, min_size=256)
    state = tx.init(params)
    assert state.nu["w"].dtype == jnp.uint8  # a column of 512 >= min_size: quantized
    # mu: 512 rows x 1 block (64 values padded to 128) x (64 B of 4-bit codes + 4 B
    # scale); nu: the (512, 1) column stored as (1, 512), 4 blocks x (128 B codes + 4 B
    # scale); count 4
    assert state.nu["w"].shape == (1, 512) and state.nu_scales["w"].shape == (1, 4)
    assert lo.state_bytes(state) == 4 + 512 * (64 + 4) + 4 * (128 + 4)
    grads = _grads(params, 5)
    p, _s = _run(optax.chain(tx, optax.scale_by_learning_rate(1e-3)), params, grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
    conv = lo.slim_state_from_adam(
        optax.adam(1e-3).init(params), rules, mu_bits=4, nu_bits=8, min_size=256
    )
    chex.assert_trees_all_equal_structs(conv[0], tx.init(params))


def test_slim_rules_under_inject_hyperparams():
    """The default rules need nothing; a callable ``rules`` is taken for a schedule by
    ``optax.inject_hyperparams`` unless static, and the library's own says so."""
    params = {"mlp": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros((32,))}}
    plain = lo.slim_adamw(1e-3)
    injected = optax.inject_hyperparams(lo.slim_adamw)(learning_rate=1e-3)
    (u1, _), (u2, _) = (t.update(params, t.init(params), params) for t in (plain, injected))
    chex.assert_trees_all_close(u1, u2, rtol=1e-5)  # float32 vs Python-float betas
    assert injected.init(params).inner_state[0].nu["mlp"]["kernel"].shape == (16, 1)
    bad = optax.inject_hyperparams(lo.slim_adamw)(learning_rate=1e-3, rules=lo.flax_default_rules)
    with pytest.raises(ValueError, match=r"static_args=\('rules',\)"):
        bad.init(params)
    ok = optax.inject_hyperparams(lo.slim_adamw, static_args=("rules",))
    ok(learning_rate=1e-3, rules=lo.flax_default_rules).init(params)
    # a function held as a value needs no static_args, and means what it says
    mine = lo.PathRules(lambda path, leaf: (0,) if path.endswith("kernel") else None)
    tx = optax.inject_hyperparams(lo.slim_adamw)(learning_rate=1e-3, rules=mine)
    u3, s3 = tx.update(params, tx.init(params), params)
    assert s3.inner_state[0].nu["mlp"]["kernel"].shape == (1, 32)
    u4, _ = lo.slim_adamw(1e-3, rules=mine.fn).update(
        params, lo.slim_adamw(1e-3, rules=mine.fn).init(params), params
    )
    chex.assert_trees_all_close(u3, u4, rtol=1e-5)
