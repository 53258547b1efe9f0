"""examples/slim_calibrate_switch.py, projected_8bit.py and memory_budget.py, each run as a
standalone script: a subprocess whose working directory is an empty temporary folder (so
nothing of the repository is importable but the installed lowbit_optax), tiny sizes.

The expectations are computed here from the tiny models' shapes, not read back from the
scripts. The runs start together (module fixture) and each test waits for its own, so
the file's wall time is about that of the slowest run on a loaded 2-core machine.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 300

# --- tiny configurations -----------------------------------------------------------
SLIM = [
    "--calib-steps", "20", "--steps", "40", "--hidden", "64", "--layers", "2",
    "--calib-every", "5", "--batch-size", "64", "--lr", "1e-3", "--rules-out", "rules.json",
    "--summary", "summary.json",
]  # fmt: skip
SLIM_SIZES = [64, 64, 64, 10]  # digits' 64 pixels -> 2 x hidden 64 -> 10 classes

PROJ = [
    "--steps", "20", "--hidden", "128", "--layers", "2", "--rank", "0.25", "--min-dim", "32",
    "--block-size", "32", "--min-size", "256", "--summary", "summary.json",
    "--optimizers", "galore_adamw,galore_adamw_8bit,coap_adamw_8bit",
]  # fmt: skip
PROJ_SIZES = [64, 128, 128, 10]

MEM = ["--model", "tiny", "--summary", "summary.json"]
# tiny: vocabulary 256, context 64, width 64, 2 blocks (q, k, v, o and a 4x MLP with
# biases, two LayerNorms), a final LayerNorm, the output tied to the embedding
_D, _F = 64, 256
TINY_PARAMS = (
    256 * _D + 64 * _D + 2 * (4 * _D + 4 * (_D * _D + _D) + 2 * _D * _F + _F + _D) + 2 * _D
)

MEM_SMALL = [*MEM, "--optimizers", "adamw,adamw_8bit", "--budget-gib", "1e-5"]
MEM_SMALL += ["--require-fit", "adamw"]  # a tiny budget: nothing fits, and the run fails
MEM_LARGE = [*MEM, "--optimizers", "adamw", "--budget-gib", "64", "--require-fit", "adamw"]
MEM_LARGE += ["--with-step", "--batch", "2x16"]  # a large budget, with a training step

RUNS = {
    "slim": ("slim_calibrate_switch.py", SLIM),
    "proj": ("projected_8bit.py", PROJ),
    "mem_small": ("memory_budget.py", MEM_SMALL),
    "mem_large": ("memory_budget.py", MEM_LARGE),
}


class Run:
    def __init__(self, cwd: pathlib.Path, proc: subprocess.Popen, out: Any, err: Any):
        self.cwd, self.proc, self._out, self._err = cwd, proc, out, err

    def wait(self) -> Run:
        if self.proc.returncode is None:
            self.proc.wait(timeout=TIMEOUT_S)
            self._out.close()
            self._err.close()
        return self

    @property
    def rc(self) -> int:
        return self.wait().proc.returncode

    @property
    def stdout(self) -> str:
        return (self.wait().cwd / "stdout.txt").read_text()

    @property
    def stderr(self) -> str:
        return (self.wait().cwd / "stderr.txt").read_text()

    def json(self, name: str = "summary.json") -> Any:
        return json.loads((self.wait().cwd / name).read_text())

    def ok(self) -> Run:
        assert self.rc == 0, f"exit {self.rc}\n{self.stdout}\n{self.stderr[-3000:]}"
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    # one CPU device, as a user's run has (conftest simulates 8 for the sharding tests)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    started = {}
    for key, (script, args) in RUNS.items():
        cwd = tmp_path_factory.mktemp(key)
        out, err = open(cwd / "stdout.txt", "w"), open(cwd / "stderr.txt", "w")
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
        )
        started[key] = Run(cwd, proc, out, err)
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.wait()


# --- slim_calibrate_switch.py -------------------------------------------------------


def _shapes(sizes: list[int]) -> dict[str, tuple[int, ...]]:
    out = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        out[f"layers/{i}/bias"], out[f"layers/{i}/kernel"] = (b,), (a, b)
    return out


def test_slim_switch_saves_what_the_rules_imply(runs: dict[str, Run]) -> None:
    run = runs["slim"].ok()
    s = run.json()
    rules = json.loads((run.cwd / "rules.json").read_text())  # written to the cwd
    shapes = _shapes(SLIM_SIZES)
    assert set(rules) == set(shapes)
    n = sum(math.prod(v) for v in shapes.values())
    assert s["num_params"] == n
    # biases are never compressed; the calibration must have compressed some kernel
    assert all(rules[p] is None for p in shapes if p.endswith("bias"))
    assert any(rules[p] is not None for p in shapes if p.endswith("kernel"))
    kept = sum(
        math.prod(1 if axes is not None and i in axes else d for i, d in enumerate(shape))
        for p, shape in shapes.items()
        for axes in [rules[p]]
    )
    # optax.adamw: int32 count + float32 mu and nu; SlimAdam: count + mu + the reduced nu
    assert s["adamw_state_bytes"] == 4 + 8 * n
    assert s["slim_state_bytes"] == 4 + 4 * n + 4 * kept
    assert s["adamw_state_bytes"] - s["slim_state_bytes"] == 4 * (n - kept) > 0
    assert s["slim_bytes_per_param"] < 8.0
    assert s["removed_fraction"] == pytest.approx(1 - kept / n)
    out = run.stdout
    assert "mean SNR" in out and "slim_adamw:" in out and "B/param" in out


def test_slim_switch_keeps_the_loss_going_down(runs: dict[str, Run]) -> None:
    s = runs["slim"].ok().json()
    adam, slim = s["adam_losses"], s["slim_losses"]
    assert len(adam) == 20 and len(slim) == 20
    mean = lambda xs: sum(xs) / len(xs)
    # no jump at the switch: the first SlimAdam steps continue AdamW's trend
    assert mean(slim[:5]) < mean(adam[-5:]) * 1.02
    assert mean(slim[-5:]) < mean(slim[:5])
    assert s["final_train_loss"] < s["switch_train_loss"] - 0.1
    # and it tracks AdamW continued from the same point
    ref = s["reference_final_train_loss"]
    assert abs(s["final_train_loss"] - ref) < 0.05 * ref


# --- projected_8bit.py --------------------------------------------------------------


def test_projected_8bit_inner_state_is_smaller(runs: dict[str, Run]) -> None:
    rows = {r["optimizer"]: r for r in runs["proj"].ok().json()}
    f32, q8, coap8 = rows["galore_adamw"], rows["galore_adamw_8bit"], rows["coap_adamw_8bit"]
    # projected kernels (min(m, n) >= 32): (64, 128) on the left, rank 16, inner 16 x 128;
    # (128, 128) on the right, rank 32, inner 128 x 32. Not projected: (128, 10), biases.
    proj_elems = 64 * 16 + 128 * 32
    inner_elems = 16 * 128 + 128 * 32 + 128 * 10 + (128 + 128 + 10)
    assert f32["projector_bytes"] == 4 * proj_elems  # float32 S
    assert q8["projector_bytes"] == 4 * proj_elems
    assert coap8["projector_bytes"] == 2 * proj_elems  # coap_adamw_8bit: bfloat16 S
    # float32 inner Adam: 8 bytes per low-rank value, plus counts and a key (< 64 bytes)
    assert 0 <= f32["inner_bytes"] - 8 * inner_elems < 64
    for row in (q8, coap8):
        assert row["inner_bytes"] < 0.5 * f32["inner_bytes"]
        assert row["state_bytes"] < f32["state_bytes"]
        assert row["end_loss"] < row["start_loss"] - 0.05
        losses = row["train_losses"]
        assert sum(losses[-5:]) < sum(losses[:5])
    assert "inner state" in runs["proj"].stdout


# --- memory_budget.py ---------------------------------------------------------------


def _row(stdout: str, name: str) -> list[str]:
    for line in stdout.splitlines():
        if line.split()[:1] == [name]:
            return line.split()
    raise AssertionError(f"no row for {name} in\n{stdout}")


def test_memory_budget_adamw_numbers(runs: dict[str, Run]) -> None:
    run = runs["mem_large"].ok()
    assert f"{TINY_PARAMS:,} params" in run.stdout
    (row,) = run.json()
    assert row["num_params"] == TINY_PARAMS
    params = grads = 4 * TINY_PARAMS
    state = 8 * TINY_PARAMS + 4  # mu, nu and an int32 count
    assert row["state_bytes"] == state
    assert _row(run.stdout, "adamw")[1] == "8.0000"
    assert row["update_peak_bytes"] >= params + grads + state
    assert row["step_peak_bytes"] >= params + grads + state
    assert row["fits"] and _row(run.stdout, "adamw")[-1] == "FITS"


def test_memory_budget_tiny_budget_fails_require_fit(runs: dict[str, Run]) -> None:
    run = runs["mem_small"]
    assert run.rc == 1, run.stderr[-3000:]
    assert "--require-fit: adamw does not fit" in run.stderr
    rows = {r["optimizer"]: r for r in run.json()}
    assert rows["adamw"]["state_bytes"] == 8 * TINY_PARAMS + 4
    assert rows["adamw_8bit"]["state_bytes"] < rows["adamw"]["state_bytes"] / 2
    for name in ("adamw", "adamw_8bit"):
        assert not rows[name]["fits"]
        assert re.search(r"DOES NOT FIT\s*$", " ".join(_row(run.stdout, name)))
