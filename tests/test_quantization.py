"""Codecs against published tables and independent float64 numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_optax import state_bytes
from lowbit_optax.quantization import (
    Codec,
    dequantize,
    dynamic_exponent_levels,
    dynamic_tree_levels,
    linear_levels,
    pack,
    quantize,
    round_to_table,
    unpack,
)

# ------------------------------------------------------------------------------------
# Level tables: published values, written out by hand.
# ------------------------------------------------------------------------------------

DE4 = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
PUBLISHED_SIGNED = {
    4: sorted([-v for v in DE4] + [0.0] + DE4 + [1.0]),
    3: [-0.775, -0.325, -0.055, 0.0, 0.055, 0.325, 0.775, 1.0],
    2: [-0.55, 0.0, 0.55, 1.0],
}


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_dynamic_exponent_tables_match_published(bits):
    got = dynamic_exponent_levels(bits, signed=True)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, PUBLISHED_SIGNED[bits], rtol=0, atol=1e-7)


def _bnb_dynamic_map_float64(signed: bool) -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed, 7, 8) transcribed in float64."""
    data = []
    for i in range(7):
        n = (2**i if signed else 2 ** (i + 1)) + 1
        b = np.linspace(0.1, 1.0, n)
        means = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
        data += list(means) + (list(-means) if signed else [])
    return np.sort(np.array([*data, 0.0, 1.0]))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_tree_matches_bitsandbytes_construction(signed):
    got = dynamic_tree_levels(8, signed=signed)
    ref = _bnb_dynamic_map_float64(signed)
    assert got.shape == (256,) and got.dtype == np.float32
    assert np.all(np.diff(got) > 0), "levels must be distinct and sorted"
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
    assert got[-1] == 1.0 and (got == 0).sum() == 1
    # Known anchors of the signed map: smallest magnitude 0.55e-6, largest below 1.
    if signed:
        assert got[0] == pytest.approx(-0.99296875, abs=1e-7)
        assert np.min(np.abs(got[got != 0])) == pytest.approx(5.5e-7, rel=1e-6)
    np.testing.assert_array_equal(dynamic_exponent_levels(8, signed), got)


def test_linear_tables():
    np.testing.assert_allclose(linear_levels(2, signed=True, zero=False), [-1, -1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(linear_levels(2, signed=True, zero=True), [-1, 0, 1])
    np.testing.assert_allclose(linear_levels(2, signed=False, zero=True), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(linear_levels(4, signed=False, zero=False), np.arange(1, 17) / 16)
    assert linear_levels(8, signed=True, zero=False).shape == (256,)


@pytest.mark.parametrize(
    "call",
    [
        lambda: linear_levels(9, True),
        lambda: dynamic_tree_levels(4),
        lambda: dynamic_exponent_levels(1),
        lambda: Codec(5, tuple(linear_levels(4, True))),
        lambda: Codec(4, tuple(linear_levels(4, True)), block_size=100),
        lambda: Codec(4, tuple(linear_levels(4, True)), rounding="stochastic_log"),
        lambda: Codec(4, tuple(linear_levels(4, True)), rounding="up"),
        lambda: Codec(2, tuple(linear_levels(3, True))),
        lambda: Codec(2, None, quantile=0.0),
        lambda: Codec(2, None, scale_dtype="float16"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_error(call):
    with pytest.raises(ValueError, match=r"must|needs|is 8-bit|got"):
        call()


# ------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), groups=st.integers(1, 6), rows=st.integers(1, 3))
def test_pack_roundtrip_and_size(bits, groups, rows):
    n = 8 * groups
    rng = np.random.default_rng(bits * 100 + groups)
    codes = rng.integers(0, 2**bits, size=(rows, n)).astype(np.uint8)
    packed = pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (rows, n * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits), codes)


def test_three_bit_layout_is_eight_codes_in_three_bytes():
    codes = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 0]], jnp.uint8)
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    expected = [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]
    np.testing.assert_array_equal(pack(codes, 3), [expected])


# ------------------------------------------------------------------------------------
# Table codecs: nearest rounding equals a float64 argmin reference.
# ------------------------------------------------------------------------------------


def _reference_nearest(x: np.ndarray, levels: np.ndarray, block: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n = x.shape[-1]
    pad = (-n) % block
    xp = np.concatenate([x, np.repeat(x[..., -1:], pad, axis=-1)], axis=-1)
    xb = xp.reshape(*x.shape[:-1], -1, block)
    scale = np.maximum(np.abs(xb).max(-1, keepdims=True), np.finfo(np.float32).tiny)
    y = xb / scale
    idx = np.abs(y[..., None] - levels.astype(np.float64)).argmin(-1)
    return (levels[idx] * scale).reshape(xp.shape)[..., :n]


TABLES = {
    "dt8": (8, dynamic_tree_levels(8, True)),
    "de4": (4, dynamic_exponent_levels(4, True)),
    "de3": (3, dynamic_exponent_levels(3, True)),
    "de2": (2, dynamic_exponent_levels(2, True)),
    "lin4": (4, linear_levels(4, True, zero=False)),
    "lin4u0": (4, linear_levels(4, False, zero=False)),
    "de4u": (4, dynamic_exponent_levels(4, False)),
}


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("shape", [(4, 256), (3, 200), (7,), (2, 3, 130)])
def test_table_codec_nearest_matches_float64_reference(name, shape):
    bits, levels = TABLES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.standard_normal(shape))
    if levels[0] >= 0:
        x = np.abs(x)
    codec = Codec(bits, tuple(levels.tolist()), block_size=128)
    q = quantize(jnp.asarray(x), codec)
    got = np.asarray(dequantize(q))
    ref = _reference_nearest(x, levels, 128)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-30)
    # The bound that follows from the table, times the scale: half the largest gap
    # inside it, or the whole distance from the range's end (-1 or 0) to the end level.
    scale = np.repeat(np.asarray(q.scales, np.float64), 128, axis=-1)[..., : shape[-1]]
    lowest = -1.0 if levels[0] < 0 else 0.0
    bound = max(np.diff(levels).max() / 2, levels[0] - lowest, 1.0 - levels[-1])
    assert np.all(np.abs(got - x) <= scale * bound * (1 + 1e-5) + 1e-30)
    # Storage at the real bit width.
    nb = math.ceil(shape[-1] / 128)
    assert q.codes.shape == (*shape[:-1], nb * 128 * bits // 8) and q.codes.dtype == jnp.uint8
    assert q.scales.shape == (*shape[:-1], nb)
    assert state_bytes(q) == math.prod(shape[:-1]) * nb * (128 * bits // 8 + 4)


ALL_TABLES = {
    **TABLES,
    "dt8u": (8, dynamic_tree_levels(8, False)),
    "de2u": (2, dynamic_exponent_levels(2, False)),
    "lin8": (8, linear_levels(8, True, zero=True)),
    "lin2": (2, linear_levels(2, True, zero=False)),  # a midpoint at 0
    "lin2u0": (2, linear_levels(2, False, zero=False)),
    "lin3u0": (3, linear_levels(3, False, zero=False)),
    "lin4u": (4, linear_levels(4, False, zero=True)),
}


def _adversarial(levels: np.ndarray) -> np.ndarray:
    """Every float32 within 3 ulps of each float32 midpoint, the midpoints, the levels,
    zeros, denormals, the range's ends and beyond, infinities, and random values."""
    mids = ((levels[1:] + levels[:-1]) / np.float32(2)).astype(np.float32)
    near = [mids, levels.astype(np.float32)]
    for toward in (np.float32(-np.inf), np.float32(np.inf)):
        x = mids
        for _ in range(3):
            x = np.nextafter(x, toward)
            near.append(x)
    specials = np.array(
        [
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            1e-40,
            -1e-40,
            1.0,
            -1.0,
            1.0000001,
            -1.0000001,
            2.0,
            -2.0,
            3e38,
            -3e38,
            np.inf,
            -np.inf,
        ],
        np.float32,
    )
    rng = np.random.default_rng(1)
    random = rng.uniform(-1.1, 1.1, 20000).astype(np.float32)
    tiny = (rng.standard_normal(5000) * 10.0 ** rng.uniform(-45, 0, 5000)).astype(np.float32)
    return np.concatenate([*near, specials, random, tiny])


@pytest.mark.parametrize("name", list(ALL_TABLES))
def test_nearest_code_is_the_count_of_float32_midpoints_below(name):
    """The search-free nearest code (a bit-pattern table, or arithmetic for dyadic
    tables) equals today's definition, the number of float32 midpoints below y (a binary
    search, as ``searchsorted(side='left')``), for every adversarial float32 y; and for
    every finite y it is a nearest level in float64 up to the midpoints' float32
    rounding."""
    _, levels = ALL_TABLES[name]
    levels = np.asarray(levels, np.float32)
    y = _adversarial(levels)
    got = np.asarray(round_to_table(jnp.asarray(y), levels))
    mids = ((levels[1:] + levels[:-1]) / np.float32(2)).astype(np.float32)
    np.testing.assert_array_equal(got, np.searchsorted(mids, y, side="left"))
    finite = np.isfinite(y)
    y64, lv64 = y[finite].astype(np.float64), levels.astype(np.float64)
    err = np.abs(y64 - lv64[got[finite]])
    best = np.abs(y64[:, None] - lv64[None, :]).min(-1)
    slack = np.abs(mids.astype(np.float64) - (lv64[1:] + lv64[:-1]) / 2).max()
    assert np.all(err <= best + 2 * slack + 1e-12)


def test_three_bit_storage_counts_three_bits_per_code():
    codec = Codec(3, tuple(dynamic_exponent_levels(3).tolist()), block_size=128)
    q = quantize(jnp.ones((64, 1024)), codec)
    assert state_bytes(q.codes) * 8 / (64 * 1024) == 3.0


def test_bf16_scales():
    codec = Codec(8, tuple(dynamic_tree_levels().tolist()), scale_dtype="bfloat16")
    x = jax.random.normal(jax.random.key(0), (4, 256))
    q = quantize(x, codec)
    assert q.scales.dtype == jnp.bfloat16
    # The bf16-rounded scale is used for encoding, so the 8-bit error bound still holds.
    err = jnp.abs(dequantize(q) - x) / jnp.repeat(q.scales.astype(jnp.float32), 128, -1)
    assert float(err.max()) < 0.01


@pytest.mark.parametrize("name", ["dt8", "de4", "lin4", "de2"])
def test_stochastic_rounding_is_unbiased(name):
    bits, levels = TABLES[name]
    codec = Codec(bits, tuple(levels.tolist()), rounding="stochastic", block_size=128)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 128)).astype(np.float32))
    x = x.at[0, 0].set(1.0)  # fixes the block scale at 1
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    samples = jax.vmap(lambda k: dequantize(quantize(x, codec, k)))(keys)
    mean = samples.mean(0)
    # Per value the outcome is one of two neighbouring levels: variance <= gap**2 / 4.
    lo = np.searchsorted(levels, np.asarray(x), side="right") - 1
    lo = np.clip(lo, 0, len(levels) - 2)
    gap = levels[lo + 1] - levels[lo]
    tol = 5 * gap / 2 / math.sqrt(n) + 1e-7
    # Unbiased where claimed: inside the table's range (signed DE tables stop short of
    # -1, so values below their lowest level are clipped up to it).
    inside = (np.asarray(x) >= levels[0]) & (np.asarray(x) <= levels[-1])
    assert inside.sum() > 100
    assert np.all(np.abs(np.asarray(mean - x))[inside] <= tol[inside])
    # and it is not nearest rounding in disguise
    assert float(samples.std(0).max()) > 0


def test_stochastic_rounding_needs_a_key_and_is_reproducible():
    codec = Codec(4, tuple(dynamic_exponent_levels(4).tolist()), rounding="stochastic")
    x = jax.random.normal(jax.random.key(0), (2, 256))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        quantize(x, codec)
    raw = jax.random.key_data(jax.random.key(7))  # raw uint32 key data also works
    a, b = quantize(x, codec, raw), quantize(x, codec, jax.random.key(7))
    np.testing.assert_array_equal(a.codes, b.codes)
    c = quantize(x, codec, jax.random.key(8))
    assert not np.array_equal(a.codes, c.codes)


# ------------------------------------------------------------------------------------
# Logarithmic codec (SOLO)
# ------------------------------------------------------------------------------------


def test_log_codec_two_bit_worked_example():
    # A block whose max is 1 and whose 10% quantile is 1e-3: base a = (1e-3)**(1/3) = 0.1,
    # levels 1, 0.1, 0.01, 0.001 (no zero level).
    x = np.full((1, 128), 0.5, np.float32)
    x[0, :13] = 1e-3  # the 10% quantile (index floor(0.1 * 127) = 12) is 1e-3
    x[0, 13] = 1.0
    x[0, 20:30] = 0.012
    x[0, 30:40] = 0.09
    codec = Codec(2, None, block_size=128)
    q = quantize(jnp.asarray(x), codec)
    np.testing.assert_allclose(q.scales, [[1.0]])
    np.testing.assert_allclose(q.bases, [[0.1]], rtol=1e-6)
    got = np.asarray(dequantize(q))[0]
    np.testing.assert_allclose(got[:13], 1e-3, rtol=1e-5)
    np.testing.assert_allclose(got[13], 1.0)
    np.testing.assert_allclose(got[20:30], 0.01, rtol=1e-5)  # log10(0.012) rounds to -2
    np.testing.assert_allclose(got[30:40], 0.1, rtol=1e-5)  # log10(0.09) rounds to -1
    np.testing.assert_allclose(got[40:], 1.0)  # log10(0.5) = -0.3 rounds to 0
    assert q.codes.shape == (1, 32)


def test_log_codec_matches_float64_reference():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((6, 384)) ** 2 * np.exp(3 * rng.standard_normal((6, 384)))
    v = v.astype(np.float32)
    codec = Codec(4, None)
    got = np.asarray(dequantize(quantize(jnp.asarray(v), codec)))
    vb = v.astype(np.float64).reshape(6, 3, 128)
    d = vb.max(-1, keepdims=True)
    xp = np.sort(vb, -1)[..., 12:13]
    a = (xp / d) ** (1 / 15)
    k = np.clip(np.round(np.log(vb / d) / np.log(a)), 0, 15)
    ref = (d * a**k).reshape(6, 384)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert np.all(got > 0), "the log codec has no zero level"


def test_log_codec_subsampled_quantile_matches_reference():
    rng = np.random.default_rng(5)
    v = (rng.standard_normal((4, 256)) ** 2).astype(np.float32)
    q = quantize(jnp.asarray(v), Codec(2, None, quantile_sample=16))
    vb = v.astype(np.float64).reshape(4, 2, 128)
    xq = np.sort(vb[..., ::8], -1)[..., 1]  # floor(0.1 * 15) = 1: second smallest of 16
    np.testing.assert_allclose(q.bases, (xq / vb.max(-1)) ** (1 / 3), rtol=1e-5)
    with pytest.raises(ValueError, match="quantile_sample"):
        Codec(2, None, quantile_sample=24)


@pytest.mark.parametrize("rounding", ["stochastic", "stochastic_log"])
def test_log_codec_stochastic_bias(rounding):
    # Values strictly between levels 1 and 0.1 (base 0.1 as in the worked example).
    x = np.full((1, 128), 0.5, np.float32)
    x[0, :13] = 1e-3
    x[0, 13] = 1.0
    x[0, 40:] = np.linspace(0.11, 0.95, 88, dtype=np.float32)
    codec = Codec(2, None, rounding=rounding)
    n = 3000
    keys = jax.random.split(jax.random.key(1), n)
    mean = np.asarray(
        jax.vmap(lambda k: dequantize(quantize(jnp.asarray(x), codec, k)))(keys).mean(0)
    )
    target = x[0, 40:]
    tol = 5 * 0.9 / 2 / math.sqrt(n)
    if rounding == "stochastic":  # unbiased: linear distance between the neighbours
        np.testing.assert_allclose(mean[0, 40:], target, atol=tol)
    else:  # exponent-domain rounding: E[a**(e+u)] >= a**e, biased upward (Jensen)
        bias = mean[0, 40:] - target
        assert np.all(bias > -tol) and bias.mean() > 0.02


def test_log_codec_guards_zero_and_constant_blocks():
    codec = Codec(2, None)
    cases = {
        "all_zero": np.zeros((1, 128), np.float32),
        "mostly_zero": np.where(np.arange(128) < 120, 0.0, 1.0).astype(np.float32)[None],
        "constant": np.full((1, 128), 3.0, np.float32),
        "tiny": np.full((1, 128), 1e-38, np.float32),
        "huge": np.full((1, 128), 3e38, np.float32),
    }
    for name, x in cases.items():
        q = quantize(jnp.asarray(x), codec)
        y = np.asarray(dequantize(q))
        assert np.all(np.isfinite(y)), name
        assert np.all(np.isfinite(np.asarray(q.scales))) and np.all(
            np.isfinite(np.asarray(q.bases))
        ), name
    np.testing.assert_allclose(dequantize(quantize(jnp.asarray(cases["constant"]), codec)), 3.0)
    y = np.asarray(dequantize(quantize(jnp.asarray(cases["mostly_zero"]), codec)))
    np.testing.assert_allclose(y[0, 120:], 1.0)
    assert np.all(y[0, :120] <= 1e-30)  # zeros decode to the smallest level, not to 1


@pytest.mark.parametrize("name", ["dt8", "de4", "de2", "lin4u0"])
def test_table_codec_edge_values(name):
    bits, levels = TABLES[name]
    codec = Codec(bits, tuple(levels.tolist()))
    for x in [
        np.zeros((2, 128)),
        np.full((2, 128), 1e-30),
        np.full((2, 128), 1e30),
        np.ones((1, 3)),
    ]:
        x = x.astype(np.float32)
        y = np.asarray(dequantize(quantize(jnp.asarray(x), codec)))
        assert np.all(np.isfinite(y))
        if np.all(x == 0) and levels[0] <= 0:
            np.testing.assert_array_equal(y, 0.0)
        else:
            np.testing.assert_allclose(y, x, rtol=1e-6)  # absmax value itself is exact


def test_abstract_matches_quantize():
    for codec in [Codec(3, tuple(dynamic_exponent_levels(3).tolist())), Codec(2, None)]:
        x = jnp.ones((5, 3, 300))
        q = quantize(x, codec)
        a = codec.abstract(x.shape)
        assert jax.tree.structure(a) == jax.tree.structure(q)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(q), strict=True):
            assert u.shape == v.shape and u.dtype == v.dtype
    with pytest.raises(ValueError, match="scalar"):
        quantize(jnp.ones(()), Codec(8, tuple(dynamic_tree_levels().tolist())))


def test_quantize_under_jit_with_codec_static():
    codec = Codec(4, tuple(dynamic_exponent_levels(4).tolist()), rounding="stochastic")
    f = jax.jit(lambda x, k: dequantize(quantize(x, codec, k)))
    x = jax.random.normal(jax.random.key(0), (8, 256))
    np.testing.assert_array_equal(
        f(x, jax.random.key(3)), dequantize(quantize(x, codec, jax.random.key(3)))
    )
