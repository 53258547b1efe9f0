"""lowbit_optax.state_shardings / sharded_init: the recommended layout of any state,
against specs written out by hand for a 2 x 4 mesh."""

from __future__ import annotations

import math
import re

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
        ((2, 128), (64, 128), P("data", "model"), P("data", "model")),  # Q^T (r, n)
        ((16, 128), (64, 128), P("data", "model"), P("data", "model")),  # projected moment
        ((3, 128), (64, 128), P("data", "model"), P(None, "model")),  # rank 3 over 2 shards
        ((8, 3, 128), (64, 128), P("data", "model"), P(None, None, "model")),  # a window
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


# --------------------------------------------------------------------------------------
# The windows' collectives (M-FAC / GGT): compile-only, the optimized HLO read back
# --------------------------------------------------------------------------------------

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def _elements(hlo_type: str) -> list[int]:
    """Element counts of the arrays of an HLO type (``f32[8]``, ``(f32[8], pred[])``)."""
    return [
        math.prod(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"\[([\d,]*)\]", hlo_type)
    ]


def _collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """``(kind, element counts of its operands and results)`` of every collective
    instruction (an async ``-start`` counted once) of an optimized HLO module."""
    types: dict[str, str] = {}
    out = []
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, result, op, rest = match.groups()
        types[name] = result
        kind = op.removesuffix("-start")
        if kind in _COLLECTIVES:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            sizes = _elements(result) + [n for o in operands for n in _elements(types[o])]
            out.append((kind, sizes))
    return out


_TENSOR_PARALLEL = {"w": P("data", "model"), "b": P("model")}
_FSDP = {"w": P(("data", "model")), "b": P()}
_SPLIT_ROWS = (
    "with the rows' last axis split ('model'), a sparse window's per-row selection needs "
    "each row whole (w's rows gathered along 'model': f32[32,32] -> f32[32,128]), and "
    "picking x at the window's indices along a split row is a masked gather summed "
    "across shards: all-reduces of m x rows x k values (w: f32[32,8,6])"
)


@pytest.mark.parametrize(
    "make, specs",
    [
        pytest.param(lambda: lo.mfac(1e-3, num_grads=8), _TENSOR_PARALLEL, id="mfac"),
        pytest.param(lambda: lo.ggt(1e-3, num_grads=8), _TENSOR_PARALLEL, id="ggt"),
        # rows split (FSDP): each device selects in its own rows (row_top_k)
        pytest.param(
            lambda: lo.sparse_mfac(1e-3, num_grads=8, density=0.05), _FSDP, id="sparse_mfac"
        ),
        pytest.param(
            lambda: lo.sparse_mfac(1e-3, num_grads=8, density=0.05),
            _TENSOR_PARALLEL,
            id="sparse_mfac_split_rows",
            marks=pytest.mark.xfail(strict=True, reason=_SPLIT_ROWS),
        ),
    ],
)
def test_window_update_reduces_only_the_partial_dots(make, specs):
    """Under a 2 x 4 mesh, the donated update of a window sharded like the params moves
    only small things: all-reduces of the ``m`` partial dot products ``G x`` (and scalars:
    ``|x|^2``, the finiteness flags), no param or window gathered, permuted or reduced."""
    m = 8
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    shapes = {"w": (64, 128), "b": (128,)}
    ps = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    params = {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=ps[k]) for k in shapes}
    tx = make()
    shardings = lo.state_shardings(tx, params)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tx.init, params),
        shardings,
    )
    update = jax.jit(
        tx.update,
        in_shardings=(ps, shardings, ps),
        out_shardings=(ps, shardings),
        donate_argnums=(0, 1),
    )
    found = _collectives(update.lower(params, state, params).compile().as_text())
    # a device's share of the smallest param: anything this large moved is a param's part
    share = min(math.prod(ps[k].shard_shape(shapes[k])) for k in shapes)
    moved = [(kind, n) for kind, n in found if kind != "all-reduce" and max(n) >= share]
    assert not moved, f"param-sized gathers/permutes: {moved}"
    reduced = [n for kind, n in found if kind == "all-reduce"]
    assert all(max(n) <= m * m for n in reduced), f"all-reduces above m*m elements: {found}"
    # the partial dots G x are reduced (a replicated computation would reduce nothing)
    assert any(m in n for n in reduced), f"no all-reduce of the m partial dots: {found}"
