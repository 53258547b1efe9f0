"""GaLore, COAP (one-pass and with 2 power iterations at t = 0) and SubTrack on ``lm`` at
one shared ``update_interval`` over seeds (eval losses only, no adamw run).

Usage (from the repository root):
``python benchmarks/projection_interval/seeds.py T SEED [SEED ...]`` ->
``seeds_T{T}.json`` next to this file, rewritten after every seed.
"""

import json
import pathlib
import sys

import lowbit_optax
from lowbit_optax.bench import registry, tasks

_PROJ = registry._PROJ  # rank 1/4, weight decay, projection mask: as the registry's


def optimizers(interval: int) -> dict:
    return {
        "galore_adamw": lambda lr: lowbit_optax.galore_adamw(lr, update_interval=interval, **_PROJ),
        "coap_adamw": lambda lr: lowbit_optax.coap_adamw(
            lr, update_interval=interval, power_iters=0, **_PROJ
        ),
        "coap_adamw_pi2": lambda lr: lowbit_optax.coap_adamw(
            lr, update_interval=interval, power_iters=2, **_PROJ
        ),
        "subtrack_adamw": lambda lr: lowbit_optax.subtrack_adamw(
            lr, update_interval=interval, **_PROJ
        ),
    }


def main(interval: int, seeds: list[int]) -> None:
    path = pathlib.Path(__file__).with_name(f"seeds_T{interval}.json")
    out = {"interval": interval, "eval_loss": {}}
    for seed in seeds:
        rec = tasks.TASKS["lm"].run(
            optimizers(interval), tasks.Settings(seed=seed, time_updates=False)
        )
        out["eval_loss"][str(seed)] = {n: r.get("eval_loss") for n, r in rec["results"].items()}
        print("RESULT", interval, seed, out["eval_loss"][str(seed)], flush=True)
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(s) for s in sys.argv[2:]])
