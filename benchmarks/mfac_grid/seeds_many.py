"""mfac / sparse_mfac / adamw on ``digits`` over many seeds, near each one's best lr.

Eval losses only. Each process takes a list of seeds and writes one JSON file,
rewritten after every seed (so a run cut short keeps what it finished). Usage (from
the repository root): ``python benchmarks/mfac_grid/seeds_many.py OUT.json SEED [SEED ...]``.

float32 matrix products run at full precision (``jax_default_matmul_precision``
'highest'), so a GPU does not use TF32 in the M-FAC Gram and solve.
"""

import json
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from lowbit_optax.bench import registry, tasks  # noqa: E402

# lr -> optimizers run at it: around the 6-seed best lr of each (mfac 5e-4,
# sparse_mfac 1e-3, adamw 1e-2; see README.md here).
GRID = {
    1e-2: ("adamw",),
    3e-4: ("mfac",),
    5e-4: ("mfac",),
    1e-3: ("mfac", "sparse_mfac"),
    2e-3: ("sparse_mfac",),
}


def main(path: str, seeds: list[int]) -> None:
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "runs": {}}
    for seed in seeds:
        row = {}
        for lr, names in GRID.items():
            opts = {n: registry.get(n).factory() for n in names}
            settings = tasks.Settings(lr=lr, seed=seed, time_updates=False)
            rec = tasks.TASKS["digits"].run(opts, settings)
            for name in names:
                loss = rec["results"][name].get("eval_loss")
                row[f"{name}@{lr:g}"] = loss
                print("RESULT", seed, name, lr, loss, flush=True)
        out["runs"][str(seed)] = row
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]])
