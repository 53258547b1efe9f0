"""Tables of ``gpu_seeds/`` (seeds 6-69 on an H100) and of those plus seeds 0-5 (CPU).

Usage (from the repository root): ``python benchmarks/mfac_grid/gpu_table.py``. The lrs
compared are each optimizer's best over seeds 0-5 (mfac 5e-4, sparse_mfac 1e-3, adamw
1e-2), chosen before seeds 6-69 were run; the other grid points are there to check
that choice.
"""

import glob
import json
from pathlib import Path

import numpy as np
from table import load_seeds

HERE = Path(__file__).parent
KEYS = (
    "mfac@0.0003",
    "mfac@0.0005",
    "mfac@0.001",
    "sparse_mfac@0.001",
    "sparse_mfac@0.002",
    "adamw@0.01",
)
CHOSEN = {"mfac": "mfac@0.0005", "sparse_mfac": "sparse_mfac@0.001", "adamw": "adamw@0.01"}


def gpu_runs() -> dict[int, dict[str, float]]:
    runs = {}
    for path in sorted(glob.glob(str(HERE / "gpu_seeds" / "*.json"))):
        runs.update({int(s): r for s, r in json.loads(Path(path).read_text())["runs"].items()})
    return runs


def report(title: str, runs: dict[int, dict[str, float]]) -> None:
    seeds = sorted(runs)
    arr = {k: np.array([runs[s][k] for s in seeds]) for k in KEYS}
    print(f"## {title}: {len(seeds)} seeds\n")
    print("| optimizer@lr | mean eval loss | median |")
    print("|---|---:|---:|")
    for k in KEYS:
        print(f"| {k} | {arr[k].mean():.4f} | {np.median(arr[k]):.4f} |")
    m, s, a = (arr[CHOSEN[n]] for n in ("mfac", "sparse_mfac", "adamw"))
    ratio = s / m - 1
    sem = ratio.std(ddof=1) / np.sqrt(len(ratio))
    print()
    print(
        f"- sparse_mfac vs mfac (means at the chosen lrs): {100 * (s.mean() / m.mean() - 1):+.2f}%"
    )
    print(
        f"- paired per seed: mean {100 * ratio.mean():+.2f}% (standard error {100 * sem:.2f}%), "
        f"median {100 * np.median(ratio):+.2f}%, "
        f"sparse better on {int((ratio < 0).sum())} of {len(ratio)}"
    )
    print(
        f"- mfac vs adamw: {100 * (m.mean() / a.mean() - 1):+.2f}%; "
        f"sparse_mfac vs adamw: {100 * (s.mean() / a.mean() - 1):+.2f}%\n"
    )


if __name__ == "__main__":
    gpu = gpu_runs()
    report("seeds 6-69, H100", gpu)
    report("seeds 0-69 (0-5 on CPU, 6-69 on the H100)", {**load_seeds(), **gpu})
