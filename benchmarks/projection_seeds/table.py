"""Table of GaLore / COAP / SubTrack eval losses on ``lm`` over seeds (paper intervals).

Usage (from the repository root): ``python benchmarks/projection_seeds/table.py``. Seed 0
is the main benchmark's run of commit fd8a505 (``seed0_fd8a505.json``, extracted from
that commit's ``benchmarks/results.json``); seeds 2-5 come from ``seeds_many.py``
(``seeds_cpu_2-5.json``). Both predate COAP's power iterations (commit 9e3c36c).
"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
NAMES = ("galore_adamw", "coap_adamw", "subtrack_adamw")


def main() -> None:
    runs = {}
    for name in ("seed0_fd8a505.json", "seeds_cpu_2-5.json"):
        runs.update({int(s): r for s, r in json.loads((HERE / name).read_text())["runs"].items()})
    print("| seed | galore_adamw | coap_adamw | subtrack_adamw |")
    print("|---:|---:|---:|---:|")
    rel = {n: [] for n in NAMES[1:]}
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
