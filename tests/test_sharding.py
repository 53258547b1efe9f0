"""lowbit_optax.state_shardings / sharded_init: the recommended layout of any state,
against specs written out by hand for a 2 x 4 mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit_optax as lo
from lowbit_optax._util import fit_spec

SIZES = {"data": 2, "model": 4}


@pytest.mark.parametrize(
    ("shape", "param_shape", "spec", "want"),
    [
        ((64, 128), (64, 128), P("data", "model"), P("data", "model")),  # a moment
        ((64, 16), (64, 128), P("data", "model"), P("data", "model")),  # blocked last axis
        ((64, 2), (64, 128), P("data", "model"), P("data")),  # 2 blocks over 4 shards
        ((64, 1), (64, 128), P("data", "model"), P("data")),  # a reduced axis
        ((8, 64, 128), (64, 128), P("data", "model"), P(None, "data", "model")),  # window
        ((8, 64, 4), (64, 128), P("data", "model"), P(None, "data", "model")),  # sparse rows
        ((2, 128), (64, 128), P("data", "model"), P(None, "model")),  # Q^T (r, n)
        ((0, 0), (128,), P("model"), P()),  # a zero-size placeholder
        ((), (64, 128), P("data", "model"), P()),  # a scalar
    ],
)
def test_fit_spec(shape, param_shape, spec, want):
    assert fit_spec(shape, param_shape, spec, SIZES) == want


def _params(mesh):
    return {
        "w": jax.device_put(jnp.ones((64, 128)), NamedSharding(mesh, P("data", "model"))),
        "b": jax.device_put(jnp.ones((128,)), NamedSharding(mesh, P("model"))),
    }


def test_state_shardings_of_adamw_8bit_and_the_window():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params = _params(mesh)
    q = lo.state_shardings(lo.adamw_8bit(1e-3, min_size=16, block_size=64), params)[0]
    assert q.mu_codes["w"].spec == P("data", "model")
    assert q.mu_scales["w"].spec == P("data")  # (64, 2): two blocks do not split 4 ways
    assert q.count.spec == P() and q.key.spec == P()
    win = lo.state_shardings(lo.sparse_mfac(1e-3, num_grads=4, density=0.05), params)[0]
    assert win.values["w"].spec == P(None, "data")  # k = 6 per row: not 4-way divisible
    assert win.error["w"].spec == P("data", "model")
    assert win.gram.spec == P()
    state = lo.sharded_init(lo.mfac(1e-3, num_grads=4), params)
    # each device holds 1/8 of the dense window of w
    w = state[0].values["w"]
    assert w.shape == (4, 64, 128)
    assert w.addressable_shards[0].data.shape == (4, 32, 32)


def test_state_shardings_needs_sharded_params():
    with pytest.raises(ValueError, match="NamedSharding"):
        lo.state_shardings(optax.adamw(1e-3), {"w": jnp.ones((4, 4))})


def test_a_window_that_cannot_fit_fails_at_init_before_allocating():
    tx = lo.mfac(1e-3)
    # the case: before, the allocator died with RESOURCE_EXHAUSTED (68719476736 B)
    with pytest.raises(ValueError, match=r"68\.72 GB per device.*sparse window.*num_grads"):
        tx.init({"w": jnp.zeros((4096, 4096))})
