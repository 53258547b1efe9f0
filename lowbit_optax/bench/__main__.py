"""``python -m lowbit_optax.bench``: memory, speed and loss of every registered optimizer.

Runs the tasks ``lm``, ``digits``, ``update`` and ``memory`` (see ``tasks``) for the chosen
optimizers, prints a table per task and writes ``results.json``, ``results.md`` and
``results.png`` into ``--out``. Times are ratios to ``optax.adamw`` measured
interleaved in this process; see results.md for how to read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit_optax.bench import registry

TASK_NAMES = ("lm", "digits", "update", "memory")
EXTRAS = {"flax": "flax", "matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def _split(values: Sequence[str] | None) -> list[str]:
    """Flattens repeated and comma-separated option values, keeping order, no repeats."""
    items = [v.strip() for value in values or () for v in value.split(",")]
    return list(dict.fromkeys(v for v in items if v))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (exits with status 2 on a bad value)."""
    parser = argparse.ArgumentParser(prog="python -m lowbit_optax.bench", description=__doc__)
    parser.add_argument(
        "--task",
        action="append",
        metavar="NAME[,NAME]",
        help=f"task(s) to run, repeatable or comma-separated: {', '.join(TASK_NAMES)} "
        "(default: all)",
    )
    parser.add_argument(
        "--optimizers",
        metavar="NAME,...",
        help="registered optimizer names (default: all registered; "
        f"{registry.REFERENCE} is always included as the reference)",
    )
    parser.add_argument("--steps", type=int, help="override every task's default step count")
    parser.add_argument("--lr", type=float, help="override every task's default learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init, gradients")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under a minute")
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lm/digits, when an optimizer that takes SlimAdam rules (slim_adamw*) runs: "
        "first train optax.adamw at a tenth of the task's default lr for --calibrate-steps "
        "steps, recording second-moment SNRs (lowbit_optax.snr_calibration), and give the "
        "rules they pick to those optimizers (default); --no-calibrate: they use "
        "lowbit_optax.flax_default_rules",
    )
    parser.add_argument(
        "--calibrate-steps",
        type=int,
        default=400,
        help="steps of the calibration run (default 400: SNR records at steps 1, 100, ..., 400)",
    )
    parser.add_argument(
        "--lrs",
        metavar="LR,...",
        help="learning-rate sweep: run each training task once per lr (no update "
        "micro-benchmark), report every optimizer's eval loss per lr and its best lr",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="also rewrite the results table of this README (between its results markers)",
    )
    args = parser.parse_args(argv)

    args.task = _split(args.task) or list(TASK_NAMES)
    unknown = [t for t in args.task if t not in TASK_NAMES]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASK_NAMES)}")
    requested = _split([args.optimizers]) if args.optimizers else registry.names()
    try:
        for name in requested:
            registry.get(name)
    except ValueError as err:
        parser.error(str(err))
    args.optimizers = list(dict.fromkeys([registry.REFERENCE, *requested]))
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.calibrate_steps < 1:
        parser.error(f"--calibrate-steps must be a positive integer, got {args.calibrate_steps}")
    if args.lrs is not None:
        try:
            args.lrs = [float(v) for v in _split([args.lrs])]
        except ValueError:
            parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
        if not args.lrs or any(not lr > 0 for lr in args.lrs):
            parser.error(f"--lrs must be positive learning rates, got {args.lrs}")
        if args.lr is not None:
            parser.error("--lr and --lrs exclude each other")
    return args


def check_extras() -> None:
    """Exits with a clear message if the packages of the ``examples`` extra are missing."""
    missing = [pip for mod, pip in EXTRAS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(
            f"python -m lowbit_optax.bench needs {', '.join(missing)}: "
            "install them with `pip install 'lowbit-optax[examples]'`"
        )


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how the benchmark ran."""
    import jax
    import optax

    import lowbit_optax

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "lowbit_optax": lowbit_optax.__version__,
        "python": platform.python_version(),
        "command": shlex.join(["python", "-m", "lowbit_optax.bench", *sys.argv[1:]]),
        "seed": args.seed,
        "quick": args.quick,
        "steps": args.steps,
        "lr": args.lr,
        "reference": registry.REFERENCE,
        "optimizers": {name: registry.get(name).description for name in args.optimizers},
        "tasks": args.task,
        "calibrate": args.calibrate,
        "calibrate_steps": args.calibrate_steps if args.calibrate else None,
        "lrs": args.lrs,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit status."""
    args = parse_args(argv)
    check_extras()
    from lowbit_optax.bench import report, tasks  # needs the extras checked above

    start = time.perf_counter()
    results: dict[str, Any] = {"meta": run_meta(args), "tasks": {}}
    settings = tasks.Settings(
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        quick=args.quick,
        calibrate=args.calibrate,
        calibrate_steps=args.calibrate_steps,
    )
    factories = {name: registry.get(name).factory() for name in args.optimizers}
    runs = [(name, name, settings) for name in args.task]
    if args.lrs is not None:  # a sweep: training tasks only, one run per lr
        runs = [
            (f"{name}@lr={lr:g}", name, dataclasses.replace(settings, lr=lr, time_updates=False))
            for name in args.task
            if name not in ("update", "memory")
            for lr in args.lrs
        ]
    for key, name, run_settings in runs:
        task_start = time.perf_counter()
        optimizers = {n: f for n, f in factories.items() if registry.runs_on(n, name)}
        results["tasks"][key] = tasks.TASKS[name].run(optimizers, run_settings)
        results["tasks"][key]["wall_s"] = time.perf_counter() - task_start
        print(report.console_table(key, results["tasks"][key]), flush=True)
    if args.lrs is not None:
        results["sweeps"] = report.sweeps(results, args.lrs)
    results["meta"]["wall_s"] = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    (args.out / "results.md").write_text(report.markdown(results))
    report.plot(results, args.out / "results.png")
    print(f"wrote {args.out}/results.json, results.md, results.png")
    if args.readme is not None:
        report.sync_readme(args.readme, results)
        print(f"updated the results table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
