"""The README's commands, example and results table stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_cmds = [b.strip() for b in _blocks("bash") if "pytest" in b]
    assert len(test_cmds) == 1, test_cmds
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmds[0] in ci_lines


def test_readme_main_job_command_runs_the_benchmark():
    assert any("python -m lowbit_optax.bench" in b for b in _blocks("bash"))


def test_quick_example_runs(capsys):
    code = _blocks("python")[0]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    # 1M-element matrix at 6 bits + three float32 per-block values per 128, the bias in
    # float32 (8 B each), counts (SOLO's, the schedule's) and the 8-byte key:
    expected = (1024 * 1024 * (6 / 8 + 12 / 128) + 1024 * 8 + 4 + 4 + 8) / (1024 * 1024 + 1024)
    assert f"{expected:.3f} B/param" in out


def test_results_table_in_sync_with_committed_benchmark():
    block = README.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    rows = [ln for ln in block.splitlines() if ln.startswith("|")]
    assert rows, "README has no results table between the results markers"
    committed = (ROOT / "benchmarks" / "results.md").read_text().splitlines()
    missing = [r for r in rows if r not in committed]
    assert not missing, f"README rows not in benchmarks/results.md: {missing}"


def test_slim_adam_example_runs(capsys):
    (code,) = [b for b in _blocks("python") if "snr_calibration" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    rules = scope["lo"].rules_from_json(printed)
    assert rules == scope["rules"]
    assert rules["dense"]["bias"] is None  # 1-D: never compressed
    nu = scope["state"][0].nu["dense"]["kernel"]
    shape = tuple(
        1 if i in (rules["dense"]["kernel"] or ()) else d for i, d in enumerate((256, 512))
    )
    assert nu.shape == shape
    # what the README's comments claim for this example
    assert rules["dense"]["kernel"] == (1,) and nu.shape == (256, 1)


def test_projection_example_runs(capsys):
    (code,) = [b for b in _blocks("python") if "low_rank_projection" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(256, 64)"
    # independent count: S 256 x 64 float32; the inner state on the 512 x 64 low-rank
    # gradient: 8-bit mu and nu (one block of 64 per row) with a float32 scale per block
    # each; counts (3 x int32) and the key (2 x uint32)
    want = 256 * 64 * 4 + 2 * (512 * 64 + 512 * 4) + 3 * 4 + 2 * 4
    assert out[1] == f"{want / (512 * 256):.3f} B/param"


def test_step_memory_example_runs(capsys):
    (code,) = [b for b in _blocks("python") if "step_memory" in b]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    # optax.adamw's donated update needs exactly params + grads + mu + nu
    assert out[0] == "{'state': 8.0, 'update_peak': 16.0, 'update_temp': 0.0}"
    # what the comment in the README says the 8-bit update needs
    comments = [ln.lstrip("# ") for ln in code.splitlines() if ln.startswith("# {")]
    assert out == comments
    # and within issue 16's limit: params + grads + state + 1 byte/param
    got = eval(out[1])  # a dict literal printed by the example
    assert got["update_peak"] <= 4 + 4 + got["state"] + 1.0


def test_inject_hyperparams_example_runs():
    (code,) = [b for b in _blocks("python") if "inject_hyperparams" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    state = scope["state"]
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(3e-4)
    assert set(state.hyperparams) >= {"learning_rate", "b1", "b2", "eps", "weight_decay"}


def test_quantize_state_example_runs(capsys):
    (code,) = [b for b in _blocks("python") if "quantize_state(optax.lion" in b]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    # independent count: the 1M matrix's momentum at 8 bits + a float32 scale per 128;
    # the 1024 bias under min_size in float32; Lion's int32 count
    want = (1024 * 1024 * (1 + 4 / 128) + 1024 * 4 + 4) / (1024 * 1025)
    assert f"{want:.3f} B/param" in out
    assert f"{want:.3f}" in code  # the comment says what it prints
