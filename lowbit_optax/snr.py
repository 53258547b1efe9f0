"""SNR-selective second moments (SlimAdam): statistics, calibration, rules, transform.

SlimAdam (Kalra et al. 2025) keeps Adam's first moment but stores the second moment of a
leaf averaged over an axis set ``K`` chosen per leaf (``keepdims``)::

    nu <- b2 * nu + (1 - b2) * mean_K(g**2)
    u   = mhat / (sqrt(vhat) + eps)          (vhat broadcast over K, eps outside sqrt)

``K`` is chosen from the signal-to-noise ratio of a full Adam second moment ``V``::

    SNR_K(V) = mean over the other axes of (mean_K V)**2 / var_K V

(population variance, non-finite ratios dropped). A large SNR means ``V`` hardly varies
along ``K``, so its mean there loses little.

The workflow this module supports:

1. **Calibrate** without changing the training loop: wrap the optimizer in
   ``snr_calibration(optax.adamw(lr / 10), every=100)``; the wrapper records the SNR of
   every leaf for every non-empty axis subset at step 1 and every ``every`` steps in its
   state (``snr_records(opt_state)`` reads them back). ``snr`` / ``snr_table`` compute
   the same statistics of any second-moment tree directly.
2. **Rules**: ``rules_from_snr(records, threshold=1.0)`` averages the records and picks,
   per leaf, the candidate with the highest mean SNR above the threshold (none: no
   compression). Rules are a nested dict keyed like the params with an axis tuple or
   ``None`` per leaf; ``rules_to_json`` / ``rules_from_json`` store them with the
   parameter paths (``'blocks/0/attn/q/kernel'``) as keys. ``flax_default_rules`` is the
   paper's published table in Flax's ``(in, out)`` kernel layout, as a callable.
3. **Train**: ``slim_adamw(lr, rules=rules)`` (or ``scale_by_slim_adam``). With no
   compression anywhere it is ``optax.adamw`` bit for bit. ``mu_bits=4`` / ``8`` stores
   the first moment block-wise quantized (the quantized-EMA codecs), ``nu_bits`` the
   reduced second moment where it is still large.
4. **Switch without restarting**: ``slim_state_from_adam(adam_state, rules)`` turns a
   calibration run's Adam state into a SlimAdam state (the average over ``K`` of Adam's
   ``nu`` is exactly SlimAdam's ``nu`` for the same gradients, since both are linear).

Rules are resolved by parameter path: a rules mapping (nested or flat, keys joined by
``/``) or a callable ``(path, leaf) -> axes | None``. Paths join dict keys, attribute
names and sequence indices with ``/`` and drop Flax NNX's trailing ``value``, so the same
rules serve a pure-dict param tree and an ``nnx.State``.

References:
  Kalra et al., When Can You Get Away with Low Memory Adam?, arXiv 2503.01843.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_optax import quantization as qz
from lowbit_optax._driver import Chain, map_rows
from lowbit_optax._util import on_auto_axes, path_str, unflatten_like, zeros_for

__all__ = [
    "SNRCalibrationState",
    "ScaleBySlimAdamState",
    "candidate_axes",
    "flax_default_rules",
    "removed_fraction",
    "resolve_rules",
    "rules_from_json",
    "rules_from_snr",
    "rules_to_json",
    "scale_by_slim_adam",
    "slim_adamw",
    "slim_state_from_adam",
    "snr",
    "snr_calibration",
    "snr_records",
    "snr_table",
]

Axes = tuple[int, ...]
RuleFn = Callable[[str, Any], "Axes | Sequence[int] | None"]
Rules = Mapping[Any, Any] | RuleFn  # nested/flat mapping of paths to axes, or a callable
Table = dict[str, dict[Axes, float]]


# ------------------------------------------------------------------------------------
# SNR statistics
# ------------------------------------------------------------------------------------


def candidate_axes(ndim: int) -> tuple[Axes, ...]:
    """Every non-empty subset of ``range(ndim)``, smallest first, then lexicographic."""
    return tuple(
        c for size in range(1, ndim + 1) for c in itertools.combinations(range(ndim), size)
    )


def _normalize_axes(axes: Sequence[int], ndim: int, what: str = "axes") -> Axes:
    try:
        out = tuple(sorted(int(a) % ndim if -ndim <= int(a) < ndim else None for a in axes))
    except TypeError:
        raise ValueError(f"{what} must be a tuple of ints, got {axes!r}") from None
    if None in out or len(set(out)) != len(out) or ndim == 0:
        raise ValueError(
            f"{what} {tuple(axes)!r} are not distinct axes of a rank-{ndim} array; "
            f"use ints in [-{ndim}, {ndim}) or None for no compression"
        )
    return out  # type: ignore[return-value]


def snr(nu: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Signal-to-noise ratio of a second-moment array ``nu`` along ``axes``.

    ``mean over the remaining positions of (mean_K nu)**2 / var_K nu`` with the population
    variance, in float32; ratios that are not finite (``0/0`` on all-zero slices,
    ``x/0`` on constant ones) are dropped before the mean. If none is left the result is
    ``inf`` when some slice was constant and non-zero, else ``nan``. Works under ``jit``
    (returns a scalar array; ``float(...)`` it on the host).

    Args:
      nu: a second moment (e.g. an uncorrected Adam ``nu``), rank >= 1.
      axes: the averaging axes ``K`` (non-empty; negative axes allowed).
    """
    x = jnp.asarray(nu, jnp.float32)
    if x.ndim == 0:
        raise ValueError("snr needs an array of rank >= 1, got a scalar")
    k = _normalize_axes(axes, x.ndim)
    if not k:
        raise ValueError("snr needs at least one axis to average over, got ()")
    mean = jnp.mean(x, axis=k)
    var = jnp.mean((x - jnp.expand_dims(mean, k)) ** 2, axis=k)
    ratio = mean**2 / var
    finite = jnp.isfinite(ratio)
    count = jnp.sum(finite)
    avg = jnp.sum(jnp.where(finite, ratio, 0.0)) / jnp.maximum(count, 1)
    fallback = jnp.where(jnp.any(ratio == jnp.inf), jnp.inf, jnp.nan)
    return jnp.where(count > 0, avg, fallback)


def _leaf_snrs(nu: jax.Array) -> jax.Array:
    """SNRs of one leaf for ``candidate_axes(nu.ndim)``, as a float32 vector."""
    return jnp.stack([snr(nu, k) for k in candidate_axes(nu.ndim)])


def _with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), x) for p, x in flat]


def snr_table(nu_tree: Any) -> Table:
    """Every leaf's SNR for every non-empty axis subset: ``{path: {axes: snr}}``.

    Host floats; paths as in ``rules_to_json``. Scalar leaves have no candidates (``{}``).
    """
    out: Table = {}
    for path, nu in _with_paths(nu_tree):
        nu = jnp.asarray(nu)
        values = np.asarray(jax.device_get(_leaf_snrs(nu))) if nu.ndim else np.zeros(0)
        out[path] = {k: float(v) for k, v in zip(candidate_axes(nu.ndim), values, strict=True)}
    return out


# ------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------


class SNRCalibrationState(NamedTuple):
    """State of ``snr_calibration``.

    Attributes:
      inner_state: the wrapped optimizer's state.
      count: int32 steps taken.
      num_records: int32 records taken (the last ``max_records`` are kept, a ring).
      steps: int32 ``(max_records,)``, the step of each ring slot's record (0: empty).
      records: tree shaped like the params; per leaf a float32 ``(max_records,
        len(candidate_axes(ndim)))`` array of SNRs, stored finite: -1 for undefined
        (``nan``; also empty slots), float32 max for ``inf``; ``MaskedNode`` for scalar
        leaves. ``snr_records`` decodes them.
    """

    inner_state: optax.OptState
    count: jax.Array
    num_records: jax.Array
    steps: jax.Array
    records: Any


def _find_nu(state: Any) -> Any:
    found = optax.tree_utils.tree_get_all_with_path(state, "nu")
    if not found:
        raise ValueError(
            "snr_calibration needs an inner optimizer whose state has an Adam second "
            f"moment field 'nu' (optax.adam, optax.adamw, optax.scale_by_adam); got a "
            f"state of type {type(state).__name__} without one"
        )
    if len(found) > 1:
        raise ValueError(
            f"the inner optimizer's state has {len(found)} fields named 'nu'; "
            "calibrate one Adam at a time"
        )
    return found[0][1]


def snr_calibration(
    inner: optax.GradientTransformation, *, every: int = 100, max_records: int = 16
) -> optax.GradientTransformation:
    """Records the SNR table of an Adam second moment while ``inner`` trains.

    Wrap the optimizer of a short calibration run (the paper uses a ~10x lower learning
    rate than training); updates are exactly ``inner``'s. At step 1 and every ``every``
    steps the wrapper computes, inside the jitted update (under ``jax.lax.cond``, so
    other steps pay nothing), the SNR of the inner state's ``nu`` (after that step's
    update) for every leaf and every non-empty axis subset, and stores it in its state.
    ``snr_records(opt_state)`` returns them; ``rules_from_snr`` turns them into rules.

    Args:
      inner: an optimizer whose state holds one Adam ``nu`` field (``optax.adamw``,
        ``optax.adam``, ``optax.scale_by_adam`` or a chain containing one).
      every: steps between records after the first.
      max_records: records kept (a ring: later records overwrite the oldest).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = snr_calibration(optax.adamw(1e-4), every=100)
      >>> state = tx.init({"w": jnp.zeros((64, 32))})
    """
    for name, v in (("every", every), ("max_records", max_records)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    def records_like(nu_tree: Any) -> Any:
        def leaf(x):
            n = len(candidate_axes(len(x.shape)))
            if n == 0:
                return optax.MaskedNode()
            return jnp.full((max_records, n), -1.0, jnp.float32)

        # not laid out like the params (nnx.Optimizer would shard them as the params)
        return unflatten_like(nu_tree, [leaf(x) for x in jax.tree.leaves(nu_tree)], replicate=True)

    def init_fn(params: optax.Params) -> SNRCalibrationState:
        inner_state = inner.init(params)
        nu = _find_nu(inner_state)
        return SNRCalibrationState(
            inner_state,
            jnp.zeros([], jnp.int32),
            jnp.zeros([], jnp.int32),
            jnp.zeros([max_records], jnp.int32),
            records_like(nu),
        )

    def update_fn(updates, state, params=None):
        updates, inner_state = inner.update(updates, state.inner_state, params)
        count = optax.safe_increment(state.count)
        take = (count == 1) | (count % every == 0)
        nu = _find_nu(inner_state)
        row = state.num_records % max_records

        def record(records):
            def leaf(r, v):
                if isinstance(r, optax.MaskedNode):
                    return r
                return r.at[row].set(_encode_snr(_leaf_snrs(v)))

            return jax.tree.map(
                leaf, records, nu, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
            )

        records = jax.lax.cond(take, record, lambda r: r, state.records)
        steps = jnp.where(take, state.steps.at[row].set(count), state.steps)
        num = state.num_records + take.astype(jnp.int32)
        return updates, SNRCalibrationState(inner_state, count, num, steps, records)

    return optax.GradientTransformation(init_fn, update_fn)


_F32_MAX = float(np.finfo(np.float32).max)


def _encode_snr(x: jax.Array) -> jax.Array:
    """Finite storage of SNRs (>= 0): ``nan`` (undefined) as -1, ``inf`` as float32 max."""
    return jnp.where(jnp.isnan(x), -1.0, jnp.minimum(x, _F32_MAX))


def _decode_snr(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.where(x < 0, np.nan, np.where(x >= _F32_MAX, np.inf, x))


def snr_records(opt_state: Any, *, with_steps: bool = False) -> Any:
    """The SNR tables recorded by ``snr_calibration`` (oldest first), read from its
    state or from any optimizer state containing it.

    With ``with_steps=True`` returns ``(steps, tables)``, ``steps`` the step of each
    record. (The step-1 record reflects a single gradient's square and has low SNRs;
    ``rules_from_snr(tables[1:])`` leaves it out.)"""
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SNRCalibrationState))
        if isinstance(s, SNRCalibrationState)
    ]
    if not states:
        raise ValueError(
            "no SNRCalibrationState found in the optimizer state; train with "
            "snr_calibration(...) to record SNR tables"
        )
    state = states[0]
    num, size = int(state.num_records), int(state.steps.shape[0])
    slot_steps = np.asarray(jax.device_get(state.steps))
    rows: list[tuple[str, np.ndarray, int]] = []
    for path, r in _with_paths(state.records, is_leaf=lambda x: isinstance(x, optax.MaskedNode)):
        if isinstance(r, optax.MaskedNode):
            rows.append((path, np.zeros((0, 0)), 0))
            continue
        arr = _decode_snr(jax.device_get(r))
        ndim = next(d for d in range(1, 64) if len(candidate_axes(d)) == arr.shape[1])
        rows.append((path, arr, ndim))
    order = [i % size for i in range(max(0, num - size), num)]
    tables = []
    for i in order:
        table: Table = {}
        for path, arr, ndim in rows:
            cands = candidate_axes(ndim)
            table[path] = {k: float(arr[i, j]) for j, k in enumerate(cands)}
        tables.append(table)
    if with_steps:
        return [int(slot_steps[i]) for i in order], tables
    return tables


def _default_no_compress(path: str, ndim: int) -> bool:
    """1-D leaves (biases, norm scales) and anything under a ``norm`` name."""
    return ndim < 2 or any("norm" in part.lower() for part in path.split("/"))


def rules_from_snr(
    records: Sequence[Table] | Any,
    threshold: float = 1.0,
    *,
    no_compress: Callable[[str, int], bool] | None = _default_no_compress,
) -> dict[Any, Any]:
    """Per-leaf averaging axes from recorded SNR tables.

    Averages each leaf's SNR per candidate over the records (NaNs ignored), and picks
    the candidate with the highest mean SNR strictly above ``threshold``; ties go to the
    smaller axis set. No candidate above the threshold: ``None`` (no compression).

    Args:
      records: a list of ``snr_table``-style tables, or an optimizer state holding an
        ``SNRCalibrationState`` (read with ``snr_records``).
      threshold: minimum mean SNR (the paper: 1.0).
      no_compress: ``(path, ndim) -> bool`` forcing ``None``; default: 1-D leaves and
        norm parameters. ``None`` disables it.

    Returns:
      Rules: a nested dict keyed like the params (path components; all-digit components
      become ints, as ``nnx.to_pure_dict`` keys list layers) with an axis tuple or
      ``None`` per leaf.
    """
    if not (
        isinstance(records, list)
        or (isinstance(records, tuple) and not hasattr(records, "_fields"))
    ):
        records = snr_records(records)
    if not records:
        raise ValueError("rules_from_snr got no records; calibrate for at least one step")
    paths = list(records[0])
    for i, table in enumerate(records):
        if list(table) != paths:
            raise ValueError(f"record {i} has different leaves than record 0")
    flat: dict[str, Axes | None] = {}
    for path in paths:
        cands = list(records[0][path])
        ndim = max((max(k) + 1 for k in cands), default=0)
        if no_compress is not None and no_compress(path, ndim):
            flat[path] = None
            continue
        best, best_snr = None, threshold
        for k in cands:
            values = np.array([t[path][k] for t in records], np.float64)
            values = values[~np.isnan(values)]
            if values.size == 0:
                continue
            mean = float(np.mean(values))
            if mean > best_snr:
                best, best_snr = k, mean
        flat[path] = best
    return _nest(flat)


# ------------------------------------------------------------------------------------
# Rules: resolution, JSON, defaults
# ------------------------------------------------------------------------------------


def _key(part: str) -> Any:
    return int(part) if part.isdigit() else part


def _nest(flat: Mapping[str, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for path, axes in flat.items():
        node = out
        parts = path.split("/") if path else [""]
        for part in parts[:-1]:
            node = node.setdefault(_key(part), {})
        node[_key(parts[-1])] = axes
    return out


def _is_rule_leaf(x: Any) -> bool:
    return x is None or (isinstance(x, (tuple, list)) and all(isinstance(a, int) for a in x))


def _flatten_rules(rules: Mapping[Any, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if _is_rule_leaf(node):
            flat[prefix] = None if node is None else tuple(node)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            raise ValueError(
                f"rules entry {prefix!r} is {node!r}; expected a tuple of axes, None, or a "
                "nested mapping of them"
            )

    walk(rules, "")
    return flat


def rules_to_json(rules: Mapping[Any, Any]) -> str:
    """JSON text of rules: ``{"path": [axes] | null}`` with ``/``-joined parameter paths."""
    flat = _flatten_rules(rules)
    return json.dumps({k: None if v is None else list(v) for k, v in flat.items()}, indent=1)


def rules_from_json(text: str) -> dict[Any, Any]:
    """Rules from ``rules_to_json`` text (a nested dict, as ``rules_from_snr`` returns)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"rules JSON must be an object of path -> axes, got {type(data)}")
    return _nest({k: None if v is None else tuple(int(a) for a in v) for k, v in data.items()})


_EMBED = re.compile(r"^(embedding|embed|wte|wpe|pos|pos_embed|pos_embedding|position.*)$")
_QK = {"q", "k", "query", "key", "q_proj", "k_proj", "wq", "wk"}
_HEAD = {"lm_head", "head", "unembed", "output", "logits"}
_OUT = {"o", "out", "o_proj", "out_proj", "wo", "proj"}


def flax_default_rules(path: str, leaf: Any) -> Axes | None:
    """SlimAdam's published GPT rules, translated to Flax NNX's layouts.

    The paper's table (PyTorch ``(out, in)`` weights) averages ``q``/``k`` over fan-in,
    ``v``, the attention output and the MLP over fan-out, embeddings and the LM head over
    the model dimension (one value per token row), and compresses no norm. In Flax a
    ``Linear`` kernel is ``(in, out)`` and a ``LinearGeneral`` kernel puts its input
    axes first, so:

    * ``.../{q,k,query,key}/kernel``: fan-in, ``(0,)``;
    * ``.../{lm_head,head,unembed}/kernel`` (``(d, vocab)``): the model dim, ``(0,)``;
    * ``.../{o,out,...}/kernel`` (attention output, ``(heads, head_dim, out)`` in
      ``nnx.MultiHeadAttention``): fan-out, the last axis;
    * any other ``kernel`` (MLP, ``v``, plain ``Linear``): fan-out, axes ``1..ndim-1``;
    * ``embedding`` (``nnx.Embed``, ``(vocab, d)``) and positional tables named
      ``pos``/``wpe``/``embed``: the model dim, the last axis;
    * norms (``LayerNorm``/``RMSNorm``), biases, any 1-D or other leaf: ``None``.

    Use as ``rules=flax_default_rules``; wrap it to change single layers.
    """
    ndim = len(leaf.shape)
    parts = path.split("/")
    if ndim < 2 or any("norm" in p.lower() for p in parts):
        return None
    name, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if name == "kernel":
        if parent in _QK or parent in _HEAD:
            return (0,)
        if parent in _OUT:
            return (ndim - 1,)
        return tuple(range(1, ndim))
    if _EMBED.match(name):
        return (ndim - 1,)
    return None


def resolve_rules(rules: Rules, tree: Any) -> list[Axes]:
    """Per leaf of ``tree`` (flatten order), the normalised averaging axes (``()`` for
    none). Raises for missing paths and axes that do not fit a leaf."""
    if rules is None:
        raise ValueError(
            "rules is required: a mapping of parameter paths to axis tuples (from "
            "rules_from_snr / rules_from_json), or a callable such as flax_default_rules"
        )
    leaves = _with_paths(tree)
    if callable(rules) and not isinstance(rules, Mapping):
        raw = [(path, leaf, rules(path, leaf)) for path, leaf in leaves]
    elif isinstance(rules, Mapping):
        flat = _flatten_rules(rules)
        missing = [path for path, _ in leaves if path not in flat]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise ValueError(
                f"rules have no entry for {len(missing)} parameter(s): {shown}"
                f"{' ...' if len(missing) > 5 else ''}; add them (None for no compression) "
                f"or pass a callable (path, leaf) -> axes. Rules cover: "
                f"{', '.join(repr(k) for k in list(flat)[:5])}"
            )
        raw = [(path, leaf, flat[path]) for path, leaf in leaves]
    else:
        raise ValueError(f"rules must be a mapping or a callable, got {type(rules).__name__}")
    out = []
    for path, leaf, axes in raw:
        if axes is None or (isinstance(axes, (tuple, list)) and len(axes) == 0):
            out.append(())
            continue
        if not isinstance(axes, (tuple, list)):
            raise ValueError(f"rule for {path!r} must be a tuple of ints or None, got {axes!r}")
        out.append(
            _normalize_axes(
                axes, len(leaf.shape), f"rule for {path!r} (shape {tuple(leaf.shape)}):"
            )
        )
    return out


def removed_fraction(params: Any, rules: Rules) -> float:
    """Fraction of the second moment's entries that ``rules`` remove (0 = plain Adam)."""
    leaves = [x for _, x in _with_paths(params)]
    full = sum(math.prod(x.shape) for x in leaves)
    kept = sum(
        math.prod(1 if i in k else d for i, d in enumerate(x.shape))
        for x, k in zip(leaves, resolve_rules(rules, params), strict=True)
    )
    return 1.0 - kept / max(full, 1)


# ------------------------------------------------------------------------------------
# The transform
# ------------------------------------------------------------------------------------


class ScaleBySlimAdamState(NamedTuple):
    """State of ``scale_by_slim_adam``; every field but ``count`` is shaped like the params.

    Attributes:
      count: int32 step count.
      mu: first moment (``mu_dtype``), or its packed ``uint8`` codes when ``mu_bits`` is
        set and the leaf has at least ``min_size`` elements.
      mu_scales: per-block scales of quantized ``mu`` leaves, else ``MaskedNode``.
      nu: second moment reduced with ``keepdims`` over each leaf's axes (the params'
        dtype), or, when ``nu_bits`` is set and it has ``min_size`` elements, the codes
        of that array laid out as ``(1, ..., 1, size)`` (blocks along its values).
      nu_scales: per-block scales of quantized ``nu`` leaves, else ``MaskedNode``.
    """

    count: jax.Array
    mu: optax.Updates
    mu_scales: optax.Updates
    nu: optax.Updates
    nu_scales: optax.Updates


def _reduced_shape(shape: tuple[int, ...], axes: Axes) -> tuple[int, ...]:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a quantized reduced ``nu`` is stored in: all its values along the last
    axis, the rank kept (a ``(vocab, 1)`` column becomes ``(1, vocab)``, so its blocks run
    along real data instead of padding each single value to a block)."""
    return (1,) * (len(shape) - 1) + (math.prod(shape),) if shape else (1,)


def _mean_sq(g: jax.Array, axes: Axes) -> jax.Array:
    sq = g**2
    return jnp.mean(sq, axis=axes, keepdims=True).astype(sq.dtype) if axes else sq


class _Plan(NamedTuple):
    """Static per-leaf layout: axes, and which moments are quantized."""

    axes: Axes
    mu_q: bool
    nu_q: bool


def _check_config(b1, b2, eps, mu_bits, nu_bits, min_size):
    for name, v in (("b1", b1), ("b2", b2)):
        if isinstance(v, (int, float)) and not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    for name, v in (("mu_bits", mu_bits), ("nu_bits", nu_bits)):
        if v is not None and v not in (2, 3, 4, 8):
            raise ValueError(f"{name} must be None (float), 8, 4, 3 or 2, got {v!r}")
    if not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")


def _codecs(mu_bits, nu_bits, mu_map, nu_map, block_size) -> tuple[Any, Any]:
    mu_codec = (
        None
        if mu_bits is None
        else qz.make_codec(mu_bits, mu_map, signed=True, block_size=block_size)
    )
    if nu_bits is None:
        return mu_codec, None
    nu_codec = qz.make_codec(
        nu_bits,
        nu_map or ("dynamic" if nu_bits == 8 else "linear_zero_free"),
        signed=False,
        block_size=block_size,
    )
    if nu_codec.signed or nu_codec.is_log:
        raise ValueError(
            "nu_map must be an unsigned level table ('dynamic', 'linear_zero_free'), "
            f"got {nu_map!r}"
        )
    return mu_codec, nu_codec


def _leaf_plans(rules, tree, mu_codec, nu_codec, min_size) -> list[_Plan]:
    out = []
    for axes, (_, x) in zip(resolve_rules(rules, tree), _with_paths(tree), strict=True):
        shape = tuple(x.shape)
        big = lambda n, shape=shape: len(shape) >= 1 and n >= min_size
        out.append(
            _Plan(
                axes,
                mu_codec is not None and big(math.prod(shape)),
                nu_codec is not None and big(math.prod(_reduced_shape(shape, axes))),
            )
        )
    return out


def scale_by_slim_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    rules: Rules,
    mu_dtype: Any = None,
    mu_bits: int | None = None,
    nu_bits: int | None = None,
    mu_map: str | qz.Codec = "dynamic",
    nu_map: str | qz.Codec | None = None,
    block_size: int = 128,
    min_size: int = 4096,
) -> optax.GradientTransformation:
    """Adam whose second moment is averaged over a per-leaf axis set (SlimAdam).

    ``nu <- b2 nu + (1 - b2) mean_K(g**2)`` (``keepdims``), ``u = mhat / (sqrt(vhat +
    eps_root) + eps)`` with ``vhat`` broadcast over ``K``. A leaf with ``K = ()`` is
    ``optax.scale_by_adam`` exactly (same operations, bit-equal results).

    Args:
      b1, b2, eps, eps_root: as ``optax.scale_by_adam`` (traced under
        ``optax.inject_hyperparams``).
      rules: per-leaf averaging axes: a nested mapping keyed like the params (or flat
        with ``/``-joined paths) of axis tuples / ``None``, or a callable ``(path, leaf)
        -> axes | None`` such as ``flax_default_rules``. Resolved at ``init`` from the
        param paths (every param needs an entry).
      mu_dtype: dtype of a float first moment (as ``optax.scale_by_adam``).
      mu_bits: store the first moment block-wise quantized at this width (8/4/3/2, the
        quantized-EMA codecs, nearest rounding) on leaves with >= ``min_size`` elements.
      nu_bits: quantize the reduced second moment where it still has >= ``min_size``
        elements (unsigned map: 8-bit dynamic tree, else zero-free linear).
      mu_map, nu_map: map names or ``Codec`` values for the two moments.
      block_size: quantization block along the last axis.
      min_size: smallest leaf (elements) that is quantized.

    Returns:
      An ``optax.GradientTransformation``.

    Memory per parameter: ``mu`` 4 bytes (``mu_bits``: ``mu_bits/8 + 4/block_size`` per
    padded element: a last axis shorter than ``block_size`` is padded to a full block,
    so narrow layers want a smaller ``block_size``) plus ``nu`` 4 bytes times the kept
    fraction ``prod(reduced shape) / size``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.zeros((64, 32))}}
      >>> tx = optax.chain(scale_by_slim_adam(rules={"dense": {"kernel": (1,)}}),
      ...                  optax.scale_by_learning_rate(1e-3))
      >>> state = tx.init(params)  # nu of the kernel has shape (64, 1)

    References:
      Kalra et al., When Can You Get Away with Low Memory Adam?, arXiv 2503.01843.
    """
    _check_config(b1, b2, eps, mu_bits, nu_bits, min_size)
    if rules is None or not (callable(rules) or isinstance(rules, Mapping)):
        raise ValueError(
            "rules must be a mapping of parameter paths to axis tuples (rules_from_snr, "
            f"rules_from_json) or a callable (path, leaf) -> axes; got {rules!r}"
        )
    mu_codec, nu_codec = _codecs(mu_bits, nu_bits, mu_map, nu_map, block_size)
    plans = lambda tree: _leaf_plans(rules, tree, mu_codec, nu_codec, min_size)

    def init_fn(params: optax.Params) -> ScaleBySlimAdamState:
        fields: list[list[Any]] = [[], [], [], []]
        for x, plan in zip(jax.tree.leaves(params), plans(params), strict=True):
            if plan.mu_q:
                q = mu_codec.abstract(tuple(x.shape))
                fields[0].append(jnp.zeros(q.codes.shape, q.codes.dtype))
                fields[1].append(jnp.zeros(q.scales.shape, q.scales.dtype))
            else:
                dtype = mu_dtype if mu_dtype is not None else x.dtype
                if mu_codec is not None:
                    dtype = jnp.float32
                fields[0].append(jnp.zeros_like(x, dtype))
                fields[1].append(optax.MaskedNode())
            rshape = _reduced_shape(tuple(x.shape), plan.axes)
            if plan.nu_q:
                q = nu_codec.abstract(_squeezed(rshape))
                fields[2].append(jnp.zeros(q.codes.shape, q.codes.dtype))
                fields[3].append(jnp.zeros(q.scales.shape, q.scales.dtype))
            else:
                nu = jnp.zeros_like(x) if not plan.axes else zeros_for(x, rshape, x.dtype)
                fields[2].append(nu)
                fields[3].append(optax.MaskedNode())
        return ScaleBySlimAdamState(
            jnp.zeros([], jnp.int32), *(unflatten_like(params, f) for f in fields)
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        per_field = [treedef.flatten_up_to(f) for f in state[1:]]
        leaf_plans = plans(updates)
        out: list[Any] = [None] * len(leaves)
        # Float leaves go through optax's own tree functions together, as in
        # optax.scale_by_adam, so the compiled arithmetic (and the result) is the same.
        idx = [i for i, p in enumerate(leaf_plans) if not (p.mu_q or p.nu_q)]
        if idx:
            results = _float_leaves(
                [leaves[i] for i in idx],
                [per_field[0][i] for i in idx],
                [per_field[2][i] for i in idx],
                [leaf_plans[i].axes for i in idx],
                b1,
                b2,
                eps,
                eps_root,
                count,
                mu_dtype,
            )
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        chain = Chain()  # quantized leaves one after another (bounded temporaries)
        hyper = (b1, b2, eps, eps_root, count)
        for i, (g, plan) in enumerate(zip(leaves, leaf_plans, strict=True)):
            if out[i] is not None:
                continue
            mu, mu_s, nu, nu_s = (f[i] for f in per_field)

            def leaf_fn(extra, g, mu, mu_s, nu, nu_s, plan=plan):
                g_stats, *hp = extra
                return _quantized_leaf(
                    g, mu, mu_s, nu, nu_s, plan, mu_codec, nu_codec, *hp, g_stats=g_stats
                )

            # the statistics read the gradient as given; the slices write the update over
            # its gated copy (one reader of each, so XLA copies neither)
            run = lambda *a, g=g, leaf_fn=leaf_fn: on_auto_axes(leaf_fn, (g, *hyper), *a)
            out[i] = chain(run, g, mu, mu_s, nu, nu_s)
        new = [treedef.unflatten([o[j] for o in out]) for j in range(5)]
        return new[0], ScaleBySlimAdamState(count, *new[1:])

    return optax.GradientTransformation(init_fn, update_fn)


def _float_leaves(gs, mus, nus, axes, b1, b2, eps, eps_root, count, mu_dtype):
    """``optax.scale_by_adam``'s tree operations on a list of leaves, with ``g**2``
    averaged over each leaf's axes."""
    mus = optax.tree.update_moment(gs, mus, b1, 1)
    new_nus = [(1 - b2) * _mean_sq(g, k) + b2 * nu for g, nu, k in zip(gs, nus, axes, strict=True)]
    mu_hat = optax.tree.bias_correction(mus, b1, count)
    nu_hat = optax.tree.bias_correction(new_nus, b2, count)
    us = [
        (m / (jnp.sqrt(v + eps_root) + eps)).astype(g.dtype)
        for m, v, g in zip(mu_hat, nu_hat, gs, strict=True)
    ]
    mus = optax.tree.cast(mus, mu_dtype)
    masked = optax.MaskedNode()
    return [
        (u, m, masked, v.astype(nu.dtype), masked)
        for u, m, v, nu in zip(us, mus, new_nus, nus, strict=True)
    ]


def _quantized_leaf(
    g, mu, mu_s, nu, nu_s, plan, mu_codec, nu_codec, b1, b2, eps, eps_root, count, g_stats=None
):
    """A leaf with a quantized first and/or reduced second moment, in float32
    (``g_stats``: the same gradient, read for the reduced second moment).

    The reduced second moment (``mean_K(g**2)`` and the update's denominator) is small
    and computed whole; the first moment and the update run over row slices of the leaf
    (``map_rows``), with the update written over the gradient. With no averaging axes
    and a float second moment, the second moment runs in the slices too; a quantized
    second moment of full size (no averaging axes) runs whole."""
    shape = tuple(g.shape)
    rshape = _reduced_shape(shape, plan.axes)
    t = count.astype(jnp.float32)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    full_nu = not plan.axes  # second moment of the leaf's own shape
    if plan.nu_q:
        qshape = _squeezed(rshape)
        v = qz.dequantize(qz.QuantizedArray(nu, nu_s, None, nu_codec, qshape)).reshape(rshape)
    elif not full_nu:
        v = nu.astype(jnp.float32)
    if not full_nu or plan.nu_q:
        g_stats = g if g_stats is None else g_stats
        v = b2 * v + (1 - b2) * _mean_sq(g_stats.astype(jnp.float32), plan.axes)
        den = jnp.sqrt(v / bc2 + eps_root) + eps
        if plan.nu_q:
            qv = qz.quantize(v.reshape(_squeezed(rshape)), nu_codec)
            nu, nu_s = qv.codes, qv.scales
        else:
            nu, nu_s = v.astype(nu.dtype), optax.MaskedNode()

    def rows(carried, readonly, _):
        g, mu, mu_s, *nu_rows = carried
        g32 = g.astype(jnp.float32)
        if plan.mu_q:
            m = qz.dequantize(qz.QuantizedArray(mu, mu_s, None, mu_codec, tuple(g.shape)))
        else:
            m = mu.astype(jnp.float32)
        m = b1 * m + (1 - b1) * g32
        if nu_rows:  # full-size float second moment, sliced with the leaf
            v = b2 * nu_rows[0].astype(jnp.float32) + (1 - b2) * g32**2
            d = jnp.sqrt(v / bc2 + eps_root) + eps
            nu_rows = [v.astype(nu_rows[0].dtype)]
        else:
            d = readonly if sliced_den else den
        u = (m / bc1) / d
        if plan.mu_q:
            qm = qz.quantize(m, mu_codec)
            mu, mu_s = qm.codes, qm.scales
        else:
            mu = m.astype(mu.dtype)
        return (u.astype(g.dtype), mu, mu_s, *nu_rows)

    carried = (g, mu, mu_s, *((nu,) if full_nu and not plan.nu_q else ()))
    sliced_den = not full_nu and 0 not in plan.axes  # row-aligned: read by slice
    readonly = den if sliced_den else ()
    if full_nu and plan.nu_q:  # pragma: no cover - quantized Adam is scale_by_quantized_adam
        out = rows(carried, readonly, None)
    else:
        out = map_rows(rows, carried, readonly)
    u, mu, mu_s, *nu_rows = out
    if nu_rows:
        nu, nu_s = nu_rows[0], optax.MaskedNode()
    return u, mu, mu_s, nu, nu_s


def slim_state_from_adam(
    adam_state: Any,
    rules: Rules,
    *,
    mu_bits: int | None = None,
    nu_bits: int | None = None,
    mu_map: str | qz.Codec = "dynamic",
    nu_map: str | qz.Codec | None = None,
    block_size: int = 128,
    min_size: int = 4096,
) -> Any:
    """Turns Adam state into SlimAdam state, to continue training without a restart.

    Every ``optax.ScaleByAdamState`` inside ``adam_state`` (e.g. ``optax.adamw``'s
    chain state, or the inner state of ``snr_calibration``) is replaced by the
    ``ScaleBySlimAdamState`` that ``scale_by_slim_adam(rules=rules, ...)`` with the same
    quantization arguments would hold: ``count`` and ``mu`` carried over (quantized if
    ``mu_bits``), ``nu`` averaged over each leaf's axes. The rest of the chain state is
    kept, so ``optax.adamw``'s state continues under ``slim_adamw`` with the same
    ``learning_rate`` schedule position. (An ``SNRCalibrationState`` wrapper is
    unwrapped to its inner state.)

    Since ``mean_K`` commutes with the EMA, the result equals the state SlimAdam would
    have reached on the same gradients.
    """
    _check_config(0.9, 0.999, 0.0, mu_bits, nu_bits, min_size)
    mu_codec, nu_codec = _codecs(mu_bits, nu_bits, mu_map, nu_map, block_size)
    is_adam = lambda x: isinstance(x, (optax.ScaleByAdamState, SNRCalibrationState))

    def convert(s: Any) -> Any:
        if isinstance(s, SNRCalibrationState):
            return jax.tree.map(convert, s.inner_state, is_leaf=is_adam)
        if not isinstance(s, optax.ScaleByAdamState):
            return s
        leaves, treedef = jax.tree.flatten(s.nu)
        mus = treedef.flatten_up_to(s.mu)
        plans = _leaf_plans(rules, s.nu, mu_codec, nu_codec, min_size)
        fields: list[list[Any]] = [[], [], [], []]
        for x, m, plan in zip(leaves, mus, plans, strict=True):
            v = jnp.mean(x, axis=plan.axes, keepdims=True).astype(x.dtype) if plan.axes else x
            if plan.mu_q:
                q = qz.quantize(m, mu_codec)
                fields[0] += [q.codes]
                fields[1] += [q.scales]
            else:
                fields[0] += [m.astype(jnp.float32) if mu_bits is not None else m]
                fields[1] += [optax.MaskedNode()]
            if plan.nu_q:
                q = qz.quantize(v.reshape(_squeezed(v.shape)), nu_codec)
                fields[2] += [q.codes]
                fields[3] += [q.scales]
            else:
                fields[2] += [v]
                fields[3] += [optax.MaskedNode()]
        return ScaleBySlimAdamState(s.count, *(treedef.unflatten(f) for f in fields))

    return jax.tree.map(convert, adam_state, is_leaf=is_adam)


def slim_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rules: Rules,
    mu_dtype: Any = None,
    mu_bits: int | None = None,
    nu_bits: int | None = None,
    block_size: int = 128,
    min_size: int = 4096,
) -> optax.GradientTransformation:
    """AdamW with SlimAdam's per-leaf averaged second moment.

    ``optax.chain(scale_by_slim_adam(...), optax.add_decayed_weights(weight_decay,
    mask), optax.scale_by_learning_rate(learning_rate))``, the same chain as
    ``optax.adamw`` (and bit-equal to it when ``rules`` compress nothing), so an
    ``optax.adamw`` state converted by ``slim_state_from_adam`` continues under it.

    Args:
      learning_rate, b1, b2, eps, eps_root, weight_decay, mask: as ``optax.adamw``.
      rules: per-leaf averaging axes (``rules_from_snr``, ``rules_from_json``, a
        mapping keyed like the params, or a callable such as ``flax_default_rules``).
      mu_dtype: dtype of a float first moment.
      mu_bits: quantize the first moment block-wise (8/4/3/2 bits; 4 gives about
        0.56 bytes/param for ``mu`` on large leaves instead of 4).
      nu_bits: quantize the reduced second moment where it keeps >= ``min_size``
        elements.
      block_size, min_size: quantization block and smallest quantized leaf.

    Memory: with calibrated rules on the benchmark LM about 4.0 bytes/param (float32
    ``mu``) or 0.6 (``mu_bits=4``); ``optax.adamw``: 8.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"mlp": {"up": {"kernel": jnp.zeros((64, 256))}}}
      >>> tx = slim_adamw(1e-3, rules=flax_default_rules, mu_bits=4)
      >>> state = tx.init(params)

    References:
      Kalra et al., When Can You Get Away with Low Memory Adam?, arXiv 2503.01843.
    """
    return optax.chain(
        scale_by_slim_adam(
            b1,
            b2,
            eps,
            eps_root,
            rules=rules,
            mu_dtype=mu_dtype,
            mu_bits=mu_bits,
            nu_bits=nu_bits,
            block_size=block_size,
            min_size=min_size,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
