"""Optimizers the benchmark knows, by name.

Each entry maps a public alias name to a factory ``make(learning_rate) ->
optax.GradientTransformation``. ``adamw`` (``optax.adamw``) is the reference every
ratio is taken against; ``adafactor`` and ``galore`` (``optax.contrib.galore``) are
external baselines. Technique issues add their aliases with ``register``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

Factory = Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]

REFERENCE = "adamw"
WEIGHT_DECAY = 1e-4


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str
    make: Factory
    description: str
    baseline: bool = False


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(name: str, make: Factory, description: str, *, baseline: bool = False) -> None:
    """Adds an optimizer under ``name`` (must be new)."""
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    _REGISTRY[name] = OptimizerSpec(name, make, description, baseline)


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
)
