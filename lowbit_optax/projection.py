"""Low-rank gradient projection: one wrapper, three projectors (GaLore, COAP, SubTrack-Grad).

``low_rank_projection(inner, rank=..., projector=...)`` runs any inner transform (Adam,
quantized Adam, ...) on low-rank projections of the 2-D gradients and projects its
updates back (Zhao et al. 2024, GaLore). For an ``(m, n)`` leaf the side is chosen
statically from the shape: ``m >= n`` projects on the right (``P`` is ``r x n``, the inner
state is ``m x r``), ``m < n`` on the left (``P`` is ``m x r``, the inner state
``r x n``). Internally both cases are one: with ``K = min(m, n)``, ``M = max(m, n)`` and
``Gk`` the gradient oriented ``K x M`` (``G.T`` on the right, ``G`` on the left), a
projector is an orthonormal ``S`` of shape ``K x r``, the projected gradient is
``A = S^T Gk`` (``r x M``; the inner transform sees ``A.T`` on the right, ``A`` on the
left), and an inner update ``U`` returns as ``scale * S U`` (re-oriented). ``S`` is what
the state stores (``P = S^T`` on the right, ``P = S`` on the left). The inner state keeps
the parameter's axis order (``m`` first on the right), so a parameter's sharding maps onto
it axis by axis.

Projectors are values (``projector=``), each with its own event schedule on the
pre-increment step count ``t`` (``t = 0, T, 2T, ...``, ``T = update_interval``):

* ``SVDProjector`` (GaLore): ``S`` = top-``r`` left singular vectors of ``Gk``, a full
  float32 SVD at every event.
* ``COAPProjector`` (Xiao et al.): a randomized range finder at ``t = 0``; every
  ``T * reproject_factor`` steps the same warm-started from the old ``S`` (one block power
  iteration); at the other events one SGD step on ``S`` of the paper's loss
  ``L(S) = mean((S S^T Gk - Gk)**2) * (1 - mean_j cos(S Mk_j, Gk_j))`` (``Mk``: the inner
  first moment in ``A``'s orientation; columns of ``Gk`` are the rows of ``G`` in the
  paper's right case), gradient clipped to norm 1, learning rate 0.1, no
  re-orthonormalisation. ``scale_aware=True`` evaluates the loss on ``Gk / rms(Gk)``:
  at real gradient scales the paper's step barely moves ``S`` (``L`` is mean-reduced and
  quadratic in ``|G|``: we measured ``|dS|`` from ~1e-11 to ~1e-6 depending on the
  gradient scale and the matrix size), see the notebook and the tests.
* ``SubTrackProjector`` (Rajabi et al.): ``S`` from an SVD at ``t = 0``, then one
  Grassmannian geodesic step per event along the descent direction of
  ``F(S) = |Gk - S S^T Gk|^2``: ``A = S^T Gk``, ``R = Gk - S A``, tangent ``-2 R A^T``
  with top singular triplet ``(sigma, u, v)``,
  ``S <- (S v cos(theta) - u sin(theta)) v^T + S (I - v v^T)`` (keeps ``S``
  orthonormal). **Decision:** ``theta = step_size * sigma / |Gk|_F**2`` (the paper's
  ``eta * sigma`` scales with ``|G|**2``), and the math of the paper rather than the
  official code (its tangent vanishes for ``m >= n``; it moved uphill). The step changes
  ``S`` by rank 1, so an event updates the step's projected gradient ``S^T Gk`` by
  rank 1 instead of recomputing it.

``moments``: what happens to the inner state when ``S`` changes: ``keep`` (GaLore, COAP),
``reset`` (zero the inner ``mu``/``nu`` of that leaf) or ``rotate`` (SubTrack++: with
``C = S_new^T S_old``, the mean rotates as ``M <- C M`` and the second moment as
mean-square = variance + mean**2, the variance rotated with ``C**2``).
``reset``/``rotate`` reach the inner moments through the moment protocol of
``lowbit_optax.moments``: an ``AdamLike`` inner (``scale_by_adam_like``,
``scale_by_quantized_adam``) carries its access and its betas; any other state needs
float ``mu`` and ``nu`` fields (``optax.scale_by_adam``). **Decision (rotate):** the paper writes
``V <- max(0, C**2 (V - M**2) + (C M)**2)`` on Adam's raw moments. Those are biased
differently (``(1 - b1**t)`` and ``(1 - b2**t)``): after ``t`` steps of a steady gradient
``g``, ``V - M**2 = ((1 - b2**t) - (1 - b1**t)**2) g**2``, strongly negative early in
training, so ``C**2`` mixes negative "variances" into coordinates and can drive ``V`` to
~0 under a large ``M``: the next Adam step blows up (we saw an 8-step loss go 2.6 -> 0.7
-> 4.0 with an event every 2 steps). We rotate the bias-corrected moments
(with the inner Adam's betas, from its ``MomentAccess`` or ``moment_betas``, and its
step count ``t``): with
``rho = (1 - b2**t) / (1 - b1**t)**2``, ``M <- C M`` and
``V <- C**2 max(0, V - rho M**2) + rho (C M)**2``, i.e. ``v_hat <- C**2 max(0, v_hat -
m_hat**2) + (C m_hat)**2``. A steady gradient then has zero variance and rotates to
exactly the moments of a steady gradient in the new basis, and every rotated coordinate
keeps ``m_hat**2 <= v_hat`` (Adam's step at most 1 there).

Robustness: a leaf whose gradient has a non-finite entry skips its projector update
(the old ``S`` is kept); the SVD never sees NaN/inf.

References:
  Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection,
  ICML 2024 (arXiv 2403.03507).
  Xiao et al., COAP: Memory-Efficient Training with Correlation-Aware Gradient
  Projection, arXiv 2412.00071.
  Rajabi et al., SubTrack your Grad: Gradient Subspace Tracking for Memory and Time
  Efficient Full-Parameter LLM Training, arXiv 2502.01586 (and SubTrack++).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowbit_optax._driver import EMPTY, Chain, init_leaves, map_rows
from lowbit_optax._util import auto_axes_like_inputs, static_arg, unflatten_like
from lowbit_optax.moments import MomentAccess, field_access, inner_count
from lowbit_optax.projectors import (  # noqa: F401 (the projectors' math, re-exported)
    COAPProjector,
    Projector,
    SubTrackProjector,
    SVDProjector,
    coap_loss,
    coap_loss_grad,
    geodesic_step,
    geodesic_step_projected,
    projector_of,
    top_subspace,
)

__all__ = [
    "COAPProjector",
    "LowRankProjectionState",
    "SVDProjector",
    "SubTrackProjector",
    "low_rank_projection",
]

MOMENTS = ("keep", "reset", "rotate")


# ------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------


class LowRankProjectionState(NamedTuple):
    """State of ``low_rank_projection``.

    Attributes:
      count: int32 steps taken.
      key: raw ``uint32`` PRNG key data (randomized range finder), folded with the step.
      projectors: tree like the params: ``S`` (``K x r``, ``proj_dtype``) for projected
        leaves, ``MaskedNode`` for the others.
      inner_state: the inner transform's state on the projected tree (projected leaves
        in their low-rank shape: ``m x r`` on the right, ``r x n`` on the left).
      residual_norms: with ``recover=True``, per projected leaf the float32 norm of the
        last recovered residual term (Fira's norm-growth limiter); ``MaskedNode``
        elsewhere, and for every leaf without ``recover``.

    Example:
      >>> tx = low_rank_projection(optax.scale_by_adam(), rank=2, min_dim=4)
      >>> state = tx.init({"w": jnp.ones((8, 4)), "b": jnp.zeros(4)})
      >>> state.projectors["w"].shape  # S is K x r, K = min(8, 4)
      (4, 2)
      >>> state.inner_state.mu["w"].shape, state.inner_state.mu["b"].shape  # m x r
      ((8, 2), (4,))
      >>> state.projectors["b"]  # 1-D leaves are not projected
      MaskedNode()
    """

    count: jax.Array
    key: jax.Array
    projectors: Any
    inner_state: optax.OptState
    residual_norms: Any = None


class _Leaf(NamedTuple):
    """Static layout of one leaf: projected or not, the 2-D view and the rank."""

    projected: bool
    shape: tuple[int, ...]
    m: int = 0
    n: int = 0
    rank: int = 0

    @property
    def right(self) -> bool:
        return self.m >= self.n

    @property
    def k(self) -> int:
        return min(self.m, self.n)

    @property
    def big(self) -> int:
        return max(self.m, self.n)

    @property
    def low_shape(self) -> tuple[int, int]:
        return (self.m, self.rank) if self.right else (self.rank, self.n)


def _plan(shape, selected, rank, min_dim, reshape) -> _Leaf:
    shape = tuple(shape)
    if not selected or len(shape) < 2 or (len(shape) > 2 and not reshape):
        return _Leaf(False, shape)
    m, n = math.prod(shape[:-1]), shape[-1]
    if min(m, n) < min_dim:
        return _Leaf(False, shape)
    k = min(m, n)
    r = rank if isinstance(rank, int) else max(1, round(rank * k))
    return _Leaf(True, shape, m, n, min(r, k))


def _to_a(x: jax.Array, leaf: _Leaf) -> jax.Array:
    """An inner-state/low-rank array (low shape) in ``A``'s ``r x M`` orientation (the
    transpose on the right; its own inverse)."""
    return x.T if leaf.right else x


def low_rank_projection(
    inner: optax.GradientTransformation,
    *,
    rank: int | float,
    projector: Projector | str = "svd",
    update_interval: int | None = None,
    scale: float = 0.25,
    min_dim: int | None = None,
    mask: optax.MaskOrFn = None,
    moments: str = "keep",
    proj_dtype: Any = None,
    reshape: bool = True,
    recover: bool = False,
    recover_limit: float = 1.01,
    key: int | None = None,
    moment_betas: tuple[float, float] | None = None,
) -> optax.GradientTransformation:
    """Runs ``inner`` on low-rank projections of the large 2-D gradients.

    Args:
      inner: any transform (e.g. ``optax.scale_by_adam()``, a quantized Adam). It gets
        ``params=None`` (keep weight decay outside, after this wrapper).
      rank: an int (that many directions), or a float in (0, 1] as a fraction of
        ``min(m, n)`` (note ``rank=1`` keeps one direction, ``rank=1.0`` all of them).
      projector: ``SVDProjector()`` (GaLore), ``COAPProjector(...)``,
        ``SubTrackProjector(...)``, or their names.
      update_interval: ``T``, steps between projector events (on the step count before
        the increment: ``t = 0, T, 2T, ...``; default 200).
      scale: ``alpha``, the factor on back-projected updates (0.25 in the papers).
      min_dim: leaves with ``min(m, n) < min_dim`` are not projected (default 128).
      mask: optax mask (tree or callable) of leaves that may be projected.
      moments: ``keep``, ``reset`` or ``rotate`` the inner moments when ``S`` changes.
      proj_dtype: storage dtype of ``S`` (``float32``, the default, or ``bfloat16``);
        math in float32.
      reshape: leaves of rank > 2 are viewed as ``(prod(shape[:-1]), shape[-1])`` (e.g.
        a conv kernel ``(h, w, in, out)`` as ``(h w in, out)``); ``False`` leaves them
        unprojected.
      recover: add back the discarded gradient ``R = Gk - S A`` scaled by
        ``|U| / |A|`` (Fira's recovery, SubTrack++'s option), with Fira's norm-growth
        limiter: when the norm of that term grows by more than ``recover_limit`` times
        over the last step, it is scaled down to ``recover_limit`` times the last norm.
      recover_limit: Fira's ``gamma`` (1.01).
      key: seed of the randomized range finder (COAP; default 0).
      moment_betas: ``(b1, b2)`` of an inner Adam that does not carry them (a plain
        ``optax.scale_by_adam``), for ``moments='rotate'``, which bias-corrects the
        moments before rotating them (see the module docstring). An ``AdamLike`` inner
        (``lowbit_optax.scale_by_adam_like``, ``scale_by_quantized_adam``) gives its own,
        and passing both is an error. The step count ``t`` is the inner state's
        ``count`` field if it has exactly one, else this wrapper's.

    Returns:
      An ``optax.GradientTransformation``; updates in the gradients' dtype.

    Memory per projected ``(m, n)`` leaf: ``K r`` for ``S`` (in ``proj_dtype``) plus the
    inner state on ``m r`` (right) or ``r n`` (left) values instead of ``m n`` (plus one
    float32 with ``recover``).

    Example:
      GaLore-style Adam at rank 2 (``min_dim=4`` so that this small matrix qualifies):

      >>> import numpy as np
      >>> tx = low_rank_projection(optax.scale_by_adam(), rank=2, min_dim=4)
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.arange(32.0).reshape(8, 4) % 5, "b": jnp.ones(4)}
      >>> updates, state = jax.jit(tx.update)(grads, state)
      >>> updates["w"].shape, int(np.linalg.matrix_rank(updates["w"]))  # rank-2 step
      ((8, 4), 2)
      >>> state.inner_state.nu["w"].shape  # Adam's state on 8 x 2 values, not 8 x 4
      (8, 2)
    """
    cfg = _Config(
        inner,
        projector_of(projector),
        static_arg("rank", rank, None),
        static_arg("update_interval", update_interval, 200),
        scale,
        static_arg("min_dim", min_dim, 128),
        mask,
        moments,
        static_arg("proj_dtype", proj_dtype, jnp.float32),
        reshape,
        recover,
        recover_limit,
        static_arg("key", key, 0),
        moment_betas,
        _moment_access(inner, moment_betas),
    )
    _check(cfg)
    return optax.GradientTransformation(
        functools.partial(_init, cfg), functools.partial(_update, cfg)
    )


class _Config(NamedTuple):
    """``low_rank_projection``'s arguments (static), as its stages read them."""

    inner: optax.GradientTransformation
    projector: Projector
    rank: int | float
    update_interval: int
    scale: float
    min_dim: int
    mask: optax.MaskOrFn
    moments: str
    proj_dtype: Any
    reshape: bool
    recover: bool
    recover_limit: float
    key: int
    moment_betas: tuple[float, float] | None
    access: MomentAccess


def _moment_access(inner: Any, moment_betas: Any) -> MomentAccess:
    """The inner transform's own ``MomentAccess`` (``AdamLike``), else access by the
    field names ``mu``/``nu`` with ``moment_betas``."""
    own = getattr(inner, "moments", None)
    if not isinstance(own, MomentAccess):
        pair = isinstance(moment_betas, tuple | list) and len(moment_betas) == 2
        return field_access(*(moment_betas if pair else (None, None)))  # _check: bad betas
    if moment_betas is not None:
        raise ValueError(
            f"moment_betas={moment_betas!r} was given, but the inner transform carries its "
            f"own betas (b1={own.b1!r}, b2={own.b2!r}) in its MomentAccess; drop "
            "moment_betas (it is only for an inner state without them, e.g. a plain "
            "optax.scale_by_adam)."
        )
    return own


def _check(cfg: _Config) -> None:
    """Clear errors for bad arguments, at construction."""
    if cfg.moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {cfg.moments!r}")
    if not isinstance(cfg.update_interval, int) or cfg.update_interval < 1:
        raise ValueError(f"update_interval must be a positive int, got {cfg.update_interval!r}")
    if isinstance(cfg.rank, bool) or not (
        (isinstance(cfg.rank, int) and cfg.rank >= 1)
        or (isinstance(cfg.rank, float) and 0 < cfg.rank <= 1)
    ):
        raise ValueError(
            f"rank must be a positive int or a fraction in (0, 1] of min(m, n), got {cfg.rank!r}"
        )
    if jnp.dtype(cfg.proj_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"proj_dtype must be float32 or bfloat16, got {cfg.proj_dtype!r}")
    if not isinstance(cfg.min_dim, int) or cfg.min_dim < 1:
        raise ValueError(f"min_dim must be a positive int, got {cfg.min_dim!r}")
    if isinstance(cfg.recover_limit, numbers.Real) and not cfg.recover_limit > 1.0:
        raise ValueError(
            f"recover_limit must be > 1 (Fira's gamma, 1.01), got {cfg.recover_limit!r}"
        )
    if cfg.moment_betas is not None and not (
        isinstance(cfg.moment_betas, tuple | list)
        and len(cfg.moment_betas) == 2
        and all(
            (isinstance(b, numbers.Real) and not isinstance(b, bool) and 0.0 <= b < 1.0)
            or (isinstance(b, jax.Array) and b.ndim == 0)  # under inject_hyperparams
            for b in cfg.moment_betas
        )
    ):
        raise ValueError(
            "moment_betas must be the inner Adam's (b1, b2), two numbers in [0, 1), "
            f"got {cfg.moment_betas!r}"
        )
    if cfg.moments == "rotate" and (cfg.access.b1 is None or cfg.access.b2 is None):
        raise ValueError(
            "moments='rotate' needs the inner Adam's betas to bias-correct its moments "
            "before rotating them, and this inner transform does not carry them; got "
            "moment_betas=None. Use an inner that does (lowbit_optax.scale_by_adam_like("
            "b1, b2, eps) or scale_by_quantized_adam), or pass moment_betas=(b1, b2), "
            "e.g. (0.9, 0.999) for optax.scale_by_adam()."
        )


def _plans(cfg: _Config, tree: Any) -> list[_Leaf]:
    """Each leaf's static layout (projected or not, its 2-D view, its rank)."""
    leaves = jax.tree.leaves(tree)
    if cfg.mask is None:
        selected = [True] * len(leaves)
    else:
        m = cfg.mask(tree) if callable(cfg.mask) else cfg.mask
        selected = [bool(x) for x in jax.tree.structure(tree).flatten_up_to(m)]
    return [
        _plan(x.shape, sel, cfg.rank, cfg.min_dim, cfg.reshape)
        for x, sel in zip(leaves, selected, strict=True)
    ]


def _init(cfg: _Config, params: optax.Params) -> LowRankProjectionState:
    layout = _plans(cfg, params)
    leaves = jax.tree.leaves(params)
    low = [
        jnp.zeros(lf.low_shape, x.dtype) if lf.projected else x
        for x, lf in zip(leaves, layout, strict=True)
    ]
    inner_state = cfg.inner.init(unflatten_like(params, low))
    if cfg.moments != "keep":
        _moment_fields(inner_state, cfg.access, what=f"moments={cfg.moments!r}")

    def init_leaf(x, lf: _Leaf) -> _LeafState:
        if not lf.projected:
            return _LeafState(EMPTY, EMPTY)
        norm = jnp.zeros([], jnp.float32) if cfg.recover else EMPTY
        return _LeafState(jnp.eye(lf.k, lf.rank, dtype=cfg.proj_dtype), norm)

    fields = init_leaves(init_leaf, params, _LeafState, layout)
    return LowRankProjectionState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(jax.random.key(cfg.key)).astype(jnp.uint32),
        projectors=fields.projectors,
        inner_state=inner_state,
        residual_norms=fields.residual_norms,
    )


class _LeafState(NamedTuple):
    """One leaf's entries of the state's per-parameter fields (``EMPTY`` where unused)."""

    projectors: jax.Array
    residual_norms: jax.Array


def _update(cfg: _Config, updates, state, params=None):
    del params
    return auto_axes_like_inputs(functools.partial(_step, cfg), updates, state)


def _step(cfg: _Config, updates: Any, state: LowRankProjectionState):
    """One update, in the paper's stages: per projected leaf orient and project the
    gradient and, at an event, move the projector (and the inner moments); the inner
    transform on the low-rank tree; per projected leaf project its update back.

    Projected leaves run one after another (``Chain``), largest first: an event's
    decompositions work on ``K x M`` temporaries, best paid while few of the low-rank
    gradients the inner transform needs are alive yet. The back-projections run in the
    reverse order, largest last, when most low-rank arrays are freed."""
    leaves, treedef = jax.tree.flatten(updates)
    layout = _plans(cfg, updates)
    view = _MomentView(cfg, state, treedef)
    chain = Chain()
    by_size = sorted(range(len(leaves)), key=lambda i: -math.prod(leaves[i].shape))
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
    s_old = treedef.flatten_up_to(state.projectors)
    new_s, low, low32 = list(s_old), list(leaves), [None] * len(leaves)
    for i in by_size:
        if layout[i].projected:
            key = jax.random.fold_in(step_key, i)
            s_new, low32[i] = _project(cfg, leaves[i], layout[i], s_old[i], view, i, key, chain)
            # stored at once (its float32 value would stay alive until the
            # back-projection otherwise, for every leaf); the back-projection reads the
            # stored S, which differs from the float32 one only on event steps with a
            # low-precision S
            new_s[i] = chain.close(s_new.astype(cfg.proj_dtype))
            low[i] = low32[i].astype(leaves[i].dtype)
    inner_state = view.stored(state.inner_state, treedef)
    low_updates, inner_state = cfg.inner.update(treedef.unflatten(low), inner_state, None)
    out = list(treedef.flatten_up_to(low_updates))
    norms = treedef.flatten_up_to(state.residual_norms)
    for i in reversed(by_size):
        lf = layout[i]
        if lf.projected:
            back = lambda g, *a, lf=lf: _back_projected(
                g, lf, *a, cfg.scale, cfg.recover, cfg.recover_limit
            )
            s32 = new_s[i].astype(jnp.float32)
            out[i], norms[i] = chain(back, leaves[i], out[i], s32, low32[i], norms[i])
    return treedef.unflatten(out), LowRankProjectionState(
        optax.safe_increment(state.count),
        state.key,
        treedef.unflatten(new_s),
        inner_state,
        treedef.unflatten(norms),
    )


def _project(cfg: _Config, g, lf: _Leaf, s, view: _MomentView, i: int, key, chain):
    """Orients and projects one leaf's gradient and, at an event, refreshes its
    projector (and moves its inner moments, in ``view``). Returns the new float32 ``S``
    and the projected gradient in the inner state's orientation."""
    g2 = g.reshape(lf.m, lf.n).astype(jnp.float32)
    # leaves one after another: an event's decompositions work on K x M copies
    s32 = chain.gate(s.astype(jnp.float32))
    # the projected gradient while S stays, in the inner state's orientation (G S on
    # the right, S^T G on the left: no transposed copy of G)
    low_g = g2 @ s32 if lf.right else s32.T @ g2
    moved = view.moved(i)
    mu = view.mu[i] if view.mu is not None else low_g

    # One conditional per leaf for the projector, the projected gradient and
    # (SubTrack++) the moments: the r x r x M rotation is paid only at a change, and so
    # are the oriented gradient, its finiteness check and Mk (steps without an event
    # only pass the operands through).
    def changed():
        gk = g2.T if lf.right else g2
        mk = _to_a(mu.astype(jnp.float32), lf)

        def refresh():
            s_new, a_new = cfg.projector.refresh(
                s=s32,
                gk=gk,
                a=_to_a(low_g, lf),
                mk=mk,
                count=view.count,
                interval=cfg.update_interval,
                key=key,
            )
            s_new = s_new.astype(jnp.float32)
            rotated = _moved_moments(moved, s32, s_new, lf, cfg.moments, view.rho, cfg.access)
            return s_new, _to_a(a_new, lf), rotated

        # a non-finite gradient keeps the old projector (the SVD never sees it)
        return jax.lax.cond(jnp.all(jnp.isfinite(g2)), refresh, lambda: (s32, low_g, moved))

    event = view.count % cfg.update_interval == 0
    s_new, low_g, moved = jax.lax.cond(event, changed, lambda: (s32, low_g, moved))
    view.set_moved(i, moved)
    return s_new, low_g


class _MomentView:
    """The inner state as the stages read and write it: its float first moment per
    leaf (COAP's ``Mk``, when it has one), and, with ``moments='reset'/'rotate'``, each
    leaf's stored moments (its entries of the ``MomentAccess`` fields, see
    ``lowbit_optax.moments``) and the bias-correction ratio."""

    def __init__(self, cfg: _Config, state: LowRankProjectionState, treedef: Any):
        self.count = state.count
        self.mu = _inner_mu(state.inner_state, treedef)
        self.fields = () if cfg.moments == "keep" else cfg.access.fields
        self.moments = [
            list(treedef.flatten_up_to(optax.tree_utils.tree_get(state.inner_state, name)))
            for name in self.fields
        ]
        self.rho = None
        if cfg.moments == "rotate":
            count = inner_count(state.inner_state, state.count)
            self.rho = _bias_ratio(count, cfg.access.b1, cfg.access.b2)

    def moved(self, i: int) -> Any:
        """Leaf ``i``'s stored moments, or ``EMPTY`` with ``moments='keep'``."""
        return tuple(field[i] for field in self.moments) if self.fields else EMPTY

    def set_moved(self, i: int, moved: Any) -> None:
        for field, value in zip(self.moments, moved if self.fields else (), strict=True):
            field[i] = value

    def stored(self, inner_state: Any, treedef: Any) -> Any:
        """``inner_state`` with the moved moments written back."""
        if not self.fields:
            return inner_state
        new = {
            name: treedef.unflatten(m) for name, m in zip(self.fields, self.moments, strict=True)
        }
        return optax.tree_utils.tree_set(inner_state, **new)


def _back_projected(g, lf, u_low, s_new, low_g, last_norm, scale, recover, limit):
    """The full-size update of a projected leaf, ``scale * S U`` (re-oriented), plus
    Fira's recovered term with ``recover``, computed in row slices of the parameter's
    ``m x n`` view written over the gradient (``map_rows``): one slice of the ``K x M``
    product is alive at a time. Returns the update (the gradient's shape and dtype) and
    the recovered term's norm (``last_norm`` without recovery)."""
    u_low = u_low.astype(jnp.float32)
    g2 = g.reshape(lf.m, lf.n)
    # on the right the rows of the update are the columns of S U, i.e. rows of the inner
    # update (m x r); on the left they are rows of S (m x r)
    by_rows = u_low if lf.right else s_new

    def product(rows):
        return (s_new @ rows.T).T if lf.right else rows @ u_low

    phi = factor = None
    if recover:
        ua, a = _to_a(u_low, lf), _to_a(low_g, lf)
        na = jnp.linalg.norm(a)
        phi = jnp.where(na > 0, jnp.linalg.norm(ua) / jnp.where(na > 0, na, 1.0), 0.0)
        low_rows = low_g if lf.right else s_new

        def residual(g_rows, low):  # rows of R = Gk - S A in the parameter's orientation
            return g_rows.astype(jnp.float32) - ((s_new @ low.T).T if lf.right else low @ low_g)

        def squares(carried, readonly, _):
            g_rows, low = readonly
            return jnp.sum((phi * residual(g_rows, low)) ** 2, axis=-1)

        sums = map_rows(squares, jnp.zeros((lf.m,), jnp.float32), (g2, low_rows), shape=g2.shape)
        norm = jnp.sqrt(jnp.sum(sums))
        cap = limit * last_norm
        shrink = (last_norm > 0) & (norm > cap)
        factor = jnp.where(shrink, cap / jnp.where(norm > 0, norm, 1.0), 1.0)
        ok = jnp.isfinite(norm)  # a non-finite gradient leaves the limiter's memory alone
        last_norm = jnp.where(ok, norm * factor, last_norm)

    def rows(g_rows, readonly, _):
        full = product(readonly[0])
        if recover:
            full = full + (phi * residual(g_rows, readonly[1])) * factor
        return (scale * full).astype(g_rows.dtype)

    ro = (by_rows, low_rows) if recover else (by_rows,)
    u = map_rows(rows, g2, ro)
    return u.reshape(lf.shape), last_norm


def _moment_fields(inner_state: Any, access: MomentAccess, what: str) -> None:
    for name in access.fields:
        found = optax.tree_utils.tree_get_all_with_path(inner_state, name)
        if len(found) != 1:
            raise ValueError(
                f"{what} needs an inner state with exactly one '{name}' field "
                f"(e.g. optax.scale_by_adam, or an AdamLike inner such as "
                f"lowbit_optax.scale_by_quantized_adam); found {len(found)}. Use "
                "moments='keep' with this inner transform."
            )


def _inner_mu(inner_state: Any, treedef: Any) -> list[Any] | None:
    """The inner first moment per leaf, if the inner state has one float ``mu`` tree."""
    found = optax.tree_utils.tree_get_all_with_path(inner_state, "mu")
    if len(found) != 1:
        return None
    try:
        leaves = treedef.flatten_up_to(found[0][1])
    except (ValueError, TypeError):
        return None
    if not all(isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) for x in leaves):
        return None
    return leaves


def _bias_ratio(t: jax.Array, b1: float, b2: float) -> jax.Array:
    """``rho = (1 - b2**t) / (1 - b1**t)**2``: ``V - rho M**2`` is ``(1 - b2**t)`` times
    the bias-corrected variance ``v_hat - m_hat**2``; 1 at ``t = 0`` (zero moments)."""
    tf = t.astype(jnp.float32)

    def one_minus_power(b):  # 1 - b^t without float32's cancellation near b = 1
        if isinstance(b, numbers.Real):  # log in float64 (b may be a traced hyperparameter)
            return -jnp.expm1(tf * math.log(b)) if b > 0 else jnp.ones_like(tf)
        return -jnp.expm1(tf * jnp.log(jnp.asarray(b, jnp.float32)))  # t > 0: b = 0 gives 1

    bc1, bc2 = one_minus_power(b1), one_minus_power(b2)
    return jnp.where(t > 0, bc2 / jnp.where(t > 0, bc1 * bc1, 1.0), 1.0)


def _moved_moments(moved, s_old, s_new, lf, moments, rho=None, access=None):
    """The inner stored moments of a projected leaf (read and written through
    ``access``) after its projector changed from ``s_old`` to ``s_new``: zeroed
    (``reset``) or rotated into the new subspace (``rotate``: ``mu <- C mu``,
    ``nu <- C^2 max(0, nu - rho mu^2) + rho (C mu)^2`` with ``C = S_new^T S_old`` and
    ``rho`` from ``_bias_ratio``); ``EMPTY`` passes through (``keep``)."""
    if moments == "keep":
        return moved
    access = field_access() if access is None else access
    m, v = access.get(moved, lf.low_shape)
    m32, v32 = m.astype(jnp.float32), v.astype(jnp.float32)
    if moments == "reset":
        m2, v2 = jnp.zeros_like(m32), jnp.zeros_like(v32)
    else:
        # in the state's own (parameter) orientation: no transposed copies of the moments
        c = s_new.T @ s_old
        rot = (lambda x, c: x @ c.T) if lf.right else (lambda x, c: c @ x)
        m2 = rot(m32, c)
        variance = jnp.maximum(0.0, v32 - rho * m32**2)  # (1 - b2^t) (v_hat - m_hat^2)
        v2 = rot(variance, c**2) + rho * m2**2
    return access.put(moved, m2.astype(m.dtype), v2.astype(v.dtype))
