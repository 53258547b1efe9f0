"""Whole-model memory in the ``memory`` task: the recipes' breakdown and its report.

Compile-only, on a one-block model small enough that each compile takes seconds.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from lowbit_optax.bench import memory_task, models, report
from lowbit_optax.bench.tasks import Settings

MICRO = models.LMConfig(vocab_size=64, width=16, depth=1, heads=2, seq_len=32, tie_embeddings=True)
TOKENS = jax.ShapeDtypeStruct((2, 32), jnp.int32)
RECIPES = {r.name: r for r in memory_task.RECIPES}
MEASURED = ("adamw f32", "adamw bf16 + f32 master", "adamw bf16 + SR")
# the state bars of a run without optimizers have no legend entries
NO_LEGEND = "ignore:No artists with labels found to put in legend"


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    """``whole_model_memory`` of a few recipes on the micro model."""
    return {
        name: memory_task.whole_model_memory(RECIPES[name], MICRO, (TOKENS, TOKENS), 1e-3)
        for name in MEASURED
    }


def _num_params() -> int:
    params, _ = memory_task._abstract_lm(MICRO)
    return sum(x.size for x in jax.tree.leaves(params))


def test_recipe_table() -> None:
    names = [r.name for r in memory_task.RECIPES]
    assert len(set(names)) == len(names) == 8
    assert {r.storage for r in memory_task.RECIPES} == {
        "float32",
        "bfloat16",
        "bfloat16 + float32 master",
    }
    for recipe in memory_task.RECIPES:  # every factory builds an optimizer
        assert callable(recipe.factory(1e-3).init), recipe.name


@pytest.mark.slow
def test_breakdown_sums_to_compiled_peak(records: dict[str, dict[str, Any]]) -> None:
    n = _num_params()
    for name, r in records.items():
        step = r["train_step"]
        peak = (
            step["argument_bytes"] + step["output_bytes"] - step["alias_bytes"] + step["temp_bytes"]
        )
        assert r["num_params"] == n
        assert r["peak_bytes"] == peak, name
        assert r["total"] == peak / n
        parts = r["params"] + r["grads"] + r["state"] + r["transient"]
        assert parts == pytest.approx(r["total"], rel=1e-12), name
        assert r["param_bytes"] + r["state_bytes"] <= peak  # both are arguments
        assert r["compile_s"] > 0
        # the update alone: params, state and grads are its arguments
        up = r["update"]
        assert r["update_peak"] * n == pytest.approx(
            up["argument_bytes"] + up["output_bytes"] - up["alias_bytes"] + up["temp_bytes"]
        )
        assert r["update_peak"] >= r["params"] + r["grads"] + r["state"] - 1e-9, name
        assert r["update_transient"] == pytest.approx(
            r["update_peak"] - r["params"] - r["grads"] - r["state"]
        )


@pytest.mark.slow
def test_param_grad_and_state_bytes(records: dict[str, dict[str, Any]]) -> None:
    n = _num_params()
    f32 = records["adamw f32"]
    assert (f32["params"], f32["grads"]) == (4.0, 4.0)
    assert f32["state_bytes"] == 8 * n + 4  # mu, nu in float32 and an int32 count
    master = records["adamw bf16 + f32 master"]
    assert (master["params"], master["grads"]) == (6.0, 2.0)  # bf16 copy + f32 master
    assert master["state_bytes"] == 8 * n + 4  # adamw on the float32 master
    sr = records["adamw bf16 + SR"]
    assert (sr["params"], sr["grads"]) == (2.0, 2.0)
    # mu float32 (mu_dtype), nu in the params' bfloat16, count, the rounding key (2 x u32)
    assert sr["state_bytes"] == 6 * n + 4 + 8


def test_bf16_recipe_runs_the_model_in_bf16() -> None:
    """Every matrix product of the bf16 forward and backward takes bf16 params; the only
    float32 operands are the attention weights jax.nn.dot_product_attention keeps in
    float32."""
    params, loss_fn = memory_task._abstract_lm(MICRO, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    jaxpr = jax.make_jaxpr(jax.grad(loss_fn))(params, (TOKENS, TOKENS))
    dots: collections.Counter[tuple[str, ...]] = collections.Counter()

    def walk(j: Any) -> None:
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                dots[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
            for value in eqn.params.values():
                if hasattr(value, "jaxpr"):
                    walk(getattr(value.jaxpr, "jaxpr", value.jaxpr))

    walk(jaxpr.jaxpr)
    assert dots[("bfloat16", "bfloat16")] > 10
    assert set(dots) <= {("bfloat16", "bfloat16"), ("float32", "bfloat16")}
    assert dots[("float32", "bfloat16")] <= 2  # attention probabilities' backward


class _MicroMemory(memory_task.MemoryTask):
    def models(self, quick: bool) -> dict[str, models.LMConfig]:
        return {"micro": MICRO}


def _results(task: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "date": "today",
        "backend": "cpu",
        "device_kind": "cpu",
        "device_count": 1,
        "cpu_count": 2,
        "jax": jax.__version__,
        "optax": "x",
        "lowbit_optax": "x",
        "python": "3",
        "seed": 0,
        "quick": True,
        "reference": "adamw",
        "command": "python -m lowbit_optax.bench --task memory",
        "wall_s": 1.0,
        "optimizers": {},
    }
    return {"meta": meta, "tasks": {"memory": {**task, "wall_s": 1.0}}}


@pytest.mark.filterwarnings(NO_LEGEND)
def test_memory_task_reports_whole_model(tmp_path: Path) -> None:
    """The task records the recipes under ``whole_model``; results.md gets their table,
    the console its lines, and results.png the stacked bar chart."""
    recipes = (RECIPES["adamw bf16 + SR"],)
    task = _MicroMemory(recipes=recipes).run({}, Settings(quick=True))
    wm = task["whole_model"]
    assert list(wm["recipes"]) == ["adamw bf16 + SR"] and wm["wall_s"] > 0
    rec = wm["recipes"]["adamw bf16 + SR"]
    assert rec["status"] == "ok" and rec["storage"] == "bfloat16"
    assert set(rec["models"]) == {"micro"}
    results = _results(task)
    report.write_json(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["memory"]["whole_model"]

    md = report.markdown(results)
    assert "### Whole-model memory" in md
    assert "| model | recipe | weights | params | grads | state | transient | total |" in md
    r = rec["models"]["micro"]
    row = f"| micro | adamw bf16 + SR | bfloat16 | 2.00 | 2.00 | {r['state']:.2f} |"
    assert row in md
    assert "adamw bf16 + SR" in report.console_table("memory", task)

    report.plot(results, tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings(NO_LEGEND)
def test_report_without_whole_model_is_unchanged(tmp_path: Path) -> None:
    """A memory record without whole-model records (``recipes=()``) renders as before."""
    task = _MicroMemory(recipes=()).run({}, Settings(quick=True))
    assert "whole_model" not in task
    results = _results(task)
    assert "Whole-model" not in report.markdown(results)
    assert "whole model" not in report.console_table("memory", task)
    report.plot(results, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.filterwarnings(NO_LEGEND)
def test_stacked_chart_draws_a_negative_transient(tmp_path: Path) -> None:
    """A negative transient (XLA freed gradients before the peak) still renders."""
    rec = {
        "params": 2.0,
        "grads": 2.0,
        "state": 2.0,
        "transient": -0.5,
        "total": 5.5,
        "update_peak": 6.25,
    }
    task = {
        "config": {"models": {"m": {}}},
        "results": {},
        "whole_model": {
            "wall_s": 1.0,
            "recipes": {
                "x": {
                    "description": "d",
                    "storage": "bfloat16",
                    "status": "ok",
                    "models": {"m": rec},
                }
            },
        },
    }
    assert report.whole_model_rows(task)[1] == [
        "m",
        "x",
        "bfloat16",
        "2.00",
        "2.00",
        "2.00",
        "-0.50",
        "5.50",
        "6.25",
    ]
    report.plot({"tasks": {"memory": task}}, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0
