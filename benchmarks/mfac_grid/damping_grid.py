"""Dense vs sparse M-FAC on ``digits`` over damping x lr, one seed (eval losses only).

Usage (from the repository root): ``python benchmarks/mfac_grid/damping_grid.py SEED``.
"""

import functools
import json
import sys

import lowbit_optax as lo
from lowbit_optax.bench import registry, tasks

DAMPINGS = (1e-3, 1e-4, 1e-5)
LRS = (5e-4, 1e-3, 2e-3)


def _factory(alias, damping, lr):
    return alias(lr, damping=damping, weight_decay=registry.WEIGHT_DECAY)


def main(seed: int) -> None:
    out = {}
    for lr in LRS:
        opts = {"adamw": registry.get("adamw").factory()}
        for kind in ("mfac", "sparse_mfac"):
            for d in DAMPINGS:
                opts[f"{kind}@d={d:g}"] = functools.partial(_factory, getattr(lo, kind), d)
        rec = tasks.TASKS["digits"].run(opts, tasks.Settings(lr=lr, seed=seed, time_updates=False))
        for name, r in rec["results"].items():
            out[f"{name}@lr={lr:g}"] = r.get("eval_loss")
            print(name, lr, r.get("eval_loss"), r.get("status"), flush=True)
    with open(f"benchmarks/mfac_grid/damping_seed{seed}.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
