"""Internal helpers shared by the technique modules (not public API)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def path_str(keypath: tuple[Any, ...]) -> str:
    """A parameter's path as ``'blocks/0/attn/q/kernel'``: key names joined by ``/``, with
    a trailing ``value`` attribute (Flax NNX ``Variable`` wrappers) dropped."""
    names = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    if names and names[-1] == "value" and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        names.pop()
    return "/".join(names)


def leaves_with_paths(tree: Any, is_leaf: Any = None) -> list[tuple[str, Any]]:
    """``(path_str(path), leaf)`` for every leaf of ``tree``, in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), x) for p, x in flat]


def on_auto_axes(fn, extra, *arrays):
    """Runs ``fn(extra, *arrays)`` as is, or, on a mesh with Explicit axes, with those axes made
    Auto (``jax.sharding.auto_axes``): a block of ``block_size`` values may span shards of
    a split last axis, which only XLA's propagation can lay out. Outputs keep the
    shardings of the matching inputs (the update the gradient's, each state field its
    own), so the state's layout is the same after every step."""
    mesh = explicit_mesh_of(arrays)
    if mesh is None:
        return fn(extra, *arrays)
    spec = lambda a: jax.typeof(a).sharding.spec
    out_sharding = tuple(jax.tree.map(spec, a) for a in arrays)  # pytrees (quantized) too
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=out_sharding)(extra, *arrays)


def mesh_of(tree: Any) -> Any:
    """The context mesh, else the mesh of the first array of ``tree`` that has one: the
    arrays' own sharding types decide, so a step jitted without ``jax.set_mesh`` on
    Explicit-axes params is handled as one inside it."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    for a in jax.tree.leaves(tree):
        m = getattr(jax.typeof(a).sharding, "mesh", None)
        if m is not None and not m.empty:
            return m
    return mesh


def explicit_mesh_of(tree: Any) -> Any:
    """``mesh_of(tree)`` if it has Explicit axes (work on it must say how it shards, or
    run with those axes made Auto), else ``None``."""
    mesh = mesh_of(tree)
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return None
    return mesh


def _is_nnx_variable(x: Any) -> bool:
    return type(x).__module__.startswith("flax.") and callable(getattr(x, "set_metadata", None))


def unflatten_like(params: Any, values: list[Any], *, replicate: bool = False) -> Any:
    """``params``' structure with ``values`` (one per param leaf, flatten order) as leaves.

    Like ``jax.tree.structure(params).unflatten(values)``, except for Flax NNX
    ``Variable`` nodes (``nnx.Optimizer`` passes them to ``init``; their metadata is what
    it shards the optimizer state by): a state leaf whose size along an axis differs
    from the param's (a reduced, blocked or packed axis) loses the param's sharding
    name on that axis (``out_sharding``), which could otherwise not divide it, and a
    leaf of another rank gets one name per own axis. ``replicate=True`` drops every
    name (leaves unrelated to the param's axes).
    """
    nodes, treedef = jax.tree.flatten(params, is_leaf=_is_nnx_variable)
    out = []
    for node, value in zip(nodes, values, strict=True):
        if not _is_nnx_variable(node):
            out.append(value)
            continue
        _, vdef = jax.tree.flatten(node)
        new = vdef.unflatten([value])
        names = node.get_metadata().get("out_sharding")
        shape, old = getattr(value, "shape", None), getattr(node.get_value(), "shape", None)
        if names is not None and shape is not None and old is not None:
            # one name per axis of the state leaf (a scalar gets none); a leaf with
            # extra leading axes (a window's slots) lines up with the param from the end
            lead = max(0, len(shape) - len(old))
            kept = tuple(
                names[i - lead]
                if not replicate
                and 0 <= i - lead < min(len(names), len(old))
                and shape[i] == old[i - lead]
                else None
                for i in range(len(shape))
            )
            if kept != tuple(names):
                new.set_metadata(out_sharding=kept)
        out.append(new)
    return treedef.unflatten(out)


def fit_spec(
    shape: tuple[int, ...],
    param_shape: tuple[int, ...],
    spec: Any,
    axis_sizes: dict[str, int],
) -> jax.sharding.PartitionSpec:
    """The param's ``spec`` laid onto a state leaf of ``shape`` taken from the param.

    The leaf's axes are aligned with the param's from the last axis (a leaf with extra
    leading axes, such as the ``m`` slots of a gradient window, lines up with its
    param). An aligned axis keeps the param's mesh axes where its size equals the
    param's; where its size differs but the shards still divide it, the last axis also
    does (a blocked, packed or selected last axis: quantization codes and scales, a
    sparse window's kept entries), and so does any axis of a leaf of the param's rank (a
    projected axis: the rank-``r`` side of a low-rank moment, PowerSGD's ``Q^T``), so
    FSDP splits low-rank state as it splits the param. All other axes are replicated.
    ``axis_sizes`` is the mesh's ``{name: size}``. Trailing ``None``s are dropped (the
    canonical form XLA hands back, so a jitted step's cache key does not change).
    """
    spec = tuple(spec) + (None,) * (len(param_shape) - len(spec))
    out: list[Any] = [None] * len(shape)
    for back in range(1, min(len(shape), len(param_shape)) + 1):
        names = spec[-back]
        axes = (names,) if isinstance(names, str) else tuple(names or ())
        ways = int(np.prod([axis_sizes[a] for a in axes]))
        size = shape[-back]
        reshaped = back == 1 or len(shape) == len(param_shape)
        if ways > 1 and (
            size == param_shape[-back] or (reshaped and size > 0 and size % ways == 0)
        ):
            out[-back] = names
    while out and out[-1] is None:
        out.pop()
    return jax.sharding.PartitionSpec(*out)


def zeros_for(param: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Zeros of ``shape`` for a state leaf derived from ``param``.

    On a mesh with Explicit axes the result is laid out as ``fit_spec`` maps the
    param's sharding onto it (what ``lowbit_optax.state_shardings`` recommends);
    elsewhere plain ``jnp.zeros`` (``init`` reads shapes only).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types:
        try:
            spec = tuple(jax.typeof(param).sharding.spec)
        except (AttributeError, TypeError):
            spec = None
        if spec is not None:
            out = fit_spec(tuple(shape), tuple(param.shape), spec, dict(mesh.shape))
            return jnp.zeros(shape, dtype, out_sharding=out)
    return jnp.zeros(shape, dtype)


def auto_axes_like_inputs(fn, *args, extra=()):
    """``fn(*args, *extra)``, whose outputs have the structure of ``args``; on a mesh with
    Explicit axes it runs with those axes made Auto (``jax.sharding.auto_axes``:
    decompositions such as SVD and QR need unsharded operands, which XLA's propagation
    arranges; a wrapped optimizer's own math need not say how its sharded dimensions go)
    and each output keeps the sharding of the matching input (the update the gradient's,
    the state its own). ``extra``: inputs read only (the params)."""
    mesh = explicit_mesh_of((args, extra))
    if mesh is None:
        return fn(*args, *extra)
    specs = jax.tree.map(lambda a: jax.typeof(a).sharding.spec, args)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(fn, out_sharding=specs)(*args, *extra)


def forwarding_signature(fn: Callable[..., Any], target: Callable[..., Any], drop=()) -> Any:
    """The signature of ``fn``, a function that forwards its ``**kwargs`` to ``target``,
    with ``target``'s keyword-only parameters in place of ``**kwargs`` (minus ``fn``'s
    own and ``drop``): what ``help``, the docs and ``optax.inject_hyperparams`` (which
    binds arguments by signature) then see. Assign it to ``fn.__signature__``."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in own} | set(drop)
    extra = [
        p
        for p in inspect.signature(target).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in names
    ]
    return inspect.signature(fn).replace(parameters=own + extra)


def static_arg(name: str, value: Any, default: Any) -> Any:
    """A shape-setting argument of a factory: ``None`` is ``default`` (so that
    ``optax.inject_hyperparams`` finds no number to trace among the defaults); a JAX or
    NumPy array means it was traced, which cannot set a shape: a clear error with the fix.
    """
    if value is None:
        return default
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        raise ValueError(
            f"{name} sets the shapes or the structure of the optimizer state, so it must be "
            f"a Python value, got {type(value).__name__} {value!r}. optax.inject_hyperparams "
            "traces every number passed to it and calls every callable (a dtype such as "
            f"jnp.bfloat16 too) as a schedule; mark it static: "
            f"optax.inject_hyperparams(..., static_args=({name!r},))"
        )
    return value
