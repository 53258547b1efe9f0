"""The named optimizers (``lowbit_optax.aliases``): documented as optax documents its
aliases, with examples that run, and arguments that conflict rejected."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest

import lowbit_optax
from lowbit_optax import aliases


def test_every_alias_has_args_example_and_references() -> None:
    for name in aliases.__all__:
        fn = getattr(aliases, name)
        if not callable(fn):
            continue
        doc = inspect.getdoc(fn) or ""
        for section in ("Args:", "Example:", "References:"):
            assert section in doc, (name, section)
        # every parameter is described under Args (grouped names count)
        args = doc.split("Args:")[1].split("Example:")[0]
        for param in inspect.signature(fn).parameters:
            assert param in args, (name, param)
        assert getattr(lowbit_optax, name) is fn


# The aliases' docstring examples run in tests/test_docstrings.py with every public name's.


def test_coap_rejects_inner_together_with_adam_arguments() -> None:
    inner = optax.scale_by_adam()
    lowbit_optax.coap_adamw(1e-3, inner=inner)  # defaults: fine
    with pytest.raises(ValueError, match=r"inner= together with \{'b1': 0.8\}"):
        lowbit_optax.coap_adamw(1e-3, b1=0.8, inner=inner)
    with pytest.raises(ValueError, match="builds its own inner 8-bit Adam"):
        lowbit_optax.coap_adamw_8bit(1e-3, inner=inner)


def test_coap_8bit_signature_is_coap_adamw_s_with_its_own_defaults() -> None:
    sig = inspect.signature(lowbit_optax.coap_adamw_8bit).parameters
    coap = inspect.signature(lowbit_optax.coap_adamw).parameters
    assert set(coap) - {"inner"} <= set(sig)
    # shape-setting defaults are None (inject_hyperparams finds nothing to trace there),
    # resolved to the 8-bit recipe's own: S in bfloat16, blocks of 64
    assert sig["proj_dtype"].default is None and sig["block_size"].default is None
    assert not any(p.kind == p.VAR_KEYWORD for p in sig.values())
    tx = lowbit_optax.coap_adamw_8bit(1e-3, rank=4, min_dim=8, update_interval=3, min_size=1)
    state = tx.init({"w": jnp.ones((32, 16))})
    assert state[0].projectors["w"].shape == (16, 4)
    assert state[0].projectors["w"].dtype == jnp.bfloat16
    # the inner state is 32 x 4; each row padded to one 8-bit block of 64 values
    assert state[0].inner_state.mu_codes["w"].shape == (32, 64)


_SHAPE_SETTING = [
    ("adamw_8bit", "block_size", 64),
    ("adamw_4bit", "min_size", 16),
    ("solo_adamw", "quantile_sample", 8),
    ("slim_adamw", "block_size", 64),
    ("galore_adamw", "rank", 4),
    ("coap_adamw", "update_interval", 10),
    ("subtrack_adamw", "min_dim", 8),
    ("coap_adamw_8bit", "proj_dtype", jnp.float32),
    ("mfac", "num_grads", 8),
    ("sparse_mfac", "density", 0.05),
    ("ggt", "num_grads", 8),
]


@pytest.mark.parametrize(("name", "arg", "value"), _SHAPE_SETTING)
def test_shape_setting_argument_under_inject_hyperparams_names_the_fix(name, arg, value):
    """Every alias works under ``optax.inject_hyperparams`` with no ``static_args`` (the
    battery's ``inject_defaults``); an argument that sets shapes, passed there
    explicitly, is traced and must be static: the error says which and how."""
    alias, params = getattr(lowbit_optax, name), {"w": jnp.ones((32, 16))}
    tx = optax.inject_hyperparams(alias)(learning_rate=1e-3, **{arg: value})
    with pytest.raises(ValueError, match=rf"{arg} sets the shapes.*static_args=\('{arg}',\)"):
        tx.init(params)
    optax.inject_hyperparams(alias, static_args=(arg,))(learning_rate=1e-3, **{arg: value}).init(
        params
    )


def test_solo_adapts_its_quantile_sample_to_small_blocks():
    params = {"w": jnp.ones((4, 64))}
    for block in (8, 24, 32):  # 16 divides neither 8 nor 24
        tx = lowbit_optax.solo_adamw(1e-3, block_size=block, min_size=1)
        u, _ = jax.jit(tx.update)(params, tx.init(params), params)  # eager: 4 s a block
        assert jnp.all(jnp.isfinite(u["w"]))
    with pytest.raises(ValueError, match="quantile_sample must be"):
        lowbit_optax.solo_adamw(1e-3, block_size=32, quantile_sample=5)
