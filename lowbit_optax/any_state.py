"""Low-bit state for any optax transformation: ``quantize_state(inner, bits=...)``.

The wrapper keeps ``inner``'s state as ``inner.init`` made it, with every floating leaf
that is laid out like a parameter (the same shape as the parameter whose path ends its
own, at least ``min_size`` values) replaced by a block-wise quantized
``QuantizedArray``. Around ``inner.update`` it decodes those leaves (to the dtype
``inner.init`` gave them: bfloat16 moments of bfloat16 params stay bfloat16 to
``inner``) and encodes the new ones (nearest rounding, or ``rounding='stochastic'``:
unbiased, with a PRNG key in the state; SOLO's remedy for slowly decaying momenta at 4
bits and below, whose nearest-rounded codes stop moving). Counts, keys, hyperparameters
and leaves of other shapes (Adafactor's factored rows and columns, Muon's coefficients)
stay as they are.

**Codec per leaf.** A leaf's field name says what it holds: first-moment-like fields
(``mu``, ``m``, ``trace``, ``ema``, ...) can be negative and take a signed map;
second-moment fields (``nu``, ``v``, ``exp_avg_sq``, ...) are non-negative by
construction and take an unsigned one, which spends no code on signs. Values are
clipped to float32's finite range before encoding, and so are the floating state leaves
kept as they are, so an overflowing inner state (a float32 ``nu`` of a 1e30 gradient is
``inf``) is stored finite. A field of another
name is an error at ``init``, naming it; ``codec=`` a callable ``(path, leaf) -> Codec
| None`` (``None``: keep float32) decides for every leaf instead.

**Memory.** Decoding the whole state before ``inner.update`` would put back the float32
state of the whole model as a transient. When ``inner``'s update is *leafwise* (each
leaf's results read only that leaf's values and shared scalars: Adam, Lion, SGD with
momentum, AdEMAMix, Adafactor, Muon's per-matrix step), the wrapper runs ``inner``'s
own computation leaf by leaf (``lowbit_optax._leafwise``: the update's jaxpr split by
data flow), each leaf decoded, updated and encoded before the next starts; a leaf whose
computation is elementwise runs in row slices. Otherwise (a global norm, a global
finiteness check inside ``inner``) it decodes the whole state and runs ``inner.update``
on the whole tree. Either way the numbers are ``inner``'s own computation on the
decoded state.

**Composition.** The state is a pytree of arrays (``QuantizedArray``'s codes, scales
and bases are its leaves): ``optax.inject_hyperparams``, ``optax.MultiSteps``, orbax
checkpoints and ``lowbit_optax.state_shardings`` see it as any state. Under
``nnx.Optimizer`` each quantized leaf's arrays carry the param's ``Variable`` metadata,
adapted to their shapes. Extra arguments (``value=``, ...) reach ``inner``. On a mesh
with Explicit axes each leaf runs with those axes made Auto (``Chain.run``), as the
library's own transforms do; ``inner`` must itself run there (``optax.contrib.muon``
does not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore

from lowbit_optax import _leafwise
from lowbit_optax import quantization as qz
from lowbit_optax._driver import EMPTY, Chain, is_empty, map_rows
from lowbit_optax._util import (
    _is_nnx_variable,
    auto_axes_like_inputs,
    explicit_mesh_of,
    fit_spec,
    unflatten_like,
)

# field names of non-negative (second-moment-like) and signed state leaves
UNSIGNED_FIELDS = frozenset(
    "nu v exp_avg_sq sum_of_squares nu_hat max_nu hessian h diag_hessian".split()
)
SIGNED_FIELDS = frozenset("mu m m1 m2 trace momentum ema exp_avg mu_hat z".split())
_MAX = float(np.finfo(np.float32).max)

CodecRule = Callable[[str, jax.Array], "qz.Codec | None"]


class QuantizeStateState(NamedTuple):
    """State of ``quantize_state``: ``inner``'s own state with its chosen leaves quantized.

    Attributes:
      inner_state: ``inner``'s state, its chosen leaves as ``QuantizedArray`` values.
      key: raw ``uint32`` PRNG key data of stochastic rounding, split every step
        (``EMPTY``, no leaves, unless ``rounding='stochastic'``).

    Example:
      >>> from lowbit_optax import state_bytes
      >>> tx = quantize_state(optax.scale_by_adam(), bits=4)
      >>> state = jax.eval_shape(tx.init, {"w": jnp.zeros((64, 256))})  # shapes only
      >>> mu = state.inner_state.mu["w"]
      >>> type(mu).__name__, mu.codes.shape, mu.scales.shape
      ('QuantizedArray', (64, 128), (64, 2))
      >>> per_moment = 64 * 256 // 2 + 64 * 2 * 4  # 4-bit codes + float32 scales
      >>> state_bytes(state) == 2 * per_moment + 4  # mu, nu and the int32 count
      True
    """

    inner_state: Any
    key: Any = EMPTY


def quantize_state(
    inner: optax.GradientTransformation,
    *,
    bits: int = 8,
    block_size: int = 128,
    min_size: int = 4096,
    codec: qz.Codec | CodecRule | None = None,
    leafwise: bool | None = None,
    rounding: str = "nearest",
    key: int = 0,
) -> optax.GradientTransformation:
    """Stores ``inner``'s state block-wise quantized between steps.

    Args:
      inner: any ``optax.GradientTransformation``.
      bits: code width of the default codecs (8, 4, 3 or 2): the dynamic map, signed
        for first-moment fields; unsigned for second-moment fields (dynamic at 8 bits,
        the zero-free linear map below, as ``scale_by_quantized_adam``).
      block_size: values per block along the last axis (a multiple of 8).
      min_size: leaves with fewer values stay float32.
      codec: ``None``: the default codecs, chosen by each leaf's field name (an
        unknown name is an error naming it); a ``Codec``: that one for every leaf
        laid out like a parameter; a callable ``(path, leaf) -> Codec | None`` for
        each such leaf (``None`` keeps it float32; ``path`` as ``jax.tree_util.keystr``).
      leafwise: ``None`` runs ``inner`` leaf by leaf when its update is leafwise
        (found from its jaxpr), else on the whole tree; ``False``: always the whole
        tree; ``True``: leaf by leaf, an error at the first update if ``inner`` is not
        leafwise.
      rounding: rounding of the default codecs: ``nearest``, or ``stochastic``
        (unbiased: one of the two neighbouring levels, with probability proportional
        to linear distance; SOLO's remedy for slowly decaying low-bit states, whose
        nearest-rounded codes stop moving). ``stochastic`` puts a PRNG key in the
        state; a ``codec=`` that rounds stochastically needs it.
      key: seed of that key.

    Returns:
      A ``GradientTransformation`` whose state is a ``QuantizeStateState``.

    Memory per parameter of a quantized leaf: ``bits / 8 + 4 / block_size`` bytes
    (the codes and a float32 scale per block) for each of ``inner``'s parameter-shaped
    state fields.

    Example:
      >>> from lowbit_optax import state_bytes
      >>> import jax.numpy as jnp, optax
      >>> tx = quantize_state(optax.lion(1e-4), bits=8)
      >>> params = {"w": jnp.ones((256, 256))}
      >>> state = tx.init(params)
      >>> updates, state = jax.jit(tx.update)(params, state, params)
      >>> state.inner_state[0].mu["w"].codes.shape  # one byte per value
      (256, 256)
      >>> state_bytes(state) == 256 * 256 + 256 * 2 * 4 + 4  # codes, scales, count
      True
    """
    if not isinstance(bits, int) or bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 8, 4, 3 or 2, got {bits!r}")
    if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    if leafwise not in (None, True, False):
        raise ValueError(f"leafwise must be None, True or False, got {leafwise!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if not isinstance(key, int) or isinstance(key, bool):
        raise ValueError(f"key must be an int seed, got {key!r}")
    signed = qz.make_codec(bits, "dynamic", signed=True, block_size=block_size, rounding=rounding)
    unsigned = qz.make_codec(
        bits,
        "dynamic" if bits == 8 else "linear_zero_free",
        signed=False,
        block_size=block_size,
        rounding=rounding,
    )
    if codec is not None and not (isinstance(codec, qz.Codec) or callable(codec)):
        raise ValueError(f"codec must be None, a Codec or a callable, got {codec!r}")

    def choose(path: str, field: str | None, leaf: jax.Array) -> qz.Codec | None:
        if isinstance(codec, qz.Codec):
            return codec
        if callable(codec):
            return codec(path, leaf)
        if field in UNSIGNED_FIELDS:
            return unsigned
        if field in SIGNED_FIELDS:
            return signed
        raise ValueError(
            f"quantize_state cannot tell whether the state leaf {path} (field {field!r}, "
            f"shape {tuple(leaf.shape)}) can be negative. Known signed fields: "
            f"{sorted(SIGNED_FIELDS)}; non-negative: {sorted(UNSIGNED_FIELDS)}. Pass "
            "codec=lambda path, leaf: ... returning a Codec (lowbit_optax.make_codec(8, "
            "'dynamic', signed=...)) or None (keep float32) for each leaf."
        )

    def init_fn(params: optax.Params) -> QuantizeStateState:
        state = inner.init(params)
        # Flax NNX Variable nodes (nnx.Optimizer passes them): each state leaf is read
        # out of its node; a quantized one's codes and scales get a node each, with the
        # param's sharding metadata adapted to their shapes (``unflatten_like``)
        flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_nnx_variable)
        paths, nodes = [p for p, _ in flat], [n for _, n in flat]
        plain = [n.get_value() if _is_nnx_variable(n) else n for n in nodes]
        owners = _owners(state, params, is_leaf=_is_nnx_variable)
        stored = []
        for node, leaf, path, (owner, field) in zip(nodes, plain, paths, owners, strict=True):
            c = None
            if (
                owner is not None
                and isinstance(leaf, jax.Array)
                and jnp.issubdtype(leaf.dtype, jnp.floating)
                and leaf.ndim >= 1
                and leaf.size >= min_size
            ):
                c = choose(jax.tree_util.keystr(path), field, leaf)
            if c is None:
                stored.append(node)
                continue
            if c.rounding != "nearest" and rounding != "stochastic":
                raise ValueError(
                    f"the codec of state leaf {jax.tree_util.keystr(path)} rounds "
                    f"{c.rounding!r}, which needs a PRNG key in the state: pass "
                    "rounding='stochastic' to quantize_state"
                )
            q = _encode_laid_out(leaf, c)
            if _is_nnx_variable(node):
                like = lambda a, node=node: None if a is None else unflatten_like([node], [a])[0]
                q = dataclasses.replace(
                    q, codes=like(q.codes), scales=like(q.scales), bases=like(q.bases)
                )
            stored.append(q)
        # the key's presence is set by the arguments, not by the leaves (optax's
        # tree_map_params inits with placeholders, which quantize nothing)
        rng = jax.random.key_data(jax.random.key(key)) if rounding == "stochastic" else EMPTY
        return QuantizeStateState(treedef.unflatten(stored), rng)

    inner_tx = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        # on a mesh with Explicit axes the whole update runs with them made Auto, so
        # inner's own math (Muon's Newton-Schulz products of a split matrix) need not say
        # how its sharded dimensions go
        update = lambda u, st, p: _update(u, st, p, **extra_args)
        return auto_axes_like_inputs(update, updates, state, extra=(params,))

    def _update(updates, state, params=None, **extra_args):
        stored, treedef = _flatten(state.inner_state)
        fstate = treedef.unflatten([_float_view(x) for x in stored])
        # extra arguments (optax's ``value=``, ``grad=``, ...) reach ``inner`` as shared
        # values (constants of the traced update)
        inner_update = lambda u, s, p: inner_tx.update(u, s, p, **extra_args)
        closed, _ = _leafwise.trace(inner_update, updates, fstate, params)
        n_g, n_s = len(jax.tree.leaves(updates)), len(stored)
        plan = None if leafwise is False else _split(closed, updates, fstate, params, n_g)
        if isinstance(plan, str):
            if leafwise:
                raise ValueError(f"quantize_state(leafwise=True): {plan}")
            plan = None
        flat_in = jax.tree.leaves((updates, state.inner_state, params), is_leaf=_is_q)
        # stochastic rounding: this step's key, one per state leaf (``fold_in`` its
        # index), the next step's key in the state
        keys, new_key = [None] * n_s, state.key
        if not is_empty(state.key):
            step_key, new_key = jax.random.split(jax.random.wrap_key_data(state.key))
            keys = [jax.random.key_data(jax.random.fold_in(step_key, j)) for j in range(n_s)]
            new_key = jax.random.key_data(new_key)
        if plan is not None:
            outs = _run_leafwise(plan, flat_in, n_g, n_s, keys)
        else:  # the whole tree: decode all, inner.update, encode all
            outs = jcore.jaxpr_as_fun(closed)(*(_decode(x) for x in flat_in))
            outs = [
                *outs[:n_g],
                *(_stored_like(o, x, k) for o, x, k in zip(outs[n_g:], stored, keys, strict=True)),
            ]
        new_updates = jax.tree.structure(updates).unflatten(outs[:n_g])
        return new_updates, QuantizeStateState(treedef.unflatten(outs[n_g:]), new_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_q(x: Any) -> bool:
    return isinstance(x, qz.QuantizedArray)


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    return jax.tree.flatten(tree, is_leaf=_is_q)


def _float_view(x: Any) -> Any:
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_q(x) else x


def _decode(x: Any) -> Any:
    return qz.dequantize(x) if _is_q(x) else x


def _stored_like(
    x: jax.Array, like: Any, key: jax.Array | None = None, rows: jax.Array | None = None
) -> Any:
    """``x`` stored as ``like`` is: encoded with its codec if quantized (``key`` and
    ``rows``, the indices of a row slice, for stochastic rounding); a floating array
    (rank >= 1) kept within float32's finite range."""
    if _is_q(like):
        return _encode(x, like.codec, like.shape, like.dtype, key, rows)
    if like is not None and x.ndim >= 1 and jnp.issubdtype(x.dtype, jnp.floating):
        big = float(jnp.finfo(x.dtype).max)
        return jnp.clip(x, -big, big)
    return x


def _encode(
    x: jax.Array,
    codec: qz.Codec,
    shape: tuple[int, ...],
    dtype: Any = None,
    key: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> qz.QuantizedArray:
    """``x`` (possibly a row slice of a leaf of ``shape``, its first-axis indices
    ``rows``) as a ``QuantizedArray`` of ``shape`` that decodes to ``dtype`` (default:
    ``x``'s), clipped to that dtype's finite range (unsigned codecs: to ``[0, max]``);
    rounded as the codec rounds (stochastic: noise of ``key`` at each value's position
    in the leaf, so a slice and the whole leaf round alike)."""
    dtype = jnp.dtype(x.dtype if dtype is None else dtype).name
    big = min(_MAX, float(jnp.finfo(dtype).max))  # finite once decoded to ``dtype`` too
    x = jnp.clip(x.astype(jnp.float32), 0.0 if not codec.signed else -big, big)
    xb = qz.to_blocks(x, codec.block_size)
    noise = qz.uniform_noise(codec, key, xb.shape, rows)
    codes, scales, bases = qz.encode(xb, codec, noise).stored(codec)
    return qz.QuantizedArray(codes, scales, bases, codec=codec, shape=tuple(shape), dtype=dtype)


def _encode_laid_out(x: jax.Array, codec: qz.Codec) -> qz.QuantizedArray:
    """``_encode(x)`` of a whole leaf; on a mesh with Explicit axes with those made Auto
    (a block may span shards of a split last axis) and the codes, scales and bases laid
    out as ``state_shardings`` lays them (``fit_spec``: the leaf's axes where they fit)."""
    if codec.rounding != "nearest":  # the initial state, rounded to nearest
        q = _encode_laid_out(x, dataclasses.replace(codec, rounding="nearest"))
        return dataclasses.replace(q, codec=codec)
    mesh = explicit_mesh_of(x)
    if mesh is None:
        return _encode(x, codec, x.shape)
    spec = jax.typeof(x).sharding.spec
    sizes = dict(mesh.shape)
    out = jax.tree.map(
        lambda a: fit_spec(a.shape, x.shape, spec, sizes), codec.abstract(tuple(x.shape))
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(lambda y: _encode(y, codec, y.shape), out_sharding=out)(x)


def _owners(state: Any, params: Any, is_leaf=None) -> list[tuple[int | None, str | None]]:
    """For each leaf of ``state`` (flatten order, ``is_leaf`` as ``jax.tree.flatten``'s):
    the index of the parameter leaf whose path ends its own with the same shape (the
    longest such path), or ``None``; and its field name (the key just before the
    parameter's path)."""
    p_leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_leaf)
    by_path = {tuple(path): (i, _shape(leaf)) for i, (path, leaf) in enumerate(p_leaves)}
    lengths = sorted({len(p) for p in by_path}, reverse=True)
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_leaf):
        found = (None, None)
        for n in lengths:
            if n > len(path):
                continue
            hit = by_path.get(tuple(path[len(path) - n :]))
            if hit is not None and _shape(leaf) == hit[1]:
                field = path[len(path) - n - 1] if len(path) > n else None
                found = (hit[0], _key_name(field))
                break
        out.append(found)
    return out


def _shape(x: Any) -> tuple[int, ...]:
    x = x.get_value() if _is_nnx_variable(x) else x
    return tuple(getattr(x, "shape", ()))


def _key_name(key: Any) -> str | None:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return None


def _split(closed, updates, fstate, params, n_g) -> _leafwise.Split | str:
    """The leafwise split of the traced update: gradient leaf ``i`` and param leaf ``i``
    belong to leaf ``i``, a state leaf to the parameter its path ends with."""
    owners = [o for o, _ in _owners(fstate, updates)]
    n_p = len(jax.tree.leaves(params))
    in_owner = [*range(n_g), *owners, *range(n_p)]
    shapes = [tuple(g.shape) for g in jax.tree.leaves(updates)]
    return _leafwise.split(closed, in_owner, shapes)


def _run_leafwise(
    plan: _leafwise.Split, flat_in: list[Any], n_g: int, n_s: int, keys: list[Any]
) -> list[Any]:
    """Evaluates the split update leaf after leaf (one ``Chain``), decoding each leaf's
    quantized state inputs before its equations and encoding its state outputs after
    (``keys``: each state leaf's stochastic-rounding key, or ``None``); an elementwise
    leaf in row slices."""
    chain = Chain()
    jaxpr = plan.closed.jaxpr
    state_in = {n_g + j: flat_in[n_g + j] for j in range(n_s)}

    def per_leaf(i, values, fn, free):
        ins, outs = plan.leaf_inputs(i), plan.leaf_outputs(i)
        like = [state_in.get(k) for k in outs]  # a state output is stored as its input
        out_keys = [keys[k - n_g] if k in state_in else None for k in outs]
        states = [k for k in ins if n_g <= k < n_g + n_s]
        n_c = 1 + len(states)  # the gradient and the state; then the rest (params)
        paired = ins[:1] == [i] and outs == [i, *states]  # outputs like (gradient, *state)
        sliceable = (
            paired
            and plan.elementwise[i]
            and len(plan.shapes[i]) >= 2
            and all(tuple(jaxpr.invars[k].aval.shape) == plan.shapes[i] for k in ins)
        )

        def run(body):
            """``body(shared, first, *rest)`` in the chain; with outputs paired to the
            inputs, through ``Chain.run`` (on a mesh with Explicit axes, made Auto: a
            block may span shards of a split last axis; the shared values go in with
            the rest)."""
            if not paired:
                shared = (free, out_keys)
                return chain(lambda *a: tuple(body(shared, *a)), values[0], *values[1:])
            extra = ((free, out_keys), values[n_c:])
            step = lambda extra, first, *st: tuple(body(extra[0], first, *st, *extra[1]))
            return chain.run(step, extra, values[0], *values[1:n_c])

        def math(shared, vals, shape=None, rows=None):
            free, ks = shared
            new = fn([_decode(v) for v in vals], shape, free)
            return [_stored_like(o, x, k, rows) for o, x, k in zip(new, like, ks, strict=True)]

        if not sliceable:
            # the stored state gated too: its decoding would otherwise float up to the
            # start of the update, every leaf's float32 state alive at once
            gated = lambda x: chain.gate(x) if _is_q(x) else x
            return run(lambda shared, first, *rest: math(shared, [first, *map(gated, rest)]))

        def sliced(shared, first, *rest):
            carried, readonly = [first, *rest[: n_c - 1]], list(rest[n_c - 1 :])
            return map_rows(
                lambda c, r, rows: math(shared, [*c, *r], c[0].shape, rows),
                carried,
                readonly,
                shape=plan.shapes[i],
            )

        return run(sliced)

    return plan.run(flat_in, per_leaf)
