"""Where optimizer state lives on a mesh: the recommended shardings of any transform's state.

Every sharded training loop needs the ``out_shardings`` of ``tx.init``: the state's
param-shaped parts laid out like their params, the rest (counts, keys, small matrices)
replicated. ``state_shardings(tx, params)`` returns them for any
``optax.GradientTransformation``, this library's or optax's, and ``sharded_init``
creates the state directly in that layout (nothing is first built on one device).

The rule, one state leaf at a time (``optax.tree_utils.tree_map_params`` finds the leaves
that belong to a param): the leaf's axes are aligned with the param's *from the last
axis*, so a leaf with extra leading axes (the ``m`` slots of a gradient window) lines
up with the param it was taken from. An aligned axis keeps the param's mesh axes where
its size equals the param's; where its size differs but still divides evenly into the
shards, the last axis also does (a blocked, packed or selected last axis: quantization
codes and scales, the values of a sparse window row), and so does any axis of a leaf
of the param's own rank (a projected axis: the rank-``r`` side of a low-rank moment,
PowerSGD's ``Q^T``), so FSDP splits low-rank state as it splits the param. Everything
else is replicated.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> import lowbit_optax as lo
  >>> n = jax.device_count()
  >>> mesh = jax.make_mesh((n,), ("fsdp",))
  >>> w = jax.device_put(jnp.zeros((8 * n, 256)), jax.NamedSharding(mesh, jax.P("fsdp")))
  >>> tx = lo.adamw_8bit(1e-3, min_size=16)
  >>> state = lo.sharded_init(tx, {"w": w})
  >>> codes = state[0].mu_codes["w"]  # 8-bit codes, laid out as w: 8 rows a device
  >>> codes.sharding.shard_shape(codes.shape) == w.sharding.shard_shape(w.shape) == (8, 256)
  True
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lowbit_optax._util import fit_spec
from lowbit_optax.quantization import QuantizedArray

__all__ = ["fit_spec", "sharded_init", "state_shardings"]


def _sharding_of(param: Any) -> NamedSharding | None:
    s = getattr(param, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
    """The recommended ``NamedSharding`` of every leaf of ``tx.init(params)``.

    Args:
      tx: any ``optax.GradientTransformation``.
      params: the param tree, as arrays or ``jax.ShapeDtypeStruct`` leaves, laid out
        with ``NamedSharding`` values on one mesh (a leaf without one is taken as
        replicated).

    Returns:
      A tree like the state with a ``NamedSharding`` per leaf: param-shaped leaves as
      the module's rule lays them out, all others replicated. Pass it as
      ``jax.jit(tx.init, out_shardings=...)`` (what ``sharded_init`` does) and as the
      state's ``in_shardings``/``out_shardings`` of a jitted step, or to
      ``orbax.checkpoint`` as the restore target's shardings.

    Raises:
      ValueError: no param carries a ``NamedSharding``, or params live on more than one
        mesh.

    Example:
      Abstract params suffice: an FSDP layout over every device splits the 8-bit codes
      and their block scales by rows, as the param; the count is replicated.

      >>> from lowbit_optax import adamw_8bit
      >>> import jax.numpy as jnp
      >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
      >>> rows = jax.NamedSharding(mesh, jax.P("fsdp"))
      >>> params = {"w": jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=rows)}
      >>> shardings = state_shardings(adamw_8bit(1e-3, min_size=16), params)
      >>> tuple(shardings[0].mu_codes["w"].spec), tuple(shardings[0].mu_scales["w"].spec)
      (('fsdp',), ('fsdp',))
      >>> tuple(shardings[0].count.spec)
      ()
    """
    shardings = [s for s in map(_sharding_of, jax.tree.leaves(params)) if s is not None]
    if not shardings:
        raise ValueError(
            "state_shardings needs params laid out with NamedShardings (jax.device_put(x, "
            "NamedSharding(mesh, spec)), or ShapeDtypeStructs with sharding=...); none of "
            f"the {len(jax.tree.leaves(params))} param leaves has one"
        )
    mesh = shardings[0].mesh
    if any(s.mesh.shape_tuple != mesh.shape_tuple for s in shardings):
        raise ValueError(
            "params live on more than one mesh: "
            f"{sorted({s.mesh.shape_tuple for s in shardings})}; put them on one"
        )
    replicated = NamedSharding(mesh, PartitionSpec())
    axis_sizes = dict(mesh.shape)

    def leaf_sharding(leaf: Any, param: Any) -> Any:
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        if isinstance(leaf, QuantizedArray):  # its codes, scales and bases, each by shape
            return jax.tree.map(lambda x: leaf_sharding(x, param), leaf)
        s = _sharding_of(param)
        if s is None:
            return replicated
        return NamedSharding(mesh, fit_spec(leaf.shape, param.shape, s.spec, axis_sizes))

    return optax.tree_utils.tree_map_params(
        tx,
        leaf_sharding,
        jax.eval_shape(tx.init, params),
        params,
        transform_non_params=lambda x: jax.tree.map(lambda _: replicated, x),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode | QuantizedArray),
    )


def sharded_init(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init(params)`` created directly in ``state_shardings(tx, params)``'s layout.

    Jitted with those ``out_shardings``: no leaf is first built whole on one device.

    Args:
      tx: any ``optax.GradientTransformation``.
      params: the param tree, laid out with ``NamedSharding`` values on one mesh.

    Returns:
      The state, each leaf already placed as ``state_shardings`` recommends.

    Example:
      >>> import jax.numpy as jnp
      >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
      >>> w = jax.device_put(jnp.zeros((8, 256)), jax.NamedSharding(mesh, jax.P("fsdp")))
      >>> state = sharded_init(optax.adam(1e-3), {"w": w})
      >>> state[0].mu["w"].sharding == w.sharding  # Adam's moments are laid out as w
      True
      >>> tuple(state[0].count.sharding.spec)  # the count is replicated
      ()
    """
    return jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)
