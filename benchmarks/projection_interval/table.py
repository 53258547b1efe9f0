"""Table of GaLore / COAP / SubTrack eval losses on ``lm`` at the shared interval T = 50
over seeds 0-5, with COAP one-pass (``power_iters=0``) and with ``power_iters=2``.

Usage (from the repository root): ``python benchmarks/projection_interval/table.py``.
Seeds 0 and 1: ``interval_T50_seed{0,1}.json`` (``interval.py``) and, for
``power_iters=2``, ``explore_T50.json`` (``explore.py``, variant ``pi2``); seeds 2-5:
``seeds_T50.json`` (``seeds.py``).
"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
NAMES = ("galore_adamw", "coap_adamw", "coap_adamw_pi2", "subtrack_adamw")


def load() -> dict[int, dict[str, float]]:
    runs: dict[int, dict[str, float]] = {}
    explore = json.loads((HERE / "explore_T50.json").read_text())["eval_loss"]
    for seed in (0, 1):
        row = json.loads((HERE / f"interval_T50_seed{seed}.json").read_text())["eval_loss"]
        runs[seed] = {n: row[n] for n in NAMES if n in row}
        runs[seed]["coap_adamw_pi2"] = explore[str(seed)]["coap_pi2"]
    for seed, row in json.loads((HERE / "seeds_T50.json").read_text())["eval_loss"].items():
        runs[int(seed)] = row
    return runs


def main() -> None:
    runs = load()
    print("| seed | " + " | ".join(NAMES) + " |")
    print("|---:|" + "---:|" * len(NAMES))
    rel: dict[str, list[float]] = {n: [] for n in NAMES[1:]}
    for seed, row in sorted(runs.items()):
        cells = [f"{row['galore_adamw']:.4f}"]
        for n in NAMES[1:]:
            d = 100 * (row[n] / row["galore_adamw"] - 1)
            rel[n].append(d)
            cells.append(f"{row[n]:.4f} ({d:+.2f}%)")
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print()
    for n, ds in rel.items():
        ds = np.array(ds)
        sem = ds.std(ddof=1) / np.sqrt(len(ds))
        print(
            f"- {n} vs galore_adamw: mean {ds.mean():+.3f}% (standard error {sem:.3f}%), "
            f"ahead on {int((ds < 0).sum())} of {len(ds)} seeds"
        )


if __name__ == "__main__":
    main()
