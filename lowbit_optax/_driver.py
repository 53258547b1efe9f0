"""The per-leaf driver every transform runs its update through (internal).

A transform writes its math for one leaf (``fn`` on the leaf's gradient and state, in
float32) and hands it to ``map_rows``; ``Chain`` runs the leaves one after another. Two
things bound the memory of an update this way, both read off XLA's buffer assignment
(``lowbit_optax.step_memory``):

* **Row slices.** A leaf larger than ``SLICE_ELEMENTS`` runs as a ``lax.fori_loop`` over
  slices of its leading axis, each slice read and written in place with
  ``dynamic_update_slice``, so the float32 working set of the math (decoded moments,
  block statistics, search intermediates) is one slice, not the leaf. The update itself
  is written over the gradient in the same loop: in a training step the gradient is an
  intermediate that dies with the update, and XLA reuses its buffer in place. Slices are
  *strided*: the leading axis ``d`` is viewed as ``(d // k, k)`` and iteration ``i`` takes
  ``[:, i]``, so an axis sharded over devices stays sharded along ``d // k`` inside every
  slice and no iteration needs another device's rows (a contiguous
  ``dynamic_slice`` along a sharded axis makes XLA's SPMD partitioner gather the whole
  axis). ``k`` divides ``d // gcd(d, device_count)``, so every possible shard count of
  that axis still divides a slice.
* **Leaves in sequence.** XLA CPU's default scheduler runs independent work concurrently;
  with no order between leaves, the temporaries of every leaf are alive at once (we
  measured the sum over all leaves in ``memory_analysis``). ``Chain`` threads a *token*
  through the leaves: a float32 zero computed from one leaf's result and added, as an
  integer, to the bits of the next leaf's first input (an exact identity for every
  value, denormals included). The next leaf's work cannot start before the previous one
  is done, so one leaf's temporaries are alive at a time, plus the update of the leaf
  before it where its consumer outside the transform (``optax.apply_updates``) has not
  run yet (XLA's scheduler may defer it; we see two leaves' updates in update-alone
  programs).

Leaves whose math is elementwise (float32 Adam-like moments) need neither: XLA fuses them
into ``optax.apply_updates`` with no temporary, in place, as it does ``optax.adamw``.

**The per-leaf pattern.** A transform's state is a NamedTuple whose per-parameter fields
are trees shaped like the params (as optax's own states). The transform defines a
NamedTuple of those fields for *one* leaf and writes two functions for one leaf: ``init``
returns that NamedTuple, ``update`` returns the leaf's update and its new NamedTuple.
``init_leaves`` and ``update_leaves`` lift them to trees, once, by field name:

    class _Leaf(NamedTuple):     # the per-parameter fields of the transform's state
      mu: jax.Array
      scales: jax.Array | optax.MaskedNode

    def init_fn(params):
      return State(count=zeros, **init_leaves(_init_leaf, params, _Leaf)._asdict())

    def update_fn(updates, state, params=None):
      updates, fields = update_leaves(_update_leaf, updates, state, _Leaf)
      return updates, State(count=..., **fields._asdict())

``_update_leaf(i, g, leaf, chain)`` gets the leaf's index in flatten order (for keys),
its gradient, its ``_Leaf`` and the update's ``Chain`` (``chain.run`` sequences heavy
work after the previous leaf's). Flax NNX ``Variable`` nodes (``nnx.Optimizer`` passes
them to ``init``) are handled in ``init_leaves`` only (``unflatten_like``).

**The empty slot.** A field a leaf does not use (a float leaf's block scales, an
unprojected leaf's projector) holds ``EMPTY``, ``optax.MaskedNode()``: a pytree node
without leaves, so tree maps, checkpoints and sharding rules skip it. It is the only
empty marker in the library's states and per-leaf code (test with ``is_empty``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowbit_optax._util import mesh_of, on_auto_axes, unflatten_like

EMPTY = optax.MaskedNode()


def is_empty(x: Any) -> bool:
    """Whether a state slot is the empty marker ``EMPTY``."""
    return isinstance(x, optax.MaskedNode)


def init_leaves(init: Callable[..., Any], params: Any, leaf_type: type, *per_leaf: Any) -> Any:
    """``init(p, *args)`` (a ``leaf_type`` NamedTuple) for every param leaf ``p``, as one
    ``leaf_type`` whose fields are trees shaped like ``params`` (NNX ``Variable``
    nodes keep their metadata, adapted to each field's shape: ``unflatten_like``).
    ``per_leaf``: lists with one entry per leaf (flatten order), passed as ``args``."""
    leaves = jax.tree.leaves(params)
    states = [init(p, *args) for p, *args in zip(leaves, *per_leaf, strict=True)]
    return leaf_type(
        *(unflatten_like(params, [s[j] for s in states]) for j in range(len(leaf_type._fields)))
    )


def update_leaves(
    update: Callable[[int, jax.Array, Any, Chain], tuple[jax.Array, Any]],
    updates: Any,
    state: Any,
    leaf_type: type,
) -> tuple[Any, Any]:
    """Runs ``update(i, g, leaf, chain)`` on every leaf, in flatten order, with one
    ``Chain`` for the whole tree; ``leaf`` is the ``leaf_type`` NamedTuple of the
    leaf's entries in ``state``'s fields of the same names. Returns the updates tree
    and a ``leaf_type`` of new field trees."""
    leaves, treedef = jax.tree.flatten(updates)
    fields = [treedef.flatten_up_to(getattr(state, f)) for f in leaf_type._fields]
    chain = Chain()
    out = [update(i, g, leaf_type(*(f[i] for f in fields)), chain) for i, g in enumerate(leaves)]
    new_fields = fields_of(treedef, leaf_type, [o[1] for o in out])
    return treedef.unflatten([o[0] for o in out]), new_fields


def fields_of(treedef: Any, leaf_type: type, per_leaf: list[Any]) -> Any:
    """``per_leaf`` (one ``leaf_type`` per leaf of ``treedef``) as one ``leaf_type`` of
    trees."""
    n = len(leaf_type._fields)
    return leaf_type(*(treedef.unflatten([s[j] for s in per_leaf]) for j in range(n)))


# The largest leaf (elements) that runs as a whole; larger ones run in row slices of
# about this size. 2**18 float32 values are 1 MiB per temporary.
SLICE_ELEMENTS = 2**18


def gate(x: Any, token: jax.Array) -> Any:
    """``x`` unchanged, but computed after ``token`` (a float32 zero): the token, as an
    integer, is added to the bits of each leaf (floats bit-cast to integers of their
    width, so even denormals, which XLA CPU's float arithmetic flushes, pass exactly)."""

    def one(a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a + token.astype(a.dtype)
        ints = jnp.dtype(f"uint{jnp.dtype(a.dtype).itemsize * 8}")
        bits = jax.lax.bitcast_convert_type(a, ints) + token.astype(ints)
        return jax.lax.bitcast_convert_type(bits, a.dtype)

    return jax.tree.map(one, x)


def _zero_of(x: jax.Array) -> jax.Array:
    probe = x[(0,) * x.ndim] if x.size else jnp.zeros([], x.dtype)
    return jnp.isnan(probe.astype(jnp.float32)).astype(jnp.float32) * 0.0


def token_of(x: Any) -> jax.Array:
    """A float32 zero that XLA can only compute once ``x`` (its first array) exists."""
    first = jax.tree.leaves(x)[0]
    mesh = mesh_of(first)
    if not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types:
        # one element of a sharded array: let XLA's propagation fetch it
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(_zero_of, out_sharding=jax.sharding.PartitionSpec())(
                first
            )
    return _zero_of(first)


class Chain:
    """Sequences per-leaf work. ``chain(fn, first, *rest)`` gates ``first`` (the leaf's
    gradient, which the work reads first) on the previous call's result, calls
    ``fn(first, *rest)`` and keeps a token of its result for the next call;
    ``chain.gate(x)`` and ``chain.close(out)`` do the two halves by hand, for work whose
    first input is better left ungated (gating copies it)."""

    def __init__(self) -> None:
        self.token: jax.Array | None = None

    def gate(self, x: Any) -> Any:
        return x if self.token is None else gate(x, self.token)

    def close(self, out: Any) -> Any:
        self.token = token_of(out)
        return out

    def __call__(self, fn: Callable[..., Any], first: Any, *rest: Any) -> Any:
        return self.close(fn(self.gate(first), *rest))

    def run(self, fn: Callable[..., Any], extra: Any, first: Any, *rest: Any) -> Any:
        """``fn(extra, first, *rest)`` in sequence (``first`` gated), on a mesh with
        Explicit axes with those made Auto (``on_auto_axes``: outputs laid out like
        ``(first, *rest)``)."""
        return self(lambda *a: on_auto_axes(fn, extra, *a), first, *rest)


def num_slices(shape: tuple[int, ...], budget: int | None = None) -> int:
    """How many strided slices of the leading axis a leaf of ``shape`` runs in: 1 for a
    leaf of at most ``budget`` elements (or rank < 2), else the smallest ``k`` dividing
    ``d // gcd(d, device_count)`` (``d`` the leading axis) whose slices hold at most
    ``budget`` elements, or the largest such divisor if none does."""
    budget = SLICE_ELEMENTS if budget is None else budget
    size = math.prod(shape)
    if len(shape) < 2 or size <= budget:
        return 1
    d = shape[0]
    free = d // math.gcd(d, jax.device_count())
    divisors = [k for k in range(1, free + 1) if free % k == 0]
    fitting = [k for k in divisors if size // k <= budget]
    return fitting[0] if fitting else divisors[-1]


def map_rows(
    fn: Callable[..., Any],
    carried: Any,
    readonly: Any = (),
    *,
    budget: int | None = None,
    shape: tuple[int, ...] | None = None,
    materialize: bool = False,
) -> Any:
    """``fn(carried, readonly, rows)`` over strided slices of the leaves' leading axis.

    Args:
      fn: the per-slice math: takes the slices of ``carried`` and ``readonly`` (pytrees
        of arrays sharing the leading axis) and ``rows``, the slice's int32 indices along
        the leaf's leading axis (``None`` when the leaf runs whole; position-dependent
        math such as ``quantization.hash_uniform`` noise uses them to give every row the
        same values whole or sliced), and returns new slices with ``carried``'s
        structure, shapes and dtypes.
      carried: arrays updated in place (the gradient, whose slices become the update's,
        and the state).
      readonly: arrays read by slice only.
      budget: slice size in elements (default ``SLICE_ELEMENTS``).
      shape: the leaf shape slices are counted in (default: the first carried array's).
      materialize: compute each new slice into a buffer before writing it in place (see
        the comment in the loop body).

    Returns:
      ``carried`` after ``fn`` ran on every slice.
    """
    leaves, treedef = jax.tree.flatten(carried)
    ro_leaves, ro_def = jax.tree.flatten(readonly)
    shape = tuple(leaves[0].shape if shape is None else shape)
    k = num_slices(shape, budget)
    if k == 1:
        return fn(carried, readonly, None)
    d = shape[0]
    view = lambda x: x.reshape(d // k, k, *x.shape[1:])

    def body(i, views):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)
        rows = jnp.arange(d // k, dtype=jnp.int32) * k + i  # row j of the view is j*k + i
        new = fn(
            treedef.unflatten([take(x) for x in views]),
            ro_def.unflatten([take(view(x)) for x in ro_leaves]),
            rows,
        )
        # The first carried buffer (the gradient) is read by the math of every output:
        # its write waits for all the others (else XLA copies the whole buffer in every
        # iteration to keep the old slice readable). With ``materialize`` every write
        # waits for every new slice, which makes XLA compute each slice into a buffer of
        # its own and copy it into place: in-place update fusions run on one thread on
        # XLA CPU, so heavy math (SOLO's logarithms) is faster outside them, light math
        # (a table lookup) inside.
        new_leaves = treedef.flatten_up_to(new)
        if materialize:
            done = sum(token_of(n) for n in new_leaves)
            new_leaves = [gate(n, done) for n in new_leaves]
        write = lambda x, n: jax.lax.dynamic_update_index_in_dim(x, n.astype(x.dtype), i, axis=1)
        if materialize or len(new_leaves) == 1:
            return [write(x, n) for x, n in zip(views, new_leaves, strict=True)]
        rest = [write(x, n) for x, n in zip(views[1:], new_leaves[1:], strict=True)]
        done = sum(token_of(w) for w in rest)
        return [write(views[0], gate(new_leaves[0], done)), *rest]

    out = jax.lax.fori_loop(0, k, body, [view(x) for x in leaves])
    return treedef.unflatten([x.reshape(y.shape) for x, y in zip(out, leaves, strict=True)])
