"""Mean eval losses over seeds of the M-FAC grid (the tables in README.md). Usage (from
the repository root): ``python benchmarks/mfac_grid/table.py``. Seed 0 comes from
``damping_seed0.json`` (damping 1e-4) and ``benchmarks/sweep_digits`` (lr 3e-4, adamw at
1e-2), seeds 1-5 from ``seeds_seedN.json``.
"""

import json

import numpy as np

B = "benchmarks/"
LRS = (3e-4, 5e-4, 1e-3, 2e-3)


def load_seeds() -> dict[int, dict[str, float]]:
    """Seeds 0-5 as ``{seed: {"name@lr": eval_loss}}`` (damping 1e-4)."""
    d0 = json.load(open(B + "mfac_grid/damping_seed0.json"))
    sw = json.load(open(B + "sweep_digits/results.json"))["tasks"]
    s0 = {}
    for lr in (5e-4, 1e-3, 2e-3):
        for n in ("mfac", "sparse_mfac"):
            s0[f"{n}@{lr:g}"] = d0[f"{n}@d=0.0001@lr={lr:g}"]
        s0[f"adamw@{lr:g}"] = d0[f"adamw@lr={lr:g}"]
    for n in ("mfac", "sparse_mfac", "adamw"):
        s0[f"{n}@0.0003"] = sw["digits@lr=0.0003"]["results"][n]["eval_loss"]
    s0["adamw@0.01"] = sw["digits@lr=0.01"]["results"]["adamw"]["eval_loss"]
    seeds = {0: s0}
    for s in range(1, 6):
        seeds[s] = json.load(open(B + f"mfac_grid/seeds_seed{s}.json"))
    return seeds


def table(ss):
    mean = {}
    for n in ("mfac", "sparse_mfac", "adamw"):
        for lr in LRS + ((1e-2,) if n == "adamw" else ()):
            mean[(n, lr)] = float(np.mean([seeds[s][f"{n}@{lr:g}"] for s in ss]))
    best = {
        n: min((v, lr) for (m, lr), v in mean.items() if m == n)
        for n in ("mfac", "sparse_mfac", "adamw")
    }
    return mean, best


def main() -> None:
    for ss in ([0, 1, 2], [0, 1, 2, 3, 4, 5]):
        mean, best = table(ss)
        print("seeds", ss)
        for lr in (*LRS, 0.01):
            print(
                f"| {lr:g} |",
                " | ".join(
                    f"{mean[(n, lr)]:.4f}" if (n, lr) in mean else ""
                    for n in ("mfac", "sparse_mfac", "adamw")
                ),
                "|",
            )
        print({n: (round(v, 4), lr) for n, (v, lr) in best.items()})
        print(
            "sparse vs dense %+.1f%%" % (100 * (best["sparse_mfac"][0] / best["mfac"][0] - 1)),
            "mfac vs adamw %+.1f%%" % (100 * (best["mfac"][0] / best["adamw"][0] - 1)),
            "sparse vs adamw %+.1f%%" % (100 * (best["sparse_mfac"][0] / best["adamw"][0] - 1)),
        )
    # per-seed bests
    for s in range(6):
        b = {n: min((seeds[s][f"{n}@{lr:g}"], lr) for lr in LRS) for n in ("mfac", "sparse_mfac")}
        ba = min((seeds[s][f"adamw@{lr:g}"], lr) for lr in (*LRS, 0.01))
        print(
            s,
            {n: (round(v, 4), lr) for n, (v, lr) in b.items()},
            "adamw",
            (round(ba[0], 4), ba[1]),
            "sparse/dense %+.1f%%" % (100 * (b["sparse_mfac"][0] / b["mfac"][0] - 1)),
        )
    # paired: sparse at 1e-3 vs mfac at 5e-4 per seed: std error of difference
    ss = range(6)
    diff = [seeds[s]["sparse_mfac@0.001"] / seeds[s]["mfac@0.0005"] - 1 for s in ss]
    print(
        "sparse@1e-3 / mfac@5e-4 - 1 per seed",
        [round(100 * x, 1) for x in diff],
        f"mean {100 * np.mean(diff):.1f}% sem {100 * np.std(diff, ddof=1) / np.sqrt(6):.1f}%",
    )


if __name__ == "__main__":
    seeds = load_seeds()
    main()
