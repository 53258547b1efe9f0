"""Timing and memory measurements: donated step loops, round-robin repeats, ratios.

Every time the benchmark reports is a median over repeats taken round-robin across
the optimizers in one process, so slow drifts of the machine (another process on the
cores, frequency changes) hit every optimizer alike; ratios divide by the reference
optimizer's median from the same rounds.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

StepFn = Callable[..., tuple[Any, ...]]


class DonatedLoop:
    """Applies a compiled ``step(params, state, *inputs)`` repeatedly, keeping its outputs.

    ``step`` donates its first two arguments and returns ``(params, state, *aux)``;
    the loop always passes the latest params and state, as a training loop does.
    """

    def __init__(self, step: StepFn, params: Any, state: Any) -> None:
        self.step = step
        self.params = params
        self.state = state

    def run(self, inputs: Sequence[tuple[Any, ...]]) -> tuple[float, list[Any]]:
        """Runs one step per element of ``inputs``.

        Args:
          inputs: the non-donated arguments of each call, e.g. ``[(grads,)] * k``.

        Returns:
          ``(seconds, aux)``: wall time from the first dispatch until every output is
          ready (``jax.block_until_ready``), and the steps' extra outputs in order.
        """
        aux: list[Any] = []
        start = time.perf_counter()
        for args in inputs:
            self.params, self.state, *extra = self.step(self.params, self.state, *args)
            aux.extend(extra)
        jax.block_until_ready((self.params, self.state, aux))
        return time.perf_counter() - start, aux


def describe_error(err: BaseException) -> str:
    """A one-line status for a failed optimizer: ``"error: Type: first line"``."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return f"error: {type(err).__name__}: {first}"[:300]


def round_robin(
    runs: Mapping[str, Callable[[], float]],
    rounds: int,
    on_done: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Calls each run once per round, in mapping order, for ``rounds`` rounds.

    Args:
      runs: name -> callable returning one sample (e.g. milliseconds per call).
      rounds: number of passes over ``runs``.
      on_done: called with the name after each call (progress reporting).

    Returns:
      ``(samples, errors)``: the samples of each name in round order, and a status
      (``describe_error``) for every name whose run raised; such a name is skipped
      in later rounds and keeps the samples it had.
    """
    samples: dict[str, list[float]] = {name: [] for name in runs}
    errors: dict[str, str] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            if name in errors:
                continue
            try:
                samples[name].append(run())
            except Exception as err:  # an optimizer failing must not end the run
                errors[name] = describe_error(err)
            if on_done is not None:
                on_done(name)
    return samples, errors


def whole_cycles(rounds: int, window: int, periods: Sequence[int]) -> int:
    """The least number of runs ``>= rounds`` whose ``window``-update runs, taken one
    after the other, cover a whole number of every period (``lcm(periods)`` divides
    ``runs * window``)."""
    if rounds < 1 or window < 1 or not periods or min(periods) < 1:
        raise ValueError(
            f"whole_cycles needs rounds, window >= 1 and positive periods, got {rounds}, "
            f"{window} and {list(periods)}"
        )
    cycle = math.lcm(*periods)
    step = cycle // math.gcd(window, cycle)
    return -(-rounds // step) * step


def split(total: int, parts: int) -> list[int]:
    """``total`` as at most ``parts`` near-equal positive sizes, larger ones first."""
    if total < 1 or parts < 1:
        raise ValueError(f"split needs total >= 1 and parts >= 1, got {total} and {parts}")
    parts = min(parts, total)
    return [total // parts + (i < total % parts) for i in range(parts)]


def interleaved_runs(
    runs: Mapping[str, Callable[[int], float]],
    sizes: Sequence[int],
    rounds: int | Mapping[str, int],
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Samples of ``sum(sizes)`` consecutive steps per name, taken in pieces that the
    names take turns at, so a slow drift of the machine during one sample hits every
    name alike.

    Args:
      runs: name -> ``run(k)``, which advances that name by ``k`` steps and returns
        their time.
      sizes: the pieces of one sample, in order (e.g. ``split(200, 8)``).
      rounds: samples per name: one count for all, or name -> count (a name whose
        count is reached sits out the later rounds).

    Returns:
      ``(samples, errors)`` as ``round_robin``'s: each sample is the summed time of one
      round's pieces; a name whose run raises keeps the samples of the rounds it
      finished.
    """
    count = dict.fromkeys(runs, rounds) if isinstance(rounds, int) else dict(rounds)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    errors: dict[str, str] = {}
    for i in range(max(count.values(), default=0)):
        due = {n: run for n, run in runs.items() if i < count[n]}
        total = dict.fromkeys(due, 0.0)
        for size in sizes:
            live = {n: functools.partial(run, size) for n, run in due.items() if n not in errors}
            got, failed = round_robin(live, 1)
            errors.update(failed)
            for name, xs in got.items():
                total[name] += sum(xs)
        for name in due:
            if name not in errors:
                samples[name].append(total[name])
    return samples, errors


def medians_and_ratios(
    samples: Mapping[str, Sequence[float]],
    reference: str,
    stat: Callable[[Sequence[float]], float] = statistics.median,
) -> dict[str, tuple[float | None, float | None]]:
    """Median of each name's samples and its ratio to the reference's median.

    Args:
      samples: name -> repeated measurements (any unit).
      reference: the name every ratio divides by.
      stat: the statistic in place of the median (e.g. ``statistics.fmean``).

    Returns:
      name -> ``(median, median / reference_median)``; the median is None without
      samples, the ratio None without a median or a positive reference median.
    """
    meds = {name: stat(xs) if xs else None for name, xs in samples.items()}
    ref = meds.get(reference)
    return {
        name: (med, med / ref if med is not None and ref else None) for name, med in meds.items()
    }


def compiled_bytes(compiled: Any) -> int | None:
    """Temp + output bytes XLA planned for a compiled program (``memory_analysis``).

    Available on CPU, unlike live device statistics. Returns None where the backend
    gives no analysis.
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def device_peak_bytes() -> int | None:
    """The default device's process-wide peak bytes in use, or None (e.g. on CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])
