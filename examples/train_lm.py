"""Train a byte-level transformer LM on CPython's pydoc text with a lowbit_optax optimizer.

Self-contained: it imports only lowbit_optax, jax, optax, flax, orbax, numpy, tqdm and the
standard library, so it can be copied into a project as it is. A Flax NNX model and
``nnx.Optimizer``, an ``nnx.jit`` train step with donated buffers, periodic held-out eval
loss, the optimizer state's memory report at start, and orbax-checkpoint checkpoints that
resume exactly: the batch for step ``s`` is drawn from ``numpy.random.default_rng((seed,
s))``, so the data stream depends only on (seed, step) and a resumed run sees the same
batches, and ends with bit-identical parameters, as an uninterrupted one.

Standalone: copied alone into an empty directory, it runs from there (``python train_lm.py
--steps 5 --depth 1 --width 32 --heads 2 --seq-len 32``); it reads nothing of this
repository but the installed lowbit_optax. ``train_multihost.py`` imports it from its own
folder.

Usage::

    python examples/train_lm.py --optimizer adamw_8bit --steps 200 --lr 1e-3 \\
        --batch-size 8 --ckpt-dir /tmp/lm --ckpt-every 50 --eval-every 50
    # interrupted? continue from the latest checkpoint up to --steps:
    python examples/train_lm.py --optimizer adamw_8bit --steps 200 --lr 1e-3 \\
        --batch-size 8 --ckpt-dir /tmp/lm --ckpt-every 50 --eval-every 50 --resume

Model size: ``--depth --width --heads --seq-len``. ``--optimizer``: a name of
``OPTIMIZERS``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import lowbit_optax as lo

WEIGHT_DECAY = 1e-4
_MATRICES = lambda params: jax.tree.map(lambda p: p.ndim == 2, params)

# name -> (learning_rate -> optax.GradientTransformation)
OPTIMIZERS = {
    "adamw": lambda lr: optax.adamw(lr, weight_decay=WEIGHT_DECAY),
    "adamw_8bit": lambda lr: lo.adamw_8bit(lr, weight_decay=WEIGHT_DECAY),
    "adamw_4bit": lambda lr: lo.adamw_4bit(lr, weight_decay=WEIGHT_DECAY),
    "solo_adamw": lambda lr: lo.solo_adamw(lr, weight_decay=WEIGHT_DECAY),
    "slim_adamw": lambda lr: lo.slim_adamw(
        lr, weight_decay=WEIGHT_DECAY, rules=lo.flax_default_rules, mu_bits=4
    ),
    "galore_adamw": lambda lr: lo.galore_adamw(
        lr, weight_decay=WEIGHT_DECAY, projection_mask=_MATRICES
    ),
    "coap_adamw_8bit": lambda lr: lo.coap_adamw_8bit(
        lr, weight_decay=WEIGHT_DECAY, projection_mask=_MATRICES
    ),
    "subtrack_adamw": lambda lr: lo.subtrack_adamw(
        lr, weight_decay=WEIGHT_DECAY, projection_mask=_MATRICES
    ),
}


# ------------------------------------------------------------------------------------
# Data: CPython's own pydoc text, as bytes (nothing is downloaded)
# ------------------------------------------------------------------------------------


def pydoc_bytes(eval_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) uint8 streams of ``pydoc_data.topics``; the last 10% held out."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    split = int(len(data) * (1.0 - eval_fraction))
    return data[:split].copy(), data[split:].copy()


def eval_batches_of(data: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Deterministic non-overlapping (inputs, targets) windows of the held-out text."""
    n = min((len(data) - 1) // seq_len, batch_size * max_batches)
    starts = np.arange(n) * seq_len
    out = []
    for i in range(0, n - batch_size + 1, batch_size):
        window = data[starts[i : i + batch_size, None] + np.arange(seq_len + 1)]
        out.append((window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)))
    return out


# ------------------------------------------------------------------------------------
# Model: a pre-LayerNorm decoder with 2-D (in, out) kernels, as Flax lays them out
# ------------------------------------------------------------------------------------


class Config(NamedTuple):
    vocab_size: int = 256
    width: int = 256
    depth: int = 4
    heads: int = 4
    seq_len: int = 128


class Block(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        w, init = cfg.width, nnx.initializers.normal(stddev=cfg.width**-0.5)
        self.heads = cfg.heads
        self.norm1, self.norm2 = nnx.LayerNorm(w, rngs=rngs), nnx.LayerNorm(w, rngs=rngs)
        linear = lambda: nnx.Linear(w, w, use_bias=False, kernel_init=init, rngs=rngs)
        self.q, self.k, self.v, self.o = linear(), linear(), linear(), linear()
        self.up, self.down = nnx.Linear(w, 4 * w, rngs=rngs), nnx.Linear(4 * w, w, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.norm1(x)
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        y = jax.nn.dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True
        )
        x = x + self.o(y.reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
    """Decoder-only byte-level transformer (learned positions, untied output layer)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} must be divisible by heads {cfg.heads}")
        self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.width)))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm_f = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.width, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


def lm_loss(model: TransformerLM, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    logits = model(tokens).astype(jnp.float32)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))


# ------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------


# Arguments that must match the checkpoint on --resume (they change the run's trajectory).
_RUN_KEYS = ("optimizer", "lr", "batch_size", "seed", "depth", "width", "heads", "seq_len")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=200, help="total steps (resume continues to it)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds the model init and the data")
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-every", type=int, default=50, help="0: only at start and end")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (none: no checkpoints)")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    return p.parse_args(argv)


def batch_at(data: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int):
    """The (inputs, targets) batch of ``step``: random windows, a pure function of (seed, step)."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    window = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return window[:, :-1], window[:, 1:]


@nnx.jit(donate_argnames=("model", "optimizer"))
def train_step(model: TransformerLM, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    loss, grads = nnx.value_and_grad(lm_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: TransformerLM, x: jax.Array, y: jax.Array) -> jax.Array:
    return lm_loss(model, x, y)


def evaluate(model: TransformerLM, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    return float(np.mean([eval_step(model, x, y) for x, y in batches]))


def params_of(model: TransformerLM) -> dict[str, np.ndarray]:
    """The model's parameters as host arrays keyed by path (for checksums and tests)."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(model, nnx.Param)))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _storable(x: Any) -> Any:
    """A leaf as orbax stores it: orbax refuses empty arrays (None: nothing to store) and
    tensorstore has no uint2/uint4/int2, so sub-byte integers travel as 8-bit integers."""
    if x.size == 0:
        return None
    if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8:
        wide = jnp.int8 if jnp.issubdtype(x.dtype, jnp.signedinteger) else jnp.uint8
        if isinstance(x, jax.Array):
            return x.astype(wide)
        return jax.ShapeDtypeStruct(x.shape, wide, sharding=getattr(x, "sharding", None))
    return x


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Saves a pytree of arrays (e.g. ``nnx.state`` of model and optimizer) plus JSON meta."""
    stored = jax.tree.map(_storable, state)
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta)),
    )


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
    """Restores into ``abstract`` (same tree, ``ShapeDtypeStruct`` leaves), exact dtypes."""
    target = jax.tree.map(_storable, abstract)
    stored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return jax.tree.map(
        lambda a, x: jnp.zeros(a.shape, a.dtype) if x is None else x.astype(a.dtype),
        abstract,
        stored["state"],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs training; returns a summary (steps, losses, memory, final parameters)."""
    args = parse_args(argv)
    if args.ckpt_dir is None:
        return train(args, None)
    # Synchronous saves: the train step donates (reuses) the buffers being saved.
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=False)
    mngr = ocp.CheckpointManager(os.path.abspath(args.ckpt_dir), options=options)
    try:
        return train(args, mngr)
    finally:
        mngr.close()


def train(args: argparse.Namespace, mngr: ocp.CheckpointManager | None) -> dict[str, Any]:
    """Builds or restores the model and optimizer, trains to ``args.steps``, checkpoints."""
    run = {k: getattr(args, k) for k in _RUN_KEYS}
    cfg = Config(depth=args.depth, width=args.width, heads=args.heads, seq_len=args.seq_len)
    tx = OPTIMIZERS[args.optimizer](args.lr)

    def build() -> tuple[TransformerLM, nnx.Optimizer]:
        model = TransformerLM(cfg, rngs=nnx.Rngs(args.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    latest = mngr.latest_step() if mngr is not None else None
    if latest is not None and not args.resume:
        raise ValueError(
            f"{args.ckpt_dir} already holds checkpoints (latest step {latest}); "
            "pass --resume to continue from it, or use an empty --ckpt-dir"
        )

    start = 0
    if args.resume and latest is not None:
        assert mngr is not None
        meta = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        diff = {k: (meta["run"][k], run[k]) for k in _RUN_KEYS if meta["run"][k] != run[k]}
        if diff:
            raise ValueError(
                f"--resume with settings unlike the checkpoint's (saved, given): {diff}"
            )
        # Restore into an abstract target: shapes/dtypes only, nothing is initialised.
        abs_model, abs_opt = nnx.eval_shape(build)
        model_def, model_target = nnx.split(abs_model)
        opt_def, opt_target = nnx.split(abs_opt)
        target = {"model": model_target, "optimizer": opt_target}
        state = restore_checkpoint(mngr, latest, target)
        model = nnx.merge(model_def, state["model"])
        optimizer = nnx.merge(opt_def, state["optimizer"])
        start = meta["data"]["next_step"]
        print(f"resumed from {args.ckpt_dir} at step {start}")
    else:
        if args.resume:
            print(f"--resume: no checkpoint in {args.ckpt_dir}, starting from step 0")
        model, optimizer = build()

    report = lo.memory_report(
        nnx.as_pure(optimizer.opt_state), nnx.as_pure(nnx.state(model, nnx.Param))
    )
    print(f"optimizer {args.optimizer}: state memory\n{report.table(max_rows=6)}")

    train_data, eval_data = pydoc_bytes()
    eval_batches = eval_batches_of(eval_data, args.batch_size, args.seq_len, args.eval_batches)
    eval_losses: dict[int, float] = {}
    if start == 0:
        eval_losses[0] = evaluate(model, eval_batches)

    def save(step: int) -> None:
        if mngr is None:
            return
        meta = {"run": run, "data": {"seed": args.seed, "next_step": step}, "config": vars(args)}
        state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        save_checkpoint(mngr, step, state, meta)

    train_losses: list[jax.Array] = []
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
    for step in bar:
        x, y = batch_at(train_data, step, args.seed, args.batch_size, args.seq_len)
        train_losses.append(train_step(model, optimizer, x, y))
        done = step + 1
        if done % 10 == 0 or done == args.steps:
            bar.set_postfix(loss=f"{float(train_losses[-1]):.4f}")
        if done == args.steps or (args.eval_every and done % args.eval_every == 0):
            eval_losses[done] = evaluate(model, eval_batches)
            bar.write(f"step {done}: eval loss {eval_losses[done]:.4f}")
        if done == args.steps or (args.ckpt_every and done % args.ckpt_every == 0):
            save(done)
    bar.close()
    final = max(start, args.steps)
    if final not in eval_losses:  # resumed at or past --steps: nothing was trained
        eval_losses[final] = evaluate(model, eval_batches)

    params = params_of(model)
    return {
        "optimizer": args.optimizer,
        "start_step": start,
        "steps_done": final,
        "train_losses": [float(v) for v in train_losses],
        "eval_losses": eval_losses,
        "final_eval_loss": eval_losses[final],
        "bytes_per_param": report.bytes_per_param,
        "params_checksum": float(sum(np.abs(v).astype(np.float64).sum() for v in params.values())),
        "params": params,
        "model_config": cfg._asdict(),
    }


if __name__ == "__main__":
    summary = main()
    print(
        f"done: {summary['steps_done']} steps, final eval loss {summary['final_eval_loss']}, "
        f"params checksum {summary['params_checksum']:.6f}"
    )
