"""Running any transformation's update one leaf at a time, from its jaxpr (internal).

``quantize_state`` must decode a state to float32 around ``inner.update`` without the
float32 state of the whole model existing at once. For an arbitrary optax
transformation that is possible exactly when its update is *leafwise*: every
computation reads one parameter leaf's values (its gradient, param and state entries)
and shared values (counts, hyperparameters) only. This module decides that from the
update's jaxpr, by data flow, and evaluates the jaxpr in that order:

* ``split`` labels each input of the jaxpr with the leaf it belongs to (or none) and
  propagates labels through every equation: an equation's outputs carry the union of
  its inputs' labels. An equation whose inputs carry two leaves mixes them
  (``clip_by_global_norm``'s sum of squares, ``apply_if_finite``'s global check): the
  update is not leafwise, and ``split`` says which primitive mixed which leaves. Nested
  jaxprs (``jit``, ``cond``, loops) count as one equation; that can only call a
  leafwise update mixed, never the reverse, so a wrong answer costs memory, never
  numerics.
* ``Split.run`` evaluates the shared equations first, then each leaf's equations in
  program order through a caller's function (which decodes that leaf's state before and
  encodes after, inside the per-leaf ``Chain``). The equations are the inner update's
  own, bound in the same order within each leaf, so the results are the same values.
* A leaf whose equations are all elementwise on its shape (Adam, Lion, SGD momentum:
  ``ELEMENTWISE`` primitives on arrays of the leaf's shape and scalars) can also run in
  row slices (``_driver.map_rows``): ``Split.eval_leaf`` evaluates the same equations on
  slices, re-binding a scalar's ``broadcast_in_dim`` to the slice's shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

# primitives that act value by value (with scalar operands broadcast)
ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
    is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor""".split()
)
# call primitives whose body is evaluated inline (its own equations checked)
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr"}


@dataclasses.dataclass
class Split:
    """A jaxpr's equations by leaf: ``owner[k]`` is the leaf of equation ``k`` (``None``:
    shared); ``elementwise[i]``: whether leaf ``i``'s equations can run on row slices of
    its shape ``shapes[i]``."""

    closed: Any
    owner: list[int | None]
    in_owner: list[int | None]
    shapes: list[tuple[int, ...]]
    elementwise: list[bool]

    @property
    def num_leaves(self) -> int:
        return len(self.shapes)

    def leaf_inputs(self, i: int) -> list[int]:
        """Indices of the jaxpr's inputs that belong to leaf ``i``."""
        return [k for k, o in enumerate(self.in_owner) if o == i]

    def leaf_outputs(self, i: int) -> list[int]:
        """Indices of the jaxpr's outputs computed by leaf ``i``'s equations or passed
        through from its inputs."""
        return [k for k, o in enumerate(self._out_owner()) if o == i]

    def _out_owner(self) -> list[int | None]:
        label = self._labels()
        return [
            label.get(v) if isinstance(v, jcore.Var) else None for v in self.closed.jaxpr.outvars
        ]

    def _labels(self) -> dict[Any, int | None]:
        jaxpr = self.closed.jaxpr
        label: dict[Any, int | None] = dict(zip(jaxpr.invars, self.in_owner, strict=True))
        for eqn, o in zip(jaxpr.eqns, self.owner, strict=True):
            for v in eqn.outvars:
                label[v] = o
        return label

    def run(self, inputs: Sequence[Any], per_leaf: Callable[..., list[Any]]) -> list[Any]:
        """The jaxpr's outputs for flat ``inputs``. The shared equations run first; then
        for each leaf ``i``, ``per_leaf(i, values, fn, free)`` gets the values of the
        leaf's inputs (``leaf_inputs(i)`` order), the shared values its equations read
        (``free``: results of shared equations, constants, unowned inputs) and
        ``fn(values, shape=None, free=None)``, which evaluates the leaf's equations on
        them (``shape``: of a row slice, for an elementwise leaf; ``free``: the shared
        values to use, e.g. passed through ``jax.sharding.auto_axes``) and returns the
        leaf's outputs (``leaf_outputs(i)`` order); ``per_leaf`` returns those outputs
        (e.g. after encoding them)."""
        jaxpr = self.closed.jaxpr
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, self.closed.consts, strict=True))
        env.update(zip(jaxpr.invars, inputs, strict=True))
        shared = [e for e, o in zip(jaxpr.eqns, self.owner, strict=True) if o is None]
        _eval_eqns(shared, env)
        out_owner = self._out_owner()
        for i in range(self.num_leaves):
            ins = self.leaf_inputs(i)
            outs = [k for k, o in enumerate(out_owner) if o == i]
            eqns = [e for e, o in zip(jaxpr.eqns, self.owner, strict=True) if o == i]
            defined = {jaxpr.invars[k] for k in ins} | {v for e in eqns for v in e.outvars}
            free_vars = list(
                dict.fromkeys(
                    v
                    for e in eqns
                    for v in e.invars
                    if isinstance(v, jcore.Var) and v not in defined
                )
            )

            def fn(values, shape=None, free=None, ins=ins, outs=outs, eqns=eqns, i=i, fv=free_vars):
                local = dict(env)
                if free is not None:
                    local.update(zip(fv, free, strict=True))
                local.update(zip((jaxpr.invars[k] for k in ins), values, strict=True))
                _eval_eqns(eqns, local, None if shape is None else (self.shapes[i], shape))
                return [local[jaxpr.outvars[k]] for k in outs]

            got = per_leaf(i, [env[jaxpr.invars[k]] for k in ins], fn, [env[v] for v in free_vars])
            for k, value in zip(outs, got, strict=True):
                env[jaxpr.outvars[k]] = value
        return [_read(env, v) for v in jaxpr.outvars]


def split(
    closed: Any, in_owner: Sequence[int | None], shapes: Sequence[tuple[int, ...]]
) -> Split | str:
    """A ``Split`` of ``closed`` (a ``ClosedJaxpr``) given the leaf of each input, or,
    if some equation mixes two leaves, a sentence saying which."""
    jaxpr = closed.jaxpr
    label: dict[Any, int | None] = dict(zip(jaxpr.invars, in_owner, strict=True))
    owner: list[int | None] = []
    for eqn in jaxpr.eqns:
        leaves = {label.get(v) for v in eqn.invars if isinstance(v, jcore.Var)} - {None}
        if len(leaves) > 1:
            return (
                f"its update mixes parameter leaves {sorted(leaves)[:2]} in one "
                f"`{eqn.primitive.name}` (a cross-leaf computation, such as a global norm)"
            )
        o = next(iter(leaves)) if leaves else None
        owner.append(o)
        for v in eqn.outvars:
            label[v] = o
    shapes = [tuple(s) for s in shapes]
    elementwise = [True] * len(shapes)
    for eqn, o in zip(jaxpr.eqns, owner, strict=True):
        if o is not None and elementwise[o] and not _elementwise(eqn, shapes[o]):
            elementwise[o] = False
    return Split(closed, owner, list(in_owner), shapes, elementwise)


def _elementwise(eqn: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``eqn`` acts value by value on arrays of ``shape`` (and scalars)."""
    name = eqn.primitive.name
    avals = [v.aval for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval")]
    fits = all(getattr(a, "shape", None) in ((), shape) for a in avals)
    if name == "broadcast_in_dim":
        return fits and all(v.aval.shape == () for v in eqn.invars)
    if name in _CALLS:
        body = eqn.params[_CALLS[name]]
        return fits and all(_elementwise(e, shape) for e in body.jaxpr.eqns)
    return fits and name in ELEMENTWISE


def _read(env: dict[Any, Any], v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval_eqns(eqns: Sequence[Any], env: dict[Any, Any], sliced=None) -> None:
    """Binds ``eqns`` in order, reading and writing ``env``. ``sliced``: ``(shape,
    slice_shape)`` when the values of ``shape`` are row slices (elementwise equations
    only): a scalar broadcast to ``shape`` is broadcast to the slice instead, and call
    bodies are evaluated inline."""
    for eqn in eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if sliced is not None and name == "broadcast_in_dim":
            outs = [jnp.broadcast_to(invals[0], sliced[1]).astype(eqn.outvars[0].aval.dtype)]
        elif sliced is not None and name in _CALLS:
            body = eqn.params[_CALLS[name]]
            inner = dict(zip(body.jaxpr.constvars, body.consts, strict=True))
            inner.update(zip(body.jaxpr.invars, invals, strict=True))
            _eval_eqns(body.jaxpr.eqns, inner, sliced)
            outs = [_read(inner, v) for v in body.jaxpr.outvars]
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            here = jax.sharding.get_abstract_mesh()
            if not here.empty and here != eqn.ctx.cur_abstract_mesh:
                # the caller runs the leaf under another mesh context (Explicit axes
                # made Auto, ``Chain.run``): bind in it
                outs = eqn.primitive.bind(*invals, **params)
            else:
                with eqn.ctx.manager:  # as jax.core.eval_jaxpr binds an equation
                    outs = eqn.primitive.bind(*invals, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = value


def trace(fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
    """``(closed jaxpr, output treedef)`` of ``fn`` on the pytrees ``args`` (arrays or
    ``ShapeDtypeStruct``s), inputs flattened in order."""
    flat, in_def = jax.tree.flatten(args)
    out_def = []

    def flat_fn(*leaves):
        out = fn(*jax.tree.unflatten(in_def, leaves))
        leaves_out, treedef = jax.tree.flatten(out)
        out_def.append(treedef)
        return leaves_out

    closed = jax.make_jaxpr(flat_fn)(*flat)
    return closed, out_def[0]
