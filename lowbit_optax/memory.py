"""Exact optimizer-state memory accounting.

``state_bytes`` counts the bytes an optimizer state occupies when stored at its
dtypes' real bit widths (sub-byte integer and float dtypes such as ``int4`` or
``int2`` count 4 or 2 bits per element, rounded up to whole bytes per array, the
way XLA packs them). ``memory_report`` breaks a state down per leaf and relates it
to the number of parameters.

Both read shapes and dtypes only, so they accept real arrays, numpy arrays and
``jax.ShapeDtypeStruct`` leaves alike (e.g. the output of ``jax.eval_shape``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LeafMemory", "MemoryReport", "dtype_bits", "memory_report", "state_bytes"]


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
    """One state leaf: its key path, shape, dtype and exact bytes."""

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
      opt_state: the optimizer state (real arrays or ``jax.ShapeDtypeStruct``s,
        e.g. ``jax.eval_shape(tx.init, params)``).
      params: the parameter tree the state was built for.

    Returns:
      A ``MemoryReport``; ``print(report)`` shows a table and
      ``report.bytes_per_param`` the headline number (``optax.adamw``: 8.0 plus
      the step counter).
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
