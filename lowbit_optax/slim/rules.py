"""SlimAdam's rules: per-leaf averaging axes, chosen from recorded SNRs
(``rules_from_snr``), stored as JSON keyed by parameter path, the paper's published table
for Flax layouts (``flax_default_rules``), and their resolution against a param tree.

Rules are resolved by parameter path: a rules mapping (nested or flat, keys joined by
``/``) or a callable ``(path, leaf) -> axes | None``. Paths join dict keys, attribute
names and sequence indices with ``/`` and drop Flax NNX's trailing ``value``, so the same
rules serve a pure-dict param tree and an ``nnx.State``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lowbit_optax._util import leaves_with_paths
from lowbit_optax.slim.stats import Axes, Table, normalize_axes, snr_records

__all__ = [
    "PathRules",
    "flax_default_rules",
    "removed_fraction",
    "resolve_rules",
    "rules_from_json",
    "rules_from_snr",
    "rules_to_json",
]

RuleFn = Callable[[str, Any], "Axes | Sequence[int] | None"]


@dataclasses.dataclass(frozen=True)
class PathRules:
    """Rules given by a function ``(path, leaf) -> axes | None``, held as a value.

    Not callable itself, so ``optax.inject_hyperparams`` keeps it static: it takes any
    callable argument for a schedule. ``rules=PathRules(fn)`` works wherever
    ``rules=fn`` does, and under ``inject_hyperparams`` without ``static_args``.

    Attributes:
      fn: ``(path, leaf) -> axes | None``, called with each param's ``/``-joined path
        and the leaf (or its ``ShapeDtypeStruct``).

    Example:
      >>> from lowbit_optax import slim_adamw
      >>> import jax.numpy as jnp
      >>> import optax
      >>> rules = PathRules(lambda path, leaf: (1,) if path.endswith("kernel") else None)
      >>> params = {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
      >>> resolve_rules(rules, params)  # leaves in flatten order: bias, kernel
      [(), (1,)]
      >>> tx = optax.inject_hyperparams(slim_adamw)(1e-3, rules=rules)  # kept static
    """

    fn: RuleFn


Rules = Mapping[Any, Any] | RuleFn | PathRules  # a mapping of paths to axes, or a function


def _default_no_compress(path: str, ndim: int) -> bool:
    """1-D leaves (biases, norm scales) and anything under a ``norm`` name."""
    return ndim < 2 or any("norm" in part.lower() for part in path.split("/"))


def rules_from_snr(
    records: Sequence[Table] | Any,
    threshold: float = 1.0,
    *,
    no_compress: Callable[[str, int], bool] | None = _default_no_compress,
) -> dict[Any, Any]:
    """Per-leaf averaging axes from recorded SNR tables.

    Averages each leaf's SNR per candidate over the records (NaNs ignored), and picks
    the candidate with the highest mean SNR strictly above ``threshold``; ties go to the
    smaller axis set. No candidate above the threshold: ``None`` (no compression).

    Args:
      records: a list of ``snr_table``-style tables, or an optimizer state holding an
        ``SNRCalibrationState`` (read with ``snr_records``).
      threshold: minimum mean SNR (the paper: 1.0).
      no_compress: ``(path, ndim) -> bool`` forcing ``None``; default: 1-D leaves and
        norm parameters. ``None`` disables it.

    Returns:
      Rules: a nested dict keyed like the params (path components; all-digit components
      become ints, as ``nnx.to_pure_dict`` keys list layers) with an axis tuple or
      ``None`` per leaf.

    Example:
      ``V`` varies less down its columns (axis 0: SNR 9) than along its rows (axis 1:
      SNR 4), so axis 0 wins; the 1-D bias is never compressed by default.

      >>> import jax.numpy as jnp
      >>> from lowbit_optax import snr_table
      >>> table = snr_table({"w": jnp.array([[1.0, 3.0], [2.0, 6.0]]), "b": jnp.ones(2)})
      >>> rules_from_snr([table])
      {'b': None, 'w': (0,)}
      >>> rules_from_snr([table], threshold=10.0)  # no candidate above it
      {'b': None, 'w': None}
    """
    if not (
        isinstance(records, list)
        or (isinstance(records, tuple) and not hasattr(records, "_fields"))
    ):
        records = snr_records(records)
    if not records:
        raise ValueError("rules_from_snr got no records; calibrate for at least one step")
    paths = list(records[0])
    for i, table in enumerate(records):
        if list(table) != paths:
            raise ValueError(f"record {i} has different leaves than record 0")
    flat: dict[str, Axes | None] = {}
    for path in paths:
        cands = list(records[0][path])
        ndim = max((max(k) + 1 for k in cands), default=0)
        if no_compress is not None and no_compress(path, ndim):
            flat[path] = None
            continue
        best, best_snr = None, threshold
        for k in cands:
            values = np.array([t[path][k] for t in records], np.float64)
            values = values[~np.isnan(values)]
            if values.size == 0:
                continue
            mean = float(np.mean(values))
            if mean > best_snr:
                best, best_snr = k, mean
        flat[path] = best
    return _nest(flat)


def _key(part: str) -> Any:
    return int(part) if part.isdigit() else part


def _nest(flat: Mapping[str, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for path, axes in flat.items():
        node = out
        parts = path.split("/") if path else [""]
        for part in parts[:-1]:
            node = node.setdefault(_key(part), {})
        node[_key(parts[-1])] = axes
    return out


def _is_rule_leaf(x: Any) -> bool:
    return x is None or (isinstance(x, (tuple, list)) and all(isinstance(a, int) for a in x))


def _flatten_rules(rules: Mapping[Any, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if _is_rule_leaf(node):
            flat[prefix] = None if node is None else tuple(node)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            raise ValueError(
                f"rules entry {prefix!r} is {node!r}; expected a tuple of axes, None, or a "
                "nested mapping of them"
            )

    walk(rules, "")
    return flat


def rules_to_json(rules: Mapping[Any, Any]) -> str:
    """JSON text of rules: ``{"path": [axes] | null}`` with ``/``-joined parameter paths.

    Args:
      rules: a rules mapping, nested (as ``rules_from_snr`` returns) or flat.

    Returns:
      The JSON text (``rules_from_json`` reads it back).

    Example:
      >>> import json
      >>> text = rules_to_json({"blocks": {0: {"q": {"kernel": (0,)}}}, "b": None})
      >>> json.loads(text)
      {'blocks/0/q/kernel': [0], 'b': None}
    """
    flat = _flatten_rules(rules)
    return json.dumps({k: None if v is None else list(v) for k, v in flat.items()}, indent=1)


def rules_from_json(text: str) -> dict[Any, Any]:
    """Rules from ``rules_to_json`` text (a nested dict, as ``rules_from_snr`` returns).

    Args:
      text: a JSON object of ``/``-joined parameter paths to axis lists or ``null``.

    Returns:
      Nested rules; all-digit path components become int keys, axis lists tuples.

    Example:
      >>> rules = {"blocks": {0: {"q": {"kernel": (0,)}}}, "b": None}
      >>> rules_from_json(rules_to_json(rules)) == rules
      True
      >>> rules_from_json('{"mlp/fc1/kernel": [1], "mlp/fc1/bias": null}')
      {'mlp': {'fc1': {'kernel': (1,), 'bias': None}}}
    """
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"rules JSON must be an object of path -> axes, got {type(data)}")
    return _nest({k: None if v is None else tuple(int(a) for a in v) for k, v in data.items()})


_EMBED = re.compile(r"^(embedding|embed|wte|wpe|pos|pos_embed|pos_embedding|position.*)$")
_QK = {"q", "k", "query", "key", "q_proj", "k_proj", "wq", "wk"}
_HEAD = {"lm_head", "head", "unembed", "output", "logits"}
_OUT = {"o", "out", "o_proj", "out_proj", "wo", "proj"}


def flax_default_rules(path: str, leaf: Any = None) -> Axes | None:
    """SlimAdam's published GPT rules, translated to Flax NNX's layouts.

    The paper's table (PyTorch ``(out, in)`` weights) averages ``q``/``k`` over fan-in,
    ``v``, the attention output and the MLP over fan-out, embeddings and the LM head over
    the model dimension (one value per token row), and compresses no norm. In Flax a
    ``Linear`` kernel is ``(in, out)`` and a ``LinearGeneral`` kernel puts its input
    axes first, so:

    * ``.../{q,k,query,key}/kernel``: fan-in, ``(0,)``;
    * ``.../{lm_head,head,unembed}/kernel`` (``(d, vocab)``): the model dim, ``(0,)``;
    * ``.../{o,out,...}/kernel`` (attention output, ``(heads, head_dim, out)`` in
      ``nnx.MultiHeadAttention``): fan-out, the last axis;
    * any other ``kernel`` (MLP, ``v``, plain ``Linear``): fan-out, axes ``1..ndim-1``;
    * ``embedding`` (``nnx.Embed``, ``(vocab, d)``) and positional tables named
      ``pos``/``wpe``/``embed``: the model dim, the last axis;
    * norms (``LayerNorm``/``RMSNorm``), biases, any 1-D or other leaf: ``None``.

    Use as ``rules=flax_default_rules`` (``slim_adamw``'s default); wrap it to change
    single layers.

    Args:
      path: the parameter's ``/``-joined path (``"blocks/0/attn/q/kernel"``).
      leaf: the parameter (or anything with a ``shape``).

    Returns:
      The averaging axes, or ``None`` (no compression).

    Example:
      >>> import jax.numpy as jnp
      >>> flax_default_rules("blocks/0/attn/q/kernel", jnp.zeros((64, 4, 16)))
      (0,)
      >>> flax_default_rules("blocks/0/attn/out/kernel", jnp.zeros((4, 16, 64)))
      (2,)
      >>> flax_default_rules("blocks/0/mlp/fc1/kernel", jnp.zeros((64, 256)))
      (1,)
      >>> flax_default_rules("embed/embedding", jnp.zeros((100, 64)))
      (1,)
      >>> flax_default_rules("blocks/0/ln1/scale", jnp.zeros(64)) is None
      True
    """
    if leaf is None and not isinstance(path, str):
        raise ValueError(
            f"flax_default_rules was called with {path!r} instead of (path, leaf): "
            "optax.inject_hyperparams calls every callable argument as a schedule of the "
            "step count. Leave rules=None (these rules are slim_adamw's default), pass "
            "rules=PathRules(fn) (a value, kept static), or pass "
            "optax.inject_hyperparams(..., static_args=('rules',))."
        )
    ndim = len(leaf.shape)
    parts = path.split("/")
    if ndim < 2 or any("norm" in p.lower() for p in parts):
        return None
    name, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if name == "kernel":
        if parent in _QK or parent in _HEAD:
            return (0,)
        if parent in _OUT:
            return (ndim - 1,)
        return tuple(range(1, ndim))
    if _EMBED.match(name):
        return (ndim - 1,)
    return None


def resolve_rules(rules: Rules, tree: Any) -> list[Axes]:
    """Per leaf of ``tree`` (flatten order), the normalised averaging axes.

    Raises for missing paths and axes that do not fit a leaf.

    Args:
      rules: a rules mapping (nested or flat), a callable ``(path, leaf) -> axes |
        None`` or a ``PathRules``.
      tree: the params (or any tree with their paths and shapes).

    Returns:
      A list with, per leaf, its sorted non-negative axes (``()``: no compression).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
      >>> resolve_rules({"w": (-1,), "b": None}, params)  # flatten order: b, w
      [(), (1,)]
    """
    if rules is None:
        raise ValueError(
            "rules is required: a mapping of parameter paths to axis tuples (from "
            "rules_from_snr / rules_from_json), or a callable such as flax_default_rules"
        )
    leaves = leaves_with_paths(tree)
    rules = rules.fn if isinstance(rules, PathRules) else rules
    if callable(rules) and not isinstance(rules, Mapping):
        raw = [(path, leaf, rules(path, leaf)) for path, leaf in leaves]
    elif isinstance(rules, Mapping):
        flat = _flatten_rules(rules)
        missing = [path for path, _ in leaves if path not in flat]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise ValueError(
                f"rules have no entry for {len(missing)} parameter(s): {shown}"
                f"{' ...' if len(missing) > 5 else ''}; add them (None for no compression) "
                f"or pass a callable (path, leaf) -> axes. Rules cover: "
                f"{', '.join(repr(k) for k in list(flat)[:5])}"
            )
        raw = [(path, leaf, flat[path]) for path, leaf in leaves]
    else:
        raise ValueError(f"rules must be a mapping or a callable, got {type(rules).__name__}")
    out = []
    for path, leaf, axes in raw:
        if axes is None or (isinstance(axes, (tuple, list)) and len(axes) == 0):
            out.append(())
            continue
        if not isinstance(axes, (tuple, list)):
            raise ValueError(f"rule for {path!r} must be a tuple of ints or None, got {axes!r}")
        out.append(
            normalize_axes(axes, len(leaf.shape), f"rule for {path!r} (shape {tuple(leaf.shape)}):")
        )
    return out


def removed_fraction(params: Any, rules: Rules) -> float:
    """Fraction of the second moment's entries that ``rules`` remove (0 = plain Adam).

    Args:
      params: the params (or their ``ShapeDtypeStruct`` tree).
      rules: rules as ``scale_by_slim_adam`` takes them.

    Returns:
      ``1 - kept / total`` over all leaves, a Python float.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}
      >>> removed_fraction(params, {"w": (1,), "b": None})  # keeps 4 + 8 of 40
      0.7
    """
    leaves = [x for _, x in leaves_with_paths(params)]
    full = sum(math.prod(x.shape) for x in leaves)
    kept = sum(
        math.prod(1 if i in k else d for i, d in enumerate(x.shape))
        for x, k in zip(leaves, resolve_rules(rules, params), strict=True)
    )
    return 1.0 - kept / max(full, 1)
