"""examples/train_lm.py: trains, checkpoints, and resumes bit-exactly (tiny model, in-process)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"
TINY = [
    "--depth", "1", "--width", "32", "--heads", "2", "--seq-len", "32",
    "--batch-size", "4", "--lr", "3e-3", "--eval-batches", "2", "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_lm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_a(train_lm: ModuleType) -> dict[str, Any]:
    """8 steps, uninterrupted, no checkpoints."""
    return train_lm.main([*TINY, "--steps", "8", "--eval-every", "4"])


def test_training_lowers_loss(run_a: dict[str, Any]) -> None:
    assert run_a["start_step"] == 0 and run_a["steps_done"] == 8
    assert len(run_a["train_losses"]) == 8
    assert sorted(run_a["eval_losses"]) == [0, 4, 8]
    # An untrained byte model sits near ln(256) = 5.55; 8 steps must bring it well below.
    assert run_a["eval_losses"][0] > 5.0
    assert run_a["final_eval_loss"] < run_a["eval_losses"][0] - 0.5
    assert run_a["train_losses"][-1] < run_a["train_losses"][0]
    assert 8.0 <= run_a["bytes_per_param"] < 8.01  # optax.adamw: two f32 moments + count


def test_resume_is_bit_exact(
    train_lm: ModuleType, run_a: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    ckpt = ["--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "2"]
    first = train_lm.main([*TINY, *ckpt, "--steps", "4"])
    assert (tmp_path / "ckpt" / "4").is_dir()
    assert first["train_losses"] == run_a["train_losses"][:4]
    # Halfway parameters differ from the final ones, so the comparison below can fail.
    assert not all(np.array_equal(first["params"][k], v) for k, v in run_a["params"].items())

    second = train_lm.main([*TINY, *ckpt, "--steps", "8", "--resume"])
    assert second["start_step"] == 4 and second["steps_done"] == 8
    # Same data stream after resume: the losses of steps 5..8 match the uninterrupted run.
    assert second["train_losses"] == run_a["train_losses"][4:]
    assert second["params"].keys() == run_a["params"].keys()
    for key, value in run_a["params"].items():
        assert np.array_equal(second["params"][key], value), key
    assert second["final_eval_loss"] == run_a["final_eval_loss"]

    with pytest.raises(ValueError, match="lr"):
        train_lm.main([*TINY, "--lr", "1e-2", *ckpt, "--steps", "9", "--resume"])  # last wins
    with pytest.raises(ValueError, match="--resume"):
        train_lm.main([*TINY, *ckpt, "--steps", "9"])


def test_checkpoint_keeps_empty_and_sub_byte_leaves(
    train_lm: ModuleType, tmp_path: pathlib.Path
) -> None:
    """optax.contrib.galore keeps empty projectors for vectors; quantized states may hold
    sub-byte codes. Orbax cannot store either as is; the example's helpers must."""
    state = {
        "empty": jnp.zeros((0, 3), jnp.float32),
        "u2": jnp.array([0, 1, 2, 3], jnp.uint2),
        "u4": jnp.arange(16, dtype=jnp.uint4).reshape(2, 8),
        "i2": jnp.array([-2, -1, 0, 1], jnp.int2),
        "i4": jnp.arange(-8, 8, dtype=jnp.int4),
        "bf16": jnp.linspace(-1, 1, 5, dtype=jnp.bfloat16),
        "key": jax.random.key_data(jax.random.key(7)),
        "f32": jnp.float32(np.pi),
    }
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=options)
    try:
        train_lm.save_checkpoint(mngr, 1, state, {"note": "x"})
        mngr.wait_until_finished()
        restored = train_lm.restore_checkpoint(mngr, 1, abstract)
    finally:
        mngr.close()
    assert restored.keys() == state.keys()
    for key, value in state.items():
        got = restored[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert np.array_equal(np.asarray(got, np.float64), np.asarray(value, np.float64)), key
