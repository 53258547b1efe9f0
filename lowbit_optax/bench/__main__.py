"""``python -m lowbit_optax.bench``: memory, speed and loss of the registered optimizers.

Without flags, the main job (a few minutes on 2 CPU cores): one optimizer per technique
(``registry.MAIN``) against ``optax.adamw`` on the tasks ``lm`` (a smaller model: quality,
update and step time) and ``memory`` (compile-only state, update and training-step peaks
of GPT-2 small and a 1B decoder). ``--full``: the complete suite (every default
optimizer on ``lm``, ``digits``, ``update`` and ``memory`` at full size, with the
whole-model memory recipes; about an hour), written into ``benchmarks/`` and the
README's techniques table. Prints a table per task and the techniques table, and writes
``results.json``, ``results.md``, ``results.png`` and ``techniques.md`` into ``--out``.
Times are ratios to ``optax.adamw`` measured interleaved in this process; see results.md
for how to read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit_optax.bench import registry

TASK_NAMES = ("lm", "mlp_lm", "digits", "update", "memory")
# what --full (and --quick) runs without --task: mlp_lm (1500 steps) is for the
# projection experiments
DEFAULT_TASKS = ("lm", "digits", "update", "memory")
# the main job's tasks (no --full, no --quick)
MAIN_TASKS = ("lm", "memory")
EXTRAS = {"flax": "flax", "matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def _split(values: Sequence[str] | None) -> list[str]:
    """Flattens repeated and comma-separated option values, keeping order, no repeats."""
    items = [v.strip() for value in values or () for v in value.split(",")]
    return list(dict.fromkeys(v for v in items if v))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (exits with status 2 on a bad value)."""
    parser = argparse.ArgumentParser(prog="python -m lowbit_optax.bench", description=__doc__)
    parser.add_argument(
        "--full",
        action="store_true",
        help="the complete suite at full size (about an hour on 2 CPU cores): every "
        f"default optimizer on {', '.join(DEFAULT_TASKS)}, the whole-model memory recipes; "
        "writes into benchmarks/ and README.md's techniques table unless --out/--readme "
        "say otherwise. Without it, --quick, and any of --task, --optimizers, --seeds, "
        f"--lrs, --set, --sweep, the main job runs: {', '.join(registry.MAIN)} against "
        f"{registry.REFERENCE} on {', '.join(MAIN_TASKS)}, a smaller lm model (minutes); "
        "choosing tasks or optimizers runs them at full size",
    )
    parser.add_argument(
        "--task",
        action="append",
        metavar="NAME[,NAME]",
        help=f"task(s) to run, repeatable or comma-separated: {', '.join(TASK_NAMES)} "
        f"(default: {', '.join(DEFAULT_TASKS)}; the main job: {', '.join(MAIN_TASKS)})",
    )
    parser.add_argument(
        "--optimizers",
        metavar="NAME,...",
        help="registered optimizer names (default: all registered but the bf16 weight "
        f"recipes, which run only when named; the main job: {', '.join(registry.MAIN)}; "
        f"{registry.REFERENCE} is always included as the reference)",
    )
    parser.add_argument("--steps", type=int, help="override every task's default step count")
    parser.add_argument("--lr", type=float, help="override every task's default learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init, gradients")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (for tests; numbers mean nothing)"
    )
    parser.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the params and gradients of the update, lm and mlp_lm tasks "
        "(bfloat16: the model computes in it; for the weight transforms of "
        "lowbit_optax.weights, whose work is on low-precision params only)",
    )
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
        default=None,
        help="steps of the calibration run (default 400: SNR records at steps 1, 100, ..., "
        "400; the main job: 50)",
    )
    parser.add_argument(
        "--lrs",
        metavar="LR,...",
        help="learning-rate sweep: run each training task once per lr (no update "
        "micro-benchmark), report every optimizer's eval loss per lr and its best lr",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="keyword argument of a registered optimizer (repeatable; VALUE a Python "
        "literal, else a string): it runs as the variant NAME[KEY=VALUE]; KEY lr_scale "
        "multiplies the task's learning rate (schedule) for that optimizer",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME.KEY=V1,V2,...",
        help="run NAME as one variant per value of keyword KEY, side by side (with any "
        "--set of NAME); a variant's event period for the amortized timing follows its "
        "update_interval",
    )
    parser.add_argument(
        "--seeds",
        metavar="SEED,...",
        help="run each task once per seed (lm, digits: eval losses summarised per "
        "optimizer as mean and standard error over the seeds)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench; with --full: benchmarks)",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="also rewrite the techniques table of this README (between its results "
        "markers; default with --full: README.md)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        action="append",
        metavar="RESULTS_JSON",
        help="run nothing: write results.md, results.png and techniques.md (and the "
        "--readme table) anew from a results.json of an earlier run; repeated, the "
        "techniques table adds the optimizers of the later runs that the first lacks",
    )
    args = parser.parse_args(argv)

    if args.full and args.quick:
        parser.error("--full and --quick exclude each other")
    chosen = (args.task, args.optimizers, args.seeds, args.lrs, args.set, args.sweep)
    if args.full:
        args.mode = "full"
    elif args.quick:
        args.mode = "quick"
    else:  # the main job, unless tasks or optimizers are chosen (today's full sizes)
        args.mode = "custom" if any(chosen) else "main"
    main_job = args.mode == "main"
    if args.out is None:
        args.out = Path("benchmarks" if args.full else "runs/bench")
    if args.readme is None and args.full:
        args.readme = Path("README.md")
    args.task = _split(args.task) or list(MAIN_TASKS if main_job else DEFAULT_TASKS)
    unknown = [t for t in args.task if t not in TASK_NAMES]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASK_NAMES)}")
    if args.optimizers:
        requested = _split([args.optimizers])
    else:
        requested = list(registry.MAIN) if main_job else registry.default_names()
    try:
        for name in requested:
            registry.get(name)
    except ValueError as err:
        parser.error(str(err))
    names = list(dict.fromkeys([registry.REFERENCE, *requested]))
    try:
        args.variants = _variants(names, args.set, args.sweep)
    except ValueError as err:
        parser.error(str(err))
    args.optimizers = list(args.variants)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.calibrate_steps is None:
        args.calibrate_steps = 50 if main_job else 400
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
    if args.seeds is not None:
        try:
            args.seeds = [int(v) for v in _split([args.seeds])]
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
        if not args.seeds:
            parser.error("--seeds needs at least one seed")
        if args.lrs is not None:
            parser.error("--seeds and --lrs exclude each other (run one sweep per seed)")
    return args


def _assignment(text: str, option: str) -> tuple[str, str, str]:
    """``NAME.KEY=VALUE`` -> ``(NAME, KEY, VALUE)``, NAME registered."""
    target, sep, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not (sep and dot and name and key.isidentifier()):
        raise ValueError(f"{option} takes NAME.KEY=VALUE, got {text!r}")
    registry.get(name)
    return name, key, value


def _variants(
    names: list[str], sets: Sequence[str], sweeps: Sequence[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{label: (registered name, keyword overrides)}`` for the run, in ``names``'
    order: ``--set`` adds overrides to a name, ``--sweep`` makes one variant per value."""
    fixed: dict[str, dict[str, Any]] = {}
    for text in sets:
        name, key, value = _assignment(text, "--set")
        fixed.setdefault(name, {})[key] = registry.parse_value(value)
    swept: dict[str, tuple[str, list[Any]]] = {}
    for text in sweeps:
        name, key, values = _assignment(text, "--sweep")
        if name in swept:
            raise ValueError(f"--sweep: one sweep per optimizer ({name!r} has two)")
        swept[name] = (key, [registry.parse_value(v) for v in _split([values])])
    unknown = [n for n in [*fixed, *swept] if n not in names]
    if unknown:
        raise ValueError(f"--set/--sweep name optimizers that do not run: {unknown}")
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in names:
        key, values = swept.get(name, (None, [None]))
        for value in values:
            overrides = {**fixed.get(name, {}), **({} if key is None else {key: value})}
            label, _ = registry.variant(name, overrides)
            out[label] = (name, overrides)
    return out


def check_extras() -> None:
    """Exits with a clear message if the packages of the ``examples`` extra are missing."""
    missing = [pip for mod, pip in EXTRAS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(
            f"python -m lowbit_optax.bench needs {', '.join(missing)}: "
            "install them with `pip install 'lowbit-optax[examples]'`"
        )


def _git_revision() -> str | None:
    """The checkout's commit, with ``+dirty`` if files differ from it (``None``
    outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(
            ["git", *a], cwd=here, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        rev = run("rev-parse", "HEAD")
        return rev + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


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
        "mode": args.mode,
        "quick": args.quick,
        "steps": args.steps,
        "lr": args.lr,
        "reference": registry.REFERENCE,
        "optimizers": {
            label: registry.get(name).description + (f" with {kw}" if kw else "")
            for label, (name, kw) in args.variants.items()
        },
        "seeds": args.seeds,
        "git": _git_revision(),
        "tasks": args.task,
        "calibrate": args.calibrate,
        "calibrate_steps": args.calibrate_steps if args.calibrate else None,
        "lrs": args.lrs,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit status."""
    args = parse_args(argv)
    check_extras()
    from tqdm import tqdm

    from lowbit_optax.bench import memory_task, report, tasks  # needs the extras checked above

    if args.render is not None:
        first, *rest = (json.loads(path.read_text()) for path in args.render)
        _write(first, args, report, [_merged(rest)] if rest else [])
        return 0
    runners = (
        tasks.LMTask(),
        tasks.MLPLMTask(),
        tasks.DigitsTask(),
        tasks.UpdateTask(),
        memory_task.MemoryTask(),
    )
    task_of = {t.name: t for t in runners}

    start = time.perf_counter()
    results: dict[str, Any] = {"meta": run_meta(args), "tasks": {}}
    settings = tasks.Settings(
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        quick=args.quick,
        fast=args.mode == "main",
        calibrate=args.calibrate,
        calibrate_steps=args.calibrate_steps,
        param_dtype=args.param_dtype,
    )
    factories = {
        label: registry.variant(name, kw)[1] for label, (name, kw) in args.variants.items()
    }
    runs = [(name, name, settings) for name in args.task]
    if args.seeds is not None:  # one run per seed, every task
        runs = [
            (f"{name}@seed={seed}", name, dataclasses.replace(settings, seed=seed))
            for name in args.task
            for seed in args.seeds
        ]
    if args.lrs is not None:  # a sweep: training tasks only, one run per lr
        runs = [
            (f"{name}@lr={lr:g}", name, dataclasses.replace(settings, lr=lr, time_updates=False))
            for name in args.task
            if name not in ("update", "memory")
            for lr in args.lrs
        ]
    with tqdm(total=len(runs), desc=f"{args.mode} job", unit="task") as overall:
        for key, name, run_settings in runs:
            overall.set_postfix_str(key)
            task_start = time.perf_counter()
            optimizers = {n: f for n, f in factories.items() if registry.runs_on(n, name)}
            results["tasks"][key] = task_of[name].run(optimizers, run_settings)
            results["tasks"][key]["wall_s"] = time.perf_counter() - task_start
            overall.write(report.console_table(key, results["tasks"][key]))
            overall.update()
    if args.lrs is not None:
        results["sweeps"] = report.sweeps(results, args.lrs)
    if args.seeds is not None:
        results["seeds"] = report.seed_summary(results, args.seeds)
    results["meta"]["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    _write(results, args, report)
    print(f"\ntechniques (optimizer against {registry.REFERENCE}):")
    print(report.techniques_console(results))
    print(f"\n{args.mode} job: {results['meta']['wall_s']:.0f} s")
    return 0


def _merged(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One record of several runs of different tasks (their tasks together; the first
    run's metadata, every run's command)."""
    meta = dict(runs[0]["meta"])
    meta["command"] = "`, `".join(r["meta"]["command"] for r in runs)
    return {"meta": meta, "tasks": {k: v for r in runs for k, v in r["tasks"].items()}}


def _write(
    results: dict[str, Any],
    args: argparse.Namespace,
    report: Any,
    extra: Sequence[dict[str, Any]] = (),
) -> None:
    """results.md, results.png and techniques.md (with ``extra`` runs' optimizers) into
    ``args.out``, and the README's techniques table with ``--readme``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report.markdown(results))
    (args.out / "techniques.md").write_text(report.techniques_markdown(results, extra))
    report.plot(results, args.out / "results.png")
    written = "results.md, results.png, techniques.md"
    print(f"wrote {written} into {args.out}" + ("" if args.render else " (and results.json)"))
    if args.readme is not None:
        report.sync_readme(args.readme, results, extra)
        print(f"updated the techniques table in {args.readme}")


if __name__ == "__main__":
    sys.exit(main())
