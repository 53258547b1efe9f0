"""Train train_lm.py's byte-level transformer on several processes, every state sharded.

JAX's own multi-host recipe: one process per host, ``jax.distributed.initialize``, one
global mesh over every process's devices, ``NamedSharding`` for params, optimizer state
and data, and orbax's ``CheckpointManager`` writing one checkpoint from all processes.

* **Mesh.** ``--mesh FSDPxTP`` (default: every device on ``fsdp``). A param's first axis
  is split over ``fsdp`` (FSDP-style) and, with ``tp > 1``, a matrix's last axis over
  ``tp``; an axis that does not divide evenly stays whole. The mesh's axes are ``Auto``:
  XLA lays out the activations (a mesh with ``Explicit`` axes works as well for the
  optimizer; the model would then need ``out_sharding`` on its ambiguous matmuls).
* **Optimizer state.** ``lowbit_optax.sharded_init(tx, params)`` creates it directly in
  the layout ``lowbit_optax.state_shardings`` recommends: param-shaped leaves (moments,
  quantization codes and scales, windows, projectors) split like their params, counts,
  keys and small matrices replicated. Each process holds only its devices' share.
* **Data.** The global batch of step ``s`` is a pure function of ``(seed, s)``; each
  process reads only the rows its devices hold (``make_array_from_process_local_data``),
  so a run on 2 processes x 4 devices sees the same global batches as 1 process x 8.
* **Checkpoints.** Every process calls ``CheckpointManager.save`` on the global arrays
  and writes its own shards; ``--resume`` restores into whatever mesh this run has (a
  different process count or mesh shape reshards on restore), exactly, and continues.

Usage::

    # try it on one machine: 2 local processes x 4 CPU devices each
    python examples/train_multihost.py --launcher 2 --optimizer adamw_8bit --steps 100
    # on each of N hosts (process i of N; host 0 runs the coordinator):
    python examples/train_multihost.py --num-processes N --process-id i \\
        --coordinator host0:1234 --optimizer solo_adamw --mesh 8x2 --ckpt-dir /shared/ckpt

``--optimizer``: ``adamw`` (optax) or any alias of lowbit_optax (``adamw_8bit``,
``solo_adamw``, ``slim_adamw``, ``galore_adamw``, ``coap_adamw_8bit``, ``sparse_mfac``,
...), as ``train_lm.py`` configures it where it has a setting, else at its defaults.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit_optax as lo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_lm  # the model, the data and the optimizer settings

ALIASES = (
    "adamw_4bit", "adamw_8bit", "ademamix_8bit", "coap_adamw", "coap_adamw_8bit",
    "galore_adamw", "ggt", "lion_8bit", "mfac", "sgd_momentum_8bit", "slim_adamw",
    "solo_adamw", "sparse_ggt", "sparse_mfac", "subtrack_adamw",
)  # fmt: skip


def make_optimizer(name: str, lr: float, **kwargs: Any) -> optax.GradientTransformation:
    """``name``'s transform: ``train_lm.OPTIMIZERS``' setting, else the alias itself."""
    if name in train_lm.OPTIMIZERS and not kwargs:
        return train_lm.OPTIMIZERS[name](lr)
    if name not in ALIASES:
        raise ValueError(f"unknown optimizer {name!r}: one of adamw, {', '.join(ALIASES)}")
    return getattr(lo, name)(lr, **kwargs)


# ------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def launch(
    n: int,
    argv: list[str],
    cpu_devices: int = 4,
    timeout: float | None = None,
    script: str = __file__,
) -> int:
    """Starts ``n`` local processes of ``script`` (this one by default: process ``i`` of
    ``n``, a coordinator on a free local port, ``cpu_devices`` CPU devices each), waits
    for all of them, and returns the first non-zero exit code (0: every one succeeded)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    argv = _without(_without(argv, "--launcher"), "--cpu-devices")

    def command(i: int) -> list[str]:
        ids = ["--num-processes", str(n), "--process-id", str(i)]
        where = ["--coordinator", f"127.0.0.1:{port}", "--cpu-devices", str(cpu_devices)]
        return [sys.executable, os.path.abspath(script), *argv, *ids, *where]

    procs = [subprocess.Popen(command(i), env=env) for i in range(n)]
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return next((c for c in codes if c), 0)


def initialize(num_processes: int, process_id: int, coordinator: str | None, cpu_devices: int):
    """JAX's distributed runtime (before any other JAX call). On CPU hosts the processes'
    devices talk through gloo; ``cpu_devices`` simulates that many CPU devices here."""
    if cpu_devices:
        flag = "--xla_force_host_platform_device_count"
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
        os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}={cpu_devices}"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        if coordinator is None:
            raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )


# ------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------


def make_mesh(shape: str | None) -> jax.sharding.Mesh:
    """``"FSDPxTP"`` (or ``"FSDP"``) over every device of every process."""
    n = jax.device_count()
    dims = [int(d) for d in shape.lower().split("x")] if shape else [n]
    fsdp, tp = [*dims, 1][:2]
    if len(dims) > 2 or fsdp * tp != n:
        raise ValueError(f"--mesh {shape!r} must be FSDP or FSDPxTP with {n} devices in all")
    return jax.make_mesh((fsdp, tp), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def param_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """FSDP on the first axis, tensor parallelism on a matrix's last axis, where each
    divides evenly."""
    fsdp, tp = mesh.shape["fsdp"], mesh.shape["tp"]
    spec: list[str | None] = [None] * len(shape)
    if shape and fsdp > 1 and shape[0] % fsdp == 0:
        spec[0] = "fsdp"
    if len(shape) >= 2 and tp > 1 and shape[-1] % tp == 0:
        spec[-1] = "tp"
    return P(*spec)


def init_model(cfg: train_lm.Config, seed: int, mesh: jax.sharding.Mesh):
    """``(graphdef, params)``: the model's structure and its params as a plain dict of
    global arrays, created directly in their sharded layout."""
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: train_lm.TransformerLM(cfg, rngs=nnx.Rngs(seed)))
    )
    abstract = nnx.to_pure_dict(abstract)
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, param_spec(a.shape, mesh)), abstract)

    def create():
        return nnx.to_pure_dict(nnx.split(train_lm.TransformerLM(cfg, rngs=nnx.Rngs(seed)))[1])

    return graphdef, jax.jit(create, out_shardings=shardings)()


def global_batch(data, step, seed, batch_size, seq_len, mesh):
    """The ``(inputs, targets)`` of ``step`` as global arrays split over ``fsdp``; this
    process builds only the rows its own devices hold."""
    sharding = NamedSharding(mesh, P("fsdp"))
    shape = (batch_size, seq_len)
    rows = sorted(
        {(idx[0].start or 0, idx[0].stop or batch_size)
         for idx in sharding.addressable_devices_indices_map(shape).values()}
    )  # fmt: skip
    lo_, hi = rows[0][0], rows[-1][1]
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)[lo_:hi]
    window = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    make = lambda a: jax.make_array_from_process_local_data(sharding, a, shape)
    return make(window[:, :-1]), make(window[:, 1:])


def local_fraction(x: jax.Array) -> float:
    """The share of a global array this process's devices hold (replicas counted once)."""
    seen = {tuple((i.start, i.stop) for i in s.index): s.data.size for s in x.addressable_shards}
    return sum(seen.values()) / max(x.size, 1)


# ------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------


def make_train_step(graphdef, tx, param_shardings, state_shardings, mesh):
    """The jitted, donated step ``(params, opt_state, x, y) -> (params, opt_state, loss)``
    with the params' and the state's layouts pinned."""

    def step(params, opt_state, x, y):
        loss_fn = lambda p: train_lm.lm_loss(nnx.merge(graphdef, p), x, y)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    data = NamedSharding(mesh, P("fsdp"))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(param_shardings, state_shardings, data, data),
        out_shardings=(param_shardings, state_shardings, replicated),
        donate_argnums=(0, 1),
    )


def layout_of(tree: Any) -> Any:
    """``tree``'s shapes, dtypes and shardings as ``ShapeDtypeStruct``s (a restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    stored = jax.tree.map(train_lm._storable, {"params": params, "opt_state": opt_state})
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta)),
    )
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, params, opt_state):
    """The checkpoint of ``step`` in the layout of ``params``/``opt_state`` (arrays or
    ``ShapeDtypeStruct``s with shardings): resharded where the mesh differs, exact."""
    abstract = {"params": params, "opt_state": opt_state}
    target = jax.tree.map(train_lm._storable, layout_of(abstract))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    restored = jax.tree.map(
        lambda a, x: (
            jnp.zeros(a.shape, a.dtype, device=a.sharding) if x is None else x.astype(a.dtype)
        ),
        abstract,
        got["state"],
    )
    return restored["params"], restored["opt_state"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = train_lm.Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="adamw_8bit", choices=["adamw", *ALIASES])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=100, help="total steps (resume continues to it)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split over fsdp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--mesh", default=None, help="FSDPxTP, e.g. 8 or 4x2 (default: all on fsdp)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    g = p.add_argument_group("processes")
    g.add_argument("--launcher", type=int, default=0, help="start N local processes")
    g.add_argument("--num-processes", type=int, default=1)
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    g.add_argument(
        "--cpu-devices", type=int, default=0, help="simulated CPU devices per process (0: as is)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.launcher:
        return launch(args.launcher, argv, cpu_devices=args.cpu_devices or 4)
    initialize(args.num_processes, args.process_id, args.coordinator, args.cpu_devices)
    return train(args)


def train(args: argparse.Namespace) -> dict[str, Any]:
    lead = jax.process_index() == 0
    say = lambda *a: print(*a, flush=True) if lead else None
    mesh = make_mesh(args.mesh)
    cfg = train_lm.Config(
        depth=args.depth, width=args.width, heads=args.heads, seq_len=args.seq_len
    )
    tx = make_optimizer(args.optimizer, args.lr)
    graphdef, params = init_model(cfg, args.seed, mesh)
    opt_state = lo.sharded_init(tx, params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    state_shardings = lo.state_shardings(tx, params)
    step_fn = make_train_step(graphdef, tx, param_shardings, state_shardings, mesh)
    say(
        f"{jax.process_count()} process(es) x {jax.local_device_count()} device(s), mesh "
        f"{dict(mesh.shape)}, {args.optimizer}: state "
        f"{lo.state_bytes(opt_state) / sum(p.size for p in jax.tree.leaves(params)):.2f} B/param"
    )

    mngr = None
    if args.ckpt_dir:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        mngr = ocp.CheckpointManager(os.path.abspath(args.ckpt_dir), options=options)
    start = 0
    if mngr is not None and args.resume and mngr.latest_step() is not None:
        start = mngr.latest_step()
        params, opt_state = restore(mngr, start, params, opt_state)
        say(f"resumed from {args.ckpt_dir} at step {start} (mesh {dict(mesh.shape)})")

    train_data, _ = train_lm.pydoc_bytes()
    losses: list[float] = []
    window: list[jax.Array] = []
    meta = {"optimizer": args.optimizer, "lr": args.lr, "seed": args.seed}
    for step in range(start, args.steps):
        x, y = global_batch(train_data, step, args.seed, args.batch_size, args.seq_len, mesh)
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        window.append(loss)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            losses.append(float(np.mean([float(v) for v in window])))
            window = []
            say(f"step {done}: train loss {losses[-1]:.4f}")
        if mngr is not None and (done % args.ckpt_every == 0 or done == args.steps):
            save(mngr, done, params, opt_state, {**meta, "next_step": done})
    if mngr is not None:
        mngr.close()
    return {
        "losses": losses,
        "params": params,
        "opt_state": opt_state,
        "state_fraction": jax.tree.map(local_fraction, opt_state),
    }


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
