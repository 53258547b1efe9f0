"""Exact optimizer-state memory accounting.

``state_bytes`` counts the bytes an optimizer state occupies when stored at its
dtypes' real bit widths (sub-byte integer and float dtypes such as ``int4`` or
``int2`` count 4 or 2 bits per element, rounded up to whole bytes per array, the
way XLA packs them). ``memory_report`` breaks a state down per leaf and relates it
to the number of parameters.

Both read shapes and dtypes only, so they accept real arrays, numpy arrays and
``jax.ShapeDtypeStruct`` leaves alike (e.g. the output of ``jax.eval_shape``).

The state is not all the memory a step needs. ``compiled_memory`` reads XLA's own
buffer assignment of a jitted function (``memory_analysis()``: arguments, outputs,
aliased (donated) bytes and temporaries) and ``step_memory`` applies it to an optimizer's
donated update and, given a loss, to a whole training step. Both compile only: on
``jax.ShapeDtypeStruct`` inputs they answer "what does my 7B model's update need?"
without allocating it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CompiledMemory",
    "LeafMemory",
    "MemoryReport",
    "StepMemory",
    "compiled_memory",
    "dtype_bits",
    "memory_report",
    "state_bytes",
    "step_memory",
]


def _is_array_like(x: Any) -> bool:
    """Arrays, numpy scalars and ShapeDtypeStructs; not Python numbers or None."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type)


def dtype_bits(dtype: Any) -> int:
    """Storage bits of one element of ``dtype`` (``int4`` -> 4, ``bfloat16`` -> 16).

    Args:
      dtype: anything ``numpy.dtype`` accepts, including the ml_dtypes that JAX
        registers (``jnp.int4``, ``jnp.uint2``, ``jnp.float8_e4m3fn``, ...).

    Returns:
      The number of bits XLA uses per element when the array is stored packed.
    """
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return 8  # XLA stores PRED as one byte.
    if np.issubdtype(dt, np.complexfloating):
        return 8 * dt.itemsize
    if jnp.issubdtype(dt, jnp.integer):
        return int(jnp.iinfo(dt).bits)  # ml_dtypes: int4 -> 4, int2 -> 2
    if jnp.issubdtype(dt, jnp.floating):
        return int(jnp.finfo(dt).bits)  # float4_e2m1fn -> 4
    return 8 * dt.itemsize


def _leaf_bytes(x: Any) -> int:
    size = math.prod(x.shape)
    return (size * dtype_bits(x.dtype) + 7) // 8


def state_bytes(tree: Any) -> int:
    """Total bytes of every array leaf of ``tree`` at its dtype's real bit width.

    Args:
      tree: any pytree (an optimizer state, params, ...). Leaves with ``shape``
        and ``dtype`` (``jax.Array``, ``np.ndarray``, numpy scalars,
        ``jax.ShapeDtypeStruct``) are counted; other leaves (Python numbers,
        strings, ``None``) are ignored.

    Returns:
      The byte count as a Python int: for each array ``ceil(size * bits / 8)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.zeros((128, 64))}
      >>> state_bytes(optax.adamw(1e-3).init(params))  # mu + nu + int32 count
      65540
    """
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree) if _is_array_like(x))


@dataclasses.dataclass(frozen=True)
class LeafMemory:
    """One state leaf: its key path, shape, dtype and exact bytes.

    Attributes:
      path: the leaf's key path in the state (``jax.tree_util.keystr``).
      shape: its shape.
      dtype: its dtype's name.
      bytes: ``ceil(size * bits / 8)``, as ``state_bytes`` counts it.

    Example:
      >>> import optax
      >>> params = {"w": jnp.zeros((128, 64))}
      >>> leaf = memory_report(optax.adam(1e-3).init(params), params).leaves[1]
      >>> leaf
      LeafMemory(path="[0].mu['w']", shape=(128, 64), dtype='float32', bytes=32768)
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Optimizer-state memory relative to the parameters it serves.

    Attributes:
      total_bytes: ``state_bytes(opt_state)``.
      num_params: number of parameter elements.
      param_bytes: ``state_bytes(params)``.
      leaves: per-leaf breakdown, in tree order.

    ``bytes_per_param`` is ``total_bytes / num_params``; ``table(max_rows=None)`` (and
    ``str(report)``) lays the leaves out as a plain-text table.

    Example:
      >>> import optax
      >>> params = {"w": jnp.zeros((128, 64)), "b": jnp.zeros(64)}
      >>> report = memory_report(optax.adam(1e-3).init(params), params)
      >>> report.total_bytes == 8 * report.num_params + 4  # mu + nu + int32 count
      True
      >>> print(report)
      state leaf   shape         dtype            bytes
      -----------  ------------  --------------  ------
      [0].count    ()            int32                4
      [0].mu['b']  (64,)         float32            256
      [0].mu['w']  (128, 64)     float32         32,768
      [0].nu['b']  (64,)         float32            256
      [0].nu['w']  (128, 64)     float32         32,768
      -----------  ------------  --------------  ------
      total        8,256 params  8.0005 B/param  66,052
    """

    total_bytes: int
    num_params: int
    param_bytes: int
    leaves: tuple[LeafMemory, ...]

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / self.num_params if self.num_params else float("nan")

    def table(self, max_rows: int | None = None) -> str:
        """A plain-text table, one row per state leaf, with a total line."""
        rows = self.leaves if max_rows is None else self.leaves[:max_rows]
        header = ("state leaf", "shape", "dtype", "bytes")
        body = [(r.path, str(r.shape), r.dtype, f"{r.bytes:,}") for r in rows]
        if max_rows is not None and len(self.leaves) > max_rows:
            body.append((f"... {len(self.leaves) - max_rows} more leaves", "", "", ""))
        total = (
            "total",
            f"{self.num_params:,} params",
            f"{self.bytes_per_param:.4f} B/param",
            f"{self.total_bytes:,}",
        )
        widths = [max(len(r[i]) for r in [header, *body, total]) for i in range(4)]

        def fmt(r: tuple[str, ...]) -> str:
            return "  ".join(
                c.rjust(w) if i == 3 else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])

    def __str__(self) -> str:
        return self.table()


def memory_report(opt_state: Any, params: Any) -> MemoryReport:
    """Per-leaf and per-parameter memory of an optimizer state.

    Args:
      opt_state: the optimizer state (real arrays or ``jax.ShapeDtypeStruct`` leaves,
        e.g. ``jax.eval_shape(tx.init, params)``).
      params: the parameter tree the state was built for.

    Returns:
      A ``MemoryReport``; ``print(report)`` shows a table and
      ``report.bytes_per_param`` the headline number (``optax.adamw``: 8.0 plus
      the step counter).

    Example:
      Shapes are enough (``jax.eval_shape`` allocates nothing). 8-bit Adam keeps two
      one-byte codes and two float32 scales per 128 values: ``2 + 8 / 128`` bytes.

      >>> from lowbit_optax import adamw_8bit
      >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
      >>> state = jax.eval_shape(adamw_8bit(1e-3).init, params)
      >>> report = memory_report(state, params)
      >>> round(report.bytes_per_param, 4)  # + 12 bytes of count and key
      2.0625
      >>> [leaf.path for leaf in report.leaves][:3]
      ['[0].count', '[0].key', "[0].mu_codes['w']"]
    """
    leaves = []
    for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if _is_array_like(x):
            leaves.append(
                LeafMemory(
                    path=jax.tree_util.keystr(path),
                    shape=tuple(int(d) for d in x.shape),
                    dtype=str(np.dtype(x.dtype)),
                    bytes=_leaf_bytes(x),
                )
            )
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params) if _is_array_like(x))
    return MemoryReport(
        total_bytes=sum(leaf.bytes for leaf in leaves),
        num_params=int(num_params),
        param_bytes=state_bytes(params),
        leaves=tuple(leaves),
    )


# ------------------------------------------------------------------------------------
# Compiled memory: what a jitted step needs, from XLA's buffer assignment
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's planned memory of one compiled program (``compiled.memory_analysis()``).

    Attributes:
      argument_bytes: the inputs' buffers.
      output_bytes: the outputs' buffers (XLA adds 8 bytes of tuple pointer per output).
      alias_bytes: output bytes written into donated input buffers (counted once).
      temp_bytes: everything else the program allocates while it runs.

    ``peak_bytes`` is ``argument + output - alias + temp``; ``per_param(n)`` divides
    every figure by ``n``.

    Example:
      Doubling a donated vector of 1024 float32 writes the result into the input:

      >>> x = jax.ShapeDtypeStruct((1024,), jnp.float32)
      >>> m = compiled_memory(lambda x: 2 * x, x, donate_argnums=0)
      >>> m.argument_bytes, m.alias_bytes, m.peak_bytes
      (4096, 4096, 4096)
      >>> m.per_param(1024)["peak_bytes"]
      4.0
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """``argument + output - alias + temp``: the bytes live at the program's peak,
        as planned (an upper bound of the device's own peak for this program)."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def per_param(self, num_params: int) -> dict[str, float]:
        """Every figure (and the peak) divided by ``num_params``."""
        fields = dataclasses.asdict(self) | {"peak_bytes": self.peak_bytes}
        return {k: v / num_params for k, v in fields.items()}


def compiled_memory(
    fn: Callable[..., Any],
    *args: Any,
    donate_argnums: int | Sequence[int] = (),
    static_argnums: int | Sequence[int] = (),
) -> CompiledMemory:
    """XLA's planned memory of ``jax.jit(fn, donate_argnums=...)`` on ``args``.

    Compiles only; nothing runs. ``args`` may be arrays or ``jax.ShapeDtypeStruct``
    trees (with shardings, for a sharded program's per-device figures).

    Args:
      fn: the function to jit.
      *args: its arguments (values or abstract).
      donate_argnums: arguments whose buffers the outputs may reuse, as a training loop
        donates params and optimizer state.
      static_argnums: as ``jax.jit``.

    Returns:
      A ``CompiledMemory``.

    Raises:
      RuntimeError: the backend gives no memory analysis.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.ShapeDtypeStruct((1024,), jnp.float32)
      >>> compiled_memory(lambda x: 2 * x, x, donate_argnums=0).peak_bytes
      4096
    """
    compiled = (
        jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums)
        .lower(*args)
        .compile()
    )
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(
            f"the {jax.default_backend()!r} backend gives no memory analysis of compiled programs"
        )
    return CompiledMemory(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
    )


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Memory of an optimizer on a parameter tree: stored state and compiled peaks.

    Attributes:
      num_params: parameter elements.
      param_bytes: bytes of the params (= of their gradients).
      state_bytes: ``state_bytes`` of the optimizer state.
      update: the donated update ``(params, state, grads) -> (params', state')``
        (``tx.update`` then ``optax.apply_updates``; params and state donated).
      train_step: the donated training step ``(params, state, batch) ->
        (params', state', loss)`` (``jax.value_and_grad(loss_fn)`` then the update), or
        ``None`` without a loss.

    ``bytes_per_param()`` gives the state, the update's peak and temporaries and the
    training step's peak per parameter.

    Example:
      SGD has no state; its donated update needs the params and the gradients:

      >>> import optax
      >>> params = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
      >>> m = step_memory(optax.sgd(1e-2), params)
      >>> m.num_params, m.state_bytes, m.train_step is None
      (65536, 0, True)
      >>> m.bytes_per_param()["update_peak"]
      8.0
    """

    num_params: int
    param_bytes: int
    state_bytes: int
    update: CompiledMemory
    train_step: CompiledMemory | None = None

    def bytes_per_param(self) -> dict[str, float | None]:
        """State, update peak (and temp) and training-step peak per parameter."""
        n = self.num_params
        step = self.train_step
        return {
            "state": self.state_bytes / n,
            "update_peak": self.update.peak_bytes / n,
            "update_temp": self.update.temp_bytes / n,
            "train_step_peak": None if step is None else step.peak_bytes / n,
        }


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def step_memory(
    tx: Any,
    params: Any,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    batch: Any = None,
) -> StepMemory:
    """Compiled memory of an optimizer's donated update and training step.

    Compiles only: ``params`` (and ``batch``) may be ``jax.ShapeDtypeStruct`` trees,
    e.g. ``jax.eval_shape`` of a model's init, so a laptop can ask what a large model's
    step needs. The gradients have the params' shapes and dtypes.

    Args:
      tx: an ``optax.GradientTransformation``.
      params: the parameter tree (values or abstract).
      loss_fn: ``loss_fn(params, batch) -> scalar``; with it, the training step is
        measured too.
      batch: ``loss_fn``'s second argument (values or abstract).

    Returns:
      A ``StepMemory``. The update's peak of ``optax.adamw`` is params + grads + state
      (its update fuses into one pass over each leaf, with no temporaries).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
      >>> m = step_memory(optax.adamw(1e-3), params)
      >>> round(m.update.peak_bytes / m.num_params, 2)  # params + grads + mu + nu
      16.0
    """
    import optax  # a runtime dependency; imported here to keep this module light

    params = _abstract(params)
    state = jax.eval_shape(tx.init, params)

    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update_mem = compiled_memory(update, params, state, params, donate_argnums=(0, 1))
    step_mem = None
    if loss_fn is not None:

        def train_step(params, state, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        step_mem = compiled_memory(
            train_step, params, state, _abstract(batch), donate_argnums=(0, 1)
        )
    return StepMemory(
        num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
        param_bytes=state_bytes(params),
        state_bytes=state_bytes(state),
        update=update_mem,
        train_step=step_mem,
    )
