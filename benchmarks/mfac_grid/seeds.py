"""adamw / mfac / sparse_mfac (damping 1e-4) on ``digits`` over lr, one seed (eval
losses only). Usage (from the repository root): ``python benchmarks/mfac_grid/seeds.py SEED``.
"""

import json
import sys

from lowbit_optax.bench import registry, tasks

LRS = (1e-2, 3e-4, 5e-4, 1e-3, 2e-3)  # mfac rows at all but 1e-2


def main(seed: int) -> None:
    out = {}
    for lr in LRS:
        names = ["adamw"] + (["mfac", "sparse_mfac"] if lr < 1e-2 else [])
        opts = {n: registry.get(n).factory() for n in names}
        rec = tasks.TASKS["digits"].run(opts, tasks.Settings(lr=lr, seed=seed, time_updates=False))
        for name, r in rec["results"].items():
            out[f"{name}@{lr:g}"] = r.get("eval_loss")
            print("RESULT", seed, name, lr, r.get("eval_loss"), flush=True)
    with open(f"benchmarks/mfac_grid/seeds_seed{seed}.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]))
