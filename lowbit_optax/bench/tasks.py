"""The benchmark's tasks: ``lm`` and ``digits`` (training) and ``update`` (optimizer only).

Every task runs all optimizers side by side in one process. Per optimizer it measures

* the exact optimizer-state bytes per parameter (``lowbit_optax.state_bytes``);
* the jitted ``tx.update`` + ``optax.apply_updates`` on the task's parameter shapes with
  fixed random gradients (params and state donated), round-robin over optimizers;
* for training tasks, the whole jitted training step (forward, backward, update, apply;
  params and state donated), timed per chunk of ``log_every`` steps while the optimizers
  train in lockstep on the same batches (round-robin per chunk), plus train and eval
  losses along the way.

Compilation is done ahead of time (``jit(...).lower(...).compile()``), so no timed call
includes it; the compiled program also yields XLA's planned memory (temp + output bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import lowbit_optax
from lowbit_optax._util import path_str
from lowbit_optax.bench import data, models, registry
from lowbit_optax.bench.timing import (
    DonatedLoop,
    compiled_bytes,
    describe_error,
    device_peak_bytes,
    interleaved_runs,
    medians_and_ratios,
    round_robin,
    split,
    whole_cycles,
)
from lowbit_optax.memory import state_bytes

Batch = tuple[Any, ...]
Record = dict[str, Any]

# pieces of one amortized run (``time_amortized``): 200 updates as 8 turns of 25
AMORTIZED_PIECES = 8


@dataclasses.dataclass(frozen=True)
class Settings:
    """Run-wide choices from the command line (None: the task's default)."""

    steps: int | None = None
    lr: float | None = None
    seed: int = 0
    quick: bool = False
    fast: bool = False  # the main job's sizes (quick wins over it)
    calibrate: bool = False
    calibrate_steps: int = 400
    time_updates: bool = True
    param_dtype: str = "float32"  # params and gradients of the update, lm and mlp_lm tasks


@dataclasses.dataclass(frozen=True)
class Plan:
    """One task's sizes.

    Attributes:
      steps: training steps (``update`` task: timed update calls per optimizer).
      lr: peak learning rate, the same for every optimizer.
      log_every: steps per timed chunk; the train loss is averaged over a chunk.
      eval_every: steps between evaluations (a multiple of ``log_every``).
      rounds: round-robin rounds of the update micro-benchmark.
      calls: timed update calls per optimizer per round.
      amortized_rounds: round-robin rounds of the amortized runs (one run = one
        longest event period of consecutive updates per optimizer).
    """

    steps: int
    lr: float
    log_every: int = 10
    eval_every: int = 50
    rounds: int = 5
    calls: int = 5
    amortized_rounds: int = 3


@dataclasses.dataclass
class Trial:
    """One optimizer on one task: its transformation and the record being filled."""

    name: str
    tx: optax.GradientTransformation | None
    record: Record


class Task(Protocol):
    """What ``__main__`` runs: a name and ``run`` returning ``{"config", "results"}``."""

    name: str

    def run(self, optimizers: Mapping[str, registry.Factory], settings: Settings) -> Record: ...


def empty_record() -> Record:
    """The result fields of one optimizer, all unmeasured."""
    return {
        "status": "ok",
        "state_bytes": None,
        "num_params": None,
        "bytes_per_param": None,
        "update_ms": None,
        "update_ratio": None,
        "update_amortized_ms": None,
        "update_amortized_ratio": None,
        "step_ms": None,
        "step_ratio": None,
        "peak_bytes": None,
        "compiled_bytes": None,
        "update_compiled_bytes": None,
        "final_train_loss": None,
        "eval_loss": None,
        "eval_accuracy": None,
        "curve": None,
    }


def num_params(params: Any) -> int:
    """Number of parameter elements in a tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _copy(tree: Any) -> Any:
    """Fresh device buffers (donation invalidates the ones passed in)."""
    return jax.tree.map(jnp.array, tree)


def _paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs with ``/``-joined parameter paths."""
    return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _random_like(tree: Any, seed: int, scale: float = 1.0) -> Any:
    """A tree of ``scale * N(0, 1)`` float32 arrays shaped like ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [
            scale * jax.random.normal(k, x.shape, jnp.float32)
            for k, x in zip(keys, leaves, strict=True)
        ]
    )


def _compile(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` jitted with its first two arguments (params, state) donated, compiled."""
    return jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile()


def _update_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def update(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return update


def _train_step(
    tx: optax.GradientTransformation, loss_fn: Callable[[Any, Batch], jax.Array]
) -> Callable[..., Any]:
    def step(params: Any, state: Any, batch: Batch) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def make_trials(
    optimizers: Mapping[str, registry.Factory], lr: optax.ScalarOrSchedule
) -> list[Trial]:
    """One trial per optimizer; a factory that raises gives an errored trial."""
    trials = []
    for name, make in optimizers.items():
        record = empty_record()
        try:
            tx = make(lr)
        except Exception as err:
            tx, record["status"] = None, describe_error(err)
        trials.append(Trial(name, tx, record))
    return trials


def alive(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if t.record["status"] == "ok"]


def _fail(trials: list[Trial], errors: Mapping[str, str]) -> None:
    for trial in trials:
        if trial.name in errors:
            trial.record["status"] = errors[trial.name]


def _setup_update(trial: Trial, params0: Any, grads: Any) -> DonatedLoop:
    """Initializes the state (recording its exact bytes), compiles and warms up."""
    params = _copy(params0)
    state = trial.tx.init(params)
    n, nbytes = num_params(params), state_bytes(state)
    trial.record.update(state_bytes=nbytes, num_params=n, bytes_per_param=nbytes / n)
    compiled = _compile(_update_step(trial.tx), params, state, grads)
    trial.record["update_compiled_bytes"] = compiled_bytes(compiled)
    loop = DonatedLoop(compiled, params, state)
    loop.run([(grads,)])  # first execution (GaLore's SVD fires here, at count 0)
    trial.record["peak_bytes"] = device_peak_bytes()
    return loop


def _setup_all(
    trials: list[Trial], setup: Callable[[Trial], DonatedLoop]
) -> dict[str, DonatedLoop]:
    """Runs ``setup`` for each live trial; one that raises is marked and dropped."""
    loops = {}
    for trial in alive(trials):
        try:
            loops[trial.name] = setup(trial)
        except Exception as err:
            trial.record["status"] = describe_error(err)
    return loops


def time_updates(trials: list[Trial], params0: Any, plan: Plan, seed: int, bar: tqdm) -> None:
    """The update micro-benchmark: ``plan.rounds`` round-robin rounds of ``plan.calls``."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), _random_like(params0, seed + 1), params0)
    bar.set_postfix_str("compiling updates")
    loops = _setup_all(trials, lambda t: _setup_update(t, params0, grads))

    def timed(loop: DonatedLoop) -> Callable[[], float]:
        return lambda: loop.run([(grads,)] * plan.calls)[0] * 1e3 / plan.calls

    bar.set_postfix_str("timing updates")
    samples, errors = round_robin(
        {name: timed(loop) for name, loop in loops.items()}, plan.rounds, lambda _: bar.update()
    )
    _fail(trials, errors)
    stats = medians_and_ratios(samples, registry.REFERENCE)
    for trial in trials:
        if trial.name in stats:
            trial.record["update_ms"], trial.record["update_ratio"] = stats[trial.name]
    time_amortized(trials, loops, grads, plan.amortized_rounds, bar)


def time_amortized(
    trials: list[Trial], loops: dict[str, DonatedLoop], grads: Any, rounds: int, bar: tqdm
) -> None:
    """For optimizers with periodic extra work (``registry.event_period``: the length of
    the cycle their events repeat with): runs of ``window`` consecutive updates (the
    longest period among them), at least ``rounds`` runs each, as many as make one
    optimizer's runs (consecutive in its own state) cover a whole number of its period
    (160: 4 runs of 200 = 800 updates; 30: 3 runs = 600), so each event counts at
    exactly its rate; the reference runs as many as the most. A run is taken in
    ``AMORTIZED_PIECES`` pieces that the optimizers take turns at (each advances its
    own state by a piece, then the next one does), so the machine's drifts over a run
    hit every optimizer alike. ``update_amortized_ms`` is the mean time per update over
    an optimizer's runs (a median would pick runs with fewer events where a period
    does not divide the window) and ``update_amortized_ratio`` its ratio to the
    reference's mean over the same rounds."""
    live = {t.name for t in alive(trials)} & set(loops)
    periods = {n: registry.event_period(n) for n in live}
    periods = {n: p for n, p in periods.items() if p}
    if not periods or registry.REFERENCE not in live:
        return
    window = max(periods.values())
    counts = {n: whole_cycles(rounds, window, [p]) for n, p in periods.items()}
    counts[registry.REFERENCE] = max(counts.values())
    bar.set_postfix_str(f"timing {counts[registry.REFERENCE]} x {window} consecutive updates")

    def timed(loop: DonatedLoop) -> Callable[[int], float]:
        return lambda k: loop.run([(grads,)] * k)[0]

    samples, errors = interleaved_runs(
        {name: timed(loops[name]) for name in [registry.REFERENCE, *sorted(periods)]},
        split(window, AMORTIZED_PIECES),
        counts,
    )
    _fail(trials, errors)
    per_update = {name: [x * 1e3 / window for x in xs] for name, xs in samples.items()}
    ref_runs = per_update.get(registry.REFERENCE, [])
    for trial in trials:
        runs = per_update.get(trial.name)
        if trial.name not in periods or not runs:
            continue
        ms = statistics.fmean(runs)
        same = ref_runs[: len(runs)]  # the reference over the same rounds
        ratio = ms / statistics.fmean(same) if len(same) == len(runs) else None
        trial.record["update_amortized_ms"] = ms
        trial.record["update_amortized_ratio"] = ratio
    if ref_runs:
        ref = next(t for t in trials if t.name == registry.REFERENCE)
        ref.record["update_amortized_ms"] = statistics.fmean(ref_runs)
        ref.record["update_amortized_ratio"] = 1.0


@dataclasses.dataclass
class Problem:
    """What a training task hands to the shared lockstep training loop.

    Attributes:
      params: initial parameters (a pure dict), copied for every optimizer.
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      evaluate: held-out metrics of a parameter tree, ``{"eval_loss": ..., ...}``.
      batches: endless iterator of host training batches (shared by all optimizers).
      config: the task's description for the results.
    """

    params: Any
    loss_fn: Callable[[Any, Batch], jax.Array]
    evaluate: Callable[[Any], dict[str, float]]
    batches: Iterator[Batch]
    config: Record


def _schedule(plan: Plan) -> optax.Schedule:
    """Linear warmup over 10% of the steps from 0 to ``plan.lr``, cosine decay to lr/10."""
    warmup = max(1, plan.steps // 10)
    return optax.warmup_cosine_decay_schedule(
        0.0, plan.lr, warmup, max(plan.steps, warmup + 1), plan.lr / 10
    )


def _chunks(plan: Plan) -> list[tuple[int, int, bool]]:
    """``(start, end, evaluate_after)`` per timed chunk; the last one always evaluates."""
    out = []
    for start in range(0, plan.steps, plan.log_every):
        end = min(start + plan.log_every, plan.steps)
        out.append((start, end, end % plan.eval_every == 0 or end == plan.steps))
    return out


def _quick_plan(calls: int) -> Plan:
    """The ``--quick`` plan of a training task: 20 steps, one amortized round."""
    return Plan(
        steps=20, lr=3e-3, log_every=5, eval_every=10, rounds=2, calls=calls, amortized_rounds=1
    )


class TrainingTask:
    """Shared driver of ``lm`` and ``digits``; subclasses define plans and the problem."""

    name: str
    schedule_note = "linear warmup (10% of steps) then cosine decay to lr/10"

    def plan(self, settings: Settings) -> Plan:
        """The task's default plan, with ``--steps``/``--lr`` applied."""
        raise NotImplementedError

    def problem(self, settings: Settings) -> Problem:
        """Model, data, loss and evaluation for a seed."""
        raise NotImplementedError

    def run(self, optimizers: Mapping[str, registry.Factory], settings: Settings) -> Record:
        """Update micro-benchmark, then lockstep training; returns config and results."""
        plan = self.plan(settings)
        problem = self.problem(settings)
        calibration = None
        if settings.calibrate and any(registry.takes_rules(n) for n in optimizers):
            calibration = self.calibrate(problem, plan, settings)
            rules = lowbit_optax.rules_from_json(calibration["rules_json"])
            optimizers = {
                n: functools.partial(make, rules=rules) if registry.takes_rules(n) else make
                for n, make in optimizers.items()
            }
        trials = make_trials(optimizers, _schedule(plan))
        rounds = plan.rounds if settings.time_updates else 0
        total = len(trials) * (rounds + plan.steps)
        with tqdm(total=total, desc=self.name, unit="step", leave=False) as bar:
            if settings.time_updates:
                time_updates(trials, problem.params, plan, settings.seed, bar)
            self._train(trials, problem, plan, bar)
        config = {
            **problem.config,
            **dataclasses.asdict(plan),
            "schedule": self.schedule_note,
            "num_params": num_params(problem.params),
            "device_peak_bytes": device_peak_bytes(),
        }
        if calibration is not None:
            config["calibration"] = calibration
        return {"config": config, "results": {t.name: t.record for t in trials}}

    def calibrate(self, problem: Problem, plan: Plan, settings: Settings) -> Record:
        """SlimAdam calibration, as the paper does it: ``optax.adamw`` at a tenth of the
        task's *default* learning rate (constant; shared by every point of an lr sweep,
        so the rules are the same for all of them) from the same initial params, on
        batches of another seed, for ``settings.calibrate_steps`` steps, recording SNRs at
        step 1 and every ``steps // 4`` (every 100 at the default 400 steps); rules from
        the mean over the records (threshold 1). Cached per seed and size."""
        key = (settings.seed, settings.quick, settings.fast, settings.calibrate_steps)
        cache = self.__dict__.setdefault("_calibrations", {})
        if key not in cache:
            cache[key] = self._calibrate(problem, settings)
        return cache[key]

    def _calibrate(self, problem: Problem, settings: Settings) -> Record:
        steps = settings.calibrate_steps
        every = max(1, steps // 4)
        lr = self.plan(dataclasses.replace(settings, lr=None)).lr / 10
        tx = lowbit_optax.snr_calibration(
            optax.adamw(lr, weight_decay=registry.WEIGHT_DECAY), every=every, max_records=8
        )
        batches = self.problem(dataclasses.replace(settings, seed=settings.seed + 1)).batches
        params = _copy(problem.params)
        state = tx.init(params)
        step = jax.jit(_train_step(tx, problem.loss_fn), donate_argnums=(0, 1))
        for _ in tqdm(range(steps), desc=f"{self.name} calibration", leave=False):
            params, state, _ = step(params, state, jax.device_put(next(batches)))
        records = lowbit_optax.snr_records(state)
        rules = lowbit_optax.rules_from_snr(records)
        flat = json.loads(lowbit_optax.rules_to_json(rules))
        defaults = {
            path: lowbit_optax.flax_default_rules(path, leaf)
            for path, leaf in _paths(problem.params)
        }
        matrices = [p for p, leaf in _paths(problem.params) if leaf.ndim >= 2]
        agree = [p for p in matrices if tuple(flat[p] or ()) == tuple(defaults[p] or ())]
        mean_snr = {
            path: {
                ",".join(map(str, k)): float(np.nanmean([r[path][k] for r in records]))
                for k in records[0][path]
            }
            for path in records[0]
        }
        return {
            "steps": steps,
            "lr": lr,
            "every": every,
            "records": len(records),
            "rules_json": lowbit_optax.rules_to_json(rules),
            "default_rules": {p: None if v is None else list(v) for p, v in defaults.items()},
            "removed_fraction": lowbit_optax.removed_fraction(problem.params, rules),
            "default_removed_fraction": lowbit_optax.removed_fraction(
                problem.params, lowbit_optax.flax_default_rules
            ),
            "matrices": len(matrices),
            "agree_with_defaults": len(agree),
            "mean_snr": mean_snr,
        }

    def _setup_train(self, trial: Trial, problem: Problem, batch: Batch) -> DonatedLoop:
        params = _copy(problem.params)
        state = trial.tx.init(params)
        if trial.record["state_bytes"] is None:  # the update micro-benchmark was skipped
            n, nbytes = num_params(params), state_bytes(state)
            trial.record.update(state_bytes=nbytes, num_params=n, bytes_per_param=nbytes / n)
        compiled = _compile(_train_step(trial.tx, problem.loss_fn), params, state, batch)
        trial.record["compiled_bytes"] = compiled_bytes(compiled)
        trial.record["peak_bytes"] = device_peak_bytes()
        return DonatedLoop(compiled, params, state)

    def _train(self, trials: list[Trial], problem: Problem, plan: Plan, bar: tqdm) -> None:
        """Trains every live optimizer in lockstep, chunk by chunk, round-robin."""
        chunks = _chunks(plan)
        batches = [jax.device_put(next(problem.batches)) for _ in range(plan.steps)]
        bar.set_postfix_str("compiling train steps")
        loops = _setup_all(trials, lambda t: self._setup_train(t, problem, batches[0]))
        bar.set_postfix_str("training")
        records = {t.name: t.record for t in trials}
        start_metrics = problem.evaluate(problem.params)
        curves = {
            name: {
                "step": [],
                "train_loss": [],
                "eval_step": [0],
                "eval_loss": [start_metrics["eval_loss"]],
            }
            for name in loops
        }

        def chunk_runner(name: str, start: int, end: int, evaluate: bool) -> Callable[[], float]:
            def run() -> float:
                seconds, losses = loops[name].run([(b,) for b in batches[start:end]])
                curves[name]["step"].append(end)
                curves[name]["train_loss"].append(float(np.mean(jax.device_get(losses))))
                if evaluate:
                    metrics = problem.evaluate(loops[name].params)
                    curves[name]["eval_step"].append(end)
                    curves[name]["eval_loss"].append(metrics["eval_loss"])
                    records[name].update(metrics)
                return seconds * 1e3 / (end - start)

            return run

        samples: dict[str, list[float]] = {name: [] for name in loops}
        for start, end, evaluate in chunks:
            live = [t.name for t in alive(trials) if t.name in loops]
            runs = {name: chunk_runner(name, start, end, evaluate) for name in live}
            chunk_samples, errors = round_robin(runs, 1, lambda _, n=end - start: bar.update(n))
            _fail(trials, errors)
            for name, xs in chunk_samples.items():
                samples[name].extend(xs)
        for name, (med, ratio) in medians_and_ratios(samples, registry.REFERENCE).items():
            curve = curves[name]
            records[name].update(
                step_ms=med,
                step_ratio=ratio,
                curve=curve,
                final_train_loss=curve["train_loss"][-1] if curve["train_loss"] else None,
            )


def _override(plan: Plan, settings: Settings) -> Plan:
    """Applies ``--steps`` and ``--lr``; eval spacing is kept a multiple of log_every."""
    steps = settings.steps if settings.steps is not None else plan.steps
    lr = settings.lr if settings.lr is not None else plan.lr
    log_every = min(plan.log_every, steps)
    eval_every = max(log_every, plan.eval_every // log_every * log_every)
    return dataclasses.replace(plan, steps=steps, lr=lr, log_every=log_every, eval_every=eval_every)


class LMTask(TrainingTask):
    """Byte-level TransformerLM on the text of ``pydoc_data.topics``."""

    name = "lm"
    model = models.TransformerLM
    batch_size = 8
    eval_batch_size = 16
    eval_batches = 4

    # 300 steps at lr 1e-3
    default_plan = Plan(steps=300, lr=1e-3, log_every=10, eval_every=50, rounds=5, calls=5)
    # the main job: 100 steps of the smaller model, fewer timing rounds
    fast_plan = Plan(
        steps=100, lr=3e-3, log_every=10, eval_every=50, rounds=2, calls=5, amortized_rounds=1
    )

    def plan(self, settings: Settings) -> Plan:
        """``default_plan`` (quick: 20 steps; fast: ``fast_plan``)."""
        if settings.quick:
            base = _quick_plan(calls=2)
        else:
            base = self.fast_plan if settings.fast else self.default_plan
        return _override(base, settings)

    def model_config(self, quick: bool, fast: bool = False) -> models.LMConfig:
        """Depth 4, width 256, 4 heads, 128 tokens (quick: depth 1, width 64, 64 tokens;
        fast: depth 2, width 128, 64 tokens)."""
        if quick:
            return models.LMConfig(width=64, depth=1, heads=4, seq_len=64)
        if fast:
            return models.LMConfig(width=128, depth=2, heads=4, seq_len=64)
        return models.LMConfig()

    def problem(self, settings: Settings) -> Problem:
        """TransformerLM split into a pure parameter dict; eval on fixed held-out windows."""
        cfg = self.model_config(settings.quick, settings.fast)
        text = data.pydoc_text()
        model = self.model(cfg, rngs=nnx.Rngs(settings.seed))
        # bfloat16: the params are stored in it and every layer computes in it (an
        # optimizer keeping float32 master weights passes them cast here); nnx.Embed
        # would otherwise cast its table to its float32 dtype, and its float32 output
        # would cast every kernel up
        dtype = jnp.dtype(settings.param_dtype)
        if dtype != jnp.float32:
            for _, module in nnx.iter_modules(model):
                if hasattr(module, "dtype"):
                    module.dtype = dtype
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p: Any, batch: Batch) -> jax.Array:
            p = jax.tree.map(lambda x: x.astype(dtype), p)
            return models.lm_loss(nnx.merge(graphdef, p, rest), *batch)

        n_eval = 2 if settings.quick else self.eval_batches
        eval_data = [
            jax.device_put(b)
            for b in data.lm_eval_batches(text.eval, self.eval_batch_size, cfg.seq_len, n_eval)
        ]
        eval_loss = jax.jit(loss_fn)

        def evaluate(p: Any) -> dict[str, float]:
            return {"eval_loss": float(np.mean([eval_loss(p, b) for b in eval_data]))}

        config = {
            "model": {"class": self.model.__name__, **dataclasses.asdict(cfg)},
            "param_dtype": settings.param_dtype,
            "data": "pydoc_data.topics bytes, last 10% held out",
            "batch_size": self.batch_size,
            "eval_tokens": len(eval_data) * self.eval_batch_size * cfg.seq_len,
        }
        return Problem(
            params=jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(params)),
            loss_fn=loss_fn,
            evaluate=evaluate,
            batches=data.lm_batches(text.train, self.batch_size, cfg.seq_len, settings.seed),
            config=config,
        )


class MLPLMTask(LMTask):
    """Byte-level MLPLM (no attention) on the same text: the second model family on which
    low-rank projection is judged (its gradient subspaces move unlike a transformer's)."""

    name = "mlp_lm"
    model = models.MLPLM

    # 1500 steps; lr from an adamw sweep (benchmarks/mlp_lm_lrs)
    default_plan = Plan(steps=1500, lr=3e-3, log_every=10, eval_every=100, rounds=5, calls=5)

    def model_config(self, quick: bool, fast: bool = False) -> models.MLPLMConfig:
        """8 bytes of context, 64 per byte, two 512-wide layers, 128 tokens a window
        (quick: 4 bytes of 16, 64 wide, 64 tokens; ``fast`` changes nothing)."""
        if quick:
            return models.MLPLMConfig(context=4, embed=16, hidden=64, seq_len=64)
        return models.MLPLMConfig()


class DigitsTask(TrainingTask):
    """MLPClassifier on scikit-learn's 8x8 digits, minibatches, 20% held out."""

    name = "digits"
    batch_size = 128

    def plan(self, settings: Settings) -> Plan:
        """500 steps at lr 1e-3 (quick: 20 steps); 20 amortized runs (they are cheap)."""
        if settings.quick:
            base = _quick_plan(calls=5)
        else:
            base = Plan(
                steps=500,
                lr=1e-3,
                log_every=10,
                eval_every=50,
                rounds=5,
                calls=20,
                amortized_rounds=20,
            )
        return _override(base, settings)

    def problem(self, settings: Settings) -> Problem:
        """Seeded minibatches without replacement within a step; full held-out eval."""
        ds = data.digits(seed=settings.seed)
        model = models.MLPClassifier(rngs=nnx.Rngs(settings.seed))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p: Any, batch: Batch) -> jax.Array:
            return models.classifier_loss(nnx.merge(graphdef, p, rest), *batch)

        @jax.jit
        def metrics(p: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = nnx.merge(graphdef, p, rest)(x)
            return loss_fn(p, (x, y)), jnp.mean(jnp.argmax(logits, -1) == y)

        x_eval, y_eval = jax.device_put((ds.x_eval, ds.y_eval))

        def evaluate(p: Any) -> dict[str, float]:
            loss, acc = metrics(p, x_eval, y_eval)
            return {"eval_loss": float(loss), "eval_accuracy": float(acc)}

        config = {
            "model": {"class": "MLPClassifier", "din": 64, "hidden": 256, "classes": 10},
            "data": f"sklearn digits, {len(ds.y_train)} train / {len(ds.y_eval)} held out",
            "batch_size": self.batch_size,
        }
        return Problem(
            params=nnx.to_pure_dict(params),
            loss_fn=loss_fn,
            evaluate=evaluate,
            batches=self._batches(ds, settings.seed),
            config=config,
        )

    def _batches(self, ds: data.DigitsData, seed: int) -> Iterator[Batch]:
        rng = np.random.default_rng(seed)
        while True:
            idx = rng.choice(len(ds.y_train), self.batch_size, replace=False)
            yield ds.x_train[idx], ds.y_train[idx]


class UpdateTask:
    """The optimizer update alone on large float32 matrices (~25M parameters)."""

    name = "update"
    # named like Flax Linear layers, so per-layer rules (SlimAdam's flax_default_rules:
    # kernels averaged over fan-out) apply as they would to a model
    shapes: ClassVar[dict[str, tuple[int, ...]]] = {
        "w0/kernel": (4096, 1024),
        "w1/kernel": (1024, 4096),
        "w2/kernel": (2048, 2048),
        "w3/kernel": (4096, 1024),
        "w4/kernel": (1024, 4096),
        "w5/kernel": (2048, 2048),
        "b0/bias": (4096,),
        "b1/bias": (1024,),
    }
    quick_shapes: ClassVar[dict[str, tuple[int, ...]]] = {
        "w0/kernel": (1024, 256),
        "w1/kernel": (256, 1024),
        "w2/kernel": (512, 512),
        "w3/kernel": (512, 512),
        "b0/bias": (1024,),
        "b1/bias": (256,),
    }

    def plan(self, settings: Settings) -> Plan:
        """Steps = timed calls per optimizer, spread over the rounds (default 6 x 5)."""
        rounds = 2 if settings.quick else 6
        steps = settings.steps if settings.steps is not None else (4 if settings.quick else 30)
        lr = settings.lr if settings.lr is not None else 1e-3
        calls = max(1, steps // rounds)
        return Plan(
            steps=rounds * calls,
            lr=lr,
            rounds=rounds,
            calls=calls,
            amortized_rounds=1 if settings.quick else 3,
        )

    def run(self, optimizers: Mapping[str, registry.Factory], settings: Settings) -> Record:
        """Round-robin timing of the donated update on fixed random gradients."""
        plan = self.plan(settings)
        shapes = self.quick_shapes if settings.quick else self.shapes
        abstract: dict[str, Any] = {}
        for path, shape in shapes.items():
            layer, name = path.split("/")
            abstract.setdefault(layer, {})[name] = jax.ShapeDtypeStruct(shape, jnp.float32)
        dtype = jnp.dtype(settings.param_dtype)
        params0 = jax.tree.map(
            lambda x: x.astype(dtype), _random_like(abstract, settings.seed, scale=0.02)
        )
        trials = make_trials(optimizers, plan.lr)
        with tqdm(total=len(trials) * plan.rounds, desc=self.name, leave=False) as bar:
            time_updates(trials, params0, plan, settings.seed, bar)
        for trial in trials:
            trial.record["compiled_bytes"] = trial.record["update_compiled_bytes"]
        config = {
            "shapes": {k: list(v) for k, v in shapes.items()},
            "num_params": num_params(params0),
            "param_dtype": settings.param_dtype,
            "lr": plan.lr,
            "rounds": plan.rounds,
            "calls": plan.calls,
            "steps": plan.steps,
            "device_peak_bytes": device_peak_bytes(),
        }
        return {"config": config, "results": {t.name: t.record for t in trials}}
