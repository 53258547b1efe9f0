"""Projected optimizers with 8-bit inner moments vs float32 ones and plain AdamW.

Low-rank projection (GaLore, COAP) runs Adam on an ``r``-dimensional projection of each
large matrix's gradient, so the moments of an ``(m, n)`` weight take ``m r`` (or
``r n``) values instead of ``m n``. ``lowbit_optax.low_rank_projection`` wraps *any*
inner transform, so those low-rank moments can themselves be stored block-wise in 8
bits (``scale_by_quantized_adam``): the two savings multiply. This script trains one
Flax NNX MLP on scikit-learn's 8x8 digits with each of

* ``adamw``: ``optax.adamw``, the baseline (8 bytes per parameter);
* ``galore_adamw``: ``lowbit_optax.galore_adamw``, SVD projector, float32 inner Adam;
* ``galore_adamw_8bit``: the same projection around an 8-bit inner Adam, composed here
  by hand: ``optax.chain(low_rank_projection(scale_by_quantized_adam(...),
  projector=SVDProjector(), ...), add_decayed_weights, scale_by_learning_rate)``, which
  is how ``lowbit_optax``'s aliases are built;
* ``coap_adamw``: ``lowbit_optax.coap_adamw``, COAP projector, float32 inner Adam;
* ``coap_adamw_8bit``: ``lowbit_optax.coap_adamw_8bit``, the same with 8-bit inner
  moments (and bfloat16 projectors, its default);

and prints a table: the optimizer state in bytes per parameter, split into projectors
and inner state (``lowbit_optax.state_bytes``), the train-set loss before and after, the
test accuracy and the time per step.

Standalone: it imports only lowbit_optax, jax, optax, flax, numpy, scikit-learn and the
standard library, and runs from any directory.

Usage::

    python examples/projected_8bit.py --steps 300 --hidden 512
    # tiny (a few seconds):
    python examples/projected_8bit.py --steps 20 --hidden 128 --block-size 32 \\
        --min-size 256 --optimizers adamw,coap_adamw,coap_adamw_8bit
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import lowbit_optax as lo

# ------------------------------------------------------------------------------------
# The optimizers
# ------------------------------------------------------------------------------------


def _matrices(params: Any) -> Any:
    """Projection mask: 2-D weights only (biases are never projected)."""
    return jax.tree.map(lambda p: p.ndim == 2, params)


def galore_adamw_8bit(
    lr: float, *, weight_decay: float, rank: float, update_interval: int, min_dim: int,
    block_size: int, min_size: int,
) -> optax.GradientTransformation:  # fmt: skip
    """GaLore (SVD projector) around an 8-bit block-wise Adam: composed by hand."""
    inner = lo.scale_by_quantized_adam(
        0.9, 0.999, 1e-6, mu_bits=8, nu_bits=8, block_size=block_size, min_size=min_size
    )
    projected = lo.low_rank_projection(
        inner,
        rank=rank,
        projector=lo.SVDProjector(),
        update_interval=update_interval,
        scale=0.25,
        min_dim=min_dim,
        mask=_matrices,
    )
    return optax.chain(
        projected,
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lr),
    )


def optimizers(args: argparse.Namespace) -> dict[str, tuple[str, optax.GradientTransformation]]:
    """name -> (inner state description, transform)."""
    wd = args.weight_decay
    projection = dict(
        rank=args.rank,
        update_interval=args.update_interval,
        min_dim=args.min_dim,
        projection_mask=_matrices,
    )
    quant = dict(block_size=args.block_size, min_size=args.min_size)
    return {
        "adamw": ("f32 (full)", optax.adamw(args.lr, weight_decay=wd)),
        "galore_adamw": ("f32", lo.galore_adamw(args.lr, weight_decay=wd, **projection)),
        "galore_adamw_8bit": (
            "8-bit",
            galore_adamw_8bit(
                args.lr,
                weight_decay=wd,
                rank=args.rank,
                update_interval=args.update_interval,
                min_dim=args.min_dim,
                **quant,
            ),
        ),
        "coap_adamw": ("f32", lo.coap_adamw(args.lr, weight_decay=wd, **projection)),
        "coap_adamw_8bit": (
            "8-bit",
            lo.coap_adamw_8bit(args.lr, weight_decay=wd, **quant, **projection),
        ),
    }


def projector_bytes(opt_state: Any) -> int:
    """Bytes of the projection matrices ``S`` in a state (0 without projection)."""
    is_proj = lambda x: isinstance(x, lo.LowRankProjectionState)
    return sum(
        lo.state_bytes(s.projectors)
        for s in jax.tree.leaves(opt_state, is_leaf=is_proj)
        if is_proj(s)
    )


# ------------------------------------------------------------------------------------
# Data, model, training
# ------------------------------------------------------------------------------------


def digits(seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): 8x8 digits as 64 floats in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    split = int(len(x) * (1 - test_fraction))
    return x[:split], y[:split], x[split:], y[split:]


class MLP(nnx.Module):
    """``in -> hidden x layers (ReLU) -> classes``; Flax ``(in, out)`` kernels."""

    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def train(name, tx, graphdef, params, data, args) -> dict[str, Any]:
    """Trains a copy of ``params`` with ``tx``; returns the row of the table."""
    x_train, y_train, x_test, y_test = data

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def evaluate(params):
        logits = nnx.merge(graphdef, params)(x_test)
        return loss_fn(params, x_train, y_train), jnp.mean(jnp.argmax(logits, -1) == y_test)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(jnp.copy, params)
    opt_state = jax.jit(tx.init)(params)
    total = lo.state_bytes(opt_state)
    proj = projector_bytes(opt_state)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    start_loss = float(evaluate(params)[0])
    losses, t0 = [], None
    for s in range(args.steps):
        idx = np.random.default_rng((args.seed, s)).integers(0, len(x_train), args.batch_size)
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        losses.append(loss)
        if s == 0:
            jax.block_until_ready(loss)
            t0 = time.perf_counter()  # the first step compiles
    jax.block_until_ready(params)
    ms = 1e3 * (time.perf_counter() - t0) / max(args.steps - 1, 1)
    end_loss, acc = map(float, evaluate(params))
    if not np.isfinite(end_loss):
        raise FloatingPointError(f"{name}: the loss diverged ({end_loss})")
    return {
        "optimizer": name,
        "state_bytes": total,
        "projector_bytes": proj,
        "inner_bytes": total - proj,
        "bytes_per_param": total / num_params,
        "projector_bytes_per_param": proj / num_params,
        "inner_bytes_per_param": (total - proj) / num_params,
        "start_loss": start_loss,
        "end_loss": end_loss,
        "train_losses": [float(v) for v in losses],
        "test_accuracy": acc,
        "ms_per_step": ms,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--optimizers",
        default="adamw,galore_adamw,galore_adamw_8bit,coap_adamw,coap_adamw_8bit",
        help="comma-separated names (see the module docstring)",
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="hidden layers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rank", type=float, default=0.25, help="fraction of min(m, n)")
    p.add_argument("--update-interval", type=int, default=50, help="steps between projector events")
    p.add_argument("--min-dim", type=int, default=32, help="project weights with min(m, n) >= this")
    p.add_argument("--block-size", type=int, default=64, help="8-bit blocks (divide the rank)")
    p.add_argument("--min-size", type=int, default=4096, help="smaller inner leaves stay float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    available = optimizers(args)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown}; choose from {sorted(available)}")

    data = digits(args.seed)
    sizes = [data[0].shape[1]] + [args.hidden] * args.layers + [10]
    # (initialised in one compiled program: eager initialisers compile one op at a time)
    graphdef, params = nnx.split(nnx.jit(lambda: MLP(sizes, rngs=nnx.Rngs(args.seed)))())
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    print(
        f"MLP {sizes}: {num_params:,} params, {args.steps} steps; projection rank "
        f"{args.rank} of min(m, n) for weights with min(m, n) >= {args.min_dim}, 8-bit "
        f"blocks of {args.block_size} on inner leaves >= {args.min_size} values"
    )
    rows = []
    for name in names:
        inner, tx = available[name]
        row = train(name, tx, graphdef, params, data, args)
        row["inner"] = inner
        rows.append(row)
        print(f"  {name}: loss {row['start_loss']:.4f} -> {row['end_loss']:.4f}")

    header = (
        "optimizer", "inner", "state B/param", "projectors", "inner state",
        "train loss", "test acc", "ms/step",
    )  # fmt: skip
    body = [
        (
            r["optimizer"],
            r["inner"],
            f"{r['bytes_per_param']:.3f}",
            f"{r['projector_bytes_per_param']:.3f}",
            f"{r['inner_bytes_per_param']:.3f}",
            f"{r['start_loss']:.3f} -> {r['end_loss']:.3f}",
            f"{r['test_accuracy']:.3f}",
            f"{r['ms_per_step']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    print()
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print(fmt(r))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
