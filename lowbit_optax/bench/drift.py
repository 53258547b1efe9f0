"""``python -m lowbit_optax.bench.drift``: how fast the top-r gradient subspace moves, and
how much of it a projection optimizer's subspace follows.

Trains one registered projection optimizer (``galore_adamw``, ``coap_adamw``,
``subtrack_adamw``, or a ``--set`` variant) on ``lm`` or ``mlp_lm`` at the task's
defaults (its batches, schedule and learning rate) and, every ``--every`` steps, for
every projected matrix ``G`` (viewed ``m x n``, the subspace on its smaller side, as the
projection keeps it), records three subspace distances, each ``1 - |A^T B|_F^2 / r``
(the mean ``sin^2`` of the principal angles between two ``r``-dimensional subspaces: 0
equal, 1 orthogonal, ``1 - r / K`` for a random pair in ``K`` dimensions):

* ``drift``: ``U`` (the exact top-``r`` singular subspace of this step's gradient) from
  the previous record's ``U``: how fast the target moves;
* ``moved``: the optimizer's subspace ``S`` after this step's update from the previous
  record's ``S``: how far the optimizer turned it;
* ``miss``: ``S`` from ``U``: what it has not followed (GaLore's, right after its SVD, is
  0 up to the range finder).

Prints a table of the means over matrices per record and writes them as JSON
(``--out``) with the final eval loss.

Example::

    python -m lowbit_optax.bench.drift --task mlp_lm --optimizer subtrack_adamw \\
        --every 50 --out drift.json
"""

from __future__ import annotations

import argparse
import ast
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import lowbit_optax as lo
from lowbit_optax.bench import registry, tasks

TASKS = {"lm": tasks.LMTask, "mlp_lm": tasks.MLPLMTask}


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - |a^T b|_F^2 / r`` of two orthonormal ``K x r`` bases."""
    return float(1.0 - np.sum((a.T @ b) ** 2) / a.shape[1])


def top_subspace(g: np.ndarray, rank: int) -> np.ndarray:
    """The exact top-``rank`` singular subspace of ``g`` (viewed ``m x n``) on its
    smaller side, ``K x rank`` (right singular vectors when ``m >= n``)."""
    mat = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    u, _, vt = np.linalg.svd(mat, full_matrices=False)
    return vt[:rank].T if mat.shape[0] >= mat.shape[1] else u[:, :rank]


def projection_state(state: Any) -> lo.LowRankProjectionState | None:
    """The ``low_rank_projection`` state inside an alias's (chained) state."""
    if isinstance(state, lo.LowRankProjectionState):
        return state
    if isinstance(state, tuple):
        for s in state:
            found = projection_state(s)
            if found is not None:
                return found
    return None


def projectors(state: Any) -> dict[str, np.ndarray]:
    """``{path: S}`` of every projected leaf, as float64 host arrays."""
    proj = projection_state(state)
    if proj is None:
        raise ValueError("the optimizer has no low_rank_projection state")
    flat = jax.tree_util.tree_flatten_with_path(
        proj.projectors, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )[0]
    return {
        jax.tree_util.keystr(k): np.asarray(s, np.float64)
        for k, s in flat
        if not isinstance(s, optax.MaskedNode)
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lowbit_optax.bench.drift", description=__doc__)
    p.add_argument("--task", choices=sorted(TASKS), default="mlp_lm")
    p.add_argument("--optimizer", default="subtrack_adamw")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="alias keyword")
    p.add_argument("--every", type=int, default=50, help="steps between records")
    p.add_argument("--steps", type=int, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the records")
    args = p.parse_args(argv)
    try:
        args.overrides = {
            k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)
        }
    except (ValueError, SyntaxError):
        p.error(f"--set takes KEY=VALUE with a Python literal value, got {args.set}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    task = TASKS[args.task]()
    settings = tasks.Settings(seed=args.seed, steps=args.steps)
    plan, problem = task.plan(settings), task.problem(settings)
    label, factory = registry.variant(args.optimizer, args.overrides)
    tx = factory(tasks._schedule(plan))
    params, state = problem.params, tx.init(problem.params)
    grad_fn = jax.jit(jax.grad(problem.loss_fn))

    @jax.jit
    def apply(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    records: list[dict[str, float]] = []
    last_u: dict[str, np.ndarray] = {}
    last_s: dict[str, np.ndarray] = {}
    for step in range(1, plan.steps + 1):
        grads = grad_fn(params, next(problem.batches))
        params, state = apply(params, state, grads)
        if step % args.every and step != 1:
            continue
        flat_g = {
            jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]
        }
        rows = {"drift": [], "moved": [], "miss": []}
        for path, s in projectors(state).items():
            u = top_subspace(np.asarray(flat_g[path]), s.shape[1])
            rows["miss"].append(distance(s, u))
            if path in last_u:
                rows["drift"].append(distance(last_u[path], u))
                rows["moved"].append(distance(last_s[path], s))
            last_u[path], last_s[path] = u, s
        record = {"step": step, **{k: float(np.mean(v)) if v else None for k, v in rows.items()}}
        records.append(record)
        fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"
        print(
            f"step {step:5d}  drift {fmt(record['drift'])}  moved {fmt(record['moved'])}"
            f"  miss {fmt(record['miss'])}",
            flush=True,
        )
    later = [r for r in records if r["drift"] is not None]
    summary = {
        "task": args.task,
        "optimizer": label,
        "every": args.every,
        "steps": plan.steps,
        "lr": plan.lr,
        "seed": args.seed,
        "mean_drift": float(np.mean([r["drift"] for r in later])),
        "mean_moved": float(np.mean([r["moved"] for r in later])),
        "mean_miss": float(np.mean([r["miss"] for r in records])),
        "eval_loss": problem.evaluate(params)["eval_loss"],
        "records": records,
    }
    print(
        f"{label} on {args.task}: mean drift {summary['mean_drift']:.3f}, moved "
        f"{summary['mean_moved']:.3f}, miss {summary['mean_miss']:.3f} per {args.every} "
        f"steps; eval loss {summary['eval_loss']:.4f}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
