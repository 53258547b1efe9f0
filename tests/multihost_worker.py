"""One process of tests/test_multihost.py: the example's pieces on a tiny model, for every
optimizer of the test, in one of three roles (``--role``):

* ``train`` (2 processes x 4 devices, mesh 8): 3 steps, a checkpoint, 3 more steps; then
  the checkpoint restored into the same layout and 3 steps again.
* ``single`` (1 process x 8 devices, mesh 8): 6 steps from scratch; then ``train``'s
  checkpoint restored and 3 steps.
* ``reshard`` (2 processes x 4 devices, mesh 4x2): ``train``'s checkpoint restored into
  another mesh shape, and 3 steps.

Process 0 writes what it saw to ``OUT/ROLE.npz`` (global arrays gathered to the host);
every process writes the share of each state leaf its devices hold to
``OUT/ROLE.fraction.P.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_multihost as mh  # noqa: E402

STEPS, SAVED = 6, 3
# no blocks: the optimizers see an embedding, positions, a norm and the output matrix (the
# attention blocks would add compile time, not coverage)
TINY = dict(depth=0, width=64, heads=2, seq_len=16)
BATCH = 8
LARGE = 512  # a state leaf of this many values or more must be split over processes


def optimizers():
    """name -> tx, small enough that every technique acts on the tiny model: quantized
    leaves of 256+ values, projection events every 2 steps (so one follows the restore)."""
    import lowbit_optax as lo

    lr = 3e-3
    matrices = lambda params: __import__("jax").tree.map(lambda p: p.ndim == 2, params)
    return {
        "adamw_8bit": lo.adamw_8bit(lr, block_size=64, min_size=256),
        "solo_adamw": lo.solo_adamw(lr, block_size=64, min_size=256),
        "slim_adamw": lo.slim_adamw(lr, mu_bits=4, block_size=64, min_size=256),
        "galore_adamw": lo.galore_adamw(
            lr, rank=8, update_interval=2, min_dim=16, projection_mask=matrices
        ),
        "coap_adamw_8bit": lo.coap_adamw_8bit(
            lr,
            rank=8,
            update_interval=2,
            block_size=64,
            min_size=256,
            min_dim=16,
            projection_mask=matrices,
        ),
        "sparse_mfac": lo.sparse_mfac(1e-2, num_grads=4, damping=1e-2, density=0.1),
        "lion_8bit": lo.lion_8bit(1e-3, block_size=64, min_size=256),  # quantize_state
    }


def scenario(role, tx, mesh, out, record, fractions):
    """One optimizer's run in ``role``; ``record(tag, tree)`` keeps a global tree."""
    import jax
    import orbax.checkpoint as ocp

    import lowbit_optax as lo

    cfg = mh.train_lm.Config(**TINY)
    data, _ = mh.train_lm.pydoc_bytes()
    graphdef, params = mh.init_model(cfg, 0, mesh)
    state = lo.sharded_init(tx, params)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    step = mh.make_train_step(graphdef, tx, shardings, lo.state_shardings(tx, params), mesh)

    def run(params, state, start, stop):
        for s in range(start, stop):
            x, y = mh.global_batch(data, s, 0, BATCH, TINY["seq_len"], mesh)
            params, state, _ = step(params, state, x, y)
        return params, state

    def held(state):
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        return {jax.tree_util.keystr(k): mh.local_fraction(v) for k, v in flat if v.size >= LARGE}

    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(out / "ckpt" / record.name, options=options) as ckpt:
        if role == "train":
            record("initial", params)
            params, state = run(params, state, 0, SAVED)
            mh.save(ckpt, SAVED, params, state, {"optimizer": record.name})
            record("saved_state", state)
            fractions[record.name] = held(state)
            params, state = run(params, state, SAVED, STEPS)
            record("final", params)
            # the checkpoint restored into the same layout, and the same 3 steps again
            params, state = mh.restore(ckpt, SAVED, *mh.layout_of((params, state)))
        else:
            if role == "single":
                params, state = run(params, state, 0, STEPS)
                record("final", params)
            params, state = mh.restore(ckpt, SAVED, *mh.layout_of((params, state)))
            record("restored_state", state)
            fractions[record.name] = held(state)
        params, state = run(params, state, SAVED, STEPS)
        record("resumed", params)


class Recorder:
    """Gathers global trees to the host as ``NAME/TAG/PATH`` arrays (one replicating
    program per tree, not one per leaf)."""

    def __init__(self, mesh):
        self.name, self.results, self.mesh = "", {}, mesh

    def __call__(self, tag, tree):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        whole = NamedSharding(self.mesh, PartitionSpec())
        tree = jax.jit(lambda t: jax.tree.map(mh.train_lm._storable, t), out_shardings=whole)(tree)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key = f"{self.name}/{tag}/{jax.tree_util.keystr(path)}"
            self.results[key] = np.asarray(x.addressable_data(0))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["train", "single", "reshard"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--only", default=None, help="comma-separated optimizer names")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--cpu-devices", type=int, default=0)
    args = p.parse_args()
    mh.initialize(args.num_processes, args.process_id, args.coordinator, args.cpu_devices)

    import jax
    from jax.experimental import multihost_utils

    out = pathlib.Path(args.out)
    mesh = mh.make_mesh("4x2" if args.role == "reshard" else "8")
    txs = optimizers()
    record, fractions = Recorder(mesh), {}
    for name in args.only.split(",") if args.only else list(txs):
        record.name, start = name, time.perf_counter()
        scenario(args.role, txs[name], mesh, out, record, fractions)
        if jax.process_index() == 0:
            print(f"{args.role} {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if jax.process_index() == 0:
        np.savez(out / f"{args.role}.npz", **record.results)
    with open(out / f"{args.role}.fraction.{jax.process_index()}.json", "w") as f:
        json.dump(fractions, f)
    multihost_utils.sync_global_devices("done")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
