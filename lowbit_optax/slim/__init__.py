"""SNR-selective second moments (SlimAdam): ``stats`` (SNR statistics and calibration),
``rules`` (choosing, storing and resolving per-leaf axes) and ``transform`` (the
optimizer).

SlimAdam (Kalra et al. 2025) keeps Adam's first moment but stores the second moment of a
leaf averaged over an axis set ``K`` chosen per leaf (``keepdims``)::

    nu <- b2 * nu + (1 - b2) * mean_K(g**2)
    u   = mhat / (sqrt(vhat) + eps)          (vhat broadcast over K, eps outside sqrt)

``K`` is chosen from the signal-to-noise ratio of a full Adam second moment ``V``::

    SNR_K(V) = mean over the other axes of (mean_K V)**2 / var_K V

(population variance, non-finite ratios dropped). A large SNR means ``V`` hardly varies
along ``K``, so its mean there loses little.

The workflow this module supports:

1. **Calibrate** without changing the training loop: wrap the optimizer in
   ``snr_calibration(optax.adamw(lr / 10), every=100)``; the wrapper records the SNR of
   every leaf for every non-empty axis subset at step 1 and every ``every`` steps in its
   state (``snr_records(opt_state)`` reads them back). ``snr`` / ``snr_table`` compute
   the same statistics of any second-moment tree directly.
2. **Rules**: ``rules_from_snr(records, threshold=1.0)`` averages the records and picks,
   per leaf, the candidate with the highest mean SNR above the threshold (none: no
   compression). Rules are a nested dict keyed like the params with an axis tuple or
   ``None`` per leaf; ``rules_to_json`` / ``rules_from_json`` store them with the
   parameter paths (``'blocks/0/attn/q/kernel'``) as keys. ``flax_default_rules`` is the
   paper's published table in Flax's ``(in, out)`` kernel layout, as a callable.
3. **Train**: ``slim_adamw(lr, rules=rules)`` (or ``scale_by_slim_adam``). With no
   compression anywhere it is ``optax.adamw`` bit for bit. ``mu_bits=4`` / ``8`` stores
   the first moment block-wise quantized (the quantized-EMA codecs), ``nu_bits`` the
   reduced second moment where it is still large.
4. **Switch without restarting**: ``slim_state_from_adam(adam_state, rules)`` turns a
   calibration run's Adam state into a SlimAdam state (the average over ``K`` of Adam's
   ``nu`` is exactly SlimAdam's ``nu`` for the same gradients, since both are linear).

Rules are resolved by parameter path: a rules mapping (nested or flat, keys joined by
``/``) or a callable ``(path, leaf) -> axes | None``. Paths join dict keys, attribute
names and sequence indices with ``/`` and drop Flax NNX's trailing ``value``, so the same
rules serve a pure-dict param tree and an ``nnx.State``.

References:
  Kalra et al., When Can You Get Away with Low Memory Adam?, arXiv 2503.01843.
"""
