"""The README's commands, example and techniques table stay true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _command(word: str) -> str:
    (cmd,) = [b.strip() for b in _blocks("bash") if word in b and "\n" not in b.strip()]
    return cmd


def test_ci_runs_the_readme_test_command():
    """The README's test command is the environment CI builds, then ``python -m pytest``."""
    setup, sep, run = _command("pytest").rpartition(" && ")
    assert sep and run == "python -m pytest"
    assert any(line.startswith(setup) for line in CI), setup
    assert any(line.endswith(run) for line in CI)


def test_ci_runs_the_readme_main_job_within_five_minutes():
    """The main job is the README's command, without flags, under a 300 s limit."""
    main = _command("lowbit_optax.bench")
    assert main.endswith("&& python -m lowbit_optax.bench")
    assert any(line.startswith("timeout 300 python -m lowbit_optax.bench --out") for line in CI)


def test_readme_docs_command_builds_with_warnings_as_errors():
    docs = _command("sphinx")
    assert "python -m sphinx -W -b html docs" in docs and '".[docs]"' in docs


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_quick_example_runs(capsys):
    (code,) = _blocks("python")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    # the 1M matrix: 8-bit mu and nu with a float32 scale per block of 128 each; the 1024
    # bias under min_size: float32 mu and nu; adamw_8bit's int32 count; inject_hyperparams'
    # int32 count and its float32 scalar hyperparameters
    hyper = scope["state"][1].hyperparams
    want = 1024 * 1024 * 2 * (1 + 4 / 128) + 1024 * 8 + 4 + 4 + 4 * len(hyper)
    assert f"{want / (1024 * 1025):.2f} B/param" in out
    assert f"{want / (1024 * 1025):.2f}" in code  # the comment says what it prints
    assert float(hyper["learning_rate"]) == 3e-4
    assert set(hyper) >= {"learning_rate", "b1", "b2", "eps", "weight_decay"}


def test_techniques_table_in_sync_with_committed_benchmark():
    block = README.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    rows = [ln for ln in block.splitlines() if ln.startswith("|")]
    assert len(rows) > 5, "README has no techniques table between the results markers"
    assert block.strip() == (ROOT / "benchmarks" / "techniques.md").read_text().strip()
    results_md = (ROOT / "benchmarks" / "results.md").read_text()
    assert re.search(r"\| lm \| adamw_8bit \| 2\.\d+ \|", results_md)  # one results file
