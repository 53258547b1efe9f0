"""The named optimizers (``lowbit_optax.aliases``): documented as optax documents its
aliases, with examples that run, and arguments that conflict rejected."""

from __future__ import annotations

import doctest
import inspect

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


def test_alias_examples_run() -> None:
    result = doctest.testmod(aliases)
    assert result.attempted >= 2 * sum(callable(getattr(aliases, n)) for n in aliases.__all__)
    assert result.failed == 0


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
    assert sig["proj_dtype"].default is jnp.bfloat16 and sig["block_size"].default == 64
    assert not any(p.kind == p.VAR_KEYWORD for p in sig.values())
    tx = lowbit_optax.coap_adamw_8bit(1e-3, rank=4, min_dim=8, update_interval=3)
    state = tx.init({"w": jnp.ones((32, 16))})
    assert state[0].projectors["w"].shape == (16, 4)
