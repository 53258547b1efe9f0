"""The benchmark's compile-only ``memory`` task: XLA's planned memory of every
optimizer's donated update and training step on a GPT-2-small and a 1B decoder's shapes
(``jax.ShapeDtypeStruct``s: nothing is allocated)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

import lowbit_optax
from lowbit_optax.bench import models, registry
from lowbit_optax.bench.tasks import (
    Batch,
    Record,
    Settings,
    Trial,
    alive,
    make_trials,
    num_params,
)
from lowbit_optax.bench.timing import describe_error


class MemoryTask:
    """Compile-only memory of every optimizer on two decoder shapes (nothing allocated).

    Per optimizer and model: the exact state bytes and XLA's planned peak
    (``lowbit_optax.step_memory``: arguments + outputs - aliased + temporaries) of the
    donated update and of the donated training step (batch 4 x 256 tokens, small so
    that the optimizer state matters), in bytes per parameter, next to ``optax.adamw``'s.
    ``update_limit`` is params + grads + state + 1 byte/param; ``step_saving`` is the
    step-peak saving over adamw's divided by the state saving (1.0: every byte saved in
    the state is saved in the step).
    """

    name = "memory"
    batch: ClassVar[tuple[int, int]] = (4, 256)

    def models(self, quick: bool) -> dict[str, models.LMConfig]:
        """GPT-2 small (124M, tied embeddings) and a 1B decoder; a tiny one with quick."""
        if quick:
            return {
                "tiny_tied": models.LMConfig(
                    vocab_size=512, width=64, depth=2, heads=4, seq_len=64, tie_embeddings=True
                ),
            }
        return {
            "gpt2_small": models.LMConfig(
                vocab_size=50257, width=768, depth=12, heads=12, seq_len=1024, tie_embeddings=True
            ),
            "decoder_1b": models.LMConfig(
                vocab_size=32000, width=2048, depth=18, heads=16, seq_len=2048
            ),
        }

    def run(self, optimizers: Mapping[str, registry.Factory], settings: Settings) -> Record:
        """Compiles every optimizer's update and training step on each model's shapes."""
        lr = settings.lr if settings.lr is not None else 1e-3
        trials = make_trials(optimizers, lr)
        configs = self.models(settings.quick)
        batch_len = (2, 32) if settings.quick else self.batch
        config: Record = {"models": {}, "batch": list(batch_len), "lr": lr}
        with tqdm(total=len(trials) * len(configs), desc=self.name, leave=False) as bar:
            for model_name, cfg in configs.items():
                params, loss_fn = _abstract_lm(cfg)
                tokens = jax.ShapeDtypeStruct(batch_len, jnp.int32)
                n = num_params(params)
                config["models"][model_name] = {**dataclasses.asdict(cfg), "num_params": n}
                for trial in alive(trials):
                    bar.set_postfix_str(f"{model_name}: {trial.name}")
                    try:
                        mem = lowbit_optax.step_memory(trial.tx, params, loss_fn, (tokens, tokens))
                    except Exception as err:  # one optimizer failing must not end the run
                        trial.record["status"] = describe_error(err)
                        continue
                    trial.record.setdefault("memory", {})[model_name] = _memory_record(mem)
                    bar.update()
        for trial in alive(trials):
            first = next(iter(trial.record["memory"].values()))
            trial.record.update(
                state_bytes=first["state_bytes"],
                num_params=first["num_params"],
                bytes_per_param=first["state"],
            )
        _compare_to_reference(trials)
        config["num_params"] = next(iter(config["models"].values()))["num_params"]
        return {"config": config, "results": {t.name: t.record for t in trials}}


def _abstract_lm(cfg: models.LMConfig) -> tuple[Any, Callable[[Any, Batch], jax.Array]]:
    """Abstract params (``jax.ShapeDtypeStruct``s) and the loss of a TransformerLM."""
    model = nnx.eval_shape(lambda: models.TransformerLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params)
    )

    def loss_fn(p: Any, batch: Batch) -> jax.Array:
        return models.lm_loss(nnx.merge(graphdef, p, rest), *batch)

    return params, loss_fn


def _memory_record(mem: lowbit_optax.StepMemory) -> Record:
    n = mem.num_params
    per = mem.bytes_per_param()
    return {
        "num_params": n,
        "state_bytes": mem.state_bytes,
        "state": per["state"],
        "update_peak": per["update_peak"],
        "update_temp": per["update_temp"],
        "step_peak": per["train_step_peak"],
        "update_limit": (2 * mem.param_bytes + mem.state_bytes) / n + 1.0,
        "update": dataclasses.asdict(mem.update),
        "train_step": dataclasses.asdict(mem.train_step),
    }


def _compare_to_reference(trials: list[Trial]) -> None:
    """``step_saving`` of each model: (reference step peak - step peak) over (reference
    state - state), where the state is smaller than the reference's."""
    ref = next((t for t in trials if t.name == registry.REFERENCE), None)
    if ref is None or "memory" not in ref.record:
        return
    for trial in alive(trials):
        for model_name, rec in trial.record.get("memory", {}).items():
            r = ref.record["memory"].get(model_name)
            saved_state = None if r is None else r["state"] - rec["state"]
            rec["step_saving"] = (
                (r["step_peak"] - rec["step_peak"]) / saved_state
                if saved_state is not None and saved_state > 1e-9
                else None
            )
