"""state_bytes / memory_report against explicit formulas and XLA's own accounting."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_optax import memory_report, state_bytes
from lowbit_optax.memory import dtype_bits

# (dtype, bits per element) written out by hand, not derived from the code under test.
BITS = [
    (jnp.float32, 32),
    (jnp.bfloat16, 16),
    (jnp.float16, 16),
    (jnp.int32, 32),
    (jnp.uint32, 32),
    (jnp.int8, 8),
    (jnp.uint8, 8),
    (jnp.float8_e4m3fn, 8),
    (jnp.int4, 4),
    (jnp.uint4, 4),
    (jnp.float4_e2m1fn, 4),
    (jnp.int2, 2),
    (jnp.uint2, 2),
    (jnp.bool_, 8),
    (np.float64, 64),
]


@pytest.mark.parametrize(("dtype", "bits"), BITS, ids=[np.dtype(d).name for d, _ in BITS])
def test_dtype_bits(dtype, bits):
    assert dtype_bits(dtype) == bits


def test_state_bytes_explicit_tree():
    class S(NamedTuple):
        count: jax.Array
        codes: dict
        scales: jax.Array

    tree = S(
        count=jnp.zeros([], jnp.int32),  # 4
        codes={
            "a": jnp.zeros((128, 64), jnp.int4),  # 8192 * 4 bits = 4096
            "b": jnp.zeros((7,), jnp.int4),  # 28 bits -> 4 bytes
            "c": jax.ShapeDtypeStruct((3, 5), jnp.uint2),  # 30 bits -> 4 bytes
            "d": np.zeros((10,), np.float32),  # 40
        },
        scales=jnp.zeros((128, 1), jnp.bfloat16),  # 256
    )
    assert state_bytes(tree) == 4 + 4096 + 4 + 4 + 40 + 256


def test_state_bytes_ignores_non_arrays():
    tree = {"lr": 1e-3, "name": "adam", "none": None, "fn": print, "x": jnp.zeros((2, 3))}
    assert state_bytes(tree) == 24
    assert state_bytes(optax.EmptyState()) == 0
    assert state_bytes(()) == 0


def test_adamw_bytes_per_param():
    params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros((128,), jnp.bfloat16)}
    state = optax.adamw(1e-3).init(params)
    expected = 4 + 2 * (256 * 128 * 4 + 128 * 2)
    assert state_bytes(state) == expected
    assert state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params)) == expected

    report = memory_report(state, params)
    assert report.total_bytes == expected
    assert report.num_params == 256 * 128 + 128
    assert report.param_bytes == 256 * 128 * 4 + 128 * 2
    assert report.bytes_per_param == pytest.approx(expected / (256 * 128 + 128))
    assert [leaf.path for leaf in report.leaves] == [
        "[0].count",
        "[0].mu['b']",
        "[0].mu['w']",
        "[0].nu['b']",
        "[0].nu['w']",
    ]
    assert report.leaves[2].shape == (256, 128) and report.leaves[2].dtype == "float32"
    table = report.table()
    assert "[0].mu['w']" in table and "131,072" in table and "total" in table
    assert str(report) == table
    assert "more leaves" in report.table(max_rows=2)


# ------------------------------------------------------------------------------------
# Against XLA: compile a function producing the arrays and read its memory analysis.
# ------------------------------------------------------------------------------------


def _xla_output_bytes(fn) -> int:
    return jax.jit(fn).lower().compile().memory_analysis().output_size_in_bytes


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 33), min_size=0, max_size=3),
    dtype=st.sampled_from([d for d, _ in BITS if d is not np.float64]),
)
def test_state_bytes_matches_xla_single_array(shape, dtype):
    shape = tuple(shape)
    x = jax.ShapeDtypeStruct(shape, dtype)
    assert state_bytes(x) == _xla_output_bytes(lambda: jnp.zeros(shape, dtype))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "tx",
    [optax.adamw(1e-3), optax.adafactor(1e-3), optax.sgd(1e-3, momentum=0.9)],
    ids=["adamw", "adafactor", "sgd_momentum"],
)
def test_state_bytes_matches_xla_real_state(tx, param_dtype):
    params = {
        "w": jnp.ones((256, 192), param_dtype),
        "b": jnp.ones((192,), param_dtype),
        "v": jnp.ones((5, 3, 7), param_dtype),
    }
    state = jax.jit(tx.init)(params)
    n_leaves = len(jax.tree.leaves(state))
    # XLA returns the state as a tuple of buffers plus one 8-byte pointer per buffer.
    xla = _xla_output_bytes(lambda: tx.init(params))
    assert xla == state_bytes(state) + 8 * n_leaves
    for leaf in jax.tree.leaves(state):
        assert state_bytes(leaf) == leaf.nbytes  # byte-sized dtypes: numpy's own count


def test_sub_byte_state_matches_xla():
    def make():
        return {
            "codes": jnp.zeros((64, 100), jnp.int4),
            "packed2": jnp.zeros((3, 333), jnp.uint2),
            "scales": jnp.zeros((64, 1), jnp.float32),
        }

    tree = jax.eval_shape(make)
    expected = 64 * 100 // 2 + math.ceil(3 * 333 * 2 / 8) + 64 * 4
    assert state_bytes(tree) == expected
    assert _xla_output_bytes(make) == expected + 8 * 3


def test_docstring_examples():
    import doctest

    import lowbit_optax.memory

    result = doctest.testmod(lowbit_optax.memory)
    assert result.attempted >= 1 and result.failed == 0
