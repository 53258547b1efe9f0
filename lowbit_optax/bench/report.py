"""Writing the benchmark's results: a console table, results.json, results.md, a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit_optax.bench import registry

Results = dict[str, Any]
MIB = 2**20

NOTES = f"""\
How to read this:
- *state B/param*: exact optimizer-state bytes (`lowbit_optax.state_bytes` of the real
  state, at each dtype's bit width) divided by the number of parameters.
- *update ms*: jitted `tx.update` + `optax.apply_updates` on the task's parameter shapes
  with fixed random gradients. *step ms*: the whole jitted training step (forward,
  backward, update, apply). Both donate params and optimizer state and exclude
  compilation. Times are medians over repeats taken round-robin across optimizers in
  this one process; a *ratio* is that median divided by {registry.REFERENCE}'s.
- Step times are medians over chunks of `log_every` steps. Projection optimizers
  refresh their projector only every so many steps (GaLore's SVD when
  `count % 200 == 0`); those steps fall into a few chunks only, so the medians are
  steady-state costs. *amortized ratio* (projection optimizers only): the mean time per
  update over consecutive runs of 200 updates that together cover a whole number of
  every refresh period (4 runs of 200 = 800 updates for periods 200 and 160, more on
  `digits`), so every refresh counts at its rate, over adamw's mean for the same runs
  (a run is taken in 8 pieces of 25 updates that the optimizers take turns at).
- *compiled MiB*: XLA's planned temp + output bytes of the compiled program
  (`memory_analysis()`; the training step for lm/digits, the update for `update`).
  *peak MiB*: the device's process-wide `peak_bytes_in_use` (n/a where the backend does
  not report it, as on CPU).
- *train loss*: mean over the last `log_every` steps; *eval loss*: held-out data after
  the last step; *eval vs {registry.REFERENCE}*: relative difference of the eval loss.
- *memory* (compile-only, nothing allocated; `lowbit_optax.step_memory`): per model,
  *state* is the exact state in bytes/param; *update peak* is XLA's planned peak
  (arguments + outputs - aliased + temporaries) of the donated update `(params, state,
  grads) -> (params, state)`, with its *limit* params + grads + state + 1 byte/param;
  *step peak* is the same for the donated training step (forward, backward, update) on a
  batch of 4 x 256 tokens; *saving* is (adamw's step peak - this one) / (adamw's state -
  this one): 1.0 means every byte saved in the state is saved in the step.
"""

WHOLE_MODEL_NOTES = """\
The memory one training step needs on the device (compile-only, nothing allocated), in
bytes per parameter, for whole training recipes rather than optimizers: *params* are
the persistent weights (the bfloat16 copy plus the float32 master where there is one),
*grads* the gradients at the params' dtype, *state* the exact optimizer state
(`lowbit_optax.state_bytes`), and *total* XLA's planned peak of the donated training
step (forward, backward, update; batch as above), so *transient* = total - params -
grads - state is what remains: activations, XLA's temporaries (float32 copies included),
the batch and the loss. The gradients are temporaries of the step and XLA may free some
before others exist, so *transient* can be smaller than the activations, even negative."""

WHOLE_MODEL_PARTS = ("params", "grads", "state", "transient")


def clean_for_json(value: Any) -> Any:
    """Replaces non-finite floats by None (strict JSON), recursing into containers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_for_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_for_json(v) for v in value]
    return value


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A number in ``spec`` format, or ``n/a`` for None."""
    return "n/a" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _vs_reference(rec: Results, ref: Results | None) -> str:
    """Relative difference of eval loss to the reference, in percent."""
    if ref is None or rec["eval_loss"] is None or not ref["eval_loss"]:
        return "n/a"
    return f"{100 * (rec['eval_loss'] / ref['eval_loss'] - 1):+.1f}%"


def is_memory_task(task: Results) -> bool:
    return "models" in task["config"]


def memory_rows(task: Results) -> list[list[str]]:
    """Header and one row per optimizer for the compile-only memory task."""
    models = list(task["config"]["models"])
    header = ["optimizer", "status"]
    for m in models:
        header += [f"{m} state", "update peak (limit)", "step peak", "saving"]
    rows = [header]
    for name, rec in task["results"].items():
        row = [name, "ok" if rec["status"] == "ok" else "error"]
        for m in models:
            r = rec.get("memory", {}).get(m)
            if r is None:
                row += ["n/a"] * 4
                continue
            peak = f"{r['update_peak']:.2f} ({r['update_limit']:.2f})"
            row += [
                fmt(r["state"], ".2f"),
                peak,
                fmt(r["step_peak"], ".2f"),
                fmt(r.get("step_saving"), ".2f"),
            ]
        rows.append(row)
    return rows


def has_whole_model(task: Results) -> bool:
    """Whether a task's record has whole-model memory (the memory task's recipes)."""
    return bool(task.get("whole_model", {}).get("recipes"))


def whole_model_rows(task: Results) -> list[list[str]]:
    """Header and one row per model and recipe of the memory task's whole-model records:
    params, grads, state, transient and total of the training step, and the update's
    own peak (params + grads + state + the update's temporaries), in bytes per
    parameter."""
    recipes = task["whole_model"]["recipes"]
    rows = [["model", "recipe", "weights", *WHOLE_MODEL_PARTS, "total", "update peak"]]
    for model in task["config"]["models"]:
        for name, rec in recipes.items():
            r = rec["models"].get(model)
            cells = (
                ["n/a"] * 6
                if r is None
                else [fmt(r.get(k), ".2f") for k in (*WHOLE_MODEL_PARTS, "total", "update_peak")]
            )
            rows.append([model, name, rec["storage"], *cells])
    return rows


def whole_model_errors(task: Results) -> list[str]:
    """``recipe: status`` for every whole-model recipe that failed."""
    recipes = task.get("whole_model", {}).get("recipes", {})
    return [f"{n}: {r['status']}" for n, r in recipes.items() if r["status"] != "ok"]


def table_rows(task: Results) -> list[list[str]]:
    """Header and one row per optimizer for a task's results."""
    if is_memory_task(task):
        return memory_rows(task)
    ref_name = registry.REFERENCE
    results = task["results"]
    ref = results.get(ref_name)
    with_acc = any(r["eval_accuracy"] is not None for r in results.values())
    header = [
        "optimizer",
        "status",
        "state B/param",
        "update ms",
        "update ratio",
        "amortized ratio",
        "step ms",
        "step ratio",
        "compiled MiB",
        "peak MiB",
        "train loss",
        "eval loss",
        f"eval vs {ref_name}",
    ] + (["eval acc"] if with_acc else [])
    rows = [header]
    for name, rec in results.items():
        row = [
            name,
            "ok" if rec["status"] == "ok" else "error",
            fmt(rec["bytes_per_param"], ".4f"),
            fmt(rec["update_ms"], ".2f"),
            fmt(rec["update_ratio"], ".2f"),
            fmt(rec.get("update_amortized_ratio"), ".2f"),
            fmt(rec["step_ms"], ".2f"),
            fmt(rec["step_ratio"], ".2f"),
            _mib(rec["compiled_bytes"]),
            _mib(rec["peak_bytes"]),
            fmt(rec["final_train_loss"], ".4f"),
            fmt(rec["eval_loss"], ".4f"),
            _vs_reference(rec, ref),
        ] + ([fmt(rec["eval_accuracy"], ".3f")] if with_acc else [])
        rows.append(row)
    return rows


def errors(task: Results) -> list[str]:
    """``name: status`` for every optimizer that failed on a task."""
    return [f"{n}: {r['status']}" for n, r in task["results"].items() if r["status"] != "ok"]


def _plain(rows: list[list[str]], left: int = 1) -> list[str]:
    """Plain-text lines of ``rows``, the first ``left`` columns left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if i >= left else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def _markdown(rows: list[list[str]], left: int = 1) -> str:
    """A GitHub markdown table of ``rows``, the first ``left`` columns left-aligned."""
    lines = ["| " + " | ".join(rows[0]) + " |"]
    lines.append("|" + "|".join(["---"] * left + ["---:"] * (len(rows[0]) - left)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def console_table(name: str, task: Results) -> str:
    """A plain-text table of one task, with failures listed below it (and the memory
    task's whole-model table)."""
    lines = [f"== {name} ==", *_plain(table_rows(task)), *errors(task)]
    if has_whole_model(task):
        lines += [f"-- {name}: whole model, bytes/param --"]
        lines += [*_plain(whole_model_rows(task), left=3), *whole_model_errors(task)]
    return "\n".join(lines)


def markdown_table(task: Results) -> str:
    """A GitHub markdown table of one task."""
    return _markdown(table_rows(task))


def whole_model_table(task: Results) -> str:
    """A GitHub markdown table of the memory task's whole-model records."""
    return _markdown(whole_model_rows(task), left=3)


def summary_table(results: Results) -> str:
    """One compact markdown table over all tasks (the one README shows)."""
    ref = registry.REFERENCE
    lines = [
        f"| task | optimizer | state B/param | update time vs {ref} | step time vs {ref} "
        f"| eval loss | eval loss vs {ref} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task_name, task in results["tasks"].items():
        if is_memory_task(task):
            continue
        ref_rec = task["results"].get(ref)
        for name, rec in task["results"].items():
            if rec["status"] != "ok":
                lines.append(f"| {task_name} | {name} | error | | | | |")
                continue
            ratio = lambda r: "n/a" if r is None else f"{r:.2f}x"
            lines.append(
                f"| {task_name} | {name} | {fmt(rec['bytes_per_param'], '.3f')} "
                f"| {ratio(rec['update_ratio'])} | {ratio(rec['step_ratio'])} "
                f"| {fmt(rec['eval_loss'], '.4f')} | {_vs_reference(rec, ref_rec)} |"
            )
    return "\n".join(lines)


def _task(results: Results, name: str) -> Results | None:
    """The record of task ``name``: its single run, or the only ``name@lr=...`` run of
    a one-rate sweep; None if it did not run."""
    keys = [k for k in results["tasks"] if k == name or k.startswith(f"{name}@lr=")]
    task = results["tasks"][keys[0]] if len(keys) == 1 else None
    return task if task is not None and task.get("results") else None


def _any_state(results: Results, name: str) -> float | None:
    """``name``'s state bytes per parameter on the first task it ran on."""
    for task in results["tasks"].values():
        rec = task.get("results", {}).get(name)
        if rec is not None and rec["status"] == "ok" and rec.get("bytes_per_param") is not None:
            return rec["bytes_per_param"]
    return None


def _memory_model(task: Results) -> str:
    """The memory task's largest model (the 1B decoder of the default sizes)."""
    models = task["config"]["models"]
    return max(models, key=lambda m: models[m]["num_params"])


TECHNIQUES_HEADER = [
    "optimizer",
    "paper",
    "state B/param",
    "step peak B/param",
    f"eval loss vs {registry.REFERENCE}",
    f"update time vs {registry.REFERENCE}",
    f"step time vs {registry.REFERENCE}",
]


def _technique_rows(results: Results, skip: set[str]) -> list[list[str]]:
    """The techniques rows of one run, for the optimizers not in ``skip``."""
    ref = registry.REFERENCE
    lm, update, memory = (_task(results, n) for n in ("lm", "update", "memory"))
    timed = update or lm
    everywhere = (t["results"] for t in results["tasks"].values() if t.get("results"))
    names = [n for n in dict.fromkeys(n for r in everywhere for n in r) if n not in skip]
    ratio = lambda r: "n/a" if r is None else f"{r:.2f}x"
    rows = []
    for name in names:
        mem = memory["results"].get(name) if memory else None
        mem = (mem or {}).get("memory", {}).get(_memory_model(memory)) if memory else None
        rec = lm["results"].get(name) if lm else None
        ok = rec is not None and rec["status"] == "ok"
        time_rec = timed["results"].get(name) if timed else None
        time_ok = time_rec is not None and time_rec["status"] == "ok"
        state = mem["state"] if mem else (rec["bytes_per_param"] if ok else None)
        rows.append(
            [
                name,
                registry.paper(name),
                fmt(state if state is not None else _any_state(results, name), ".2f"),
                fmt(mem["step_peak"] if mem else None, ".2f"),
                _vs_reference(rec, lm["results"].get(ref)) if ok else "n/a",
                ratio(time_rec["update_ratio"]) if time_ok else "n/a",
                ratio(rec["step_ratio"]) if ok else "n/a",
            ]
        )
    return rows


def techniques_rows(results: Results, extra: Sequence[Results] = ()) -> list[list[str]]:
    """Header and one row per optimizer: its paper, state and training-step peak
    (memory task, the largest model; the state of one that is not there: on lm, else on
    the first task it ran), eval loss vs the reference (lm), update time vs the
    reference (the update task, else lm) and step time vs the reference (lm). Rows of
    the optimizers that ``results`` lacks follow from each run of ``extra`` in turn,
    every ratio against that run's own reference."""
    rows = [TECHNIQUES_HEADER]
    for run in (results, *extra):
        rows += _technique_rows(
            run, {r[0] for r in rows[1:]} | ({registry.REFERENCE} if run is not results else set())
        )
    return rows


def techniques_caption(results: Results, extra: Sequence[Results] = ()) -> str:
    """Where each column of the techniques table comes from, and how it was run."""
    meta = results["meta"]
    lm, update, memory = (_task(results, n) for n in ("lm", "update", "memory"))
    parts = []
    if memory:
        model = _memory_model(memory)
        n = memory["config"]["models"][model]["num_params"]
        batch = " x ".join(map(str, memory["config"]["batch"]))
        parts.append(
            f"state and step peak: compile-only on {model} ({n / 1e9:.2f}B params, float32; "
            f"step peak = XLA's planned peak of the donated training step, batch {batch} "
            "tokens, activations included)"
        )
    if lm:
        c = lm["config"]
        parts.append(
            f"eval loss and step time: the lm task ({c['num_params'] / 1e6:.1f}M params, "
            f"{c['steps']} steps at lr {c['lr']:g})"
        )
    timed = "the update task" if update else "the lm task"
    parts.append(f"update time: {timed}, medians interleaved with {registry.REFERENCE}")
    device = f"{meta['device_kind']} ({meta['backend']}, {meta['cpu_count']} CPU cores)"
    text = (
        f"Measured {meta['date'][:10]} on {device} by `{meta['command']}`; "
        + "; ".join(parts)
        + "; n/a: not run on that task (EFCP windows do not fit the large shapes; the state "
        "of an optimizer not on the memory task is that of the lm model, else of the "
        "first task it ran on)."
    )
    if extra:
        runs = ", ".join(f"`{r['meta']['command']}` ({r['meta']['date'][:10]})" for r in extra)
        text += (
            f" The rows after {_technique_rows(results, set())[-1][0]} come from other "
            f"runs of the same tasks, each against its own {registry.REFERENCE}: {runs}."
        )
    return text


def techniques_markdown(results: Results, extra: Sequence[Results] = ()) -> str:
    """The techniques table (README and docs) with its caption, as markdown."""
    table = _markdown(techniques_rows(results, extra), left=2)
    return f"{table}\n\n{techniques_caption(results, extra)}\n"


def techniques_console(results: Results) -> str:
    """The techniques table as plain text."""
    return "\n".join(_plain(techniques_rows(results), left=2))


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def sync_readme(readme: Path, results: Results, extra: Sequence[Results] = ()) -> None:
    """Replaces the README's block between the results markers with the techniques
    table (``techniques_markdown``)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    block = "\n" + techniques_markdown(results, extra)
    readme.write_text(head + README_BEGIN + block + README_END + tail)


def _config_line(config: Results) -> str:
    if "models" in config:
        return (
            "; ".join(
                f"{name}: {m['num_params']:,} params (width {m['width']}, depth {m['depth']}, "
                f"vocab {m['vocab_size']}{', tied embeddings' if m['tie_embeddings'] else ''})"
                for name, m in config["models"].items()
            )
            + f"; batch {' x '.join(map(str, config['batch']))} tokens"
        )
    keys = ("steps", "lr", "batch_size", "log_every", "eval_every", "rounds", "calls")
    parts = [f"{k} {config[k]}" for k in keys if k in config]
    parts.append(f"{config['num_params']:,} params")
    return ", ".join(parts)


def markdown(results: Results) -> str:
    """The whole results.md: run header, reading notes, one section per task."""
    meta = results["meta"]
    lines = [
        "# lowbit_optax benchmark",
        "",
        f"- date: {meta['date']}",
        f"- backend: {meta['backend']}, device: {meta['device_kind']} "
        f"({meta['device_count']} device(s), {meta['cpu_count']} CPU cores)",
        f"- versions: jax {meta['jax']}, optax {meta['optax']}, "
        f"lowbit_optax {meta['lowbit_optax']}, python {meta['python']}",
        f"- seed: {meta['seed']}, quick: {meta['quick']}, reference: {meta['reference']}",
        f"- command: `{meta['command']}`",
        f"- git revision: {meta.get('git') or 'unknown'}",
        f"- wall time: {meta['wall_s']:.0f} s",
        "- optimizers:",
        *(f"  - `{name}`: {desc}" for name, desc in meta["optimizers"].items()),
        "",
        NOTES,
        "## Summary",
        "",
        summary_table(results),
        "",
    ]
    for name, task in results["tasks"].items():
        config = task["config"]
        lines += [f"## {name}", "", f"{_config_line(config)} ({task['wall_s']:.0f} s)  "]
        lines += [f"{k}: {config[k]}  " for k in ("model", "data", "schedule") if k in config]
        lines += ["", markdown_table(task), ""]
        lines += [f"- {e}" for e in errors(task)]
        if has_whole_model(task):
            lines += ["", *_whole_model_lines(task), ""]
        if "calibration" in config:
            lines += ["", *_calibration_lines(config["calibration"]), ""]
    for name, sweep in results.get("sweeps", {}).items():
        lines += [f"## Learning-rate sweep: {name}", "", "Final eval loss per learning rate.", ""]
        lines += [sweep_table(sweep), ""]
    for name, summary in results.get("seeds", {}).items():
        lines += [f"## Seeds: {name}", "", SEED_NOTES, "", seed_table(summary), ""]
    return "\n".join(lines).rstrip() + "\n"


SEED_NOTES = (
    "Final eval loss per seed; mean and standard error (sample standard deviation over "
    "sqrt(seeds)); and the mean over seeds of the relative difference to the reference "
    "on the same seed, in percent, with its standard error."
)


def seed_summary(results: Results, seeds: list[int]) -> Results:
    """Per training task run with ``--seeds``: every optimizer's final eval loss per
    seed, their mean and standard error, and the mean paired relative difference (%)
    to the reference's loss on the same seed, with its standard error."""
    out: Results = {}
    for key, task in results["tasks"].items():
        name, sep, seed = key.partition("@seed=")
        if not sep or not any(r.get("eval_loss") is not None for r in task["results"].values()):
            continue  # not a training task (update, memory)
        summary = out.setdefault(name, {"seeds": list(seeds), "eval_loss": {}})
        for opt, rec in task["results"].items():
            losses = summary["eval_loss"].setdefault(opt, [None] * len(seeds))
            losses[seeds.index(int(seed))] = rec.get("eval_loss")
    ref = results["meta"]["reference"]
    for summary in out.values():
        base = summary["eval_loss"].get(ref)
        summary["mean"], summary["stderr"], summary["vs_reference"] = {}, {}, {}
        for opt, losses in summary["eval_loss"].items():
            summary["mean"][opt], summary["stderr"][opt] = _mean_se(losses)
            rel = [
                None if v is None or b is None else 100.0 * (v - b) / b
                for v, b in zip(losses, base or [None] * len(losses), strict=True)
            ]
            summary["vs_reference"][opt] = _mean_se(rel)
    return out


def _mean_se(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error of the finite values (``None`` where there are none,
    standard error ``None`` for one value)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var / len(finite))


def seed_table(summary: Results) -> str:
    """Markdown: optimizers x seeds, final eval loss, mean +- se, vs reference."""
    rows = {}
    for opt, losses in summary["eval_loss"].items():
        rel, rel_se = summary["vs_reference"][opt]
        mean, se = summary["mean"][opt], summary["stderr"][opt]
        rows[opt] = [*(fmt(v, ".4f") for v in losses), fmt(mean, ".4f"), fmt(se, ".4f")]
        rows[opt].append(f"{fmt(rel, '+.3f')} +- {fmt(rel_se, '.3f')}")
    columns = [*(f"seed {s}" for s in summary["seeds"]), "mean", "se", "vs ref %"]
    return _optimizer_table(columns, rows)


def sweeps(results: Results, lrs: list[float]) -> Results:
    """Per swept task: every optimizer's final eval loss per lr and its best lr."""
    out: Results = {}
    for key, task in results["tasks"].items():
        if "@lr=" not in key:
            continue
        name = key.split("@lr=")[0]
        sweep = out.setdefault(name, {"lrs": list(lrs), "eval_loss": {}, "best_lr": {}})
        lr = task["config"]["lr"]
        for opt, rec in task["results"].items():
            losses = sweep["eval_loss"].setdefault(opt, [None] * len(lrs))
            losses[lrs.index(lr)] = rec["eval_loss"]
    for sweep in out.values():
        for opt, losses in sweep["eval_loss"].items():
            finite = [
                (v, lr)
                for v, lr in zip(losses, sweep["lrs"], strict=True)
                if v is not None and math.isfinite(v)
            ]
            sweep["best_lr"][opt] = min(finite)[1] if finite else None
    return out


def _optimizer_table(columns: list[str], rows: dict[str, list[str]]) -> str:
    """Markdown: one row of cells per optimizer under ``columns``, numbers right-aligned."""
    lines = ["| optimizer | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {opt} | " + " | ".join(cells) + " |" for opt, cells in rows.items()]
    return "\n".join(lines)


def sweep_table(sweep: Results) -> str:
    """Markdown: optimizers x learning rates, final eval loss, best lr in bold."""
    rows = {}
    for opt, losses in sweep["eval_loss"].items():
        best = sweep["best_lr"][opt]
        cells = [
            ("**" + fmt(v, ".4f") + "**") if lr == best else fmt(v, ".4f")
            for v, lr in zip(losses, sweep["lrs"], strict=True)
        ]
        rows[opt] = [*cells, fmt(best, "g")]
    return _optimizer_table([*(f"lr {lr:g}" for lr in sweep["lrs"]), "best lr"], rows)


def _whole_model_lines(task: Results) -> list[str]:
    wm = task["whole_model"]
    lines = [
        f"### Whole-model memory ({wm['wall_s']:.0f} s)",
        "",
        WHOLE_MODEL_NOTES,
        "",
        *(f"- `{name}`: {rec['description']}" for name, rec in wm["recipes"].items()),
        "",
        whole_model_table(task),
    ]
    return lines + [f"- {e}" for e in whole_model_errors(task)]


def _calibration_lines(cal: Results) -> list[str]:
    rules = json.loads(cal["rules_json"])
    lines = [
        f"SlimAdam calibration: optax.adamw at lr {cal['lr']:g} for {cal['steps']} steps, "
        f"{cal['records']} SNR records (every {cal['every']}); the calibrated rules remove "
        f"{100 * cal['removed_fraction']:.1f}% of the second moment's entries "
        f"(flax_default_rules: {100 * cal['default_removed_fraction']:.1f}%); they agree "
        f"with flax_default_rules on {cal['agree_with_defaults']} of {cal['matrices']} "
        "matrices.",
        "",
        "| parameter | calibrated axes | default axes | mean SNR per candidate |",
        "|---|---|---|---|",
    ]
    for path, axes in rules.items():
        snrs = ", ".join(f"({k}): {v:.3g}" for k, v in cal["mean_snr"][path].items())
        lines.append(f"| {path} | {axes} | {cal['default_rules'][path]} | {snrs} |")
    return lines


def write_json(results: Results, path: Path) -> None:
    """results.json, strict JSON (non-finite numbers become null)."""
    path.write_text(json.dumps(clean_for_json(results), indent=1, allow_nan=False) + "\n")


def plot(results: Results, path: Path) -> None:
    """Loss curves per training task and state bytes/param bars, in one PNG; below
    them, when the memory task has whole-model records, one stacked bar chart per model
    (params, grads, state, transient; one bar per recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    trained = [n for n, t in tasks.items() if any(r["curve"] for r in t["results"].values())]
    panels = [
        (task_name, model)
        for task_name, task in tasks.items()
        if has_whole_model(task)
        for model in task["config"]["models"]
    ]
    top = len(trained) + 1
    if panels:
        width = max(5.5 * top, 6.0 * len(panels))
        fig = plt.figure(figsize=(width, 4.2 + 5.4), layout="constrained")
        upper, lower = fig.subfigures(2, 1, height_ratios=[4.2, 5.4])
        axes = upper.subplots(1, top, squeeze=False)
        wm_axes = lower.subplots(1, len(panels), squeeze=False)[0]
    else:
        fig, axes = plt.subplots(1, top, figsize=(5.5 * top, 4.2), squeeze=False)
    names = list(dict.fromkeys(n for t in tasks.values() for n in t["results"]))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for ax, task_name in zip(axes[0], trained, strict=False):
        _plot_curves(ax, task_name, tasks[task_name], colors)
    _plot_state_bars(axes[0][-1], tasks, names, colors)
    if panels:
        several = len({task_name for task_name, _ in panels}) > 1
        for ax, (task_name, model) in zip(wm_axes, panels, strict=True):
            title = f"{task_name}: {model}" if several else model
            _plot_whole_model(ax, title, tasks[task_name]["whole_model"]["recipes"], model)
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_whole_model(ax: Any, title: str, recipes: Results, model: str) -> None:
    """One bar per recipe: params, grads, state and transient stacked, total on top (a
    negative transient is drawn hatched, downward from the top of the state)."""
    rows = [(name, rec["models"][model]) for name, rec in recipes.items() if model in rec["models"]]
    xs = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    colors = dict(zip(WHOLE_MODEL_PARTS, ("#4c72b0", "#55a868", "#dd8452", "#8c8c8c"), strict=True))
    for part in WHOLE_MODEL_PARTS:
        heights = [r[part] for _, r in rows]
        bars = ax.bar(xs, heights, 0.7, bottom=bottom, color=colors[part], label=part)
        for bar, h in zip(bars, heights, strict=True):
            if h < 0:
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for x, (_, r) in zip(xs, rows, strict=True):
        stacked = r["params"] + r["grads"] + r["state"] + max(r["transient"], 0.0)
        ax.text(x, stacked, f"{r['total']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [name for name, _ in rows], rotation=35, ha="right", fontsize=7)
    ax.set(title=f"{title}: whole model, one training step", ylabel="bytes / parameter")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _plot_curves(ax: Any, task_name: str, task: Results, colors: dict[str, Any]) -> None:
    """Train loss (solid, chunk means) and eval loss (dashed, dots) per optimizer."""
    from matplotlib.lines import Line2D

    for name, rec in task["results"].items():
        curve = rec["curve"]
        if not curve:
            continue
        ax.plot(curve["step"], curve["train_loss"], color=colors[name], label=name)
        ax.plot(curve["eval_step"], curve["eval_loss"], "o--", color=colors[name], markersize=4)
    styles = [
        Line2D([], [], color="gray", label="train (chunk mean)"),
        Line2D([], [], color="gray", ls="--", marker="o", markersize=4, label="eval (held out)"),
    ]
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *styles], fontsize=7)
    ax.set(title=f"{task_name}: loss", xlabel="step", ylabel="cross-entropy")
    ax.grid(alpha=0.3)


def _plot_state_bars(
    ax: Any, tasks: dict[str, Results], names: list[str], colors: dict[str, Any]
) -> None:
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, task in enumerate(tasks.values()):
            bpp = task["results"].get(name, {}).get("bytes_per_param")
            if bpp is not None:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(bpp)
        bars = ax.bar(xs, ys, width, color=colors[name], label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(tasks)), list(tasks))
    ax.set(title="optimizer state", ylabel="bytes / parameter")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
