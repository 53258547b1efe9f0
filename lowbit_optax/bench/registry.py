"""Optimizers the benchmark knows, by name.

Each entry maps a public alias name to a factory ``make(learning_rate) ->
optax.GradientTransformation``. ``adamw`` (``optax.adamw``) is the reference every
ratio is taken against; ``adafactor`` and ``galore`` (``optax.contrib.galore``) are
external baselines. Technique issues add their aliases with ``register``.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
    event_period: int | Callable[[Mapping[str, Any]], int] | None = None
    tasks: tuple[str, ...] | None = None
    lr_scale: float = 1.0
    default: bool = True

    def factory(self, **overrides: Any) -> Factory:
        """``make`` with the task's learning rate (a float or a schedule) times
        ``lr_scale`` and keyword ``overrides`` (``--set``, ``--sweep``); an
        ``lr_scale`` among them replaces the registered one."""
        overrides = dict(overrides)
        scale = overrides.pop("lr_scale", self.lr_scale)

        def make(lr, **kwargs):
            scaled = lr
            if scale != 1.0:
                scaled = (lambda step: scale * lr(step)) if callable(lr) else scale * lr
            return self.make(scaled, **{**overrides, **kwargs})

        return make if (overrides or scale != 1.0) else self.make


_REGISTRY: dict[str, OptimizerSpec] = {}
_OVERRIDES: dict[str, dict[str, Any]] = {}  # variant label -> its keyword overrides


def register(
    name: str,
    make: Factory,
    description: str,
    *,
    baseline: bool = False,
    takes_rules: bool = False,
    event_period: int | Callable[[Mapping[str, Any]], int] | None = None,
    tasks: tuple[str, ...] | None = None,
    lr_scale: float = 1.0,
    default: bool = True,
) -> None:
    """Adds an optimizer under ``name`` (must be new). ``takes_rules``: ``make`` also
    accepts ``rules=`` (SlimAdam's per-leaf axes), which ``--calibrate`` supplies.
    ``event_period``: the optimizer does extra work every so many steps (a projector
    refresh); the benchmark then also times that many consecutive updates (amortized).
    A callable gets a variant's keyword overrides (``{}`` for ``name`` itself) and
    returns its period (one that ``--set update_interval=...`` changes).
    ``tasks``: the only tasks it runs on (a dense window over 25M parameters does not
    fit); ``lr_scale``: its learning rate is the task's times this (SGD-type updates
    want a much larger step than Adam's), noted in the description; ``default``: it
    runs without ``--optimizers`` (False: only when named, e.g. the bf16 weight recipes,
    which pass float32 params through)."""
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    if lr_scale != 1.0:
        description = f"{description} [lr x{lr_scale:g} the task's]"
    _REGISTRY[name] = OptimizerSpec(
        name, make, description, baseline, takes_rules, event_period, tasks, lr_scale, default
    )


def base_name(name: str) -> str:
    """The registered name of a variant label ``name[key=value,...]`` (``variant``)."""
    return name.split("[", 1)[0]


def parse_value(text: str) -> Any:
    """A ``--set``/``--sweep`` value: a Python literal (``50``, ``0.5``, ``True``,
    ``(4, 2)``, ``None``), else the string itself (``bfloat16``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def variant(name: str, overrides: dict[str, Any]) -> tuple[str, Factory]:
    """``(label, factory)`` of the registered optimizer ``name`` with keyword
    ``overrides`` (label ``name[key=value,...]``; ``name`` itself without any)."""
    spec = get(name)
    if not overrides:
        return name, spec.factory()
    label = name + "[" + ",".join(f"{k}={v!r}" for k, v in overrides.items()) + "]"
    label = label.replace("'", "")
    _OVERRIDES[label] = dict(overrides)
    return label, spec.factory(**overrides)


def runs_on(name: str, task: str) -> bool:
    """Whether a registered optimizer (or a variant of it) runs on ``task``."""
    spec = _REGISTRY.get(base_name(name))
    return spec is None or spec.tasks is None or task in spec.tasks


def event_period(name: str) -> int | None:
    """Steps between a registered optimizer's periodic extra work, if any; that of a
    variant (a label ``variant`` made) with its overrides."""
    spec = _REGISTRY.get(base_name(name))
    period = None if spec is None else spec.event_period
    if callable(period):
        return period(_OVERRIDES.get(name, {}))
    return period


def takes_rules(name: str) -> bool:
    """Whether a registered optimizer (or a variant) accepts calibrated SlimAdam rules."""
    name = base_name(name)
    return name in _REGISTRY and _REGISTRY[name].takes_rules


def get(name: str) -> OptimizerSpec:
    """The registered optimizer ``name`` (that of a variant label ``name[...]``)."""
    try:
        return _REGISTRY[base_name(name)]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    """All registered names, the reference first."""
    return [REFERENCE] + [n for n in _REGISTRY if n != REFERENCE]


def default_names() -> list[str]:
    """The names a run without ``--optimizers`` uses: those registered as ``default``."""
    return [n for n in names() if _REGISTRY[n].default]


def _alias(fn: Callable[..., optax.GradientTransformation], **defaults: Any) -> Factory:
    """``make(lr, **kwargs)``: ``fn(lr, **defaults, **kwargs)`` with the benchmark's
    weight decay (a keyword of every alias); ``kwargs`` win (``--set``, ``--sweep``)."""
    no_decay = (optax.sgd, lowbit_optax.sgd_momentum_8bit)
    if "weight_decay_rate" not in defaults and fn not in no_decay:
        defaults = {"weight_decay": WEIGHT_DECAY, **defaults}
    return lambda lr, **kwargs: fn(lr, **{**defaults, **kwargs})


register(
    "adamw",
    _alias(optax.adamw),
    "optax.adamw (reference, float32 moments)",
    baseline=True,
)
register(
    "adafactor",
    _alias(optax.adafactor, weight_decay_rate=WEIGHT_DECAY, multiply_by_parameter_scale=False),
    "optax.adafactor (factored second moment, no first moment)",
    baseline=True,
)
register(
    "galore",
    _alias(optax.contrib.galore, rank=64, update_proj_gap=200, weight_decay=WEIGHT_DECAY),
    "optax.contrib.galore (rank 64, SVD every 200 steps)",
    baseline=True,
    event_period=lambda kw: kw.get("update_proj_gap", 200),
)

# ---- low-precision weights (lowbit_optax.stochastic_rounding) ---------------------------
# On float32 params stochastic rounding passes the updates through; its work shows with
# ``--param-dtype bfloat16`` (the update task).


def _then_sr(make: Factory) -> Factory:
    return lambda lr, **kwargs: optax.chain(make(lr, **kwargs), lowbit_optax.stochastic_rounding())


register(
    "adamw_sr",
    _then_sr(_alias(optax.adamw)),
    "optax.adamw, then lowbit_optax.stochastic_rounding (bf16 params)",
    tasks=("update",),
    default=False,
)
register(
    "adamw_8bit_sr",
    _then_sr(_alias(lowbit_optax.adamw_8bit)),
    "lowbit_optax.adamw_8bit, then lowbit_optax.stochastic_rounding (bf16 params)",
    tasks=("update",),
    default=False,
)


# ---- bfloat16 weights on lm (--param-dtype bfloat16) ----------------------------------
# The params and grads are bf16 there; the reference ``adamw`` keeps its moments in bf16
# too (optax.scale_by_adam's state follows the params' dtype). The recipes below keep
# float32 Adam moments, so that only the weights' storage and rounding differ.


def _float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def float32_moments(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` fed float32 gradients and initialised on float32 params, so that its
    moments are float32 whatever the params' dtype (optax.scale_by_adam keeps them in
    the params' dtype)."""
    return optax.GradientTransformation(
        lambda params: inner.init(_float32(params)),
        lambda updates, state, params=None: inner.update(_float32(updates), state, params),
    )


class MasterWeightsState(NamedTuple):
    master: Any
    inner_state: Any


def master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """The mixed-precision recipe as a transform: a float32 master copy of the params
    in the state (4 bytes per parameter), ``inner`` run on it with float32 gradients,
    and the emitted update ``bf16(master_new) - params`` (exact in float32), so that
    ``optax.apply_updates`` writes the master's rounding into the bf16 params."""

    def init_fn(params):
        master = _float32(params)
        return MasterWeightsState(master, inner.init(master))

    def update_fn(updates, state, params=None):
        u, inner_state = inner.update(_float32(updates), state.inner_state, state.master)
        master = optax.apply_updates(state.master, u)
        out = jax.tree.map(
            lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32),
            master,
            params,
        )
        return out, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def _adamw_f32m(lr, **kwargs):
    return float32_moments(optax.adamw(lr, **{"weight_decay": WEIGHT_DECAY, **kwargs}))


def _with(make: Factory, last: Callable[[], optax.GradientTransformation]) -> Factory:
    return lambda lr, **kwargs: optax.chain(make(lr, **kwargs), last())


def _float32_adam_like() -> lowbit_optax.AdamLike:
    """``scale_by_adam_like()`` with float32 moments on bf16 params."""
    inner = lowbit_optax.scale_by_adam_like()
    tx = float32_moments(inner)
    return lowbit_optax.AdamLike(tx.init, tx.update, inner.moments)


def _eco(inner: Callable[[], Any], rounding: str) -> Factory:
    return lambda lr, **kwargs: lowbit_optax.eco(
        inner(), lr, **{"weight_decay": WEIGHT_DECAY, **kwargs}, rounding=rounding
    )


_LM = ("lm", "mlp_lm")
for _name, _make, _text in [
    (
        "adamw_master",
        lambda lr, **kw: master_weights(optax.adamw(lr, **{"weight_decay": WEIGHT_DECAY, **kw})),
        "optax.adamw on float32 master weights of the bf16 params (mixed precision)",
    ),
    ("adamw_bf16", _adamw_f32m, "optax.adamw, float32 moments, bf16 params rounded to nearest"),
    (
        "adamw_bf16_sr",
        _with(_adamw_f32m, lowbit_optax.stochastic_rounding),
        "optax.adamw (float32 moments), then lowbit_optax.stochastic_rounding",
    ),
    (
        "adamw_bf16_kahan",
        _with(_adamw_f32m, lowbit_optax.compensated),
        "optax.adamw (float32 moments), then lowbit_optax.compensated (bf16 buffer)",
    ),
    (
        "adamw_bf16_eco",
        _eco(_float32_adam_like, "nearest"),
        "lowbit_optax.eco(scale_by_adam_like()), float32 moments, nearest rounding",
    ),
    (
        "adamw_bf16_eco_sr",
        _eco(_float32_adam_like, "stochastic"),
        "lowbit_optax.eco(scale_by_adam_like(), rounding='stochastic'), float32 moments",
    ),
    (
        "adamw_8bit_bf16_sr",
        _with(_alias(lowbit_optax.adamw_8bit), lowbit_optax.stochastic_rounding),
        "lowbit_optax.adamw_8bit, then lowbit_optax.stochastic_rounding",
    ),
    (
        "adamw_8bit_bf16_eco_sr",
        _eco(lowbit_optax.scale_by_quantized_adam, "stochastic"),
        "lowbit_optax.eco(scale_by_quantized_adam(), rounding='stochastic'): 8-bit moments",
    ),
    (
        "solo_adamw_4_2_bf16_sr",
        _with(_alias(lowbit_optax.solo_adamw, bits=(4, 2)), lowbit_optax.stochastic_rounding),
        "lowbit_optax.solo_adamw(bits=(4, 2)), then lowbit_optax.stochastic_rounding",
    ),
]:
    register(_name, _make, f"{_text} [--param-dtype bfloat16]", tasks=_LM, default=False)

# ---- quantized EMA state ---------------------------------------------------------------
register(
    "adamw_8bit",
    _alias(lowbit_optax.adamw_8bit),
    "lowbit_optax.adamw_8bit (8-bit dynamic-tree moments, blocks of 128)",
)
register(
    "adamw_4bit",
    _alias(lowbit_optax.adamw_4bit),
    "lowbit_optax.adamw_4bit (4-bit DE first moment, zero-free linear second moment)",
)
for _bits in ((4, 2), (3, 3), (2, 2)):
    register(
        f"solo_adamw_{_bits[0]}_{_bits[1]}",
        _alias(lowbit_optax.solo_adamw, bits=_bits),
        f"lowbit_optax.solo_adamw(bits={_bits}) (SOLO: log second moment, "
        f"b1={lowbit_optax.aliases.SOLO_B1[_bits[0]]})",
    )
register(
    "adamw_2bit_plain",
    lambda lr, weight_decay=WEIGHT_DECAY, **kwargs: optax.chain(
        lowbit_optax.scale_by_quantized_adam(**{"mu_bits": 2, "nu_bits": 2, **kwargs}),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lr),
    ),
    "plain 2-bit Adam for contrast (2-bit DE mu, zero-free linear nu, b1=0.9, nearest; "
    "no SOLO remedies)",
)

# ---- SNR-selective second moments (SlimAdam) ---------------------------------------------
register(
    "slim_adamw",
    _alias(lowbit_optax.slim_adamw, rules=lowbit_optax.flax_default_rules),
    "lowbit_optax.slim_adamw (float32 mu; nu averaged per leaf: calibrated rules with "
    "--calibrate, else flax_default_rules)",
    takes_rules=True,
)
register(
    "slim_adamw_mu4",
    _alias(lowbit_optax.slim_adamw, rules=lowbit_optax.flax_default_rules, mu_bits=4),
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


_PROJ = dict(rank=0.25, projection_mask=_matrices_only)
register(
    "galore_adamw",
    _alias(lowbit_optax.galore_adamw, **_PROJ),
    "lowbit_optax.galore_adamw (rank 1/4 of min(m, n), SVD every 200 steps, scale 0.25)",
    event_period=lambda kw: kw.get("update_interval", 200),
)
register(
    "coap_adamw",
    _alias(lowbit_optax.coap_adamw, **_PROJ),
    "lowbit_optax.coap_adamw (rank 1/4, P step every 32, recalibration every 160, scale-aware, "
    "2 power iterations at t = 0)",
    event_period=lambda kw: kw.get("update_interval", 32) * kw.get("reproject_factor", 5),
)
register(
    "subtrack_adamw",
    _alias(lowbit_optax.subtrack_adamw, **_PROJ),
    "lowbit_optax.subtrack_adamw (rank 1/4, SVD at step 0, whole geodesic at best angles "
    "every 30, moments rotated)",
    event_period=lambda kw: kw.get("update_interval", 30),
)
register(
    "coap_adamw_8bit",
    _alias(lowbit_optax.coap_adamw_8bit, **_PROJ),
    "lowbit_optax.coap_adamw_8bit (COAP with 8-bit inner Adam moments in blocks of 64, "
    "bfloat16 projectors)",
    event_period=lambda kw: kw.get("update_interval", 32) * kw.get("reproject_factor", 5),
)


# error feedback and windowed preconditioners (EFCP); dense windows over 25M (update) or
# 3.3M (lm) parameters would not fit, so they run on digits (85k parameters) only
register(
    "sgd",
    _alias(optax.sgd, momentum=0.9),
    "optax.sgd (momentum 0.9; the reference for error-feedback SGD)",
    baseline=True,
    lr_scale=30.0,
)
register(
    "ef_top_k_sgd",
    lambda lr, density=0.01, momentum=0.9: optax.chain(
        lowbit_optax.error_feedback(lowbit_optax.top_k(density)), optax.sgd(lr, momentum)
    ),
    "lowbit_optax.error_feedback(top_k(0.01)) then optax.sgd (momentum 0.9): 1% of each "
    "leaf's entries per step",
    lr_scale=30.0,
)
register(
    "mfac",
    _alias(lowbit_optax.mfac),
    "lowbit_optax.mfac (dense window of m = 1024 gradients, damping 1e-4)",
    tasks=("digits",),
)
register(
    "sparse_mfac",
    _alias(lowbit_optax.sparse_mfac),
    "lowbit_optax.sparse_mfac (m = 1024, error-feedback top-k at 1% density, damping 1e-4)",
    tasks=("digits", "lm"),
)
register(
    "ggt",
    _alias(lowbit_optax.ggt),
    "lowbit_optax.ggt (dense window of r = 100 gradients, eps 1e-5)",
    tasks=("digits",),
    lr_scale=300.0,
)
register(
    "sparse_ggt",
    _alias(lowbit_optax.sparse_ggt),
    "lowbit_optax.sparse_ggt (r = 100, error-feedback top-k at 1% density, eps 1e-5)",
    tasks=("digits", "lm"),
    lr_scale=300.0,
)


# ---- any optimizer's state in 8 or 4 bits (lowbit_optax.quantize_state) ----------------
# Each float32 optimizer next to its 8-bit recipe and its state at 4 bits
# (``quantize_state(inner, bits=4)``), at the same learning rate: the comparison
# is each one against its own float32 version.


def _times(lr: optax.ScalarOrSchedule, k: float) -> optax.ScalarOrSchedule:
    return (lambda step: k * lr(step)) if callable(lr) else k * lr


def _muon(fn: Callable[..., optax.GradientTransformation]) -> Factory:
    """Muon at 20 times the task's (Adam) learning rate on its matrices; its Adam
    fallback (embeddings, biases, norms) at the task's rate."""
    return lambda lr, **kwargs: fn(_times(lr, 20.0), **{"adam_learning_rate": lr, **kwargs})


def _q4(fn: Callable[..., optax.GradientTransformation], rounding: str = "nearest") -> Factory:
    return lambda lr, **kwargs: lowbit_optax.quantize_state(
        fn(lr, **kwargs), bits=4, rounding=rounding
    )


_LION = _alias(optax.lion)
_ADEMAMIX = _alias(optax.contrib.ademamix)
_SGDM = _alias(optax.sgd, momentum=0.9)
_MUON = _muon(optax.contrib.muon)
for _name, _make, _desc, _scale in (
    ("lion", _LION, "optax.lion (float32 momentum)", 0.1),
    ("lion_8bit", _alias(lowbit_optax.lion_8bit), "lowbit_optax.lion_8bit", 0.1),
    ("lion_q4", _q4(_LION), "quantize_state(optax.lion, bits=4)", 0.1),
    (
        "lion_q4_sr",
        _q4(_LION, "stochastic"),
        "quantize_state(optax.lion, bits=4, rounding='stochastic')",
        0.1,
    ),
    (
        "sgd_momentum_8bit",
        _alias(lowbit_optax.sgd_momentum_8bit, momentum=0.9),
        "lowbit_optax.sgd_momentum_8bit (momentum 0.9)",
        30.0,
    ),
    ("sgd_momentum_q4", _q4(_SGDM), "quantize_state(optax.sgd(momentum=0.9), bits=4)", 30.0),
    ("muon", _MUON, "optax.contrib.muon (float32 momentum; lr x20 on matrices)", 1.0),
    ("muon_8bit", _muon(lowbit_optax.muon_8bit), "lowbit_optax.muon_8bit (lr x20 on matrices)", 1),
    ("muon_q4", _q4(_MUON), "quantize_state(optax.contrib.muon, bits=4) (lr x20 on matrices)", 1),
    (
        "muon_q4_sr",
        _q4(_MUON, "stochastic"),
        "quantize_state(optax.contrib.muon, bits=4, rounding='stochastic') (lr x20 on matrices)",
        1,
    ),
    ("ademamix", _ADEMAMIX, "optax.contrib.ademamix (float32 m1, m2, nu)", 1.0),
    ("ademamix_8bit", _alias(lowbit_optax.ademamix_8bit), "lowbit_optax.ademamix_8bit", 1.0),
    ("ademamix_q4", _q4(_ADEMAMIX), "quantize_state(optax.contrib.ademamix, bits=4)", 1.0),
):
    register(_name, _make, _desc, baseline=_name in ("lion", "muon", "ademamix"), lr_scale=_scale)


# ---- the main job and the techniques table ----------------------------------------------

MAIN = ("adamw_8bit", "slim_adamw", "galore_adamw", "sparse_ggt")
"""The optimizers of the main job (``python -m lowbit_optax.bench`` without flags): one
per technique (quantized state, SNR-selective second moment, low-rank projection,
error-feedback compressed preconditioner), next to the reference."""

PAPERS: dict[str, str] = {
    "adamw": "Loshchilov & Hutter 2019 (reference)",
    "adafactor": "Shazeer & Stern 2018 (optax)",
    "galore": "Zhao et al. 2024 (optax.contrib)",
    "adamw_8bit": "Dettmers et al. 2022",
    "adamw_4bit": "Li et al. 2023",
    "solo_adamw": "Xu et al. 2025 (SOLO)",
    "adamw_2bit_plain": "contrast: 2-bit without SOLO's remedies",
    "slim_adamw": "Kalra et al. 2025 (SlimAdam)",
    "galore_adamw": "Zhao et al. 2024 (GaLore)",
    "coap_adamw": "Xiao et al. 2025 (COAP)",
    "subtrack_adamw": "Rajabi et al. 2025 (SubTrack-Grad)",
    "sgd": "reference of error feedback",
    "ef_top_k_sgd": "error feedback, Karimireddy et al. 2019",
    "mfac": "Frantar et al. 2021 (M-FAC)",
    "sparse_mfac": "Modoranu et al. 2023 (EFCP)",
    "ggt": "Agarwal et al. 2019 (GGT)",
    "sparse_ggt": "Modoranu et al. 2023 (EFCP)",
    "lion": "Chen et al. 2023 (optax)",
    "muon": "Jordan et al. 2024 (optax.contrib)",
    "ademamix": "Pagliardini et al. 2024 (optax.contrib)",
    "sgd_momentum": "quantize_state (any optax optimizer)",
    "lion_": "quantize_state (any optax optimizer)",
    "muon_": "quantize_state (any optax optimizer)",
    "ademamix_": "quantize_state (any optax optimizer)",
}


def paper(name: str) -> str:
    """The paper (or role) behind a registered optimizer or variant, for the techniques
    table: the entry of ``PAPERS`` whose key is the longest prefix of its name."""
    base = base_name(name)
    keys = [k for k in PAPERS if base == k or base.startswith(k if k.endswith("_") else k + "_")]
    return PAPERS[max(keys, key=len)] if keys else ""
