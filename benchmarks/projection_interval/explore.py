"""COAP variants on ``lm`` at one shared ``update_interval`` (eval losses only), the
exploration behind ``coap_adamw``'s ``power_iters``: the P step's learning rate, two
block power iterations in the first range finder, and recalibration at every event.

Usage (from the repository root):
``python benchmarks/projection_interval/explore.py T SEEDS VARIANTS [--ref]``, e.g.
``... explore.py 50 0,1 pi2,rho1``; prints ``RESULT T SEED NAME LOSS`` lines
(``--ref`` adds adamw). Variants: ``lr0.1`` (``coap_adamw`` as registered), ``lr0.3``,
``lr1.0`` (the scale-aware P step's learning rate), ``pi2`` (``power_iters=2``),
``rho1`` (``reproject_factor=1``: a warm recalibration at every event, no P steps).
"""

import sys

import optax

from lowbit_optax.bench import registry, tasks
from lowbit_optax.bench.registry import WEIGHT_DECAY
from lowbit_optax.projection import COAPProjector, _adamw, low_rank_projection

VARIANTS = {
    "lr0.1": dict(),
    "lr0.3": dict(lr=0.3),
    "lr1.0": dict(lr=1.0),
    "pi2": dict(power_iters=2),
    "rho1": dict(reproject_factor=1),
}


def coap(interval: int, **kw):
    kw = {"reproject_factor": 5, "scale_aware": True, **kw}
    return lambda lr: _adamw(
        low_rank_projection(
            optax.scale_by_adam(0.9, 0.999, 1e-6),
            rank=0.25,
            projector=COAPProjector(**kw),
            update_interval=interval,
            scale=0.25,
            min_dim=128,
            mask=registry._PROJ["projection_mask"],
        ),
        lr,
        WEIGHT_DECAY,
        None,
    )


def main(interval: int, seeds: list[int], names: list[str], ref: bool) -> None:
    opts = {"adamw": registry.get("adamw").factory()} if ref else {}
    opts.update({f"coap_{n}": coap(interval, **VARIANTS[n]) for n in names})
    for seed in seeds:
        rec = tasks.TASKS["lm"].run(opts, tasks.Settings(seed=seed, time_updates=False))
        for n, r in rec["results"].items():
            print("RESULT", interval, seed, n, r.get("eval_loss"), flush=True)


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        [int(s) for s in sys.argv[2].split(",")],
        sys.argv[3].split(","),
        "--ref" in sys.argv,
    )
