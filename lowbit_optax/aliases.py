"""The named optimizers: each technique's transform in ``optax.adamw``'s chain, one
function per paper's recipe (as optax keeps its aliases apart from its transforms).

Every alias is ``optax.chain(<the technique's scale_by transform>,
optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(
learning_rate))``, the chain ``optax.adamw`` is, so a state converted from (or to)
``optax.adamw``'s keeps its schedule position, and the weight decay stays outside any
projection or quantization.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import optax

from lowbit_optax._util import forwarding_signature, static_arg
from lowbit_optax.any_state import quantize_state
from lowbit_optax.error_feedback import top_k
from lowbit_optax.moments import scale_by_adam_like
from lowbit_optax.preconditioners import scale_by_ggt, scale_by_mfac
from lowbit_optax.projection import (
    COAPProjector,
    SubTrackProjector,
    SVDProjector,
    low_rank_projection,
)
from lowbit_optax.quantized import scale_by_quantized_adam
from lowbit_optax.slim.rules import Rules, flax_default_rules
from lowbit_optax.slim.transform import scale_by_slim_adam

__all__ = [
    "SOLO_B1",
    "adamw_4bit",
    "adamw_8bit",
    "ademamix_8bit",
    "coap_adamw",
    "coap_adamw_8bit",
    "galore_adamw",
    "ggt",
    "lion_8bit",
    "mfac",
    "muon_8bit",
    "sgd_momentum_8bit",
    "slim_adamw",
    "solo_adamw",
    "sparse_ggt",
    "sparse_mfac",
    "subtrack_adamw",
]


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """AdamW with 8-bit block-wise moments (bitsandbytes' recipe).

    Both moments use the 8-bit dynamic tree map (signed for ``mu``, unsigned for
    ``nu``), blocks of ``block_size`` with float32 absmax scales, nearest rounding:
    ``2 + 8 / block_size`` bytes per parameter on quantized leaves (``optax.adamw``: 8).

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask: as ``optax.adamw``.
      block_size: values per block along the last axis (multiple of 8; default 128).
      min_size: smaller leaves (and scalars) keep float32 moments (default 4096).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((256, 256))}
      >>> tx = adamw_8bit(1e-3)
      >>> state = tx.init(params)
      >>> updates, state = jax.jit(tx.update)(params, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> state[0].mu_codes["w"].dtype, state[0].mu_scales["w"].shape  # 2 blocks a row
      (dtype('uint8'), (256, 2))

    References:
      Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022.
    """
    return optax.chain(
        scale_by_quantized_adam(
            b1,
            b2,
            eps,
            mu_bits=8,
            nu_bits=8,
            mu_map="dynamic",
            nu_map="dynamic",
            block_size=block_size,
            min_size=min_size,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw_4bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """AdamW with 4-bit block-wise moments (the 4-bit paper's recipe).

    ``mu``: signed 4-bit dynamic-exponent map; ``nu``: unsigned 4-bit linear map
    without a zero level (the paper's zero-point fix). **Decision:** blocks of
    ``block_size`` for both moments (the paper normalises ``nu`` rank-1).
    ``1 + 8 / block_size`` bytes per parameter on quantized leaves.

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask: as ``optax.adamw``.
      block_size: values per block along the last axis (multiple of 8; default 128).
      min_size: smaller leaves (and scalars) keep float32 moments (default 4096).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = adamw_4bit(1e-3, weight_decay=0.01)
      >>> state = tx.init({"w": jnp.ones((256, 256)), "b": jnp.zeros(256)})
      >>> state[0].mu_codes["w"].shape  # two 4-bit codes per byte
      (256, 128)
      >>> state[0].mu_codes["b"].dtype  # fewer than min_size values: float32
      dtype('float32')

    References:
      Li et al., Memory Efficient Optimizers with 4-bit States, NeurIPS 2023.
    """
    return optax.chain(
        scale_by_quantized_adam(
            b1,
            b2,
            eps,
            mu_bits=4,
            nu_bits=4,
            mu_map="dynamic",
            nu_map="linear_zero_free",
            block_size=block_size,
            min_size=min_size,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


SOLO_B1 = {4: 0.8, 3: 0.7, 2: 0.6}


def solo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | None = None,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    bits: tuple[int, int] = (4, 2),
    block_size: int | None = None,
    quantile_sample: int | None = None,
    min_size: int | None = None,
    key: int | None = None,
) -> optax.GradientTransformation:
    """SOLO: low-bit AdamW robust to signal swamping.

    ``mu``: signed dynamic-exponent map at ``bits[0]``, nearest rounding, with a
    precision-specific default ``b1``; ``nu``: SOLO's logarithmic unsigned quantizer at
    ``bits[1]`` (per block max ``D`` and base from the block's 10% quantile, no zero
    level) with stochastic rounding in the exponent. 3-bit codes are packed in real 3
    bits. **Decision:** the 10% quantile is estimated from a strided subsample of
    ``quantile_sample`` values per block (an exact per-block sort dominated the
    update's time on CPU); ``quantile_sample=0`` computes it exactly.

    Args:
      learning_rate, b2, eps, weight_decay, mask: as ``optax.adamw``.
      b1: first-moment decay; default by precision (``SOLO_B1``: 0.8 at 4 bits, 0.7 at
        3, 0.6 at 2), the paper's remedy for swamped low-bit EMA updates.
      bits: ``(mu_bits, nu_bits)``: ``(4, 2)``, ``(3, 3)`` or ``(2, 2)``.
      block_size: values per block along the last axis (multiple of 8; default 128).
      quantile_sample: values per block the quantile is estimated from (divides
        ``block_size``), or 0 for the exact quantile. Default: 16, or 8 when 16 does
        not divide ``block_size``.
      min_size: smaller leaves (and scalars) keep float32 moments (default 4096).
      key: seed of the stochastic-rounding noise stored in the state (default 0).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = solo_adamw(1e-3, bits=(3, 3))
      >>> state = tx.init({"w": jnp.ones((256, 256))})
      >>> state[0].nu_codes["w"].shape, state[0].nu_bases["w"].shape  # 3-bit, log base
      ((256, 96), (256, 2))

    References:
      Xu et al., Pushing the Limits of Low-Bit Optimizers: A Focus on EMA Dynamics,
      arXiv 2505.00347.
    """
    if tuple(bits) not in ((4, 2), (3, 3), (2, 2)):
        raise ValueError(f"bits must be (4, 2), (3, 3) or (2, 2), got {bits!r}")
    block_size = static_arg("block_size", block_size, 128)
    if quantile_sample is None and isinstance(block_size, int):
        quantile_sample = 16 if block_size % 16 == 0 else 8
    return optax.chain(
        scale_by_quantized_adam(
            SOLO_B1[bits[0]] if b1 is None else b1,
            b2,
            eps,
            mu_bits=bits[0],
            nu_bits=bits[1],
            mu_map="dynamic",
            nu_map="log",
            rounding=("nearest", "stochastic_log"),
            block_size=block_size,
            quantile_sample=quantile_sample,
            min_size=min_size,
            key=key,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def slim_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rules: Rules | None = None,
    mu_dtype: Any = None,
    mu_bits: int | None = None,
    nu_bits: int | None = None,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """AdamW with SlimAdam's per-leaf averaged second moment.

    ``optax.chain(scale_by_slim_adam(...), optax.add_decayed_weights(weight_decay,
    mask), optax.scale_by_learning_rate(learning_rate))``, the same chain as
    ``optax.adamw`` (and bit-equal to it when ``rules`` compress nothing), so an
    ``optax.adamw`` state converted by ``slim_state_from_adam`` continues under it.

    Args:
      learning_rate, b1, b2, eps, eps_root, weight_decay, mask: as ``optax.adamw``.
      rules: per-leaf averaging axes (``rules_from_snr``, ``rules_from_json``, a
        mapping keyed like the params, or a callable ``(path, leaf) -> axes | None``).
        Default: ``flax_default_rules`` (the paper's GPT table in Flax layouts; other
        parameters keep Adam's full second moment). Under ``optax.inject_hyperparams``
        give a function as ``PathRules(fn)`` (optax calls a bare one as a schedule).
      mu_dtype: dtype of a float first moment.
      mu_bits: quantize the first moment block-wise (8/4/3/2 bits) on leaves of at
        least ``min_size`` elements.
      nu_bits: quantize the reduced second moment where it keeps >= ``min_size``
        elements.
      block_size, min_size: quantization block and smallest quantized leaf (default
        128 and 4096).

    Memory per parameter: ``mu`` 4 bytes (``mu_bits``: about ``mu_bits / 8``) plus 4
    bytes times the fraction of the second moment the rules keep (``removed_fraction``
    says how much they remove).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"mlp": {"up": {"kernel": jnp.zeros((64, 256))}}}
      >>> from lowbit_optax import flax_default_rules
      >>> tx = slim_adamw(1e-3, rules=flax_default_rules, mu_bits=4)
      >>> state = tx.init(params)
      >>> state[0].nu["mlp"]["up"]["kernel"].shape  # averaged over the fan-out
      (64, 1)

    References:
      Kalra et al., When Can You Get Away with Low Memory Adam?, arXiv 2503.01843.
    """
    return optax.chain(
        scale_by_slim_adam(
            b1,
            b2,
            eps,
            eps_root,
            rules=flax_default_rules if rules is None else rules,
            mu_dtype=mu_dtype,
            mu_bits=mu_bits,
            nu_bits=nu_bits,
            block_size=block_size,
            min_size=min_size,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


_ADAM_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-6}


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rank: int | float | None = None,
    update_interval: int | None = None,
    scale: float = 0.25,
    min_dim: int | None = None,
    proj_dtype: Any = None,
    projection_mask: optax.MaskOrFn = None,
) -> optax.GradientTransformation:
    """GaLore AdamW: Adam on SVD-projected gradients, weight decay and learning rate
    outside the projection; the inner moments are kept when the projector changes.

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask: as ``optax.adamw`` (``mask``
        selects the leaves that get weight decay).
      rank: projection rank: an int, or a fraction in (0, 1] of ``min(m, n)``
        (default 0.25).
      update_interval: steps between SVD refreshes of the projector (default 200).
      scale: ``alpha``, the factor on back-projected updates.
      min_dim: leaves with ``min(m, n) < min_dim`` are not projected (plain Adam;
        default 128).
      proj_dtype: storage dtype of the projectors (``float32``, the default, or
        ``bfloat16``).
      projection_mask: optax mask of the leaves that may be projected.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = galore_adamw(1e-3, rank=64, update_interval=200)
      >>> state = tx.init({"w": jnp.ones((512, 256)), "b": jnp.zeros(256)})
      >>> state[0].projectors["w"].shape, state[0].inner_state.mu["w"].shape
      ((256, 64), (512, 64))

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024 (arXiv 2403.03507).
    """
    projected = low_rank_projection(
        optax.scale_by_adam(b1, b2, eps),
        rank=static_arg("rank", rank, 0.25),
        projector=SVDProjector(),
        update_interval=static_arg("update_interval", update_interval, 200),
        scale=scale,
        min_dim=min_dim,
        mask=projection_mask,
        proj_dtype=proj_dtype,
    )
    return optax.chain(
        projected,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def coap_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rank: int | float | None = None,
    update_interval: int | None = None,
    reproject_factor: int | None = None,
    scale: float = 0.25,
    scale_aware: bool = True,
    power_iters: int | None = None,
    min_dim: int | None = None,
    proj_dtype: Any = None,
    projection_mask: optax.MaskOrFn = None,
    inner: optax.GradientTransformation | None = None,
    key: int | None = None,
) -> optax.GradientTransformation:
    """COAP AdamW: correlation-aware projector updates, inner moments kept.

    **Decisions:** ``scale_aware=True`` by default, since the paper's P step is
    numerically a no-op at real gradient scales (``False`` restores it);
    ``power_iters=2``: the first range finder (``t = 0`` only) takes two block power
    iterations, since COAP keeps that first subspace, moved only by small P steps, until
    its first recalibration, and the paper's one-pass sketch catches less of the top
    singular energy on slowly decaying spectra (``benchmarks/projection_interval``
    holds the comparison); ``0`` restores the paper's form.

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask: as ``optax.adamw``. ``b1``,
        ``b2`` and ``eps`` configure the default inner Adam.
      rank: projection rank: an int, or a fraction in (0, 1] of ``min(m, n)``
        (default 0.25).
      update_interval: steps between P steps (SGD on the projector; default 32).
      reproject_factor: every ``update_interval * reproject_factor`` steps the P step is
        replaced by a warm-started range-finder recalibration (default 5).
      scale: ``alpha``, the factor on back-projected updates.
      scale_aware: evaluate COAP's loss on RMS-normalised gradient and moment.
      power_iters: block power iterations of the first range finder (default 2).
      min_dim: leaves with ``min(m, n) < min_dim`` are not projected (default 128).
      proj_dtype: storage dtype of the projectors (``float32``, the default, or
        ``bfloat16``).
      projection_mask: optax mask of the leaves that may be projected.
      inner: a transform replacing the inner Adam (e.g. 8-bit moments: see
        ``coap_adamw_8bit``); it cannot be combined with ``b1``, ``b2`` or ``eps``.
      key: seed of the randomized range finder (default 0).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = coap_adamw(1e-3, rank=0.25, update_interval=32)
      >>> state = tx.init({"w": jnp.ones((512, 256))})
      >>> state[0].inner_state.mu["w"].shape  # rank 0.25 * min(512, 256) = 64
      (512, 64)

    References:
      Xiao et al., COAP: Memory-Efficient Training with Correlation-Aware Gradient
      Projection, arXiv 2412.00071.
    """
    given = {  # (traced values under inject_hyperparams count as given)
        k: v
        for k, v in (("b1", b1), ("b2", b2), ("eps", eps))
        if not isinstance(v, numbers.Real) or v != _ADAM_DEFAULTS[k]
    }
    if inner is not None and given:
        raise ValueError(
            f"coap_adamw got inner= together with {given}: b1, b2 and eps configure the "
            "default inner Adam, which inner= replaces. Set them on the inner transform "
            "instead."
        )
    projected = low_rank_projection(
        inner if inner is not None else optax.scale_by_adam(b1, b2, eps),
        rank=static_arg("rank", rank, 0.25),
        projector=COAPProjector(
            static_arg("reproject_factor", reproject_factor, 5),
            scale_aware=scale_aware,
            power_iters=static_arg("power_iters", power_iters, 2),
        ),
        update_interval=static_arg("update_interval", update_interval, 32),
        scale=scale,
        min_dim=min_dim,
        mask=projection_mask,
        proj_dtype=proj_dtype,
        key=key,
    )
    return optax.chain(
        projected,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def subtrack_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rank: int | float | None = None,
    update_interval: int | None = None,
    step_size: float | None = None,
    directions: int | float | None = None,
    scale: float = 0.25,
    moments: str = "rotate",
    recover: bool = False,
    min_dim: int | None = None,
    proj_dtype: Any = None,
    projection_mask: optax.MaskOrFn = None,
) -> optax.GradientTransformation:
    """SubTrack++ AdamW: Grassmannian subspace tracking, Adam moments rotated into the
    new subspace at each change, optional recovery of the discarded gradient.

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask: as ``optax.adamw``.
      rank: projection rank: an int, or a fraction in (0, 1] of ``min(m, n)``
        (default 0.25).
      update_interval: steps between geodesic steps (an SVD at the first; default 30,
        chosen from measured subspace drift, see ``benchmarks/projection_remedy``).
      step_size: ``None`` (the default): each turned direction takes the angle that
        captures the most of the gradient's energy (an exact line search along it); a
        float: the paper's scale-free angle ``step_size * sigma / |G|_F^2`` (see
        ``SubTrackProjector``).
      directions: how many of the tangent's top singular directions a geodesic step
        turns: ``None`` (the default), all ``r`` (the whole geodesic); an int (``1``,
        with ``step_size=1.0``, is the paper's rank-1 step); a float in (0, 1], a
        fraction of ``r``.
      scale: ``alpha``, the factor on back-projected updates.
      moments: ``rotate`` (SubTrack++), ``keep`` or ``reset`` the inner moments at a
        change of subspace.
      recover: add back the discarded gradient, scaled (Fira's recovery).
      min_dim: leaves with ``min(m, n) < min_dim`` are not projected (default 128).
      proj_dtype: storage dtype of the projectors (``float32``, the default, or
        ``bfloat16``).
      projection_mask: optax mask of the leaves that may be projected.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = subtrack_adamw(1e-3, rank=64, recover=True)
      >>> state = tx.init({"w": jnp.ones((512, 256))})
      >>> state[0].projectors["w"].shape, state[0].residual_norms["w"].shape
      ((256, 64), ())
      >>> paper = subtrack_adamw(1e-3, update_interval=50, step_size=1.0, directions=1)

    References:
      Rajabi et al., SubTrack your Grad: Gradient Subspace Tracking for Memory and Time
      Efficient Full-Parameter LLM Training, arXiv 2502.01586 (and SubTrack++).
    """
    projected = low_rank_projection(
        scale_by_adam_like(b1, b2, eps),
        rank=static_arg("rank", rank, 0.25),
        projector=SubTrackProjector(step_size, static_arg("directions", directions, None)),
        update_interval=static_arg("update_interval", update_interval, 30),
        scale=scale,
        min_dim=min_dim,
        mask=projection_mask,
        moments=moments,
        proj_dtype=proj_dtype,
        recover=recover,
    )
    return optax.chain(
        projected,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def coap_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
    proj_dtype: Any = None,
    **coap_kwargs: Any,
) -> optax.GradientTransformation:
    """8-bit COAP: ``coap_adamw`` whose inner Adam keeps 8-bit block-wise moments
    (``scale_by_quantized_adam``, bitsandbytes' dynamic maps) in the low-rank shape.
    Leaves that are not projected get the same 8-bit Adam. The COAP ``P`` step reads
    the projected gradient in place of the (quantized) inner first moment.

    **Decisions:** ``S`` is stored in ``bfloat16`` and the moments are quantized in
    blocks of 64. Blocks run along the last axis of the low-rank state, which is ``r``
    long on the right side (``m x r``): with blocks longer than ``r`` every row is
    padded to a whole block. Pick ``block_size`` dividing ``r`` (a multiple of 8).

    Args:
      learning_rate, b1, b2, eps, weight_decay, mask: as ``optax.adamw``.
      block_size: values per quantization block of the inner moments (default 64).
      min_size: inner leaves with fewer elements keep float32 moments (default 4096).
      proj_dtype: storage dtype of the projectors (default ``bfloat16``).
      **coap_kwargs: the projection's keyword arguments, as ``coap_adamw`` takes them
        (``rank``, ``update_interval``, ``reproject_factor``, ``scale``,
        ``scale_aware``, ``power_iters``, ``min_dim``, ``projection_mask``, ``key``).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = coap_adamw_8bit(1e-3, rank=64, update_interval=32)
      >>> state = tx.init({"w": jnp.ones((512, 256))})
      >>> state[0].projectors["w"].dtype, state[0].inner_state.mu_codes["w"].shape
      (dtype(bfloat16), (512, 64))

    References:
      Xiao et al., COAP: Memory-Efficient Training with Correlation-Aware Gradient
      Projection, arXiv 2412.00071 (8-bit COAP); Dettmers et al., 8-bit Optimizers via
      Block-wise Quantization, ICLR 2022.
    """
    if "inner" in coap_kwargs:
        raise ValueError(
            "coap_adamw_8bit builds its own inner 8-bit Adam; use coap_adamw(inner=...) "
            "for another inner transform"
        )
    block_size = static_arg("block_size", block_size, 64)
    inner = scale_by_quantized_adam(
        b1, b2, eps, mu_bits=8, nu_bits=8, block_size=block_size, min_size=min_size
    )
    return coap_adamw(
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        proj_dtype=static_arg("proj_dtype", proj_dtype, jnp.bfloat16),
        inner=inner,
        **coap_kwargs,
    )


coap_adamw_8bit.__signature__ = forwarding_signature(coap_adamw_8bit, coap_adamw, drop=("inner",))


def mfac(
    learning_rate: optax.ScalarOrSchedule,
    num_grads: int | None = None,
    damping: float | None = None,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
) -> optax.GradientTransformation:
    """Dense M-FAC with decoupled weight decay (the EFCP paper's defaults).

    Args:
      learning_rate: step size or schedule. The update is ``F^{-1} g`` with
        ``F = damping I + (1/m) sum g_i g_i^T``, whose scale grows as ``1 / damping``
        along directions the window has not seen: pick the rate together with
        ``damping`` (``scale_by_mfac`` says how).
      num_grads: window size ``m`` (``4 m`` bytes per parameter; default 1024).
      damping: ``lambda`` of the empirical Fisher (default 1e-4); static, since it
        picks the precision of the window's solve.
      weight_decay, mask: as ``optax.adamw``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = mfac(1e-3, num_grads=32)
      >>> state = tx.init({"w": jnp.zeros((64, 10))})
      >>> state[0].values["w"].shape, state[0].gram.shape  # the last 32 gradients
      ((32, 64, 10), (32, 32))

    References:
      Frantar, Kurtic, Alistarh, M-FAC: Efficient Matrix-Free Approximations of
      Second-Order Information, NeurIPS 2021.
    """
    return optax.chain(
        scale_by_mfac(num_grads, damping),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sparse_mfac(
    learning_rate: optax.ScalarOrSchedule,
    num_grads: int | None = None,
    damping: float | None = None,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    density: float | None = None,
) -> optax.GradientTransformation:
    """Sparse M-FAC (EFCP): error-feedback top-k gradients in the window.

    Args:
      learning_rate, num_grads, damping, weight_decay, mask: as ``mfac``.
      density: fraction of each (accumulated) gradient kept in the window:
        ``8 m k`` bytes for the window instead of ``4 m d`` (default 0.01).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = sparse_mfac(1e-3, num_grads=32, density=0.05)
      >>> state = tx.init({"w": jnp.zeros((64, 10))})
      >>> state[0].values["w"].shape  # 5% of each row's 10 values, at least 1
      (32, 64, 1)

    References:
      Modoranu et al., Error Feedback Can Accurately Compress Preconditioners,
      arXiv 2306.06098.
    """
    return optax.chain(
        scale_by_mfac(num_grads, damping, compressor=top_k(static_arg("density", density, 0.01))),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def ggt(
    learning_rate: optax.ScalarOrSchedule,
    num_grads: int | None = None,
    eps: float = 1e-5,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
) -> optax.GradientTransformation:
    """Dense windowed GGT (full-matrix AdaGrad over the last gradients) with decoupled
    weight decay.

    Args:
      learning_rate: step size or schedule.
      num_grads: window size ``r`` (``4 r`` bytes per parameter; default 100).
      eps: ``eps`` of ``((G^T G)^{1/2} + eps I)^{-1}``; directions outside the window
        are scaled by ``1 / eps``.
      weight_decay, mask: as ``optax.adamw``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = ggt(1e-3, num_grads=16)
      >>> state = tx.init({"w": jnp.zeros((64, 10))})
      >>> state[0].values["w"].shape, state[0].gram.shape
      ((16, 64, 10), (16, 16))

    References:
      Agarwal et al., Efficient Full-Matrix Adaptive Regularization, ICML 2019.
    """
    return optax.chain(
        scale_by_ggt(num_grads, eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sparse_ggt(
    learning_rate: optax.ScalarOrSchedule,
    num_grads: int | None = None,
    eps: float = 1e-5,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    density: float | None = None,
) -> optax.GradientTransformation:
    """Sparse GGT (EFCP): error-feedback top-k gradients in the window.

    Args:
      learning_rate, num_grads, eps, weight_decay, mask: as ``ggt``.
      density: fraction of each (accumulated) gradient kept in the window (default
        0.01).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = sparse_ggt(1e-3, num_grads=16, density=0.05)
      >>> state = tx.init({"w": jnp.zeros((64, 10))})
      >>> state[0].values["w"].shape, state[0].indices["w"].dtype
      ((16, 64, 1), dtype('int32'))

    References:
      Modoranu et al., Error Feedback Can Accurately Compress Preconditioners,
      arXiv 2306.06098.
    """
    return optax.chain(
        scale_by_ggt(num_grads, eps, compressor=top_k(static_arg("density", density, 0.01))),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# ---- any optimizer's state in 8 bits (lowbit_optax.any_state) -----------------------


def lion_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: optax.MaskOrFn = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """``optax.lion`` with its momentum ``mu`` in 8 bits (signed dynamic map, blocks of
    ``block_size`` with a float32 scale): ``1 + 4 / block_size`` bytes per parameter on
    quantized leaves (``optax.lion``: 4). Leaf by leaf, in row slices.

    Args:
      learning_rate, b1, b2, weight_decay, mask: as ``optax.lion``.
      block_size: values per block along the last axis (multiple of 8; default 128).
      min_size: smaller leaves keep a float32 ``mu`` (default 4096).

    Example:
      >>> from lowbit_optax import state_bytes
      >>> import jax.numpy as jnp
      >>> tx = lion_8bit(1e-4)
      >>> state = tx.init({"w": jnp.ones((256, 256))})
      >>> state_bytes(state) == 256 * 256 + 256 * 2 * 4 + 4  # codes, scales, count
      True

    References:
      Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023;
      Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022.
    """
    return quantize_state(
        optax.lion(learning_rate, b1, b2, weight_decay=weight_decay, mask=mask),
        **_storage(block_size, min_size),
    )


def sgd_momentum_8bit(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """``optax.sgd`` with heavy-ball (or Nesterov) momentum, its ``trace`` in 8 bits
    (signed dynamic map): ``1 + 4 / block_size`` bytes per parameter on quantized
    leaves (float32: 4). Leaf by leaf, in row slices.

    Args:
      learning_rate, momentum, nesterov: as ``optax.sgd`` (``momentum`` is required
        to be a number here: without it there is no state to quantize).
      block_size: values per block along the last axis (multiple of 8; default 128).
      min_size: smaller leaves keep a float32 ``trace`` (default 4096).

    Example:
      >>> from lowbit_optax import state_bytes
      >>> import jax.numpy as jnp
      >>> tx = sgd_momentum_8bit(1e-2, momentum=0.9, nesterov=True)
      >>> state = tx.init({"w": jnp.ones((256, 256))})
      >>> state_bytes(state) == 256 * 256 + 256 * 2 * 4  # codes and block scales
      True

    References:
      Dettmers et al., 8-bit Optimizers via Block-wise Quantization, ICLR 2022.
    """
    return quantize_state(
        optax.sgd(learning_rate, momentum, nesterov), **_storage(block_size, min_size)
    )


def muon_8bit(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs: Any = (3.4445, -4.775, 2.0315),
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: optax.MaskOrFn = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
    **muon_kwargs: Any,
) -> optax.GradientTransformation:
    """``optax.contrib.muon`` with 8-bit state: the momentum of the matrices Muon
    orthogonalizes (signed dynamic map: ``1 + 4 / block_size`` bytes per parameter),
    and the Adam moments of the other leaves (signed ``mu``, unsigned ``nu``, as
    ``adamw_8bit``; leaves under ``min_size`` stay float32). Leaf by leaf: each
    matrix's Newton-Schulz step decodes that matrix's momentum only.

    Args:
      learning_rate, ns_coeffs, ns_steps, beta, eps, weight_decay, weight_decay_mask: as
        ``optax.contrib.muon``.
      block_size: values per block along the last axis (multiple of 8; default 128).
      min_size: smaller leaves keep float32 state (default 4096).
      **muon_kwargs: ``optax.contrib.muon``'s keyword-only arguments (``nesterov``,
        ``adaptive``, ``preconditioning``, ``adam_b1``, ``adam_b2``, ``adam_eps_root``,
        ``adam_weight_decay``, ``adam_learning_rate``,
        ``muon_weight_dimension_numbers``, ``consistent_rms``), passed on.

    Example:
      >>> from lowbit_optax import memory_report
      >>> import jax.numpy as jnp
      >>> tx = muon_8bit(0.02, nesterov=True)
      >>> params = {"w": jnp.ones((256, 256)), "b": jnp.zeros(256)}
      >>> state = tx.init(params)
      >>> round(memory_report(state, params).bytes_per_param, 2)  # mostly 8-bit momentum
      1.06

    References:
      Jordan et al., Muon: An optimizer for hidden layers in neural networks (2024);
      8-bit Muon: arXiv 2509.23106.
    """
    return quantize_state(
        optax.contrib.muon(
            learning_rate,
            ns_coeffs,
            ns_steps,
            beta,
            eps,
            weight_decay,
            weight_decay_mask,
            **muon_kwargs,
        ),
        **_storage(block_size, min_size),
    )


muon_8bit.__signature__ = forwarding_signature(muon_8bit, optax.contrib.muon)


def ademamix_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: optax.MaskOrFn = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """``optax.contrib.ademamix`` with its three moments in 8 bits: the fast and slow
    EMAs ``m1``, ``m2`` (signed dynamic map) and ``nu`` (unsigned):
    ``3 + 12 / block_size`` bytes per parameter on quantized leaves (float32: 12).
    Leaf by leaf, in row slices.

    Args:
      learning_rate, b1, b2, b3, alpha, eps, weight_decay, mask: as
        ``optax.contrib.ademamix``.
      block_size: values per block along the last axis (multiple of 8; default 128).
      min_size: smaller leaves keep float32 moments (default 4096).

    Example:
      >>> from lowbit_optax import state_bytes
      >>> import jax.numpy as jnp
      >>> tx = ademamix_8bit(1e-3)
      >>> state = tx.init({"w": jnp.ones((256, 256))})
      >>> state_bytes(state) == 3 * (256 * 256 + 256 * 2 * 4) + 8  # three 8-bit EMAs
      True

    References:
      Pagliardini et al., The AdEMAMix Optimizer: Better, Faster, Older, ICLR 2025.
    """
    return quantize_state(
        optax.contrib.ademamix(
            learning_rate, b1, b2, b3, alpha, eps, weight_decay=weight_decay, mask=mask
        ),
        **_storage(block_size, min_size),
    )


def _storage(block_size: int | None, min_size: int | None) -> dict[str, int]:
    """``quantize_state``'s 8-bit storage arguments of a recipe."""
    return dict(
        bits=8,
        block_size=static_arg("block_size", block_size, 128),
        min_size=static_arg("min_size", min_size, 4096),
    )
