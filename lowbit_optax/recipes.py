"""Recipes that compose techniques through their public composition points.

Technique modules do not import each other; a composition that needs two of them (a
projection wrapping a quantized Adam) lives here.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from lowbit_optax.projection import coap_adamw
from lowbit_optax.quantized import scale_by_quantized_adam

__all__ = ["coap_adamw_8bit"]


def coap_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    rank: int | float = 0.25,
    update_interval: int = 32,
    reproject_factor: int = 5,
    scale: float = 0.25,
    scale_aware: bool = True,
    power_iters: int = 2,
    min_dim: int = 128,
    proj_dtype: Any = jnp.bfloat16,
    projection_mask: optax.MaskOrFn = None,
    block_size: int = 64,
    min_size: int = 4096,
    key: int = 0,
) -> optax.GradientTransformation:
    """8-bit COAP: ``coap_adamw`` whose inner Adam keeps 8-bit block-wise moments
    (``scale_by_quantized_adam``, bitsandbytes' dynamic maps) in the low-rank shape.
    Leaves that are not projected get the same 8-bit Adam. The COAP ``P`` step reads
    the projected gradient in place of the (quantized) inner first moment.

    **Decisions** (measured on the benchmark's ``lm``, rank 1/4 of the width 256, so
    ``r = 64``): ``S`` is stored in ``bfloat16`` and the moments are quantized in
    blocks of 64. Blocks run along the last axis of the low-rank state, which is ``r``
    long on the right side (``m x r``): with blocks of 128 every row of 64 values is
    padded to a whole block, doubling the codes. The whole ``lm`` state is 0.87
    bytes/param this way, against 1.41 with ``float32`` ``S`` and blocks of 128 (1.11
    with ``float32`` ``S`` and blocks of 64). Pick ``block_size`` dividing ``r`` (a
    multiple of 8) for other ranks.

    References:
      Xiao et al., COAP, arXiv 2412.00071 (8-bit COAP); Dettmers et al., 8-bit
      Optimizers via Block-wise Quantization, ICLR 2022.
    """
    inner = scale_by_quantized_adam(
        b1, b2, eps, mu_bits=8, nu_bits=8, block_size=block_size, min_size=min_size
    )
    return coap_adamw(
        learning_rate,
        b1,
        b2,
        eps,
        weight_decay,
        mask,
        rank=rank,
        update_interval=update_interval,
        reproject_factor=reproject_factor,
        scale=scale,
        scale_aware=scale_aware,
        power_iters=power_iters,
        min_dim=min_dim,
        proj_dtype=proj_dtype,
        projection_mask=projection_mask,
        inner=inner,
        key=key,
    )
