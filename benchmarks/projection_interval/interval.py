"""GaLore, COAP and SubTrack on ``lm`` at one shared projector interval (eval losses
only). The main benchmark runs each at its paper's interval (GaLore 200, COAP 32 with
recalibration every 5 x 32, SubTrack 50); here all three get the same ``update_interval``
``T`` (COAP: P step every ``T``, recalibration every ``5 T``), rank 1/4 as in the registry.

Usage (from the repository root): ``python benchmarks/projection_interval/interval.py T SEED``
-> ``interval_T{T}_seed{SEED}.json`` next to this file.
"""

import json
import pathlib
import sys

import lowbit_optax
from lowbit_optax.bench import registry, tasks

_PROJ = registry._PROJ  # rank 1/4, weight decay, projection mask: as the registry's


def optimizers(interval: int) -> dict:
    return {
        "adamw": registry.get("adamw").factory(),
        "galore_adamw": lambda lr: lowbit_optax.galore_adamw(lr, update_interval=interval, **_PROJ),
        "coap_adamw": lambda lr: lowbit_optax.coap_adamw(lr, update_interval=interval, **_PROJ),
        "subtrack_adamw": lambda lr: lowbit_optax.subtrack_adamw(
            lr, update_interval=interval, **_PROJ
        ),
    }


def main(interval: int, seed: int, quick: bool = False) -> None:
    settings = tasks.Settings(seed=seed, time_updates=False, quick=quick)
    rec = tasks.TASKS["lm"].run(optimizers(interval), settings)
    out = {name: r.get("eval_loss") for name, r in rec["results"].items()}
    for name, loss in out.items():
        print("RESULT", interval, seed, name, loss, flush=True)
    if not quick:
        path = pathlib.Path(__file__).with_name(f"interval_T{interval}_seed{seed}.json")
        path.write_text(
            json.dumps({"interval": interval, "seed": seed, "eval_loss": out}, indent=1)
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), quick="--quick" in sys.argv)
