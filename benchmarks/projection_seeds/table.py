"""Tables of GaLore / COAP / SubTrack eval losses on ``lm`` over seeds (paper intervals).

Usage (from the repository root): ``python benchmarks/projection_seeds/table.py``.

* Before commit 9e3c36c (COAP's one-pass first range finder): seed 0 is the main
  benchmark's run of commit fd8a505 (``seed0_fd8a505.json``, extracted from that
  commit's ``benchmarks/results.json``), seeds 2-5 come from ``seeds_many.py``
  (``seeds_cpu_2-5.json``).
* With the code of commit 9e3c36c (``coap_adamw`` with ``power_iters=2``; events reuse
  ``S^T G``): seed 0 is the main benchmark's run of that code (``seed0_9e3c36c.json``,
  from commit 7a19021's ``benchmarks/results.json``), seeds 2-5 come from
  ``seeds_many.py`` (``seeds_cpu_2-5_9e3c36c.json``).
* With SubTrack++'s rotation on bias-corrected moments (commit 15d1109; GaLore and COAP
  are unchanged by it, bit for bit): seed 0 is the main benchmark's run
  (``benchmarks/results.json``), seeds 2-5 take GaLore and COAP from the previous table
  and SubTrack from ``seeds_many.py --names subtrack_adamw``
  (``seeds_cpu_1-5_subtrack_15d1109.json``).
"""

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
NAMES = ("galore_adamw", "coap_adamw", "subtrack_adamw")


def runs_of(path: Path) -> dict[int, dict[str, float]]:
    return {int(s): r for s, r in json.loads(path.read_text())["runs"].items()}


def main_run_losses(names: tuple[str, ...] = NAMES) -> dict[str, float]:
    """``lm`` eval losses of the main benchmark run (``benchmarks/results.json``, seed 0)."""
    results = json.loads((HERE.parent / "results.json").read_text())["tasks"]["lm"]["results"]
    return {n: results[n]["eval_loss"] for n in names}


def table(
    title: str | None, runs: dict[int, dict[str, float]], names: tuple[str, ...] = NAMES
) -> None:
    """Markdown table of ``runs`` (seed -> name -> loss), each name after the first in
    percent against the first, then the mean, standard error and wins per name."""
    if title is not None:
        print(f"{title}\n")
    print("| seed | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    rel = {n: [] for n in names[1:]}
    for seed, row in sorted(runs.items()):
        cells = [f"{row[names[0]]:.4f}"]
        for n in names[1:]:
            d = 100 * (row[n] / row[names[0]] - 1)
            rel[n].append(d)
            cells.append(f"{row[n]:.4f} ({d:+.2f}%)")
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print()
    for n, ds in rel.items():
        ds = np.array(ds)
        sem = ds.std(ddof=1) / np.sqrt(len(ds))
        print(
            f"- {n} vs {names[0]}: mean {ds.mean():+.3f}% (standard error {sem:.3f}%), "
            f"ahead on {int((ds < 0).sum())} of {len(ds)} seeds"
        )
    print()


def main() -> None:
    before = runs_of(HERE / "seed0_fd8a505.json") | runs_of(HERE / "seeds_cpu_2-5.json")
    table("Before commit 9e3c36c (COAP one-pass)", before)
    then = runs_of(HERE / "seed0_9e3c36c.json") | runs_of(HERE / "seeds_cpu_2-5_9e3c36c.json")
    table("With the code of commit 9e3c36c (COAP power_iters=2)", then)
    now = {0: main_run_losses()}
    subtrack = runs_of(HERE / "seeds_cpu_1-5_subtrack_15d1109.json")
    for seed in (2, 3, 4, 5):
        now[seed] = then[seed] | {"subtrack_adamw": subtrack[seed]["subtrack_adamw"]}
    table("With the bias-corrected rotation of commit 15d1109 (SubTrack)", now)


if __name__ == "__main__":
    main()
