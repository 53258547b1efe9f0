"""SlimAdam's statistics: the SNR of a second moment along axis subsets, and the
calibration wrapper that records it while an Adam trains.

``SNR_K(V) = mean over the other axes of (mean_K V)**2 / var_K V`` (population
variance, non-finite ratios dropped): a large SNR means ``V`` hardly varies along ``K``,
so its mean there loses little.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_optax._driver import EMPTY, is_empty
from lowbit_optax._util import leaves_with_paths, static_arg, unflatten_like

__all__ = [
    "SNRCalibrationState",
    "candidate_axes",
    "snr",
    "snr_calibration",
    "snr_records",
    "snr_table",
]

Axes = tuple[int, ...]
Table = dict[str, dict[Axes, float]]


# ------------------------------------------------------------------------------------
# SNR statistics
# ------------------------------------------------------------------------------------


def candidate_axes(ndim: int) -> tuple[Axes, ...]:
    """Every non-empty subset of ``range(ndim)``, smallest first, then lexicographic.

    Args:
      ndim: the rank of a leaf.

    Returns:
      The candidate axis sets SNR tables and records list, in their order.

    Example:
      >>> candidate_axes(2)
      ((0,), (1,), (0, 1))
      >>> len(candidate_axes(3))  # 2**3 - 1
      7
    """
    return tuple(
        c for size in range(1, ndim + 1) for c in itertools.combinations(range(ndim), size)
    )


def normalize_axes(axes: Sequence[int], ndim: int, what: str = "axes") -> Axes:
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

    Returns:
      A float32 scalar array.

    Example:
      Rows ``(1, 3)`` and ``(2, 6)`` each have mean**2 / variance = 4; columns
      ``(1, 2)`` and ``(3, 6)`` each 9:

      >>> nu = jnp.array([[1.0, 3.0], [2.0, 6.0]])
      >>> float(snr(nu, (1,))), float(snr(nu, (0,)))
      (4.0, 9.0)
      >>> float(snr(jnp.ones((2, 3)), (1,)))  # constant slices: no noise at all
      inf
    """
    x = jnp.asarray(nu, jnp.float32)
    if x.ndim == 0:
        raise ValueError("snr needs an array of rank >= 1, got a scalar")
    k = normalize_axes(axes, x.ndim)
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


def snr_table(nu_tree: Any) -> Table:
    """Every leaf's SNR for every non-empty axis subset: ``{path: {axes: snr}}``.

    Host floats; paths as in ``rules_to_json``. Scalar leaves have no candidates (``{}``).

    Args:
      nu_tree: a tree of second moments (e.g. ``optax.adam``'s ``nu``).

    Returns:
      ``{path: {axes: snr}}`` with the axes of ``candidate_axes(ndim)``.

    Example:
      >>> table = snr_table({"w": jnp.array([[1.0, 3.0], [2.0, 6.0]]), "s": jnp.ones(())})
      >>> table["s"], table["w"][(0,)], table["w"][(1,)]
      ({}, 9.0, 4.0)
      >>> list(table["w"])
      [(0,), (1,), (0, 1)]
    """
    out: Table = {}
    for path, nu in leaves_with_paths(nu_tree):
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

    Example:
      >>> tx = snr_calibration(optax.adam(1e-3), every=10, max_records=4)
      >>> state = tx.init({"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)})
      >>> state.records["w"].shape  # 4 records of the 3 candidates of a 2-D leaf
      (4, 3)
      >>> state.steps.tolist()  # no record yet
      [0, 0, 0, 0]
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
    inner: optax.GradientTransformation,
    *,
    every: int | None = None,
    max_records: int | None = None,
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
      every: steps between records after the first (default 100).
      max_records: records kept (a ring: later records overwrite the oldest; default
        16).

    Returns:
      A ``GradientTransformationExtraArgs`` whose state is an ``SNRCalibrationState``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = snr_calibration(optax.adamw(1e-4), every=100)
      >>> params = {"w": jnp.ones((8, 4))}
      >>> state = tx.init(params)
      >>> updates, state = jax.jit(tx.update)(params, state, params)  # step 1: recorded
      >>> list(snr_records(state)[0]["w"])  # SNR per candidate axis set
      [(0,), (1,), (0, 1)]
    """
    every = static_arg("every", every, 100)
    max_records = static_arg("max_records", max_records, 16)
    for name, v in (("every", every), ("max_records", max_records)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    def records_like(nu_tree: Any) -> Any:
        def leaf(x):
            n = len(candidate_axes(len(x.shape)))
            if n == 0:
                return EMPTY
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

    def update_fn(updates, state, params=None, **extra_args):
        updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra_args
        )
        count = optax.safe_increment(state.count)
        take = (count == 1) | (count % every == 0)
        nu = _find_nu(inner_state)
        row = state.num_records % max_records

        def record(records):
            def leaf(r, v):
                if is_empty(r):
                    return r
                return r.at[row].set(_encode_snr(_leaf_snrs(v)))

            return jax.tree.map(leaf, records, nu, is_leaf=is_empty)

        records = jax.lax.cond(take, record, lambda r: r, state.records)
        steps = jnp.where(take, state.steps.at[row].set(count), state.steps)
        num = state.num_records + take.astype(jnp.int32)
        return updates, SNRCalibrationState(inner_state, count, num, steps, records)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_F32_MAX = float(np.finfo(np.float32).max)


def _encode_snr(x: jax.Array) -> jax.Array:
    """Finite storage of SNRs (>= 0): ``nan`` (undefined) as -1, ``inf`` as float32 max."""
    return jnp.where(jnp.isnan(x), -1.0, jnp.minimum(x, _F32_MAX))


def _decode_snr(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.where(x < 0, np.nan, np.where(x >= _F32_MAX, np.inf, x))


def snr_records(opt_state: Any, *, with_steps: bool = False) -> Any:
    """The SNR tables recorded by ``snr_calibration`` (oldest first).

    Read from its state or from any optimizer state containing it. (The step-1 record
    reflects a single gradient's square and has low SNRs; ``rules_from_snr(tables[1:])``
    leaves it out.)

    Args:
      opt_state: an ``SNRCalibrationState`` or any optimizer state holding one.
      with_steps: also return the step of each record.

    Returns:
      A list of ``snr_table``-style tables, or ``(steps, tables)`` with
      ``with_steps=True``.

    Example:
      >>> from lowbit_optax import rules_from_snr
      >>> tx = snr_calibration(optax.adam(0.1), every=2)
      >>> params = {"w": jnp.ones((4, 8))}
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for i in range(3):  # records at steps 1 and 2
      ...     grads = {"w": jnp.arange(32.0).reshape(4, 8) * (i + 1)}
      ...     _, state = update(grads, state)
      >>> steps, tables = snr_records(state, with_steps=True)
      >>> steps, list(tables[-1]["w"])
      ([1, 2], [(0,), (1,), (0, 1)])
      >>> rules_from_snr(tables)  # rows are smooth here: average along axis 1
      {'w': (1,)}
    """
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
    for path, r in leaves_with_paths(state.records, is_leaf=is_empty):
        if is_empty(r):
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
