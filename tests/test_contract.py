"""The contract battery: every public transform and alias must pass every check.

Add each new public transform or alias to ``REGISTRY`` (one ``Entry``). A check an
entry is known to fail is listed in ``Entry.xfail`` with the reason; those run as
strict expected failures, so a fixed failure is noticed too. The external
baselines (``optax.adamw``, ``optax.adafactor``, ``optax.contrib.galore``) show
that the battery both passes and fails.

Checks (one test function each):
  (a) ``test_parabola`` / ``test_rosenbrock``: minimises both, as optax's alias tests.
  (b) ``test_no_recompilation``: a second jitted ``update`` call does not retrace.
  (c) ``test_inject_hyperparams`` / ``test_multi_steps``: under
      ``optax.inject_hyperparams`` (``Entry.static_args`` lists shape-setting ints)
      and ``optax.MultiSteps``.
  (d) ``test_update_dtype``: update dtype equals gradient dtype (float32, bfloat16).
  (e) ``test_state_structure_stable``: same structure/shapes/dtypes after update,
      also inside ``jax.lax.cond``.
  (f) ``test_init_abstract``: ``init`` on ``jax.ShapeDtypeStruct`` params.
  (g) ``test_sharded``: 8 simulated devices, 2-D mesh, ``NamedSharding`` params.
  (h) ``test_nnx_optimizer``: ``flax.nnx.Optimizer`` trains an NNX model, plain and
      with sharding annotations.
  (i) ``test_orbax_roundtrip``: bit-exact checkpoint and exact resume.
  (j) ``test_state_bytes_formula``: ``state_bytes`` equals the documented formula.
  (k) ``test_update_temp_bound``: XLA's planned temporaries of the donated update on a
      fixed multi-leaf model stay under 1 byte per parameter (compile-only), so its
      peak is at most params + grads + state + 1 byte/param (issue 16's target).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit_optax
from lowbit_optax import state_bytes

# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

CHECKS = (
    "parabola",
    "rosenbrock",
    "no_recompilation",
    "inject_hyperparams",
    "inject_defaults",
    "extra_args",
    "lr_schedule",
    "multi_steps",
    "update_dtype",
    "state_structure",
    "init_abstract",
    "sharded",
    "sharded_explicit",
    "explicit_no_context",
    "nnx",
    "nnx_sharded",
    "orbax",
    "state_bytes",
    "update_temp",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One transform under test.

    Attributes:
      name: test id.
      factory: the public alias (called with ``learning_rate=`` plus ``kwargs``).
      kwargs: constructor arguments other than the learning rate.
      learning_rate: used by every check but the toy problems.
      problem_learning_rate: for the parabola and Rosenbrock problems.
      static_args: arguments ``optax.inject_hyperparams`` must treat as static
        (ints that set state shapes, strings, callables).
      state_bytes: the documented state-size formula, ``params -> bytes``.
      xfail: check name -> reason, for checks this entry is known to fail.
      update_dtype: the updates' dtype where it is not the gradients' (``None``: the
        gradients'); ``stochastic_rounding`` emits float32 updates by design.
      param_dtype: the params' dtype in the checks that do not set one, except those
        comparing update values to float32 precision (``inject_hyperparams``, schedule,
        ``MultiSteps``): bfloat16 for the transforms of ``lowbit_optax.weights``, whose
        work is on low-precision params (and whose update of a bf16 param is a rounded
        step, not linear in the learning rate).
      atol: absolute tolerance where two computations of the same update are compared
        (MultiSteps vs averaged gradients, sharded vs single device); 1e-5 for updates
        that pass through an SVD or QR, whose float32 rounding differs with the operand
        layout (relative differences grow on near-degenerate singular values).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    state_bytes: Callable[[Any], int]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 1e-2
    problem_learning_rate: float = 1e-1
    static_args: tuple[str, ...] = ()
    xfail: dict[str, str] = dataclasses.field(default_factory=dict)
    update_dtype: Any = None
    param_dtype: Any = jnp.float32
    atol: float = 1e-7

    def make(self, learning_rate: float | None = None) -> optax.GradientTransformation:
        lr = self.learning_rate if learning_rate is None else learning_rate
        return self.factory(learning_rate=lr, **self.kwargs)


def _itemsize(x: Any) -> int:
    return np.dtype(x.dtype).itemsize


def _adamw_bytes(params: Any) -> int:
    """Adam: int32 count + mu and nu in the params' dtype."""
    return 4 + sum(2 * x.size * _itemsize(x) for x in jax.tree.leaves(params))


def _adafactor_bytes(params: Any, min_dim_size_to_factor: int = 128) -> int:
    """Adafactor: row and column statistics for matrices whose two largest dims are
    >= 128 (plus a (1,) placeholder), full ``v`` otherwise (plus two (1,)
    placeholders); ``update`` placeholder (1,); int32 count."""
    total = 4
    for x in jax.tree.leaves(params):
        dims = sorted(x.shape)
        if x.ndim >= 2 and dims[-2] >= min_dim_size_to_factor:
            n = x.size // dims[-1] + x.size // dims[-2] + 1
        else:
            n = x.size + 2
        total += _itemsize(x) * n
    return total


def _galore_bytes(params: Any, rank: int) -> int:
    """GaLore (optax.contrib): per 2-D (m, n) leaf, r = min(rank, m, n), projector
    max(m, n) x r and Adam moments r x min(m, n); other leaves full Adam moments and an
    empty projector; two int32 counts."""
    total = 8
    for x in jax.tree.leaves(params):
        if x.ndim == 2:
            m, n = x.shape
            r = min(rank, m, n)
            total += _itemsize(x) * (max(m, n) * r + 2 * r * min(m, n))
        else:
            total += 2 * x.size * _itemsize(x)
    return total


REGISTRY: list[Entry] = [
    Entry(
        name="optax.adamw",
        factory=optax.adamw,
        kwargs=dict(weight_decay=1e-4),
        state_bytes=_adamw_bytes,
    ),
    Entry(
        name="optax.adafactor",
        factory=optax.adafactor,
        kwargs=dict(multiply_by_parameter_scale=False),
        problem_learning_rate=3e-3,
        state_bytes=_adafactor_bytes,
        static_args=("min_dim_size_to_factor", "factored", "multiply_by_parameter_scale"),
        xfail={
            "nnx_sharded": "nnx.Optimizer gives every param-structured state leaf its param's "
            "sharding annotation, but adafactor's (1,) placeholders cannot be split 4 ways",
            "explicit_no_context": "adafactor creates an array inside the jitted step that "
            "JAX places on one device, which an Explicit mesh refuses without jax.set_mesh "
            "('Length of device assignment 1 is not equal to the size of the mesh 8')",
            "inject_defaults": "inject_hyperparams traces the default "
            "min_dim_size_to_factor=128, and adafactor branches on it in Python "
            "(TracerBoolConversionError): it needs static_args",
        },
    ),
    Entry(
        name="optax.contrib.galore",
        factory=optax.contrib.galore,
        kwargs=dict(rank=8, update_proj_gap=10),
        state_bytes=lambda p: _galore_bytes(p, rank=8),
        static_args=("rank", "update_proj_gap"),
        xfail={
            "init_abstract": "galore's init reshapes the param value (calls .transpose) "
            "instead of reading shape and dtype only",
            "explicit_no_context": "galore's SVD needs its input unsharded on non-batch "
            "dims (ShardingTypeError on an Explicit mesh)",
            "sharded_explicit": "galore's SVD needs its input unsharded on non-batch dims "
            "(ShardingTypeError on an Explicit mesh)",
            "inject_defaults": "inject_hyperparams traces the default rank=128 and "
            "update_proj_gap=200, which set galore's shapes ('rank must be an int'): it "
            "needs static_args",
            "orbax": "galore keeps zero-size (0, 0) projector placeholders for non-2-D leaves, "
            "which orbax refuses to save ('Cannot save arrays with zero size')",
        },
    ),
]


# ---- quantized EMA state (lowbit_optax.quantized) -----------------------------------


def _quantized_adam_bytes(
    params: Any, mu_bits: int, nu_bits: int, log_nu: bool, block: int = 128, min_size: int = 4096
) -> int:
    """int32 count + 2 x uint32 key; per leaf with >= min_size elements and rank >= 1:
    codes at (mu_bits + nu_bits) per padded element, two float32 scales per block (three
    with the log map's base); smaller leaves: float32 mu and sqrt(nu)."""
    total = 4 + 8
    for x in jax.tree.leaves(params):
        if x.ndim >= 1 and x.size >= min_size:
            rows, blocks = x.size // x.shape[-1], -(-x.shape[-1] // block)
            total += rows * blocks * (block * (mu_bits + nu_bits) // 8 + 4 * (3 if log_nu else 2))
        else:
            total += 8 * x.size
    return total


def _scale_by_quantized_adam_lr(
    learning_rate: optax.ScalarOrSchedule,
    mu_bits=None,
    nu_bits=None,
    rounding="nearest",
    scale_dtype="float32",
    block_size=None,
    min_size=None,
    key=None,
):
    """The bare transform, chained with a learning rate so the battery can drive it
    (shape-setting arguments default to ``None``, as the library's factories do)."""
    return optax.chain(
        lowbit_optax.scale_by_quantized_adam(
            mu_bits=mu_bits,
            nu_bits=nu_bits,
            rounding=rounding,
            scale_dtype=scale_dtype,
            block_size=block_size,
            min_size=min_size,
            key=key,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


_QUANTIZED_STATIC = ("block_size", "min_size")

REGISTRY += [
    Entry(
        name="adamw_8bit",
        factory=lowbit_optax.adamw_8bit,
        state_bytes=lambda p: _quantized_adam_bytes(p, 8, 8, log_nu=False),
        static_args=_QUANTIZED_STATIC,
    ),
    Entry(
        name="adamw_4bit",
        factory=lowbit_optax.adamw_4bit,
        state_bytes=lambda p: _quantized_adam_bytes(p, 4, 4, log_nu=False),
        static_args=_QUANTIZED_STATIC,
    ),
    *(
        Entry(
            name=f"solo_adamw_{bits[0]}_{bits[1]}",
            factory=lowbit_optax.solo_adamw,
            kwargs=dict(bits=bits),
            state_bytes=lambda p, bits=bits: _quantized_adam_bytes(p, *bits, log_nu=True),
            static_args=(*_QUANTIZED_STATIC, "bits", "key", "quantile_sample"),
            problem_learning_rate=1e-2,  # SOLO's low b1 (0.6-0.8) needs a smaller lr here
        )
        for bits in ((4, 2), (3, 3), (2, 2))
    ),
    Entry(
        name="scale_by_quantized_adam_3bit_stochastic",
        factory=_scale_by_quantized_adam_lr,
        kwargs=dict(mu_bits=3, nu_bits=3, rounding="stochastic", scale_dtype="bfloat16"),
        state_bytes=lambda p: (
            _quantized_adam_bytes(p, 3, 3, log_nu=False)
            - sum(
                2 * 2 * (x.size // x.shape[-1]) * -(-x.shape[-1] // 128)
                for x in jax.tree.leaves(p)
                if x.size >= 4096
            )
        ),  # bfloat16 scales: 2 bytes less per scale
        static_args=("mu_bits", "nu_bits", *_QUANTIZED_STATIC, "key"),
    ),
]


# ---- any optimizer's state quantized (lowbit_optax.quantize_state) ------------------


def _any_state_bytes(params: Any, fields: int, counts: int, bits: int = 8, muon=False) -> int:
    """``counts`` int32 counts; per leaf and each of ``fields`` parameter-shaped state
    fields: with >= 4096 elements and rank >= 1, codes at ``bits`` per padded element
    and a float32 scale per block of 128, else the field in the param dtype. ``muon``:
    2-D leaves have one field (the momentum; plus Muon's 3 float32 coefficients), the
    others Adam's two, and Muon's and Adam's counts are both there."""
    total = 4 * counts
    for x in jax.tree.leaves(params):
        n = (1 if x.ndim == 2 else 2) if muon else fields
        if x.ndim >= 1 and x.size >= 4096:
            rows, blocks = x.size // x.shape[-1], -(-x.shape[-1] // 128)
            total += n * rows * blocks * (128 * bits // 8 + 4)
        else:
            total += n * x.size * _itemsize(x)
    return total + (4 * 3 if muon else 0)


_ANY_STATIC = ("block_size", "min_size")


def _lion_q4_sr(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
) -> optax.GradientTransformation:
    """Lion's momentum in 4 bits, rounded stochastically."""
    inner = optax.lion(learning_rate, b1, b2, weight_decay=weight_decay)
    return lowbit_optax.quantize_state(inner, bits=4, rounding="stochastic")


REGISTRY += [
    Entry(
        name="lion_8bit",
        factory=lowbit_optax.lion_8bit,
        state_bytes=lambda p: _any_state_bytes(p, fields=1, counts=1),
        static_args=_ANY_STATIC,
        learning_rate=1e-3,
        problem_learning_rate=3e-3,  # Lion moves every value by lr per step
    ),
    Entry(
        name="sgd_momentum_8bit",
        factory=lowbit_optax.sgd_momentum_8bit,
        kwargs=dict(nesterov=True),
        state_bytes=lambda p: _any_state_bytes(p, fields=1, counts=0),
        static_args=(*_ANY_STATIC, "nesterov"),
        problem_learning_rate=1e-3,
    ),
    Entry(
        name="muon_8bit",
        factory=lowbit_optax.muon_8bit,
        state_bytes=lambda p: _any_state_bytes(p, fields=0, counts=2, muon=True),
        static_args=(*_ANY_STATIC, "ns_steps", "nesterov"),
        xfail={
            "update_temp": "2.67 B/param: optax.contrib.muon's Newton-Schulz step of one "
            "matrix (its float32 iterates and Gram products, inner's own math) runs whole",
        },
    ),
    Entry(
        name="ademamix_8bit",
        factory=lowbit_optax.ademamix_8bit,
        state_bytes=lambda p: _any_state_bytes(p, fields=3, counts=2),
        static_args=_ANY_STATIC,
    ),
    Entry(
        name="quantize_state(lion, bits=4, rounding='stochastic')",
        factory=_lion_q4_sr,
        # the stochastic-rounding key: two uint32 words
        state_bytes=lambda p: _any_state_bytes(p, fields=1, counts=1, bits=4) + 8,
        learning_rate=1e-3,
        problem_learning_rate=3e-3,
    ),
]


# ---- low-precision weights (lowbit_optax.weights) -------------------------------------


def _adamw_then(last: Callable[[], optax.GradientTransformation]) -> Callable[..., Any]:
    """A factory: optax.adamw, then ``last()`` on the updates of bf16 params."""

    def factory(
        learning_rate: optax.ScalarOrSchedule,
        b1: float = 0.9,
        b2: float = 0.999,
        weight_decay: float = 1e-4,
    ) -> optax.GradientTransformation:
        return optax.chain(optax.adamw(learning_rate, b1, b2, weight_decay=weight_decay), last())

    return factory


_adamw_sr = _adamw_then(lowbit_optax.stochastic_rounding)
_adamw_compensated = _adamw_then(lowbit_optax.compensated)


def _eco_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
) -> optax.GradientTransformation:
    """ECO around 8-bit Adam moments, stochastic rounding of the bf16 weights."""
    return lowbit_optax.eco(
        lowbit_optax.scale_by_quantized_adam(b1, b2, eps),
        learning_rate,
        weight_decay,
        rounding="stochastic",
    )


def _narrow_bytes(params: Any) -> int:
    """Bytes of the params stored in fewer than 32 bits (one buffer of their dtype)."""
    return sum(x.size * _itemsize(x) for x in jax.tree.leaves(params) if _itemsize(x) < 4)


# The weight transforms (lowbit_optax.weights) act on low-precision params only: their
# checks run on bfloat16 params. By design they emit float32 updates (SR(p + u) - p and
# the like, exact), so that optax.apply_updates lands exactly on the rounded value.
REGISTRY += [
    Entry(
        name="adamw_stochastic_rounding",
        factory=_adamw_sr,
        state_bytes=lambda p: _adamw_bytes(p) + 8,  # the key: two uint32 words
        update_dtype=jnp.float32,
        param_dtype=jnp.bfloat16,
    ),
    Entry(
        name="adamw_compensated",
        factory=_adamw_compensated,
        state_bytes=lambda p: _adamw_bytes(p) + _narrow_bytes(p),
        update_dtype=jnp.float32,
        param_dtype=jnp.bfloat16,
    ),
    Entry(
        name="eco(scale_by_quantized_adam, rounding='stochastic')",
        factory=_eco_8bit,
        # eco's count and key, then the inner 8-bit Adam's
        state_bytes=lambda p: 4 + 8 + _quantized_adam_bytes(p, 8, 8, log_nu=False),
        update_dtype=jnp.float32,
        param_dtype=jnp.bfloat16,
    ),
]


# ---- SNR-selective second moments (lowbit_optax.snr) --------------------------------


def _slim_bytes(
    params: Any,
    rules: Any,
    mu_bits: int | None = None,
    nu_bits: int | None = None,
    block: int = 128,
    min_size: int = 4096,
) -> int:
    """int32 count; per leaf: ``mu`` (param dtype, or with ``mu_bits`` and >= min_size
    elements: codes at mu_bits per padded element plus a float32 scale per block) and
    ``nu`` reduced over the leaf's axes (same rule with ``nu_bits``)."""

    def moment(shape: tuple[int, ...], bits: int | None, itemsize: int) -> int:
        size = math.prod(shape)
        if bits is None or not shape or size < min_size:
            return itemsize * size
        rows, blocks = size // shape[-1], -(-shape[-1] // block)
        return rows * blocks * (block * bits // 8 + 4)

    total = 4
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, x in flat:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        axes = rules(name, x)
        reduced = tuple(1 if i in (axes or ()) else d for i, d in enumerate(x.shape))
        # float moments: mu in the param dtype (float32 beside a quantized codec), nu in
        # the param dtype
        mu_item = 4 if mu_bits is not None else _itemsize(x)
        if nu_bits is not None:  # a quantized reduced nu is laid out as (1, ..., 1, size)
            reduced = (1,) * (len(reduced) - 1) + (math.prod(reduced),)
        total += moment(x.shape, mu_bits, mu_item) + moment(reduced, nu_bits, _itemsize(x))
    return total


_SLIM_TABLE = {"embed": (0,), "dense/kernel": (1,), "dense/bias": None, "odd": (0, 1)}


def _SLIM_RULES(path: str, leaf: Any) -> tuple[int, ...] | None:
    """The table above for the shared params; every axis for other trees' leaves."""
    return _SLIM_TABLE[path] if path in _SLIM_TABLE else tuple(range(len(leaf.shape)))


_SLIM_STATIC = ("rules", "mu_bits", "nu_bits", "block_size", "min_size", "mu_dtype")


def _calibration_lr(learning_rate: optax.ScalarOrSchedule, every=None, max_records=None):
    """optax.adamw wrapped in the SNR recorder (a record every 3 steps, 4 kept)."""
    return lowbit_optax.snr_calibration(
        optax.adamw(learning_rate, weight_decay=1e-4),
        every=3 if every is None else every,
        max_records=4 if max_records is None else max_records,
    )


def _calibration_bytes(params: Any, max_records: int = 4) -> int:
    """optax.adamw's state + int32 count, record counter and record steps + float32 SNR
    records (max_records x number of non-empty axis subsets) per leaf of rank >= 1."""
    records = sum(4 * max_records * (2**x.ndim - 1) for x in jax.tree.leaves(params) if x.ndim)
    return _adamw_bytes(params) + 8 + 4 * max_records + records


REGISTRY += [
    Entry(
        name="slim_adamw",
        factory=lowbit_optax.slim_adamw,
        kwargs=dict(rules=lowbit_optax.flax_default_rules),
        state_bytes=lambda p: _slim_bytes(p, lowbit_optax.flax_default_rules),
        static_args=_SLIM_STATIC,
    ),
    Entry(
        name="slim_adamw_mu4",
        factory=lowbit_optax.slim_adamw,
        kwargs=dict(rules=_SLIM_RULES, mu_bits=4),
        state_bytes=lambda p: _slim_bytes(p, _SLIM_RULES, mu_bits=4),
        static_args=_SLIM_STATIC,
    ),
    Entry(
        name="slim_adamw_mu8_nu8",
        factory=lowbit_optax.slim_adamw,
        kwargs=dict(rules=_SLIM_RULES, mu_bits=8, nu_bits=8, min_size=64),
        state_bytes=lambda p: _slim_bytes(p, _SLIM_RULES, mu_bits=8, nu_bits=8, min_size=64),
        static_args=_SLIM_STATIC,
    ),
    Entry(
        name="snr_calibration",
        factory=_calibration_lr,
        state_bytes=_calibration_bytes,
        static_args=("every", "max_records"),
    ),
]


# ---- low-rank projection (lowbit_optax.projection) -----------------------------------

_PROJ = dict(rank=0.25, min_dim=32)


def _low_shapes(params: Any, rank: float = 0.25, min_dim: int = 32) -> tuple[Any, int]:
    """The inner transform's tree (projected 2-D leaves in their low-rank shape: m x r
    for m >= n, r x n otherwise, r = round(rank * min(m, n))) and the number of
    projector entries (K x r per projected leaf)."""
    s_entries = 0

    def low(x):
        nonlocal s_entries
        if x.ndim != 2 or min(x.shape) < min_dim:
            return x
        m, n = x.shape
        k = min(m, n)
        r = max(1, round(rank * k))
        s_entries += k * r
        return jnp.zeros((m, r) if m >= n else (r, n), x.dtype)

    tree = jax.tree.map(low, params)
    return tree, s_entries


def _projected_bytes(
    params: Any, inner_bytes: Callable[[Any], int], proj_item: int = 4, recover: bool = False
) -> int:
    """int32 count + 2 x uint32 key + float32 projectors + the inner state on the
    low-rank tree (+ one float32 residual norm per projected leaf with recover)."""
    tree, s_entries = _low_shapes(params, **_PROJ)
    n_projected = sum(
        x.ndim == 2 and min(x.shape) >= _PROJ["min_dim"] for x in jax.tree.leaves(params)
    )
    return 4 + 8 + proj_item * s_entries + inner_bytes(tree) + (4 * n_projected if recover else 0)


def _projection_args(rank, min_dim, update_interval) -> dict[str, Any]:
    """The bare wrappers' defaults: rank 1/4, min_dim 32, an event every 2 steps."""
    given = dict(rank=rank, min_dim=min_dim, update_interval=update_interval)
    return {**_PROJ, "update_interval": 2} | {k: v for k, v in given.items() if v is not None}


def _low_rank_lr(
    learning_rate: optax.ScalarOrSchedule,
    rank=None,
    min_dim=None,
    update_interval=None,
    proj_dtype=None,
    projector="subtrack",
    moments="rotate",
    recover=False,
):
    """The bare wrapper around optax.scale_by_adam, chained with a learning rate (rank
    1/4, min_dim 32, an event every 2 steps by default)."""
    return optax.chain(
        lowbit_optax.low_rank_projection(
            optax.scale_by_adam(),
            **_projection_args(rank, min_dim, update_interval),
            proj_dtype=proj_dtype,
            projector=projector,
            moments=moments,
            recover=recover,
            moment_betas=(0.9, 0.999),
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def _low_rank_8bit_lr(
    learning_rate: optax.ScalarOrSchedule,
    rank=None,
    min_dim=None,
    update_interval=None,
    block_size=None,
    min_size=None,
):
    """GaLore's projector over the 8-bit Adam, its moments rotated at each refresh through
    the quantized state's moment access (betas read from it); rank 1/4, min_dim 32, an
    event every 2 steps, blocks of 64, quantized from 256 elements by default."""
    inner = lowbit_optax.scale_by_quantized_adam(
        block_size=64 if block_size is None else block_size,
        min_size=256 if min_size is None else min_size,
    )
    return optax.chain(
        lowbit_optax.low_rank_projection(
            inner,
            **_projection_args(rank, min_dim, update_interval),
            moments="rotate",
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


_PROJ_STATIC = ("rank", "min_dim", "update_interval", "proj_dtype")

REGISTRY += [
    Entry(
        name="galore_adamw",
        factory=lowbit_optax.galore_adamw,
        kwargs=dict(**_PROJ, update_interval=2),
        state_bytes=lambda p: _projected_bytes(p, _adamw_bytes),
        static_args=_PROJ_STATIC,
        atol=1e-5,
    ),
    Entry(
        name="coap_adamw",
        factory=lowbit_optax.coap_adamw,
        kwargs=dict(**_PROJ, update_interval=2, reproject_factor=2),
        state_bytes=lambda p: _projected_bytes(p, _adamw_bytes),
        static_args=(*_PROJ_STATIC, "reproject_factor", "scale_aware", "power_iters"),
        # COAP: QR, P step, and the first range finder's power iterations, which on
        # the battery's random (gapless) gradients amplify float32 reordering to ~2e-4
        atol=3e-4,
    ),
    Entry(
        name="subtrack_adamw",
        factory=lowbit_optax.subtrack_adamw,
        kwargs=dict(**_PROJ, update_interval=2),
        state_bytes=lambda p: _projected_bytes(p, _adamw_bytes),
        static_args=(*_PROJ_STATIC, "moments", "recover"),
        # the first step's SVD (of Gk^T) on MultiSteps' averaged gradient vs the mean
        # taken here: 1.1e-5 on 4 of 32768 entries of a near-degenerate direction
        atol=3e-5,
    ),
    Entry(
        name="coap_adamw_8bit",
        factory=lowbit_optax.coap_adamw_8bit,
        # float32 S here (the recipe defaults to bfloat16, covered by the bf16 entry
        # below) and the one-pass first range finder (coap_adamw's entry covers the
        # power iterations): a 1-ulp bfloat16 flip of S, or the ~2e-4 that the power
        # iterations make of float32 reordering, between the sharded and the
        # single-device run flips 8-bit codes, beyond any tolerance of the comparison
        kwargs=dict(
            **_PROJ,
            update_interval=2,
            reproject_factor=2,
            proj_dtype=jnp.float32,
            power_iters=0,
        ),
        state_bytes=lambda p: _projected_bytes(
            p, lambda t: _quantized_adam_bytes(t, 8, 8, log_nu=False, block=64)
        ),
        static_args=(
            *_PROJ_STATIC,
            "reproject_factor",
            "scale_aware",
            "power_iters",
            "block_size",
            "min_size",
        ),
        atol=1e-4,  # COAP's QR and P step amplify float32 reordering a little more
    ),
    Entry(
        name="low_rank_projection_subtrack_rotate_recover_bf16",
        factory=_low_rank_lr,
        kwargs=dict(**_PROJ, update_interval=2, proj_dtype=jnp.bfloat16, recover=True),
        state_bytes=lambda p: _projected_bytes(p, _adamw_bytes, proj_item=2, recover=True),
        static_args=(*_PROJ_STATIC, "projector", "moments", "recover"),
        atol=1e-3,  # S stored in bfloat16: a float32 difference can flip its rounding
    ),
    Entry(
        name="low_rank_projection_svd_rotate_8bit",
        factory=_low_rank_8bit_lr,
        kwargs=dict(**_PROJ, update_interval=2),
        state_bytes=lambda p: _projected_bytes(
            p, lambda t: _quantized_adam_bytes(t, 8, 8, log_nu=False, block=64, min_size=256)
        ),
        static_args=("rank", "min_dim", "update_interval", "block_size", "min_size"),
        atol=1e-4,
    ),
]


# --------------------------------------------------------------------------------------
# Error feedback and windowed preconditioners
# --------------------------------------------------------------------------------------


def _num(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _window_bytes(params: Any, m: int, density: float | None) -> int:
    """int32 count + 2 x uint32 key + the window (dense m x d float32; sparse, per row of
    each param along its last axis, k = round(density * cols) float32 values + int32
    indices, and a float32 accumulator of d) + the m x m float32 Gram."""
    d = _num(params)
    if density is None:
        window = 4 * m * d
    else:
        window = 4 * d
        for x in jax.tree.leaves(params):
            cols = x.shape[-1] if x.ndim else 1
            window += 8 * m * (x.size // cols) * min(cols, max(1, round(density * cols)))
    return 4 + 8 + window + 4 * m * m


def _ef_sgd(learning_rate: optax.ScalarOrSchedule, compressor=None, accumulator_dtype=None):
    """Error-feedback SGD: the transform (top-k at 10% in blocks of 64 by default)
    chained before optax.sgd."""
    if compressor is None:
        compressor = lowbit_optax.top_k(0.1, block_size=64)
    return optax.chain(
        lowbit_optax.error_feedback(compressor, accumulator_dtype=accumulator_dtype),
        optax.sgd(learning_rate),
    )


def _ef_bytes(params: Any, item: int = 4, q_rank: int | None = None) -> int:
    """int32 count + 2 x uint32 key + the accumulator (+ PowerSGD's Q, n x r per 2-D leaf
    with min(m, n) > r)."""
    total = 4 + 8 + item * _num(params)
    if q_rank is not None:
        for x in jax.tree.leaves(params):
            if x.ndim >= 2 and min(x.size // x.shape[-1], x.shape[-1]) > q_rank:
                total += 4 * x.shape[-1] * q_rank
    return total


REGISTRY += [
    Entry(
        name="mfac",
        factory=lowbit_optax.mfac,
        kwargs=dict(num_grads=8, damping=1.0),
        problem_learning_rate=2e-2,
        state_bytes=lambda p: _window_bytes(p, 8, None),
        static_args=("num_grads", "damping"),
        learning_rate=1e-1,
        atol=1e-5,
    ),
    Entry(
        name="sparse_mfac",
        factory=lowbit_optax.sparse_mfac,
        # damping 3: with one entry per row kept (5% of 2-3 values), damping 1 at lr 2e-2
        # wanders along Rosenbrock's valley (8% off after 10k steps) and lr 5e-3 is too slow
        # for the parabola; damping 3 at 2e-2 solves both within 0.6%
        kwargs=dict(num_grads=8, damping=3.0, density=0.05),
        problem_learning_rate=2e-2,
        state_bytes=lambda p: _window_bytes(p, 8, 0.05),
        static_args=("num_grads", "damping", "density"),
        learning_rate=1e-1,
        atol=1e-5,
    ),
    Entry(
        name="ggt",
        factory=lowbit_optax.ggt,
        kwargs=dict(num_grads=8, eps=1e-1),
        problem_learning_rate=1e-2,
        state_bytes=lambda p: _window_bytes(p, 8, None),
        static_args=("num_grads",),
        learning_rate=1e-1,
        # the eigendecomposition of the Gram matrix of two nearly parallel gradients:
        # float32 rounding of the small eigenvalue moves the update by ~1e-3
        atol=5e-3,
    ),
    Entry(
        name="sparse_ggt",
        factory=lowbit_optax.sparse_ggt,
        kwargs=dict(num_grads=8, eps=1e-1, density=0.05),
        problem_learning_rate=1e-2,
        state_bytes=lambda p: _window_bytes(p, 8, 0.05),
        static_args=("num_grads", "density"),
        learning_rate=1e-1,
        atol=5e-3,  # as ggt
    ),
    Entry(
        name="error_feedback_top_k_sgd",
        factory=_ef_sgd,
        kwargs=dict(compressor=lowbit_optax.top_k(0.1, block_size=64)),
        state_bytes=_ef_bytes,
        static_args=("compressor", "accumulator_dtype"),
        problem_learning_rate=2e-3,
    ),
    Entry(
        name="error_feedback_low_rank_sgd",
        factory=_ef_sgd,
        kwargs=dict(compressor=lowbit_optax.low_rank(2)),
        state_bytes=lambda p: _ef_bytes(p, q_rank=2),
        static_args=("compressor", "accumulator_dtype"),
        problem_learning_rate=2e-3,
        atol=1e-5,  # QR
    ),
    Entry(
        name="error_feedback_sign_sgd_bf16",
        factory=_ef_sgd,
        kwargs=dict(
            compressor=lowbit_optax.quantizer(1, block_size=64),
            accumulator_dtype=jnp.bfloat16,
        ),
        state_bytes=lambda p: _ef_bytes(p, item=2),
        static_args=("compressor", "accumulator_dtype"),
        problem_learning_rate=2e-3,
        atol=1e-3,  # a bfloat16 accumulator
    ),
]


# (k): entries whose update needs more than TEMP_BOUND of temporaries on MEMORY_SHAPES,
# with the figure measured (bytes/param) and the reason.
_PROJ_TEMP = (
    "the inner transform takes the whole rank-r projected gradient tree at once "
    "(4 r / K bytes per projected parameter: ~0.93 B/param here, rank 1/4 with every "
    "leaf projected), plus one leaf's update and an event's decompositions"
)
_WINDOW_TEMP = (
    "the window preconditioners hold float32 copies of each param's gradient and "
    "direction (the sparse ones also the accumulator, its top-k magnitudes and the "
    "scattered new row); their state is far above adamw's anyway"
)
_TEMP_XFAIL = {
    "optax.adafactor": "4.07 B/param: float32 squared gradients and factored statistics",
    "optax.contrib.galore": "3.98 B/param: full-size projections back, all leaves at once",
    "galore_adamw": f"1.61 B/param: {_PROJ_TEMP}",
    "coap_adamw": f"1.83 B/param: {_PROJ_TEMP}",
    "subtrack_adamw": f"1.75 B/param: {_PROJ_TEMP}",
    "coap_adamw_8bit": f"1.82 B/param: {_PROJ_TEMP}",
    "low_rank_projection_subtrack_rotate_recover_bf16": f"3.28 B/param: {_PROJ_TEMP}; the "
    "recovered residual needs a float32 copy of the gradient in the event's orientation",
    "low_rank_projection_svd_rotate_8bit": f"1.75 B/param: {_PROJ_TEMP}",
    "mfac": f"8.06 B/param: {_WINDOW_TEMP}",
    "sparse_mfac": f"17.3 B/param: {_WINDOW_TEMP}",
    "ggt": f"8.06 B/param: {_WINDOW_TEMP}",
    "sparse_ggt": f"17.3 B/param: {_WINDOW_TEMP}",
    "adamw_compensated": "4.00 B/param on bf16 params: the new weight reads the old "
    "compensation and the new compensation the old weight, each written over the other's "
    "input; XLA on CPU has no multi-output fusion, so it keeps a copy of the compensation "
    "and the update both of them read (2 + 2 B/param)",
    "eco(scale_by_quantized_adam, rounding='stochastic')": "9.89 B/param on bf16 params: "
    "the inner transform's whole update tree (float32) exists before the rounding pass, "
    "which decodes each leaf's moments again and encodes the corrected first moment",
    "error_feedback_top_k_sgd": "4.53 B/param: the top-k selection spans the whole leaf "
    "(its magnitudes, the selection and the dense result, one leaf at a time)",
}
REGISTRY = [
    dataclasses.replace(e, xfail={**e.xfail, "update_temp": _TEMP_XFAIL[e.name]})
    if e.name in _TEMP_XFAIL
    else e
    for e in REGISTRY
]


def cases(check: str) -> list[Any]:
    assert check in CHECKS, check
    out = []
    for e in REGISTRY:
        marks = []
        if check in e.xfail:
            marks.append(pytest.mark.xfail(reason=e.xfail[check], strict=True))
        out.append(pytest.param(e, id=e.name, marks=marks))
    return out


def test_registry_xfail_names_are_checks():
    for e in REGISTRY:
        unknown = set(e.xfail) - set(CHECKS)
        assert not unknown, f"{e.name}: unknown check names in xfail: {unknown}"


# --------------------------------------------------------------------------------------
# Shared fixtures: a small parameter tree with a quantizable matrix, a non-square
# matrix, a vector and a tiny odd-shaped leaf; sharding specs for a 2x4 mesh.
# --------------------------------------------------------------------------------------

SHAPES = {
    "embed": (256, 128),
    "dense": {"kernel": (128, 64), "bias": (64,)},
    "odd": (3, 5),
}
SPECS = {
    "embed": P("data", "model"),
    "dense": {"kernel": P(None, "model"), "bias": P("model")},
    "odd": P(),
}


def make_params(dtype: Any = jnp.float32, seed: int = 0) -> Any:
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    arrays = [0.1 * jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, arrays)


def loss_fn(params: Any, target: Any) -> jax.Array:
    """A smooth, non-separable objective on the parameter tree."""
    sq = [
        jnp.sum((p.astype(jnp.float32) - t) ** 2)
        for p, t in zip(*map(jax.tree.leaves, (params, target)), strict=True)
    ]
    coupling = jnp.sum(params["dense"]["kernel"].astype(jnp.float32) ** 2) * jnp.sum(
        params["dense"]["bias"].astype(jnp.float32) ** 2
    )
    return sum(sq) + 0.1 * coupling


TARGET = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), make_params())


def grads_at(params: Any) -> Any:
    g = jax.grad(loss_fn)(params, TARGET)
    return jax.tree.map(lambda x, p: x.astype(p.dtype), g, params)


def abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def assert_finite(tree: Any, what: str) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(x))), f"{what}{jax.tree_util.keystr(path)} not finite"


def assert_same_shardings(tree: Any, shardings: Any) -> None:
    """Every leaf of ``tree`` is laid out as the matching leaf of ``shardings``."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, x), s0 in zip(flat, jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s0, x.ndim), (
            f"state{jax.tree_util.keystr(path)}: {x.sharding} != {s0}"
        )


def train_step(tx: optax.GradientTransformation):
    """The pure (params, state) -> (params, state) step every check jits its own way."""

    def step(params, state):
        updates, state = tx.update(grads_at(params), state, params)
        return optax.apply_updates(params, updates), state

    return step


# --------------------------------------------------------------------------------------
# (a) toy problems, as optax's alias tests
# --------------------------------------------------------------------------------------


def _minimise(tx: optax.GradientTransformation, objective, init, steps: int) -> jax.Array:
    @jax.jit
    def run(params):
        state = tx.init(params)

        def body(_, carry):
            params, state = carry
            g = jax.grad(objective)(params)
            updates, state = tx.update(g, state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, steps, body, (params, state))[0]

    return run(init)


@pytest.mark.parametrize("entry", cases("parabola"))
def test_parabola(entry: Entry):
    final = jnp.array([1.0, -1.0, 1.0])
    params = _minimise(
        entry.make(entry.problem_learning_rate),
        lambda p: jnp.sum((p - final) ** 2),
        jnp.array([-1.0, 10.0, 1.0]),
        steps=10_000,
    )
    np.testing.assert_allclose(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("entry", cases("rosenbrock"))
def test_rosenbrock(entry: Entry):
    a, b = 1.0, 100.0
    params = _minimise(
        entry.make(entry.problem_learning_rate),
        lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2,
        jnp.array([0.0, 0.0]),
        steps=10_000,
    )
    np.testing.assert_allclose(params, jnp.array([a, a**2]), rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------------------
# (b) no recompilation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", cases("no_recompilation"))
def test_no_recompilation(entry: Entry):
    tx = entry.make()
    params = make_params(entry.param_dtype)
    state = tx.init(params)

    traces = []

    def step(params, state):
        traces.append(1)  # runs once per trace, never when a compiled call is reused
        return train_step(tx)(params, state)

    # Donated, as a training loop does: fails if init hands out one buffer twice.
    step = jax.jit(step, donate_argnums=(0, 1))

    for _ in range(3):  # init's state, then update's state, must share one compilation
        params, state = step(params, state)
    assert len(traces) == 1 and step._cache_size() == 1, (len(traces), step._cache_size())


# --------------------------------------------------------------------------------------
# (c) inject_hyperparams and MultiSteps
# --------------------------------------------------------------------------------------


def _run_updates(tx, params, grads_seq, update=None, state=None):
    """The updates of ``grads_seq`` in turn from ``state`` (default: ``tx.init``), with
    ``update`` (default: ``jax.jit(tx.update)``; pass one to reuse its compilation)."""
    state = tx.init(params) if state is None else state
    update = jax.jit(tx.update) if update is None else update
    out = []
    for g in grads_seq:
        u, state = update(g, state, params)
        out.append(u)
    return out, state


@pytest.mark.parametrize("entry", cases("inject_hyperparams"))
def test_inject_hyperparams(entry: Entry):
    params = make_params()
    grads_seq = [grads_at(params), jax.tree.map(lambda g: -0.5 * g, grads_at(params))]
    injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)
    lr = entry.learning_rate

    plain, _ = _run_updates(entry.make(lr), params, grads_seq)
    tx = injected(learning_rate=lr, **entry.kwargs)
    update = jax.jit(tx.update)  # compiled once for both runs
    inj, state = _run_updates(tx, params, grads_seq, update)
    assert "learning_rate" in state.hyperparams
    chex.assert_trees_all_close(inj, plain, rtol=1e-5, atol=1e-7)

    # The learning rate is a traced hyperparameter: doubling it doubles the update.
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(
        2 * lr, state.hyperparams["learning_rate"].dtype
    )
    u2, _ = update(grads_seq[0], state, params)
    chex.assert_trees_all_close(u2, jax.tree.map(lambda u: 2 * u, plain[0]), rtol=1e-5, atol=1e-7)


# The numeric hyperparameters every Adam-like alias takes, and values that change its
# second update (from the defaults 0.9, 0.999, small eps, small weight decay)
# b1 = 0.99, above every default: Lion's sign(b1 mu + (1 - b1) g) on the check's steps
# (g, then -g/2; mu = (1 - b2) g) flips only for b1 above 1 / (1 + 2 (1 - b2)).
_INJECTED = {"b1": 0.99, "b2": 0.9, "eps": 0.5, "weight_decay": 0.5, "damping": 0.5}


@pytest.mark.parametrize("entry", cases("inject_defaults"))
def test_inject_hyperparams_with_defaults(entry: Entry):
    """``optax.inject_hyperparams(factory)(learning_rate=lr)``, as with ``optax.adamw``:
    no ``static_args``, every other argument at its default. The updates equal the plain
    transform's, and the numeric hyperparameters it injects act when set."""
    params = make_params()
    grads_seq = [grads_at(params), jax.tree.map(lambda g: -0.5 * g, grads_at(params))]
    lr = entry.learning_rate
    injected = optax.inject_hyperparams(entry.factory)
    plain, _ = _run_updates(entry.factory(learning_rate=lr), params, grads_seq)
    tx = injected(learning_rate=lr)
    update = jax.jit(tx.update)  # one compilation for these updates and every set below
    inj, _ = _run_updates(tx, params, grads_seq, update)
    chex.assert_trees_all_close(inj, plain, rtol=1e-5, atol=1e-7)
    names = sorted(set(_INJECTED) & set(tx.init(params).hyperparams))
    for name in ["learning_rate", *names]:
        state = tx.init(params)
        state.hyperparams[name] = jnp.asarray(
            2 * lr if name == "learning_rate" else _INJECTED[name],
            state.hyperparams[name].dtype,
        )
        _, state = update(grads_seq[0], state, params)
        u, _ = update(grads_seq[1], state, params)
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(*map(jax.tree.leaves, (u, plain[1])), strict=True)
        )
        assert diff > 1e-6, f"{entry.name}: setting hyperparams[{name!r}] did not change the update"


@pytest.mark.parametrize("entry", cases("extra_args"))
def test_update_accepts_extra_args(entry: Entry):
    """``update(..., some_keyword=...)`` is accepted and ignored
    (``optax.GradientTransformationExtraArgs``), as optax's optimizers do."""
    params = make_params(entry.param_dtype)
    tx = entry.make()
    assert isinstance(tx, optax.GradientTransformationExtraArgs), type(tx)
    state = tx.init(params)
    u, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, unexpected_extra_arg=1))(
        grads_at(params), state, params
    )
    want, _ = jax.jit(tx.update)(grads_at(params), tx.init(params), params)
    chex.assert_trees_all_close(u, want)


@pytest.mark.parametrize("entry", cases("lr_schedule"))
def test_learning_rate_schedule(entry: Entry):
    """Where ``learning_rate`` is annotated ``ScalarOrSchedule``, a constant schedule
    gives the same updates as the number."""
    import inspect

    annotation = inspect.signature(entry.factory).parameters["learning_rate"].annotation
    schedules = (optax.ScalarOrSchedule, optax.ScalarOrSchedule | None)
    if annotation not in schedules and "ScalarOrSchedule" not in str(annotation):
        pytest.fail(f"{entry.name}: learning_rate is annotated {annotation!r}")
    params = make_params()
    grads_seq = [grads_at(params), jax.tree.map(lambda g: -0.5 * g, grads_at(params))]
    lr = entry.learning_rate
    plain, _ = _run_updates(entry.make(lr), params, grads_seq)
    sched, _ = _run_updates(entry.make(optax.constant_schedule(lr)), params, grads_seq)
    chex.assert_trees_all_close(sched, plain, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("entry", cases("multi_steps"))
def test_multi_steps(entry: Entry):
    params = make_params()
    g1 = grads_at(params)
    g2 = jax.tree.map(lambda g: 0.25 - 0.5 * g, g1)
    ms = optax.MultiSteps(entry.make(), every_k_schedule=2)
    (u1, u2), state = _run_updates(ms, params, [g1, g2])

    chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, u1))
    (expected,), _ = _run_updates(
        entry.make(), params, [jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)]
    )
    chex.assert_trees_all_close(u2, expected, rtol=1e-5, atol=entry.atol)
    assert int(state.gradient_step) == 1


# --------------------------------------------------------------------------------------
# (d) dtypes, (e) state structure, (f) abstract init
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("entry", cases("update_dtype"))
def test_update_dtype(entry: Entry, dtype):
    tx = entry.make()
    params = make_params(dtype)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(2):
        grads = grads_at(params)
        updates, state = update(grads, state, params)
        chex.assert_trees_all_equal_dtypes(updates, _as_update(entry, grads))
        assert_finite(updates, "updates")
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal_dtypes(params, make_params(dtype))


def _as_update(entry: Entry, grads: Any) -> Any:
    """``grads`` in the dtype ``entry``'s updates have."""
    if entry.update_dtype is None:
        return grads
    return jax.tree.map(lambda g: g.astype(entry.update_dtype), grads)


def _structure(tree: Any) -> Any:
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("entry", cases("state_structure"))
def test_state_structure_stable(entry: Entry, dtype):
    tx = entry.make()
    params = make_params(dtype)
    state0 = tx.init(params)

    @jax.jit
    def cond_update(pred, grads, state, params):
        # lax.cond requires both branches to return identical types; one compilation
        # serves the plain first update (pred True: the branch is tx.update) as well
        return jax.lax.cond(
            pred,
            lambda: tx.update(grads, state, params),
            lambda: (jax.tree.map(jnp.zeros_like, _as_update(entry, grads)), state),
        )

    _, state1 = cond_update(True, grads_at(params), state0, params)
    assert _structure(state1) == _structure(state0)
    for pred in (True, False):
        _updates, state2 = cond_update(pred, grads_at(params), state1, params)
        assert _structure(state2) == _structure(state0)
        assert_finite(state2, "state")


@pytest.mark.parametrize("entry", cases("init_abstract"))
def test_init_abstract(entry: Entry):
    tx = entry.make()
    params = make_params(entry.param_dtype)
    state_abstract = tx.init(abstract(params))  # called directly: must not read values
    assert _structure(state_abstract) == _structure(tx.init(params))


# --------------------------------------------------------------------------------------
# (g) sharding on 8 simulated devices
# --------------------------------------------------------------------------------------


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize("entry", cases("sharded"))
def test_sharded(entry: Entry):
    mesh = _mesh()
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
    params = jax.device_put(make_params(entry.param_dtype), param_shardings)
    tx = entry.make()
    # what a user does: the library's recommended layout (lowbit_optax.state_shardings)
    shardings = lowbit_optax.state_shardings(tx, params)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings)), (
        "no state leaf is sharded: the harness did not map the params' shardings"
    )

    state = lowbit_optax.sharded_init(tx, params)
    assert_same_shardings(state, shardings)

    # No out_shardings: the update's own sharding propagation must keep the layout.
    step = jax.jit(train_step(tx), donate_argnums=(0, 1))
    for _ in range(3):
        params, state = step(params, state)
        assert_same_shardings(state, shardings)
        assert_same_shardings(params, param_shardings)
    assert step._cache_size() == 1
    assert_finite(state, "state")


@pytest.mark.parametrize("entry", cases("sharded_explicit"))
def test_sharded_explicit_mesh(entry: Entry):
    _check_explicit_mesh(entry, context=True)


@pytest.mark.parametrize("entry", cases("explicit_no_context"))
def test_sharded_explicit_mesh_without_set_mesh(entry: Entry):
    _check_explicit_mesh(entry, context=False)


_SINGLE_DEVICE: dict[str, Any] = {}


def _single_device_params(entry: Entry) -> Any:
    """The params after two updates of ``entry`` on one device (computed once per
    worker process: both explicit-mesh checks compare against it)."""
    if entry.name not in _SINGLE_DEVICE:
        tx = entry.make()
        ref, ref_state = make_params(entry.param_dtype), tx.init(make_params(entry.param_dtype))
        update = jax.jit(tx.update)
        for _ in range(2):
            u, ref_state = update(grads_at(ref), ref_state, ref)
            ref = optax.apply_updates(ref, u)
        _SINGLE_DEVICE[entry.name] = jax.device_get(ref)
    return _SINGLE_DEVICE[entry.name]


def _check_explicit_mesh(entry: Entry, context: bool) -> None:
    """(g) again on a mesh with Explicit axes (``jax.make_mesh``'s default, what Flax
    uses under ``jax.set_mesh``): shardings are part of the types, so every op must
    say what it does with a sharded dimension. Also without ``jax.set_mesh`` around the
    jitted step (params placed with ``NamedSharding``s only, as ``optax.adamw`` allows):
    the arrays' own sharding types must decide. (JAX itself cannot jit an ``init``
    that creates unsharded arrays there, so that one runs eagerly.)"""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    tx = entry.make()
    with jax.set_mesh(mesh) if context else _null():
        params = jax.device_put(
            make_params(entry.param_dtype), jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
        )
        state = jax.jit(tx.init)(params) if context else tx.init(params)
        step = jax.jit(train_step(tx))
        if not context:  # eager init leaves scalars on one device; the step replicates them
            params, state = step(params, state)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        for _ in range(2 if context else 1):
            params, state = step(params, state)
            assert_same_shardings(state, shardings)
    assert_finite(state, "state")
    # Sharding changes the layout, not the math: same params as a single-device run.
    ref = _single_device_params(entry)
    # bf16 params: a reduction summed in another order can flip a rounding (one unit,
    # 2**-8 to 2**-7 of the value), and a flip moves the next steps' gradients: a few
    # units after the steps here
    rtol = 1e-5 if entry.param_dtype == jnp.float32 else 2.0**-5
    chex.assert_trees_all_close(jax.device_get(params), ref, rtol=rtol, atol=max(1e-6, entry.atol))


# --------------------------------------------------------------------------------------
# (h) flax.nnx.Optimizer
# --------------------------------------------------------------------------------------


def _nnx_model(sharded: bool):
    from flax import nnx

    def annotate(init, spec):
        return nnx.with_partitioning(init, spec) if sharded else init

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            kinit, zinit = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
            self.l1 = nnx.Linear(
                16,
                128,
                kernel_init=annotate(kinit, (None, "model")),
                bias_init=annotate(zinit, ("model",)),
                rngs=rngs,
            )
            self.l2 = nnx.Linear(128, 64, kernel_init=annotate(kinit, ("model", None)), rngs=rngs)
            self.norm = nnx.LayerNorm(64, rngs=rngs)
            self.out = nnx.Linear(64, 4, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x))))
            return self.out(self.norm(h))

    return Net(nnx.Rngs(0))


@pytest.mark.parametrize("entry", cases("nnx"))
def test_nnx_optimizer(entry: Entry):
    _check_nnx_training(entry, sharded=False)


@pytest.mark.parametrize("entry", cases("nnx_sharded"))
def test_nnx_optimizer_sharded(entry: Entry):
    _check_nnx_training(entry, sharded=True)


def _check_nnx_training(entry: Entry, sharded: bool) -> None:
    from flax import nnx

    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jnp.sin(x[:, :4] * 2.0) + x[:, 4:8] * x[:, 8:12]
    mesh = _mesh()
    with jax.set_mesh(mesh) if sharded else _null():
        model = _nnx_model(sharded)
        optimizer = nnx.Optimizer(model, entry.make(), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            optimizer.update(model, grads)
            return loss

        losses = [float(train_step(model, optimizer, x, y)) for _ in range(8)]
        if sharded:
            kernel = model.l1.kernel[...]
            assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------
# (i) orbax checkpoint round trip and exact resume
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", cases("orbax"))
def test_orbax_roundtrip(entry: Entry, tmp_path):
    import orbax.checkpoint as ocp

    tx = entry.make()

    step = jax.jit(train_step(tx))

    def train(params, state, n):
        for _ in range(n):
            params, state = step(params, state)
        return params, state

    params0 = make_params(entry.param_dtype)
    full_params, _ = train(params0, tx.init(params0), 6)

    mid = train(params0, tx.init(params0), 3)
    # Synchronous checkpointer: a failing save raises here, leaving no background thread.
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "ckpt", args=ocp.args.StandardSave(mid))
        restored = ckptr.restore(tmp_path / "ckpt", args=ocp.args.StandardRestore(abstract(mid)))

    assert jax.tree.structure(restored) == jax.tree.structure(mid)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(mid), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    resumed_params, _ = train(*restored, 3)
    for a, b in zip(jax.tree.leaves(resumed_params), jax.tree.leaves(full_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------
# (j) state bytes against the documented formula
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("entry", cases("state_bytes"))
def test_state_bytes_formula(entry: Entry, dtype):
    params = make_params(dtype)
    assert state_bytes(entry.make().init(params)) == entry.state_bytes(params)
    assert math.prod(SHAPES["embed"]) > 4096  # large enough for quantized storage


# --------------------------------------------------------------------------------------
# (k) bounded temporaries of the donated update (compile-only)
# --------------------------------------------------------------------------------------

# 16 layers and an embedding of 8192 values each, biases and a norm: no leaf is more than
# 3% of the model, as in a real network, so the bound measures working sets, not one leaf
MEMORY_SHAPES = {
    "embed": (64, 128),
    "blocks": {str(i): {"kernel": (64, 128), "bias": (128,)} for i in range(16)},
    "norm": (128,),
}
TEMP_BOUND = 1.0  # bytes per parameter


@pytest.mark.parametrize("entry", cases("update_temp"))
def test_update_temp_bound(entry: Entry, monkeypatch):
    from lowbit_optax import _driver

    # slices of 1024 values, as the default 2**18 is to a model of millions
    monkeypatch.setattr(_driver, "SLICE_ELEMENTS", 1024)
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, entry.param_dtype),
        MEMORY_SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    mem = lowbit_optax.step_memory(entry.make(), params)
    temp = mem.update.temp_bytes / n
    assert temp <= TEMP_BOUND, f"{entry.name}: update temporaries {temp:.2f} B/param"
    # the peak is what the bound is for: params + grads + state + at most 1 B/param
    assert (
        mem.update.peak_bytes <= 2 * mem.param_bytes + mem.state_bytes + (TEMP_BOUND * n) + 8 * 512
    )
