"""The benchmark's compile-only ``memory`` task: XLA's planned memory of every
optimizer's donated update and training step on a GPT-2-small and a 1B decoder's shapes
(``jax.ShapeDtypeStruct``s: nothing is allocated), and the whole-model memory of a few
training recipes (``RECIPES``: params, grads, optimizer state and what remains of the
step's peak, for float32, bfloat16 + float32 master, and bfloat16-only weights)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
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

    Then, under the record's ``whole_model`` key, every recipe of ``recipes`` (the
    optimizers are not used there; ``--quick`` with the default recipes: that of
    ``QUICK_RECIPES``; the main job, ``Settings.fast``: none, ``--full`` compiles them):
    what one training step needs on each model, split into params, grads, optimizer
    state and transient (``whole_model_memory``).
    """

    name = "memory"
    batch: ClassVar[tuple[int, int]] = (4, 256)

    def __init__(self, recipes: Sequence[Recipe] | None = None):
        self.recipes = RECIPES if recipes is None else tuple(recipes)

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
        record = {"config": config, "results": {t.name: t.record for t in trials}}
        recipes = self.recipes
        if settings.quick and recipes is RECIPES:  # --quick: one of the default recipes
            recipes = tuple(r for r in recipes if r.name in QUICK_RECIPES)
        elif settings.fast and recipes is RECIPES:  # the main job: --full compiles them
            recipes = ()
        if recipes:
            record["whole_model"] = self.run_whole_model(recipes, configs, batch_len, lr)
        return record

    def run_whole_model(
        self,
        recipes: Sequence[Recipe],
        configs: Mapping[str, models.LMConfig],
        batch_len: tuple[int, int],
        lr: float,
    ) -> Record:
        """``{"wall_s", "recipes": {name: {"description", "storage", "status", "models":
        {model: whole_model_memory(...)}}}}`` for every recipe on every model."""
        start = time.perf_counter()
        records: Record = {
            r.name: {
                "description": r.description,
                "storage": r.storage,
                "status": "ok",
                "models": {},
            }
            for r in recipes
        }
        tokens = jax.ShapeDtypeStruct(batch_len, jnp.int32)
        total = len(recipes) * len(configs)
        with tqdm(total=total, desc=f"{self.name}: whole model", leave=False) as bar:
            for model_name, cfg in configs.items():
                for recipe in recipes:
                    rec = records[recipe.name]
                    bar.set_postfix_str(f"{model_name}: {recipe.name}")
                    if rec["status"] == "ok":
                        try:
                            rec["models"][model_name] = whole_model_memory(
                                recipe, cfg, (tokens, tokens), lr
                            )
                        except Exception as err:  # one recipe failing must not end the run
                            rec["status"] = describe_error(err)
                    bar.update()
        return {"wall_s": time.perf_counter() - start, "recipes": records}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A whole-model training recipe: how the weights are stored and the optimizer.

    Attributes:
      name: its label in the report.
      factory: ``learning_rate -> optax.GradientTransformation``.
      param_dtype: the dtype of the params, of the gradients and of the model's
        computation (a bfloat16 model runs its forward and backward in bfloat16; the loss
        is taken in float32 from its logits).
      master: the step also keeps float32 master weights (an argument of the step,
        donated like the params): the optimizer updates the master from the gradients
        cast to float32, and the params become ``master.astype(param_dtype)``.
      description: what the recipe is, in words.
    """

    name: str
    factory: Callable[[float], optax.GradientTransformation]
    param_dtype: Any
    master: bool = False
    description: str = ""

    @property
    def storage(self) -> str:
        """The persistent weights, e.g. ``bfloat16 + float32 master``."""
        dtype = jnp.dtype(self.param_dtype).name
        return f"{dtype} + float32 master" if self.master else dtype


def _sr(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(tx, lowbit_optax.stochastic_rounding())


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "adamw f32",
        lambda lr: optax.adamw(lr),
        jnp.float32,
        description="optax.adamw; float32 params, grads and compute",
    ),
    Recipe(
        "adamw bf16 + f32 master",
        lambda lr: optax.adamw(lr),
        jnp.bfloat16,
        master=True,
        description="mixed precision: bfloat16 params, grads and compute; optax.adamw "
        "updates float32 master weights from the grads cast to float32",
    ),
    Recipe(
        "adamw bf16 + SR",
        lambda lr: _sr(optax.adamw(lr, mu_dtype=jnp.float32)),
        jnp.bfloat16,
        description="optax.adamw(mu_dtype=float32) + stochastic_rounding on bfloat16 "
        "params (optax keeps nu in the params' dtype: bfloat16)",
    ),
    Recipe(
        "adamw_8bit bf16 + SR",
        lambda lr: _sr(lowbit_optax.adamw_8bit(lr)),
        jnp.bfloat16,
        description="adamw_8bit + stochastic_rounding on bfloat16 params",
    ),
    Recipe(
        "solo_adamw(4,2) bf16 + SR",
        lambda lr: _sr(lowbit_optax.solo_adamw(lr, bits=(4, 2))),
        jnp.bfloat16,
        description="solo_adamw(bits=(4, 2)) + stochastic_rounding on bfloat16 params",
    ),
    Recipe(
        "solo_adamw(2,2) bf16 + SR",
        lambda lr: _sr(lowbit_optax.solo_adamw(lr, bits=(2, 2))),
        jnp.bfloat16,
        description="solo_adamw(bits=(2, 2)) + stochastic_rounding on bfloat16 params",
    ),
    Recipe(
        "adamw_8bit bf16 + compensated",
        lambda lr: optax.chain(lowbit_optax.adamw_8bit(lr), lowbit_optax.compensated()),
        jnp.bfloat16,
        description="adamw_8bit + compensated (a bfloat16 Kahan buffer) on bfloat16 params",
    ),
    Recipe(
        "eco 8bit bf16",
        lambda lr: lowbit_optax.eco(lowbit_optax.scale_by_quantized_adam(), lr, weight_decay=1e-4),
        jnp.bfloat16,
        description="eco(scale_by_quantized_adam()) on bfloat16 params: the rounding error "
        "goes into the 8-bit first moment",
    ),
)
"""The whole-model recipes: float32 AdamW, the usual bfloat16 + float32-master mixed
precision, and bfloat16 weights without a master copy (stochastic rounding, Kahan
compensation or ECO after an optimizer with quantized state)."""

QUICK_RECIPES = ("adamw_8bit bf16 + SR",)
"""The recipes ``--quick`` compiles (the default run compiles them all)."""


def whole_model_memory(recipe: Recipe, cfg: models.LMConfig, batch: Batch, lr: float) -> Record:
    """What one donated training step of ``recipe`` needs, split per parameter.

    Compiles (nothing runs) the step ``(params[, master], state, batch) -> (params[,
    master], state, loss)`` of a ``TransformerLM`` computing in ``recipe.param_dtype``
    with its params in it: ``jax.value_and_grad`` of the language-model loss, the
    optimizer's update and ``optax.apply_updates``, with the weights and the state
    donated. ``total`` is its planned peak (``lowbit_optax.compiled_memory``);
    ``params`` the persistent weights (the params, plus the master with
    ``recipe.master``), ``grads`` the gradients at the params' dtype, ``state`` the
    exact optimizer-state bytes, and ``transient`` what remains: activations, XLA's
    temporaries, the batch and the loss. The gradients are
    temporaries of the step, so XLA may free some before others exist; ``transient``
    is then smaller than the activations, and can be negative.

    Args:
      recipe: the recipe.
      cfg: the model's shape.
      batch: ``(tokens, targets)``, abstract.
      lr: the learning rate.

    Returns:
      A record: ``num_params``, the byte counts (``param_bytes``, ``grad_bytes``,
      ``state_bytes``, ``peak_bytes``), the same per parameter (``params``, ``grads``,
      ``state``, ``transient``, ``total``), the planned peak of the donated update
      alone ``(params[, master], state, grads) -> (params[, master], state)`` per
      parameter (``update_peak``: the device's memory at the optimizer step, once the
      activations are freed) and its ``update_transient`` (the update's temporaries),
      XLA's figures (``train_step``, ``update``) and the compile time (``compile_s``).
    """
    weights, loss_fn = _abstract_lm(cfg, recipe.param_dtype)
    master = _cast(weights, jnp.float32) if recipe.master else None
    tx = recipe.factory(lr)
    state = jax.eval_shape(tx.init, weights if master is None else master)

    def train_step(params, master, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        if master is None:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), None, state, loss
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, state = tx.update(grads, state, master)
        master = optax.apply_updates(master, updates)
        params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
        return params, master, state, loss

    def update(params, master, state, grads):
        """The optimizer's step alone: what the device holds once the activations are
        gone (params, grads, state and the update's temporaries)."""
        if master is None:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), None, state
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, state = tx.update(grads, state, master)
        master = optax.apply_updates(master, updates)
        return jax.tree.map(lambda m, p: m.astype(p.dtype), master, params), master, state

    start = time.perf_counter()
    mem = lowbit_optax.compiled_memory(
        train_step, weights, master, state, batch, donate_argnums=(0, 1, 2)
    )
    update_mem = lowbit_optax.compiled_memory(
        update, weights, master, state, weights, donate_argnums=(0, 1, 2)
    )
    compile_s = time.perf_counter() - start
    n = num_params(weights)
    param_bytes = lowbit_optax.state_bytes(weights) + lowbit_optax.state_bytes(master)
    grad_bytes = lowbit_optax.state_bytes(weights)
    opt_bytes = lowbit_optax.state_bytes(state)
    peak = mem.peak_bytes
    return {
        "num_params": n,
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "state_bytes": opt_bytes,
        "peak_bytes": peak,
        "params": param_bytes / n,
        "grads": grad_bytes / n,
        "state": opt_bytes / n,
        "transient": (peak - param_bytes - grad_bytes - opt_bytes) / n,
        "total": peak / n,
        "update_peak": update_mem.peak_bytes / n,
        "update_transient": (update_mem.peak_bytes - param_bytes - grad_bytes - opt_bytes) / n,
        "train_step": dataclasses.asdict(mem),
        "update": dataclasses.asdict(update_mem),
        "compile_s": compile_s,
    }


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def _abstract_lm(
    cfg: models.LMConfig, dtype: Any = jnp.float32
) -> tuple[Any, Callable[[Any, Batch], jax.Array]]:
    """Abstract params (``jax.ShapeDtypeStruct``s) and the loss of a TransformerLM;
    with a ``dtype`` other than float32, params in it and every layer computing in it
    (``nnx.Embed`` would otherwise cast its table to its float32 ``dtype``, and the
    float32 activations would cast every kernel up)."""
    model = nnx.eval_shape(lambda: models.TransformerLM(cfg, rngs=nnx.Rngs(0)))
    if jnp.dtype(dtype) != jnp.float32:
        for _, module in nnx.iter_modules(model):
            if hasattr(module, "dtype"):
                module.dtype = dtype
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params)
    )
    if jnp.dtype(dtype) != jnp.float32:
        params = _cast(params, dtype)

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
