"""Tests of ``python -m lowbit_optax.bench``: a real ``--quick`` run and its pure helpers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import pytest

from lowbit_optax.bench import __main__ as cli
from lowbit_optax.bench import registry
from lowbit_optax.bench.timing import (
    describe_error,
    interleaved_runs,
    medians_and_ratios,
    round_robin,
    split,
    whole_cycles,
)

REPO = Path(__file__).resolve().parents[1]
TASKS = ("lm", "digits", "update", "memory")  # a run's default tasks
# The --quick run covers the tasks the main job does not run (digits, update) for the
# reference, SOLO, and the error-feedback pieces (sgd, its base; top-k; a sparse
# window); the main job (test_main_job_*; .ci/run runs it before the tests) covers lm
# and memory with adamw_8bit, slim_adamw, galore_adamw and sparse_ggt. Compiling every
# registered optimizer for three tasks took ~4 minutes of the suite:
# test_every_registered_optimizer_builds_and_inits covers the rest of the registry, the
# contract battery their updates.
QUICK_TASKS = ("digits", "update")
QUICK = [
    "adamw",
    "solo_adamw_4_2",
    "sgd",
    "ef_top_k_sgd",
    "sparse_mfac",
]


def _check_curves(task: dict[str, Any]) -> None:
    """A training task's records: curves to the last step, losses from them."""
    steps = task["config"]["steps"]
    for rec in task["results"].values():
        curve = rec["curve"]
        assert curve["step"][-1] == steps and curve["eval_step"][-1] == steps
        assert rec["final_train_loss"] == curve["train_loss"][-1]
        assert rec["eval_loss"] == curve["eval_loss"][-1]
        assert rec["step_ms"] > 0


def _expected(task: str) -> list[str]:
    return [n for n in QUICK if registry.runs_on(n, task)]


FIELDS = {
    "status",
    "state_bytes",
    "num_params",
    "bytes_per_param",
    "update_ms",
    "update_ratio",
    "step_ms",
    "step_ratio",
    "peak_bytes",
    "compiled_bytes",
    "final_train_loss",
    "eval_loss",
    "eval_accuracy",
    "curve",
}


def _bench_once(tmp_path_factory: pytest.TempPathFactory, name: str, argv: list[str]) -> Path:
    """Runs ``python -m lowbit_optax.bench *argv --out DIR`` once per test run, also under
    pytest-xdist: the first worker to create the run's shared folder (an atomic mkdir)
    runs it, the others wait for its ``done`` marker. (``--dist loadgroup`` did not keep
    the tests of a group on one worker with this pytest-xdist, so each worker ran its
    own copy.)"""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:
        out, owner = tmp_path_factory.mktemp(name), True
    else:
        out = tmp_path_factory.getbasetemp().parent / f"{name}-{uid}"
        try:
            out.mkdir(parents=True)
            owner = True
        except FileExistsError:
            owner = False
    marker = out / "done"
    if owner:
        proc = subprocess.run(
            [sys.executable, "-m", "lowbit_optax.bench", *argv, "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        marker.write_text("ok" if proc.returncode == 0 else proc.stderr[-3000:])
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert time.monotonic() < deadline, f"timed out waiting for the {name} bench run"
        time.sleep(1)
    status = marker.read_text()
    assert status == "ok", status
    return out


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of one ``--quick`` run with the QUICK optimizers."""
    argv = ["--quick", "--task", ",".join(QUICK_TASKS), "--optimizers", ",".join(QUICK)]
    return _bench_once(tmp_path_factory, "quick", argv)


@pytest.fixture(scope="session")
def results(quick_run: Path) -> dict[str, Any]:
    return json.loads((quick_run / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_three_files(quick_run: Path) -> None:
    for name in ("results.json", "results.md", "results.png"):
        assert (quick_run / name).stat().st_size > 0
    assert (quick_run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_results_json_has_every_task_and_optimizer(results: dict[str, Any]) -> None:
    assert results["meta"]["reference"] == registry.REFERENCE
    assert set(results["tasks"]) == set(QUICK_TASKS)
    for task_name, task in results["tasks"].items():
        assert list(task["results"]) == _expected(task_name), task_name
        for name, rec in task["results"].items():
            assert FIELDS <= set(rec), (task_name, name)
            assert rec["status"] == "ok", (task_name, name, rec["status"])
            assert rec["bytes_per_param"] == rec["state_bytes"] / rec["num_params"]
            assert rec["update_ms"] > 0
        if task_name in QUICK_TASKS:
            assert task["results"][registry.REFERENCE]["update_ratio"] == 1.0


@pytest.mark.slow
def test_adamw_state_is_two_float32_moments_and_counts(results: dict[str, Any]) -> None:
    for task_name, task in results["tasks"].items():
        rec = task["results"]["adamw"]
        n = rec["num_params"]
        assert n == task["config"]["num_params"]
        # mu and nu in float32 plus adam's int32 count; the training tasks' warmup-cosine
        # schedule (optax.scale_by_schedule) keeps a second int32 count.
        counts = 1 if task_name in ("update", "memory") else 2
        assert rec["state_bytes"] == 8 * n + 4 * counts
        assert rec["bytes_per_param"] == pytest.approx(8.0, abs=1e-3)


@pytest.mark.slow
def test_training_tasks_record_losses_and_curves(results: dict[str, Any]) -> None:
    _check_curves(results["tasks"]["digits"])
    assert 0.0 <= results["tasks"]["digits"]["results"]["adamw"]["eval_accuracy"] <= 1.0
    update = results["tasks"]["update"]["results"]["adamw"]
    assert update["step_ms"] is None and update["eval_loss"] is None and update["curve"] is None


@pytest.mark.slow
def test_results_md_has_a_row_per_optimizer(quick_run: Path) -> None:
    md = (quick_run / "results.md").read_text()
    sections = md.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["Summary", *QUICK_TASKS]
    summary = sections[0].splitlines()
    for task in QUICK_TASKS:
        for name in QUICK:
            rows = sum(line.startswith(f"| {task} | {name} |") for line in summary)
            assert rows == (1 if name in _expected(task) else 0), (task, name)
    for task, section in zip(QUICK_TASKS, sections[1:], strict=True):
        for name in QUICK:
            rows = sum(line.startswith(f"| {name} |") for line in section.splitlines())
            assert rows == (1 if name in _expected(task) else 0), (task, name)
    assert "python -m lowbit_optax.bench --quick" in md


@pytest.mark.slow
def test_memory_task_reports_compiled_peaks(main_job: Path) -> None:
    """The compile-only memory task (of the main job): adamw's donated update needs
    exactly params + grads + state (plus XLA's 8-byte output pointers); every
    optimizer's figures are those of XLA's analysis (peak = arguments + outputs -
    aliased + temporaries)."""
    task = json.loads((main_job / "results.json").read_text())["tasks"]["memory"]
    assert set(task["config"]["models"]) == {"gpt2_small", "decoder_1b"}
    for model, cfg in task["config"]["models"].items():
        n = cfg["num_params"]
        ref = task["results"]["adamw"]["memory"][model]
        outputs = ref["update"]["output_bytes"] - ref["update"]["alias_bytes"]
        # scalars and the output tuple's 8-byte pointers (one per leaf) only
        assert ref["update"]["temp_bytes"] < 1024 and 0 <= outputs < 16 * 1024
        assert ref["update_peak"] == pytest.approx(16.0 + outputs / n, abs=1024 / n)
        for name, rec in task["results"].items():
            r = rec["memory"][model]
            u = r["update"]
            peak = u["argument_bytes"] + u["output_bytes"] - u["alias_bytes"] + u["temp_bytes"]
            assert r["update_peak"] == peak / n
            # params, grads, state (jit drops state leaves the update never reads)
            assert 8 * n <= u["argument_bytes"] <= 8 * n + r["state_bytes"]
            assert r["update_limit"] == pytest.approx(8.0 + r["state"] + 1.0)
            assert r["step_peak"] > r["state"] + 4.0  # at least params and state
            saving = r["step_saving"]
            assert (saving is None) == (name == "adamw" or r["state"] >= ref["state"])


def test_every_registered_optimizer_builds_and_inits() -> None:
    """Each registry factory (with its lr scale) gives a transform whose init runs on the
    quick lm parameters (abstractly: shapes only) and on its tasks only."""
    from lowbit_optax.bench import tasks

    params = tasks.LMTask().problem(tasks.Settings(quick=True)).params
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for name in registry.names():
        spec = registry.get(name)
        tx = spec.factory()(optax.constant_schedule(1e-3))
        state = jax.eval_shape(tx.init, abstract)
        assert jax.tree.leaves(state), name
        assert spec.tasks is None or set(spec.tasks) <= set(cli.TASK_NAMES), name
    assert set(QUICK) <= set(registry.names())
    # the bf16 weight recipes run only when named (float32 params pass through them)
    assert "adamw_master" not in registry.default_names()
    assert registry.default_names()[0] == registry.REFERENCE


def test_lr_scale_scales_floats_and_schedules() -> None:
    seen = []
    spec = registry.OptimizerSpec(
        "x", lambda lr: seen.append(lr) or optax.sgd(lr), "d", lr_scale=30.0
    )
    spec.factory()(1e-3)
    spec.factory()(optax.constant_schedule(2e-3))
    assert seen[0] == pytest.approx(3e-2)
    assert seen[1](0) == pytest.approx(6e-2)
    assert registry.runs_on("mfac", "digits") and not registry.runs_on("mfac", "update")
    assert registry.runs_on("adamw", "update")


def test_medians_and_ratios_by_hand() -> None:
    samples = {"adamw": [3.0, 1.0, 2.0], "slow": [8.0, 6.0, 4.0, 100.0], "none": []}
    stats = medians_and_ratios(samples, "adamw")
    assert stats["adamw"] == (2.0, 1.0)
    assert stats["slow"] == (7.0, 3.5)  # median of an even count: mean of the middle two
    assert stats["none"] == (None, None)
    assert medians_and_ratios({"x": [1.0]}, "adamw") == {"x": (1.0, None)}
    means = medians_and_ratios(samples, "adamw", statistics.fmean)
    assert means["adamw"] == (2.0, 1.0)
    assert means["slow"] == (29.5, 14.75)  # (8 + 6 + 4 + 100) / 4


def test_whole_cycles_covers_every_period() -> None:
    # runs of 200 updates: periods 200 and 160 repeat together every 800 updates
    assert whole_cycles(3, 200, [200, 160, 200]) == 4
    assert whole_cycles(12, 200, [200, 160]) == 12
    assert whole_cycles(1, 200, [200, 50]) == 1
    assert whole_cycles(5, 200, [200, 160]) == 8
    assert whole_cycles(1, 30, [20]) == 2  # 2 x 30 = 60 = 3 x 20
    for rounds, window, periods in [(3, 200, [200, 160]), (7, 30, [20, 45]), (1, 7, [3])]:
        n = whole_cycles(rounds, window, periods)
        assert n >= rounds and all(n * window % p == 0 for p in periods)
        assert not any(
            all(k * window % p == 0 for p in periods) for k in range(rounds, n)
        )  # the least such count
    with pytest.raises(ValueError, match="positive periods"):
        whole_cycles(3, 200, [])


def test_round_robin_interleaves_and_isolates_failures() -> None:
    calls: list[str] = []

    def sample(name: str, value: float) -> Any:
        return lambda: calls.append(name) or value

    def broken() -> float:
        calls.append("broken")
        raise RuntimeError("boom\nsecond line")

    runs = {"a": sample("a", 1.0), "broken": broken, "b": sample("b", 2.0)}
    samples, errors = round_robin(runs, rounds=3)
    assert calls == ["a", "broken", "b", "a", "b", "a", "b"]
    assert samples == {"a": [1.0, 1.0, 1.0], "broken": [], "b": [2.0, 2.0, 2.0]}
    assert errors == {"broken": "error: RuntimeError: boom"}
    assert describe_error(ValueError()) == "error: ValueError: "


def test_split_sums_to_the_total_in_near_equal_pieces() -> None:
    assert split(200, 8) == [25] * 8
    assert split(10, 4) == [3, 3, 2, 2]
    assert split(3, 8) == [1, 1, 1]
    with pytest.raises(ValueError, match="total >= 1"):
        split(0, 8)


def test_interleaved_runs_take_turns_and_sum_each_rounds_pieces() -> None:
    calls: list[tuple[str, int]] = []
    steps = {"a": 0, "b": 0}

    def run(name: str, per_step: float) -> Any:
        def go(k: int) -> float:
            calls.append((name, k))
            steps[name] += k
            return per_step * k

        return go

    def broken_in_round_two(k: int) -> float:
        calls.append(("broken", k))
        if len([c for c in calls if c[0] == "broken"]) > 2:
            raise RuntimeError("late")
        return 1.0

    runs = {"a": run("a", 1.0), "broken": broken_in_round_two, "b": run("b", 3.0)}
    samples, errors = interleaved_runs(runs, [3, 2], rounds=2)
    # one round: every live name advances by the first piece, then by the second
    assert calls[:6] == [("a", 3), ("broken", 3), ("b", 3), ("a", 2), ("broken", 2), ("b", 2)]
    assert calls[6:] == [("a", 3), ("broken", 3), ("b", 3), ("a", 2), ("b", 2)]
    assert steps == {"a": 10, "b": 10}  # two runs of 5 consecutive steps each
    assert samples == {"a": [5.0, 5.0], "broken": [2.0], "b": [15.0, 15.0]}
    assert errors == {"broken": "error: RuntimeError: late"}


def test_interleaved_runs_with_a_count_per_name() -> None:
    """A name whose count is reached sits out the later rounds; the others keep turns."""
    calls: list[str] = []
    runs = {n: (lambda k, n=n: calls.append(n) or float(k)) for n in ("ref", "a", "b")}
    samples, errors = interleaved_runs(runs, [2], {"ref": 4, "a": 3, "b": 1})
    assert calls == ["ref", "a", "b", "ref", "a", "ref", "a", "ref"]
    assert samples == {"ref": [2.0] * 4, "a": [2.0] * 3, "b": [2.0]}
    assert errors == {}


def test_cli_parses_lists_and_always_includes_the_reference() -> None:
    args = cli.parse_args(["--task", "update,lm", "--task", "lm", "--optimizers", "galore"])
    assert args.task == ["update", "lm"]
    assert args.optimizers == [registry.REFERENCE, "galore"]
    assert args.mode == "custom"  # chosen tasks or optimizers run at full size
    assert cli.parse_args(["--optimizers", "adamw_8bit"]).task == list(TASKS)


def test_cli_modes_main_full_quick() -> None:
    """No flags: the main job (one optimizer per technique on lm and memory, small lm,
    100 calibration steps); --full: the whole suite into benchmarks/ and README.md."""
    main = cli.parse_args([])
    assert main.mode == "main"
    assert main.task == ["lm", "memory"]
    assert main.optimizers == [registry.REFERENCE, *registry.MAIN]
    assert (str(main.out), main.readme, main.calibrate_steps) == ("runs/bench", None, 50)
    full = cli.parse_args(["--full"])
    assert full.mode == "full"
    assert full.task == list(TASKS)
    assert full.optimizers == registry.default_names()
    assert (str(full.out), str(full.readme), full.calibrate_steps) == (
        "benchmarks",
        "README.md",
        400,
    )
    assert cli.parse_args(["--seeds", "0,1"]).mode == "custom"
    assert cli.parse_args(["--full", "--out", "x"]).out.name == "x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizers", "adamw,nope"], "unknown optimizer 'nope'"),
        (["--task", "lm,vision"], "unknown task(s) vision"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--full", "--quick"], "--full and --quick exclude each other"),
    ],
)
def test_cli_rejects_bad_values(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def _failing_update() -> optax.GradientTransformation:
    def update(updates: Any, state: Any, params: Any = None) -> Any:
        raise ValueError("this optimizer cannot update")

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_failing_optimizers_are_recorded_not_fatal() -> None:
    from lowbit_optax.bench import tasks

    def bad_factory(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        raise TypeError("bad factory")

    optimizers = {
        "adamw": registry.get("adamw").make,
        "fails_update": lambda lr: _failing_update(),
        "fails_factory": bad_factory,
    }
    out = tasks.UpdateTask().run(optimizers, tasks.Settings(quick=True))["results"]
    assert out["adamw"]["status"] == "ok" and out["adamw"]["update_ratio"] == 1.0
    assert out["fails_update"]["status"] == "error: ValueError: this optimizer cannot update"
    assert out["fails_update"]["state_bytes"] == 0  # init succeeded before the failure
    assert out["fails_factory"]["status"] == "error: TypeError: bad factory"
    assert out["fails_factory"]["update_ms"] is None
    assert math.isfinite(out["adamw"]["update_ms"])


def test_missing_extras_give_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "tqdm" else real(name)
    )
    with pytest.raises(SystemExit) as exc:
        cli.check_extras()
    assert "needs tqdm" in str(exc.value.code)
    assert "lowbit-optax[examples]" in str(exc.value.code)


@pytest.fixture(scope="session")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A ``--quick`` lm sweep over two learning rates with SlimAdam calibration."""
    argv = ["--quick", "--task", "lm", "--optimizers", "slim_adamw"]  # calibrates by default
    argv += ["--calibrate-steps", "8", "--lrs", "1e-3,3e-3"]
    out = _bench_once(tmp_path_factory, "sweep", argv)
    md = (out / "results.md").read_text()
    return {"json": json.loads((out / "results.json").read_text()), "md": md}


@pytest.mark.slow
def test_sweep_runs_each_lr_and_reports_the_best(sweep_run: dict[str, Any]) -> None:
    results = sweep_run["json"]
    assert list(results["tasks"]) == ["lm@lr=0.001", "lm@lr=0.003"]
    for key, lr in (("lm@lr=0.001", 1e-3), ("lm@lr=0.003", 3e-3)):
        task = results["tasks"][key]
        assert task["config"]["lr"] == lr
        assert all(r["update_ms"] is None for r in task["results"].values())  # not timed
    sweep = results["sweeps"]["lm"]
    assert sweep["lrs"] == [1e-3, 3e-3]
    for opt in ("adamw", "slim_adamw"):
        losses = [results["tasks"][k]["results"][opt]["eval_loss"] for k in results["tasks"]]
        assert sweep["eval_loss"][opt] == losses
        assert sweep["best_lr"][opt] == sweep["lrs"][int(np.argmin(losses))]
    assert "## Learning-rate sweep: lm" in sweep_run["md"]


@pytest.mark.slow
def test_calibration_rules_are_the_ones_trained_with(sweep_run: dict[str, Any]) -> None:
    import lowbit_optax

    task = sweep_run["json"]["tasks"]["lm@lr=0.001"]
    cal = task["config"]["calibration"]
    assert cal["steps"] == 8 and cal["records"] == 5  # steps 1, 2, 4, 6, 8 (every 8 // 4)
    # a tenth of the quick lm task's default lr (3e-3), the same for every sweep point
    assert cal["lr"] == pytest.approx(3e-4)
    assert sweep_run["json"]["tasks"]["lm@lr=0.003"]["config"]["calibration"] == cal
    rules = lowbit_optax.rules_from_json(cal["rules_json"])
    flat = json.loads(cal["rules_json"])
    assert 0 <= cal["agree_with_defaults"] <= cal["matrices"]
    # The state bytes of slim_adamw follow from the calibrated rules: float32 mu, float32
    # nu reduced over each leaf's axes, two int32 counts (adam + schedule).
    from lowbit_optax.bench import tasks

    params = tasks.LMTask().problem(tasks.Settings(quick=True)).params
    kept = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axes = flat[name] or []
        kept += int(np.prod([1 if i in axes else d for i, d in enumerate(leaf.shape)]))
    n = task["results"]["slim_adamw"]["num_params"]
    assert task["results"]["slim_adamw"]["state_bytes"] == 4 * n + 4 * kept + 8
    assert cal["removed_fraction"] == pytest.approx(lowbit_optax.removed_fraction(params, rules))
    assert "SlimAdam calibration" in sweep_run["md"]


def test_sweep_summary_by_hand() -> None:
    from lowbit_optax.bench import report

    def task(lr: float, losses: dict[str, float | None]) -> dict[str, Any]:
        return {"config": {"lr": lr}, "results": {k: {"eval_loss": v} for k, v in losses.items()}}

    results = {
        "tasks": {
            "lm@lr=0.001": task(1e-3, {"adamw": 2.0, "x": 3.0}),
            "lm@lr=0.01": task(1e-2, {"adamw": 2.5, "x": None}),
            "lm@lr=0.1": task(1e-1, {"adamw": float("nan"), "x": 2.9}),
        }
    }
    sweeps = report.sweeps(results, [1e-3, 1e-2, 1e-1])
    assert sweeps["lm"]["best_lr"] == {"adamw": 1e-3, "x": 1e-1}
    assert sweeps["lm"]["eval_loss"]["x"] == [3.0, None, 2.9]
    table = report.sweep_table(sweeps["lm"])
    assert "| adamw | **2.0000** | 2.5000 | nan | 0.001 |" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lrs", "1e-3,abc"], "--lrs must be comma-separated numbers"),
        (["--lrs", "1e-3,-1"], "--lrs must be positive"),
        (["--lrs", "1e-3", "--lr", "1e-3"], "--lr and --lrs exclude each other"),
        (["--calibrate-steps", "0"], "--calibrate-steps must be a positive integer"),
        (["--set", "adamw.b1"], "--set takes NAME.KEY=VALUE"),
        (["--set", "nope.b1=0.5"], "unknown optimizer 'nope'"),
        (["--optimizers", "adamw", "--set", "galore.rank=8"], "do not run: ['galore']"),
        (["--sweep", "adamw.b1=0.8", "--sweep", "adamw.b2=0.9"], "one sweep per optimizer"),
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--seeds", "0", "--lrs", "1e-3"], "--seeds and --lrs exclude each other"),
    ],
)
def test_cli_rejects_bad_sweeps(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_cli_set_and_sweep_make_labelled_variants() -> None:
    args = cli.parse_args(
        [
            "--optimizers", "coap_adamw,galore_adamw",
            "--set", "coap_adamw.update_interval=50",
            "--set", "coap_adamw.proj_dtype=bfloat16",
            "--sweep", "galore_adamw.rank=0.25,0.5",
            "--seeds", "3,1",
        ]
    )  # fmt: skip
    assert args.optimizers == [
        "adamw",
        "coap_adamw[update_interval=50,proj_dtype=bfloat16]",
        "galore_adamw[rank=0.25]",
        "galore_adamw[rank=0.5]",
    ]
    assert args.variants["galore_adamw[rank=0.5]"] == ("galore_adamw", {"rank": 0.5})
    assert args.variants["coap_adamw[update_interval=50,proj_dtype=bfloat16]"][1] == {
        "update_interval": 50,
        "proj_dtype": "bfloat16",
    }
    assert args.seeds == [3, 1]
    # variants keep their optimizer's registry entries; the event period follows an
    # overridden interval (COAP's is its interval times its reproject factor)
    assert registry.event_period("galore_adamw[rank=0.5]") == 200
    assert registry.event_period("coap_adamw[update_interval=50,proj_dtype=bfloat16]") == 250
    assert registry.event_period("subtrack_adamw") == 30
    label, _ = registry.variant("subtrack_adamw", {"update_interval": 25})
    assert registry.event_period(label) == 25
    assert registry.takes_rules("slim_adamw[mu_bits=8]")
    assert not registry.runs_on("mfac[damping=0.1]", "update")


def test_variant_factory_passes_the_keywords() -> None:
    seen: list[dict[str, Any]] = []
    spec = registry.OptimizerSpec(
        "x", lambda lr, **kw: seen.append({"lr": lr, **kw}) or optax.sgd(lr), "d", lr_scale=2.0
    )
    spec.factory(momentum=0.5)(1e-3)
    spec.factory(momentum=0.5)(1e-3, rules="r")
    spec.factory(lr_scale=0.5)(1e-3)
    assert seen == [
        {"lr": 2e-3, "momentum": 0.5},
        {"lr": 2e-3, "momentum": 0.5, "rules": "r"},
        {"lr": 5e-4},
    ]
    assert registry.parse_value("(4, 2)") == (4, 2) and registry.parse_value("x1") == "x1"
    label, make = registry.variant("solo_adamw_3_3", {"b1": 0.5})
    assert label == "solo_adamw_3_3[b1=0.5]"
    state = make(1e-3).init({"w": jax.numpy.zeros((64, 64))})
    assert jax.tree.leaves(state)


def test_seed_summary_by_hand() -> None:
    from lowbit_optax.bench import report

    def task(losses: dict[str, float | None]) -> dict[str, Any]:
        return {"config": {}, "results": {k: {"eval_loss": v} for k, v in losses.items()}}

    results = {
        "meta": {"reference": "adamw"},
        "tasks": {
            "lm@seed=0": task({"adamw": 2.0, "x": 2.2}),
            "lm@seed=1": task({"adamw": 4.0, "x": 4.0}),
            "update@seed=0": task({"adamw": None, "x": None}),
        },
    }
    summary = report.seed_summary(results, [0, 1])
    assert list(summary) == ["lm"]
    lm = summary["lm"]
    assert lm["eval_loss"]["x"] == [2.2, 4.0]
    assert lm["mean"]["x"] == pytest.approx(3.1)
    assert lm["stderr"]["x"] == pytest.approx(math.sqrt(((2.2 - 3.1) ** 2 + 0.9**2) / 1 / 2))
    rel, rel_se = lm["vs_reference"]["x"]  # +10% and 0% on the two seeds
    assert rel == pytest.approx(5.0) and rel_se == pytest.approx(5.0)
    assert "| x | 2.2000 | 4.0000 | 3.1000 |" in report.seed_table(lm)


def test_mlp_lm_is_causal_and_starts_near_uniform() -> None:
    """The MLP language model of ``--task mlp_lm``: a prediction never sees later bytes,
    and an untrained model sits near ln(256) nats."""
    import jax.numpy as jnp
    from flax import nnx

    from lowbit_optax.bench import models

    cfg = models.MLPLMConfig(context=4, embed=8, hidden=32, seq_len=16)
    model = models.MLPLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) * 7 % 256
    changed = tokens.at[:, 10].set(255)
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 256)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])  # before the change: the same
    assert not np.allclose(a[:, 10:14], b[:, 10:14])  # the next `context` positions see it
    np.testing.assert_array_equal(a[:, 14:], b[:, 14:])  # beyond the context: the same
    loss = float(models.lm_loss(model, tokens, tokens))
    assert abs(loss - np.log(256)) < 0.5


def test_update_task_runs_on_bfloat16_params() -> None:
    """``--param-dtype bfloat16``: the update task's params and gradients are bf16, so
    stochastic rounding has work to time (its updates are float32 by design)."""
    from lowbit_optax.bench import tasks

    settings = tasks.Settings(quick=True, steps=2, param_dtype="bfloat16")
    optimizers = {n: registry.get(n).factory() for n in ("adamw", "adamw_sr")}
    record = tasks.UpdateTask().run(optimizers, settings)
    assert record["config"]["param_dtype"] == "bfloat16"
    for name in optimizers:
        r = record["results"][name]
        assert r["status"] == "ok" and r["update_ms"] > 0, r
        assert r["num_params"] * 2 * 2 <= r["state_bytes"] <= r["num_params"] * 2 * 2 + 16


def test_lm_task_in_bfloat16_stores_and_computes_in_it() -> None:
    """``--param-dtype bfloat16`` on lm: bf16 params, and every matrix product of the
    gradient's program on bf16 operands (nnx.Embed's own float32 dtype would cast them
    all up), also when float32 master weights are passed in."""
    import jax.numpy as jnp

    from lowbit_optax.bench import tasks

    problem = tasks.LMTask().problem(tasks.Settings(quick=True, param_dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(problem.params)} == {jnp.dtype(jnp.bfloat16)}
    batch = next(problem.batches)
    master = jax.tree.map(lambda x: x.astype(jnp.float32), problem.params)
    for params in (problem.params, master):
        text = jax.jit(jax.grad(problem.loss_fn)).lower(params, batch).as_text()
        dots = [line for line in text.splitlines() if "dot_general" in line]
        # a bf16 operand in each (attention takes its softmax's float32 probabilities)
        assert dots and all("bf16>" in d.split("->")[0] for d in dots), dots[:2]


def test_master_weights_follow_float32_adamw() -> None:
    """registry.master_weights(optax.adamw): the bf16 params are, after every step, the
    bf16 rounding of float32 AdamW run on float32 weights whose gradients are taken at
    their bf16 rounding (the mixed-precision recipe), exactly."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    grad = jax.grad(lambda p: jnp.sum((p["w"].astype(jnp.float32) - target) ** 2))
    # the master starts as the bf16 params
    p32 = {"w": jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16).astype(jnp.float32)}
    ref_tx = optax.adamw(1e-2)
    ref_state = ref_tx.init(p32)
    tx = registry.master_weights(optax.adamw(1e-2))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    state = tx.init(params)
    for _ in range(5):
        g = grad(jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32))
        u, ref_state = ref_tx.update(
            jax.tree.map(lambda x: x.astype(jnp.float32), g), ref_state, p32
        )
        p32 = optax.apply_updates(p32, u)
        u, state = tx.update(grad(params), state, params)
        params = optax.apply_updates(params, u)
        assert params["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(params["w"]), np.asarray(p32["w"].astype(jnp.bfloat16))
        )
    # float32_moments: adamw's moments stay float32 on bf16 params and grads
    tx = registry.float32_moments(optax.adamw(1e-2))
    state = tx.init(params)
    _, state = tx.update(grad(params), state, params)
    assert {x.dtype for x in jax.tree.leaves(state[0].mu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state[0].nu)} == {jnp.dtype(jnp.float32)}


def _rec(**fields: Any) -> dict[str, Any]:
    return {"status": "ok", **fields}


def test_techniques_table_by_hand() -> None:
    """State and step peak from the memory task's largest model, eval loss vs adamw
    from lm, update time from the update task (else lm), step time from lm."""
    from lowbit_optax.bench import report

    memory = {
        "config": {
            "models": {"small": {"num_params": 10}, "big": {"num_params": 10**9}},
            "batch": [4, 256],
        },
        "results": {
            "adamw": _rec(
                memory={
                    "small": {"state": 8.0, "step_peak": 30.0},
                    "big": {"state": 8.0, "step_peak": 17.5},
                }
            ),
            "adamw_8bit": _rec(
                memory={
                    "small": {"state": 2.1, "step_peak": 25.0},
                    "big": {"state": 2.0625, "step_peak": 11.25},
                }
            ),
        },
    }
    lm = {
        "config": {"num_params": 3_000_000, "steps": 300, "lr": 1e-3},
        "results": {
            "adamw": _rec(eval_loss=2.0, update_ratio=1.0, step_ratio=1.0, bytes_per_param=8.0),
            "adamw_8bit": _rec(
                eval_loss=2.02, update_ratio=3.0, step_ratio=1.25, bytes_per_param=2.1
            ),
            "sparse_ggt": _rec(
                eval_loss=1.9, update_ratio=9.0, step_ratio=2.0, bytes_per_param=12.5
            ),
        },
    }
    update = {
        "config": {},
        "results": {"adamw": _rec(update_ratio=1.0), "adamw_8bit": _rec(update_ratio=1.5)},
    }
    meta = {
        "device_kind": "cpu",
        "backend": "cpu",
        "cpu_count": 2,
        "date": "2026-12-07T00:00:00",
        "command": "python -m lowbit_optax.bench",
    }
    rows = report.techniques_rows({"meta": meta, "tasks": {"lm": lm, "memory": memory}})
    assert rows[1] == ["adamw", registry.paper("adamw"), "8.00", "17.50", "+0.0%", "1.00x", "1.00x"]
    assert rows[2][2:] == ["2.06", "11.25", "+1.0%", "3.00x", "1.25x"]  # lm's update time
    assert rows[3][2:] == ["12.50", "n/a", "-5.0%", "9.00x", "2.00x"]  # not on memory
    with_update = {"meta": meta, "tasks": {"lm": lm, "memory": memory, "update": update}}
    assert report.techniques_rows(with_update)[2][5] == "1.50x"  # the update task's
    assert report.techniques_rows(with_update)[3][5] == "n/a"
    assert "SOLO" in registry.paper("solo_adamw_2_2[block_size=64]")
    text = report.techniques_markdown(with_update)
    assert text.count("\n| ") == 3 and "compile-only on big (1.00B params" in text
    # another run's optimizers follow, against that run's own reference; what the
    # first run has already is not repeated
    other_lm = {
        "config": {},
        "results": {
            "adamw": _rec(eval_loss=3.0, update_ratio=1.0, step_ratio=1.0, bytes_per_param=8.0),
            "adamw_8bit": _rec(
                eval_loss=9.0, update_ratio=9.0, step_ratio=9.0, bytes_per_param=9.0
            ),
            "lion": _rec(eval_loss=3.3, update_ratio=0.5, step_ratio=0.75, bytes_per_param=4.0),
        },
    }
    other = {"meta": {**meta, "command": "other"}, "tasks": {"lm@lr=0.001": other_lm}}
    rows = report.techniques_rows(with_update, [other])
    assert [r[0] for r in rows[1:]] == ["adamw", "adamw_8bit", "sparse_ggt", "lion"]
    assert rows[4][2:] == ["4.00", "n/a", "+10.0%", "0.50x", "0.75x"]
    assert "after sparse_ggt come from other runs" in report.techniques_caption(
        with_update, [other]
    )


@pytest.fixture(scope="session")
def main_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of the main job (``python -m lowbit_optax.bench``, no flags): that
    of ``.ci/run``, which runs it alone under a 5-minute limit before the tests and
    passes its folder in ``LOWBIT_MAIN_JOB``, else a run of it here."""
    done = os.environ.get("LOWBIT_MAIN_JOB")
    if done:
        return Path(done)
    return _bench_once(tmp_path_factory, "main", [])


@pytest.mark.slow
def test_main_job_runs_one_optimizer_per_technique(main_job: Path) -> None:
    results = json.loads((main_job / "results.json").read_text())
    meta = results["meta"]
    assert meta["mode"] == "main"
    assert meta["command"] == "python -m lowbit_optax.bench" or "--out" in meta["command"]
    assert list(results["tasks"]) == ["lm", "memory"]
    expected = [registry.REFERENCE, *registry.MAIN]
    lm = results["tasks"]["lm"]
    assert list(lm["results"]) == expected
    assert all(r["status"] == "ok" for r in lm["results"].values())
    # adamw's eval loss sits well below a uniform byte distribution's ln(256) = 5.55
    assert lm["results"]["adamw"]["eval_loss"] < 0.6 * math.log(256)
    _check_curves(lm)
    assert lm["results"]["adamw"]["eval_accuracy"] is None
    memory = results["tasks"]["memory"]
    assert set(memory["config"]["models"]) == {"gpt2_small", "decoder_1b"}
    assert "whole_model" not in memory  # --full compiles the whole-model recipes
    ran = [n for n in expected if registry.runs_on(n, "memory")]
    assert list(memory["results"]) == ran
    for model in ("gpt2_small", "decoder_1b"):
        ref = memory["results"]["adamw"]["memory"][model]
        # float32 params, grads and two float32 moments: 4 + 4 + 8 bytes a parameter
        assert ref["state"] == pytest.approx(8.0, abs=1e-6)
        assert ref["update_peak"] == pytest.approx(16.0, abs=0.01)
        q = memory["results"]["adamw_8bit"]["memory"][model]
        assert q["state"] < 2.1 and q["step_peak"] < ref["step_peak"] - 5.5
    table = (main_job / "techniques.md").read_text()
    for name in expected:
        assert f"| {name} |" in table
    assert (main_job / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
