"""Calibrate SlimAdam's rules on a running AdamW, save them, and switch to SlimAdam mid-run.

SlimAdam (``lowbit_optax.slim_adamw``) keeps Adam's first moment but averages the second
moment of each parameter over the axes where it hardly varies, chosen from its
signal-to-noise ratio (SNR). This script walks the whole workflow on a Flax NNX MLP
classifying scikit-learn's 8x8 digits:

1. train with ``optax.adamw`` wrapped by ``lowbit_optax.snr_calibration`` (updates are
   AdamW's exactly; the wrapper records the SNR of every weight's second moment along
   every axis subset, at step 1 and every ``--calib-every`` steps);
2. derive per-parameter rules with ``rules_from_snr``, print the SNR table and the rules,
   and save them as JSON (``rules_to_json``; ``rules_from_json`` reads them back, e.g. for
   the next run, which can start with ``slim_adamw(lr, rules=...)`` directly);
3. convert the AdamW state with ``slim_state_from_adam`` (step count and first moment
   carried over, each second moment averaged over its rule's axes: exactly the state
   SlimAdam would have reached on the same gradients) and continue with ``slim_adamw``,
   without a restart, a bias-correction reset or a loss jump;
4. print the optimizer-state bytes per parameter before and after, and the loss around
   the switch (with, by default, an AdamW run continued from the same point to compare).

Standalone: it imports only lowbit_optax, jax, optax, flax, numpy, scikit-learn and the
standard library, and runs from any directory.

Usage::

    python examples/slim_calibrate_switch.py --calib-steps 200 --steps 600 \\
        --rules-out slim_rules.json
    # tiny (a few seconds):
    python examples/slim_calibrate_switch.py --calib-steps 20 --steps 40 --hidden 64 \\
        --calib-every 5 --no-reference
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import lowbit_optax as lo

# ------------------------------------------------------------------------------------
# Data and model
# ------------------------------------------------------------------------------------


def digits(seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): 8x8 digits as 64 floats in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    split = int(len(x) * (1 - test_fraction))
    return x[:split], y[:split], x[split:], y[split:]


class MLP(nnx.Module):
    """``in -> hidden x layers (ReLU) -> classes``; Flax ``(in, out)`` kernels."""

    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


# ------------------------------------------------------------------------------------
# Training: functional (params and optimizer state are plain pytrees), so the optimizer
# can be replaced mid-run.
# ------------------------------------------------------------------------------------


def make_fns(graphdef: Any):
    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def evaluate(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    def make_step(tx: optax.GradientTransformation):
        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    return evaluate, make_step


def batch_at(x: np.ndarray, y: np.ndarray, step: int, seed: int, batch_size: int):
    """Step ``step``'s minibatch: a pure function of (seed, step)."""
    idx = np.random.default_rng((seed, step)).integers(0, len(x), size=batch_size)
    return x[idx], y[idx]


def run(step_fn, params, opt_state, data, start: int, stop: int, args, log=True) -> tuple:
    """Steps ``start+1 .. stop``; returns (params, opt_state, per-step train losses)."""
    x_train, y_train = data[:2]
    losses = []
    for step in range(start, stop):
        x, y = batch_at(x_train, y_train, step, args.seed, args.batch_size)
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        losses.append(loss)
        if log and args.log_every and (step + 1) % args.log_every == 0:
            print(f"  step {step + 1:5d}  train loss {float(loss):.4f}")
    return params, opt_state, [float(v) for v in losses]


def copy_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def snr_report(tables: list[dict], rules_flat: dict[str, Any]) -> str:
    """Per leaf and axis subset: the mean recorded SNR; ``*`` marks the chosen rule."""
    lines = [f"{'parameter':<18} {'axes':<8} {'mean SNR':>10}", "-" * 38]
    for path in tables[0]:
        chosen = rules_flat.get(path)
        for axes in tables[0][path]:
            values = np.array([t[path][axes] for t in tables], np.float64)
            values = values[~np.isnan(values)]
            mean = float(np.mean(values)) if values.size else float("nan")
            mark = " *" if chosen is not None and tuple(chosen) == axes else ""
            lines.append(f"{path:<18} {axes!s:<8} {mean:>10.3f}{mark}")
        if not tables[0][path]:
            lines.append(f"{path:<18} {'-':<8} {'(scalar)':>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib-steps", type=int, default=200, help="AdamW steps before the switch")
    p.add_argument("--steps", type=int, default=600, help="total steps (AdamW + SlimAdam)")
    p.add_argument("--calib-every", type=int, default=25, help="steps between SNR records")
    p.add_argument("--threshold", type=float, default=1.0, help="minimum mean SNR to compress")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="hidden layers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0, help="print the train loss every N steps")
    p.add_argument("--rules-out", default="slim_rules.json", help="where the rules JSON goes")
    p.add_argument(
        "--no-reference", action="store_true", help="skip the AdamW run continued for comparison"
    )
    p.add_argument("--summary", default=None, help="write a JSON summary of the run here")
    args = p.parse_args(argv)
    if not 0 < args.calib_steps < args.steps:
        p.error(f"need 0 < --calib-steps < --steps, got {args.calib_steps} and {args.steps}")

    data = digits(args.seed)
    x_train, y_train, x_test, y_test = data
    sizes = [x_train.shape[1]] + [args.hidden] * args.layers + [10]
    # (initialised in one compiled program: eager initialisers compile one op at a time)
    graphdef, params = nnx.split(nnx.jit(lambda: MLP(sizes, rngs=nnx.Rngs(args.seed)))())
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    evaluate, make_step = make_fns(graphdef)
    print(f"MLP {sizes}: {num_params:,} params; digits train {len(x_train)}, test {len(x_test)}")

    # 1. AdamW, calibrating.
    adamw = optax.adamw(args.lr, weight_decay=args.weight_decay)
    calib_tx = lo.snr_calibration(adamw, every=args.calib_every)
    opt_state = jax.jit(calib_tx.init)(params)
    calib_step = make_step(calib_tx)
    print(
        f"\n[1] optax.adamw + snr_calibration(every={args.calib_every}), {args.calib_steps} steps"
    )
    params, opt_state, adam_losses = run(
        calib_step, params, opt_state, data, 0, args.calib_steps, args
    )
    switch_loss = float(evaluate(params, x_train, y_train)[0])
    print(f"  at the switch (step {args.calib_steps}): train-set loss {switch_loss:.4f}")

    # 2. Rules from the recorded SNRs (the step-1 record, one squared gradient, left out).
    record_steps, tables = lo.snr_records(opt_state, with_steps=True)
    if len(tables) > 1:
        record_steps, tables = record_steps[1:], tables[1:]
    rules = lo.rules_from_snr(tables, threshold=args.threshold)
    rules_json = lo.rules_to_json(rules)
    with open(args.rules_out, "w") as f:
        f.write(rules_json)
    rules = lo.rules_from_json(rules_json)  # as a later run would load them
    rules_flat = json.loads(rules_json)
    print(f"\n[2] SNR of Adam's second moment, mean over the records at steps {record_steps}")
    print(snr_report(tables, rules_flat))
    print(f"\nrules (threshold {args.threshold}; saved to {args.rules_out}):")
    for (path, leaf), axes in zip(
        _leaves_with_paths(params), lo.resolve_rules(rules, params), strict=True
    ):
        kept = tuple(1 if i in axes else d for i, d in enumerate(leaf.shape))
        print(f"  {path:<18} {tuple(leaf.shape)!s:<11} axes {axes or None!s:<7} nu {kept}")
    removed = lo.removed_fraction(params, rules)
    print(f"  second-moment entries removed: {removed:.1%}")

    # 3. Switch: AdamW state -> SlimAdam state, same step count and first moment.
    adam_state = opt_state.inner_state
    before = lo.memory_report(adam_state, params)
    calib_overhead = lo.state_bytes(opt_state) - before.total_bytes
    reference = None
    if not args.no_reference:  # AdamW continued from the switch point, for comparison
        reference = (copy_tree(params), copy_tree(opt_state))
    slim_tx = lo.slim_adamw(args.lr, weight_decay=args.weight_decay, rules=rules)
    slim_state = jax.jit(lambda s: lo.slim_state_from_adam(s, rules), donate_argnums=0)(opt_state)
    expected = jax.eval_shape(slim_tx.init, params)
    same = jax.tree.structure(slim_state) == jax.tree.structure(expected) and all(
        (a.shape, a.dtype) == (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(slim_state), jax.tree.leaves(expected), strict=True)
    )
    if not same:
        raise RuntimeError("slim_state_from_adam's state does not match slim_adamw's init")
    after = lo.memory_report(slim_state, params)
    print("\n[3] optimizer state")
    print(
        f"  adamw     : {before.bytes_per_param:.4f} B/param ({before.total_bytes:,} bytes; "
        f"the calibration records add {calib_overhead:,} bytes while calibrating)"
    )
    print(f"  slim_adamw: {after.bytes_per_param:.4f} B/param ({after.total_bytes:,} bytes)")
    print(after.table())

    # 4. Continue with SlimAdam.
    rest = args.steps - args.calib_steps
    print(f"\n[4] slim_adamw, steps {args.calib_steps + 1}..{args.steps}")
    params, slim_state, slim_losses = run(
        make_step(slim_tx), params, slim_state, data, args.calib_steps, args.steps, args
    )
    final_loss = float(evaluate(params, x_train, y_train)[0])
    test_loss, test_acc = map(float, evaluate(params, x_test, y_test))
    ref_losses, ref_final = None, None
    if reference is not None:
        ref_params, _, ref_losses = run(
            calib_step, *reference, data, args.calib_steps, args.steps, args, log=False
        )
        ref_final = float(evaluate(ref_params, x_train, y_train)[0])

    k = max(1, min(10, args.calib_steps, rest))
    print(
        f"\nloss around the switch (train loss, mean of {k} steps): "
        f"adamw before {np.mean(adam_losses[-k:]):.4f} -> slim_adamw after "
        f"{np.mean(slim_losses[:k]):.4f}"
    )
    print(f"train-set loss: switch {switch_loss:.4f} -> end {final_loss:.4f} (slim_adamw)")
    if ref_final is not None:
        print(f"                         AdamW continued instead: end {ref_final:.4f}")
    print(f"test accuracy at the end: {test_acc:.3f} (loss {test_loss:.4f})")

    summary = {
        "num_params": num_params,
        "sizes": sizes,
        "rules": rules_flat,
        "removed_fraction": removed,
        "adamw_state_bytes": before.total_bytes,
        "slim_state_bytes": after.total_bytes,
        "adamw_bytes_per_param": before.bytes_per_param,
        "slim_bytes_per_param": after.bytes_per_param,
        "adam_losses": adam_losses,
        "slim_losses": slim_losses,
        "reference_losses": ref_losses,
        "switch_train_loss": switch_loss,
        "final_train_loss": final_loss,
        "reference_final_train_loss": ref_final,
        "test_accuracy": test_acc,
    }
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` with the paths the rules use: keys joined by ``/``, NNX's ``value``
    dropped."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if parts and parts[-1] == "value":
            parts = parts[:-1]
        out.append(("/".join(parts), leaf))
    return out


if __name__ == "__main__":
    main()
