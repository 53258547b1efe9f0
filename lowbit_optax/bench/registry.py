"""Optimizers the benchmark knows, by name.

Each entry maps a public alias name to a factory ``make(learning_rate) ->
optax.GradientTransformation``. ``adamw`` (``optax.adamw``) is the reference every
ratio is taken against; ``adafactor`` and ``galore`` (``optax.contrib.galore``) are
external baselines. Technique issues add their aliases with ``register``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax

import lowbit_optax

Factory = Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]

REFERENCE = "adamw"
WEIGHT_DECAY = 1e-4


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str
    make: Factory
    description: str
    baseline: bool = False
    takes_rules: bool = False
    event_period: int | None = None
    tasks: tuple[str, ...] | None = None
    lr_scale: float = 1.0

    def factory(self) -> Factory:
        """``make`` with the task's learning rate (a float or a schedule) times
        ``lr_scale``."""
        if self.lr_scale == 1.0:
            return self.make
        scale = self.lr_scale

        def make(lr, **kwargs):
            scaled = (lambda step: scale * lr(step)) if callable(lr) else scale * lr
            return self.make(scaled, **kwargs)

        return make


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(
    name: str,
    make: Factory,
    description: str,
    *,
    baseline: bool = False,
    takes_rules: bool = False,
    event_period: int | None = None,
    tasks: tuple[str, ...] | None = None,
    lr_scale: float = 1.0,
) -> None:
    """Adds an optimizer under ``name`` (must be new). ``takes_rules``: ``make`` also
    accepts ``rules=`` (SlimAdam's per-leaf axes), which ``--calibrate`` supplies.
    ``event_period``: the optimizer does extra work every so many steps (a projector
    refresh); the benchmark then also times that many consecutive updates (amortized).
    ``tasks``: the only tasks it runs on (a dense window over 25M parameters does not
    fit); ``lr_scale``: its learning rate is the task's times this (SGD-type updates
    want a much larger step than Adam's), noted in the description."""
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    if lr_scale != 1.0:
        description = f"{description} [lr x{lr_scale:g} the task's]"
    _REGISTRY[name] = OptimizerSpec(
        name, make, description, baseline, takes_rules, event_period, tasks, lr_scale
    )


def runs_on(name: str, task: str) -> bool:
    """Whether a registered optimizer runs on ``task``."""
    spec = _REGISTRY.get(name)
    return spec is None or spec.tasks is None or task in spec.tasks


def event_period(name: str) -> int | None:
    """Steps between a registered optimizer's periodic extra work, if any."""
    return _REGISTRY[name].event_period if name in _REGISTRY else None


def takes_rules(name: str) -> bool:
    """Whether a registered optimizer accepts calibrated SlimAdam rules."""
    return name in _REGISTRY and _REGISTRY[name].takes_rules


def get(name: str) -> OptimizerSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    """All registered names, the reference first."""
    return [REFERENCE] + [n for n in _REGISTRY if n != REFERENCE]


register(
    "adamw",
    lambda lr: optax.adamw(lr, weight_decay=WEIGHT_DECAY),
    "optax.adamw (reference, float32 moments)",
    baseline=True,
)
register(
    "adafactor",
    lambda lr: optax.adafactor(
        lr, weight_decay_rate=WEIGHT_DECAY, multiply_by_parameter_scale=False
    ),
    "optax.adafactor (factored second moment, no first moment)",
    baseline=True,
)
register(
    "galore",
    lambda lr: optax.contrib.galore(lr, rank=64, update_proj_gap=200, weight_decay=WEIGHT_DECAY),
    "optax.contrib.galore (rank 64, SVD every 200 steps)",
    baseline=True,
    event_period=200,
)

# ---- quantized EMA state ---------------------------------------------------------------
register(
    "adamw_8bit",
    lambda lr: lowbit_optax.adamw_8bit(lr, weight_decay=WEIGHT_DECAY),
    "lowbit_optax.adamw_8bit (8-bit dynamic-tree moments, blocks of 128)",
)
register(
    "adamw_4bit",
    lambda lr: lowbit_optax.adamw_4bit(lr, weight_decay=WEIGHT_DECAY),
    "lowbit_optax.adamw_4bit (4-bit DE first moment, zero-free linear second moment)",
)
for _bits in ((4, 2), (3, 3), (2, 2)):
    register(
        f"solo_adamw_{_bits[0]}_{_bits[1]}",
        lambda lr, bits=_bits: lowbit_optax.solo_adamw(lr, weight_decay=WEIGHT_DECAY, bits=bits),
        f"lowbit_optax.solo_adamw(bits={_bits}) (SOLO: log second moment, "
        f"b1={lowbit_optax.quantized.SOLO_B1[_bits[0]]})",
    )
register(
    "adamw_2bit_plain",
    lambda lr: optax.chain(
        lowbit_optax.scale_by_quantized_adam(mu_bits=2, nu_bits=2),
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.scale_by_learning_rate(lr),
    ),
    "plain 2-bit Adam for contrast (2-bit DE mu, zero-free linear nu, b1=0.9, nearest; "
    "no SOLO remedies)",
)

# ---- SNR-selective second moments (SlimAdam) ---------------------------------------------
register(
    "slim_adamw",
    lambda lr, rules=None: lowbit_optax.slim_adamw(
        lr, weight_decay=WEIGHT_DECAY, rules=rules or lowbit_optax.flax_default_rules
    ),
    "lowbit_optax.slim_adamw (float32 mu; nu averaged per leaf: calibrated rules with "
    "--calibrate, else flax_default_rules)",
    takes_rules=True,
)
register(
    "slim_adamw_mu4",
    lambda lr, rules=None: lowbit_optax.slim_adamw(
        lr, weight_decay=WEIGHT_DECAY, rules=rules or lowbit_optax.flax_default_rules, mu_bits=4
    ),
    "lowbit_optax.slim_adamw(mu_bits=4) (4-bit DE mu, blocks of 128; averaged float32 nu)",
    takes_rules=True,
)

# ---- low-rank projection --------------------------------------------------------------


def _matrices_only(params):
    """Projection mask: attention and MLP kernels (not embeddings, positions, LM head),
    as GaLore, COAP and SubTrack apply it."""
    from lowbit_optax._util import path_str

    skip = ("embed", "pos", "lm_head")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not any(s in path_str(p) for s in skip), params
    )


_PROJ = dict(rank=0.25, weight_decay=WEIGHT_DECAY, projection_mask=_matrices_only)
register(
    "galore_adamw",
    lambda lr: lowbit_optax.galore_adamw(lr, **_PROJ),
    "lowbit_optax.galore_adamw (rank 1/4 of min(m, n), SVD every 200 steps, scale 0.25)",
    event_period=200,
)
register(
    "coap_adamw",
    lambda lr: lowbit_optax.coap_adamw(lr, **_PROJ),
    "lowbit_optax.coap_adamw (rank 1/4, P step every 32, recalibration every 160, scale-aware, "
    "2 power iterations at t = 0)",
    event_period=160,
)
register(
    "subtrack_adamw",
    lambda lr: lowbit_optax.subtrack_adamw(lr, **_PROJ),
    "lowbit_optax.subtrack_adamw (rank 1/4, SVD at step 0, geodesic step every 50, "
    "moments rotated)",
    event_period=200,
)
register(
    "coap_adamw_8bit",
    lambda lr: lowbit_optax.coap_adamw_8bit(lr, **_PROJ),
    "lowbit_optax.coap_adamw_8bit (COAP with 8-bit inner Adam moments in blocks of 64, "
    "bfloat16 projectors)",
    event_period=160,
)


# error feedback and windowed preconditioners (EFCP); dense windows over 25M (update) or
# 3.3M (lm) parameters would not fit, so they run on digits (85k parameters) only
register(
    "sgd",
    lambda lr: optax.sgd(lr, momentum=0.9),
    "optax.sgd (momentum 0.9; the reference for error-feedback SGD)",
    baseline=True,
    lr_scale=30.0,
)
register(
    "ef_top_k_sgd",
    lambda lr: optax.chain(
        lowbit_optax.error_feedback(lowbit_optax.top_k(0.01)), optax.sgd(lr, momentum=0.9)
    ),
    "lowbit_optax.error_feedback(top_k(0.01)) then optax.sgd (momentum 0.9): 1% of each "
    "leaf's entries per step",
    lr_scale=30.0,
)
register(
    "mfac",
    lambda lr: lowbit_optax.mfac(lr, weight_decay=WEIGHT_DECAY),
    "lowbit_optax.mfac (dense window of m = 1024 gradients, damping 1e-4)",
    tasks=("digits",),
)
register(
    "sparse_mfac",
    lambda lr: lowbit_optax.sparse_mfac(lr, weight_decay=WEIGHT_DECAY),
    "lowbit_optax.sparse_mfac (m = 1024, error-feedback top-k at 1% density, damping 1e-4)",
    tasks=("digits", "lm"),
)
register(
    "ggt",
    lambda lr: lowbit_optax.ggt(lr, weight_decay=WEIGHT_DECAY),
    "lowbit_optax.ggt (dense window of r = 100 gradients, eps 1e-5)",
    tasks=("digits",),
    lr_scale=300.0,
)
register(
    "sparse_ggt",
    lambda lr: lowbit_optax.sparse_ggt(lr, weight_decay=WEIGHT_DECAY),
    "lowbit_optax.sparse_ggt (r = 100, error-feedback top-k at 1% density, eps 1e-5)",
    tasks=("digits", "lm"),
    lr_scale=300.0,
)
