"""Print one markdown table over the three GPU runs in this folder (update, lm, digits).

Run from the repository root: ``python benchmarks/gpu_h100/table.py``.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


def ms(value):
    return "n/a" if value is None else f"{value:.2f}"


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
            compiled = "n/a" if compiled is None else f"{compiled / 2**20:.1f}"
            loss = rec.get("eval_loss")
            loss = "n/a" if loss is None else f"{loss:.4f}"
            print(
                f"| {task} | {name} | {rec['bytes_per_param']:.3f} | {ms(rec.get('update_ms'))} "
                f"| {ratio(rec.get('update_ratio'))} | {ratio(rec.get('update_amortized_ratio'))} "
                f"| {ms(rec.get('step_ms'))} | {ratio(rec.get('step_ratio'))} "
                f"| {compiled} | {loss} |"
            )


if __name__ == "__main__":
    main()
