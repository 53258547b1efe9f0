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


def _seeds_table():
    """``benchmarks/projection_seeds/table.py`` (loaded by path): its table and loaders."""
    spec = importlib.util.spec_from_file_location(
        "projection_seeds_table", HERE.parent / "projection_seeds" / "table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> dict[int, dict[str, float]]:
    runs: dict[int, dict[str, float]] = {}
    explore = json.loads((HERE / "explore_T50.json").read_text())["eval_loss"]
    for seed in (0, 1):
        row = json.loads((HERE / f"interval_T50_seed{seed}.json").read_text())["eval_loss"]
        runs[seed] = {n: row[n] for n in NAMES if n in row}
        runs[seed]["coap_adamw_pi2"] = explore[str(seed)]["coap_pi2"]
    for seed, row in json.loads((HERE / "seeds_T50.json").read_text())["eval_loss"].items():
        runs[int(seed)] = row
    seeds_table = _seeds_table()
    runs[0]["subtrack_15d1109"] = seeds_table.main_run_losses(("subtrack_adamw",))["subtrack_adamw"]
    new = seeds_table.runs_of(seeds_table.HERE / "seeds_cpu_1-5_subtrack_15d1109.json")
    for seed, row in new.items():
        runs[seed]["subtrack_15d1109"] = row["subtrack_adamw"]
    return runs


def main() -> None:
    _seeds_table().table(None, load(), NAMES)  # the same table as benchmarks/projection_seeds


if __name__ == "__main__":
    main()
