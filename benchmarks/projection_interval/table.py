"""Table of GaLore / COAP / SubTrack eval losses on ``lm`` at the shared interval T = 50
over seeds 0-5, with COAP one-pass (``power_iters=0``) and with ``power_iters=2``.

Usage (from the repository root): ``python benchmarks/projection_interval/table.py``.
Seeds 0 and 1: ``interval_T50_seed{0,1}.json`` (``interval.py``) and, for
``power_iters=2``, ``explore_T50.json`` (``explore.py``, variant ``pi2``); seeds 2-5:
``seeds_T50.json`` (``seeds.py``). ``subtrack_15d1109``: SubTrack (whose default interval
is 50) with the rotation on bias-corrected moments of commit 15d1109, seed 0 from the main
benchmark (``benchmarks/results.json``), seeds 1-5 from
``benchmarks/projection_seeds/seeds_cpu_1-5_subtrack_15d1109.json``.
"""

import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ("galore_adamw", "coap_adamw", "coap_adamw_pi2", "subtrack_adamw", "subtrack_15d1109")


def load() -> dict[int, dict[str, float]]:
    runs: dict[int, dict[str, float]] = {}
    explore = json.loads((HERE / "explore_T50.json").read_text())["eval_loss"]
    for seed in (0, 1):
        row = json.loads((HERE / f"interval_T50_seed{seed}.json").read_text())["eval_loss"]
        runs[seed] = {n: row[n] for n in NAMES if n in row}
        runs[seed]["coap_adamw_pi2"] = explore[str(seed)]["coap_pi2"]
    for seed, row in json.loads((HERE / "seeds_T50.json").read_text())["eval_loss"].items():
        runs[int(seed)] = row
    main_run = json.loads((HERE.parent / "results.json").read_text())["tasks"]["lm"]["results"]
    runs[0]["subtrack_15d1109"] = main_run["subtrack_adamw"]["eval_loss"]
    new = HERE.parent / "projection_seeds" / "seeds_cpu_1-5_subtrack_15d1109.json"
    for seed, row in json.loads(new.read_text())["runs"].items():
        runs[int(seed)]["subtrack_15d1109"] = row["subtrack_adamw"]
    return runs


def main() -> None:
    # the same table as benchmarks/projection_seeds (one file, loaded by path)
    spec = importlib.util.spec_from_file_location(
        "projection_seeds_table", HERE.parent / "projection_seeds" / "table.py"
    )
    seeds_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds_table)
    seeds_table.table(None, load(), NAMES)


if __name__ == "__main__":
    main()
