"""galore_adamw / coap_adamw / subtrack_adamw on ``lm`` over many seeds (eval loss only).

The registry's aliases as the main benchmark runs them (rank 1/4, each paper's interval),
at the task's default lr and steps. Each process takes a list of seeds and writes one
JSON file, rewritten after every seed (a run cut short keeps what it finished). Usage
(from the repository root): ``python benchmarks/projection_seeds/seeds_many.py
[--names a,b] OUT.json SEED [SEED ...]`` (``--names``: a subset of the three). float32
matrix products run at full precision (``jax_default_matmul_precision`` 'highest'), so a
GPU does not use TF32.
"""

import json
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from lowbit_optax.bench import registry, tasks  # noqa: E402

NAMES = ("galore_adamw", "coap_adamw", "subtrack_adamw")


def main(path: str, seeds: list[int], quick: bool = False, names=NAMES) -> None:
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "runs": {}}
    for seed in seeds:
        opts = {n: registry.get(n).factory() for n in names}
        rec = tasks.TASKS["lm"].run(
            opts, tasks.Settings(seed=seed, quick=quick, time_updates=False)
        )
        row = {n: rec["results"][n].get("eval_loss") for n in names}
        print("RESULT", seed, *(f"{n}={v:.5f}" for n, v in row.items()), flush=True)
        out["runs"][str(seed)] = row
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    args = sys.argv[1:]
    quick = "--quick" in args
    args = [a for a in args if a != "--quick"]
    names = NAMES
    if args[:1] == ["--names"]:
        names = tuple(args[1].split(","))
        if not set(names) <= set(NAMES):
            raise SystemExit(f"--names: a subset of {NAMES}, got {names}")
        args = args[2:]
    main(args[0], [int(s) for s in args[1:]], quick=quick, names=names)
