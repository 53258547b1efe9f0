"""Does my model's optimizer update (or training step) fit my memory budget? Compile only.

For each optimizer, builds its state with ``jax.eval_shape`` (nothing is allocated) and
asks XLA for the planned memory of the donated update ``(params, state, grads) ->
(params', state')`` with ``lowbit_optax.step_memory``, and with ``--with-step`` of a whole
training step (forward, backward and update of a GPT-style decoder on a ``--batch``).
The parameters are ``jax.ShapeDtypeStruct``s, so a laptop answers for a 1B model in
seconds. It prints, per optimizer, the state in bytes per parameter and GiB, the update's
(and the step's) peak in GiB, and FITS / DOES NOT FIT against ``--budget-gib``.

The peak is XLA's plan for the program on the backend it compiles for (the default
device: CPU here, the GPU on a GPU machine): arguments + outputs - donated + temporaries.
It does not include what the rest of a training loop keeps alive, nor framework
overheads (CUDA context, allocator fragmentation): keep a margin.

Optimizer names are ``lowbit_optax`` aliases (``adamw_8bit``, ``adamw_4bit``,
``solo_adamw``, ``slim_adamw``, ``galore_adamw``, ``coap_adamw_8bit``, ...) or ``optax``
optimizers (``adamw``, ``adam``, ``lion``, ``adafactor``, ``sgd``, ...), each called as
``name(learning_rate)`` with its defaults.

Exit status: 0, or 1 when an optimizer named by ``--require-fit`` does not fit (for CI
scripts; ``--require-fit`` may be repeated and adds the optimizer if it is not listed).

Standalone: it imports only lowbit_optax, jax, optax, numpy and the standard library,
and runs from any directory.

Usage::

    python examples/memory_budget.py --model 1b --optimizers adamw,adamw_8bit,solo_adamw \\
        --budget-gib 16
    python examples/memory_budget.py --model gpt2 --with-step --batch 8x1024 \\
        --param-dtype bfloat16 --budget-gib 12 --require-fit adamw_8bit
    python examples/memory_budget.py --model tiny --budget-gib 0.001   # a few seconds

``--model``: ``gpt2`` (GPT-2 small's shapes, 124M, tied embeddings), ``1b`` (a GPT-style
decoder of ~1.0B: width 2048, 18 layers, MLP 8192, vocabulary 50304) or ``tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lowbit_optax as lo

GIB = 1024**3


# ------------------------------------------------------------------------------------
# The model: parameter shapes (a dict of ShapeDtypeStructs) and a pure forward pass
# ------------------------------------------------------------------------------------


class Config(NamedTuple):
    vocab: int
    context: int
    width: int
    depth: int
    heads: int
    mlp: int


MODELS = {
    "gpt2": Config(vocab=50257, context=1024, width=768, depth=12, heads=12, mlp=3072),
    "1b": Config(vocab=50304, context=2048, width=2048, depth=18, heads=16, mlp=8192),
    "tiny": Config(vocab=256, context=64, width=64, depth=2, heads=4, mlp=256),
}


def param_shapes(cfg: Config, dtype: Any) -> dict[str, Any]:
    """A pre-LayerNorm decoder's parameters, named as Flax NNX names them (so path rules
    such as ``lowbit_optax.flax_default_rules`` apply): ``(in, out)`` kernels with biases,
    learned positions, the output layer tied to the token embedding (GPT-2's layout)."""
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    d, f = cfg.width, cfg.mlp
    linear = lambda i, o: {"kernel": s(i, o), "bias": s(o)}
    norm = lambda: {"scale": s(d), "bias": s(d)}
    block = lambda: {
        "norm1": norm(),
        "attn": {name: linear(d, d) for name in ("q", "k", "v", "o")},
        "norm2": norm(),
        "mlp": {"up": linear(d, f), "down": linear(f, d)},
    }
    return {
        "embed": {"embedding": s(cfg.vocab, d)},
        "pos": s(cfg.context, d),
        "blocks": {i: block() for i in range(cfg.depth)},
        "norm_f": norm(),
    }


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]).astype(x.dtype)


def _linear(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def loss_fn(params: dict[str, Any], tokens: jax.Array, heads: int) -> jax.Array:
    """Next-token cross-entropy of ``tokens`` (``(batch, seq + 1)`` int32)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    b, t = inputs.shape
    x = params["embed"]["embedding"][inputs] + params["pos"][:t]
    for i in range(len(params["blocks"])):
        blk = params["blocks"][i]
        h = _layer_norm(x, blk["norm1"])
        split = lambda y: y.reshape(b, t, heads, -1)
        q, k, v = (split(_linear(h, blk["attn"][n])) for n in ("q", "k", "v"))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, -1)
        x = x + _linear(y, blk["attn"]["o"])
        h = _layer_norm(x, blk["norm2"])
        x = x + _linear(jax.nn.gelu(_linear(h, blk["mlp"]["up"])), blk["mlp"]["down"])
    logits = _layer_norm(x, params["norm_f"]) @ params["embed"]["embedding"].T
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


# ------------------------------------------------------------------------------------
# Optimizers by name
# ------------------------------------------------------------------------------------


def resolve_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """``lowbit_optax.<name>(lr)`` if it is one of its optimizers, else ``optax.<name>(lr)``."""
    for module in (lo, optax):
        fn = getattr(module, name, None) if name in getattr(module, "__all__", ()) else None
        if fn is None or not callable(fn):
            continue
        try:
            tx = fn(learning_rate)
        except (TypeError, ValueError):
            continue
        if isinstance(tx, optax.GradientTransformation):
            return tx
    raise ValueError(
        f"unknown optimizer {name!r}: not a lowbit_optax alias nor an optax optimizer "
        "taking a learning rate (e.g. adamw, adamw_8bit, solo_adamw, slim_adamw, lion)"
    )


# ------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    g = n / GIB
    return f"{g:.3f}" if g >= 0.01 else f"{g:.2e}"


def parse_batch(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must look like 4x256, got {text!r}") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"--batch sizes must be positive, got {text!r}")
    return b, t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    p.add_argument("--optimizers", default="adamw,adamw_8bit,solo_adamw", help="comma-separated")
    p.add_argument("--budget-gib", type=float, default=16.0, help="memory budget (GiB)")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--with-step", action="store_true", help="also compile a whole training step")
    p.add_argument("--batch", type=parse_batch, default=(4, 256), help="BATCHxSEQ (--with-step)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate the optimizers get")
    p.add_argument(
        "--require-fit",
        action="append",
        default=[],
        metavar="NAME",
        help="exit 1 if optimizer NAME does not fit (repeatable)",
    )
    p.add_argument("--summary", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    cfg = MODELS[args.model]
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    names += [n for n in args.require_fit if n not in names]
    try:
        txs = {name: resolve_optimizer(name, args.lr) for name in names}
    except ValueError as e:
        p.error(str(e))
    batch_size, seq = args.batch
    if args.with_step and seq > cfg.context:
        p.error(f"--batch sequence {seq} exceeds the {args.model} context of {cfg.context}")

    params = param_shapes(cfg, jnp.dtype(args.param_dtype))
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    param_bytes = lo.state_bytes(params)
    budget = args.budget_gib * GIB
    print(
        f"model {args.model}: {num_params:,} params ({num_params / 1e6:.1f}M, "
        f"{args.param_dtype}, {_gib(param_bytes)} GiB); budget {args.budget_gib:g} GiB; "
        f"backend {jax.default_backend()}"
        + (f"; training step on a {batch_size}x{seq} batch" if args.with_step else "")
    )

    loss, batch = None, None
    if args.with_step:
        loss = lambda params, tokens: loss_fn(params, tokens, cfg.heads)
        batch = jax.ShapeDtypeStruct((batch_size, seq + 1), jnp.int32)

    header = ["optimizer", "state B/param", "state GiB", "update peak GiB"]
    header += ["step peak GiB"] if args.with_step else []
    header += ["fits"]
    rows, table = [], []
    for name, tx in txs.items():
        mem = lo.step_memory(tx, params, loss, batch)
        step_peak = mem.train_step.peak_bytes if mem.train_step is not None else None
        peak = step_peak if step_peak is not None else mem.update.peak_bytes
        fits = peak <= budget
        rows.append(
            {
                "optimizer": name,
                "num_params": mem.num_params,
                "param_bytes": mem.param_bytes,
                "state_bytes": mem.state_bytes,
                "state_bytes_per_param": mem.state_bytes / mem.num_params,
                "update_peak_bytes": mem.update.peak_bytes,
                "update_temp_bytes": mem.update.temp_bytes,
                "step_peak_bytes": step_peak,
                "fits": fits,
            }
        )
        cells = [
            name,
            f"{mem.state_bytes / mem.num_params:.4f}",
            _gib(mem.state_bytes),
            _gib(mem.update.peak_bytes),
        ]
        cells += [_gib(step_peak)] if args.with_step else []
        cells += ["FITS" if fits else "DOES NOT FIT"]
        table.append(cells)

    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    fmt = lambda r: "  ".join(
        c.ljust(w) if i in (0, len(r) - 1) else c.rjust(w)
        for i, (c, w) in enumerate(zip(r, widths, strict=True))
    ).rstrip()
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print(fmt(r))
    print(
        "(update peak: XLA's planned buffers of the donated update, params + grads + state "
        "+ temporaries" + ("; step peak: forward, backward and update)" if args.with_step else ")")
    )
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(rows, f, indent=1)

    failed = [r["optimizer"] for r in rows if r["optimizer"] in args.require_fit and not r["fits"]]
    if failed:
        print(
            f"--require-fit: {', '.join(failed)} does not fit in {args.budget_gib:g} GiB",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
