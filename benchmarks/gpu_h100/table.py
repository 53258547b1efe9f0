"""Print one markdown table over the three GPU runs in this folder (update, lm, digits).

Run from the repository root: ``python benchmarks/gpu_h100/table.py``.
"""

import json
from pathlib import Path

from lowbit_optax.bench.report import fmt

HERE = Path(__file__).parent


def ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


def main():
    print(
        "| task | optimizer | state B/param | update ms | update vs adamw | amortized vs adamw "
        "| step ms | step vs adamw | compiled MiB | eval loss |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task in ("update", "lm", "digits"):
        results = json.loads((HERE / task / "results.json").read_text())
        for name, rec in results["tasks"][task]["results"].items():
            compiled = rec.get("compiled_bytes")
            cells = [
                task,
                name,
                fmt(rec["bytes_per_param"]),
                fmt(rec.get("update_ms"), ".2f"),
                ratio(rec.get("update_ratio")),
                ratio(rec.get("update_amortized_ratio")),
                fmt(rec.get("step_ms"), ".2f"),
                ratio(rec.get("step_ratio")),
                fmt(None if compiled is None else compiled / 2**20, ".1f"),
                fmt(rec.get("eval_loss"), ".4f"),
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
