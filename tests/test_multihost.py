"""Multi-process training on JAX's distributed runtime (gloo collectives on CPU).

Three runs of tests/multihost_worker.py with examples/train_multihost.py's pieces, every
optimizer of the issue in each (see the worker's docstring): 2 processes x 4 devices on
an 8-way FSDP mesh (``train``), 1 process x 8 devices on the same mesh (``single``), and
2 processes x 4 devices on a 4x2 mesh (``reshard``). The two later runs restore the
checkpoint the two processes of ``train`` wrote.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from jax._src.lib import _jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

import multihost_worker  # noqa: E402
import train_multihost  # noqa: E402

OPTIMIZERS = [
    "adamw_8bit", "solo_adamw", "slim_adamw", "galore_adamw", "coap_adamw_8bit", "sparse_mfac",
    "lion_8bit",
]  # fmt: skip
TIMEOUT = 600  # seconds for one run (about 50 s each on 2 cores)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(_jax, "make_gloo_tcp_collectives"),
        reason="this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives), which "
        "multi-process CPU runs need",
    ),
]


def test_the_worker_runs_the_issue_optimizers() -> None:
    assert list(multihost_worker.optimizers()) == OPTIMIZERS


def _run_all(out: pathlib.Path) -> None:
    for role, processes in [("train", 2), ("single", 1), ("reshard", 2)]:
        argv = ["--role", role, "--out", str(out)]
        if processes == 1:
            cmd = [sys.executable, str(WORKER), *argv, "--cpu-devices", "8"]
            rc = subprocess.run(cmd, timeout=TIMEOUT, env=dict(os.environ)).returncode
        else:
            rc = train_multihost.launch(processes, argv, 4, timeout=TIMEOUT, script=str(WORKER))
        assert rc == 0, f"the {role} run failed (exit {rc}); its output is above"


def _load(out: pathlib.Path) -> dict[str, Any]:
    roles = {}
    for role, processes in [("train", 2), ("single", 1), ("reshard", 2)]:
        results = dict(np.load(out / f"{role}.npz"))
        fractions = [
            json.loads((out / f"{role}.fraction.{p}.json").read_text()) for p in range(processes)
        ]
        roles[role] = (results, fractions)
    return roles


def _tree(runs, role: str, name: str, tag: str) -> dict[str, np.ndarray]:
    prefix = f"{name}/{tag}/"
    got = {k[len(prefix) :]: v for k, v in runs[role][0].items() if k.startswith(prefix)}
    assert got, f"{role} recorded no {tag} for {name}"
    return got


def two_processes_train_as_one(runs, name: str) -> None:
    initial = _tree(runs, "train", name, "initial")
    two, one = _tree(runs, "train", name, "final"), _tree(runs, "single", name, "final")
    assert two.keys() == one.keys() == initial.keys()
    moved = max(float(np.max(np.abs(two[k] - initial[k]))) for k in two)
    assert moved > 5e-3, "six steps must move the params, or the comparison means nothing"
    for k in two:  # float32 reductions in another order; 8-bit codes may round apart
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-4, err_msg=k)


def each_process_holds_half_of_every_large_state_leaf(runs, name: str) -> None:
    per_process = runs["train"][1]
    assert len(per_process) == 2
    for held in per_process:
        assert held[name], f"{name} has no state leaf of {multihost_worker.LARGE}+ values"
        assert held[name] == {k: 0.5 for k in held[name]}
    # the single-process run holds everything, so the check above can tell the two apart
    assert set(runs["single"][1][0][name].values()) == {1.0}


def a_two_process_checkpoint_restores_exactly_into_another_layout(runs, name: str) -> None:
    saved = _tree(runs, "train", name, "saved_state")
    for role in ("single", "reshard"):
        restored = _tree(runs, role, name, "restored_state")
        assert saved.keys() == restored.keys()
        for k in saved:
            np.testing.assert_array_equal(restored[k], saved[k], err_msg=f"{role} {k}")
            assert restored[k].dtype == saved[k].dtype, k


def training_continues_from_the_checkpoint(runs, name: str) -> None:
    final = _tree(runs, "train", name, "final")
    # same processes and mesh: the resumed run is the uninterrupted one, bit for bit
    resumed = _tree(runs, "train", name, "resumed")
    for k in final:
        np.testing.assert_array_equal(resumed[k], final[k], err_msg=k)
    # 1 x 8 devices, or another mesh shape: the same steps up to float32 reduction order
    for role in ("single", "reshard"):
        other = _tree(runs, role, name, "resumed")
        for k in final:
            np.testing.assert_allclose(other[k], final[k], rtol=0, atol=1e-4, err_msg=k)


CHECKS = (
    two_processes_train_as_one,
    each_process_holds_half_of_every_large_state_leaf,
    a_two_process_checkpoint_restores_exactly_into_another_layout,
    training_continues_from_the_checkpoint,
)


def test_multi_process_training(tmp_path: pathlib.Path, subtests) -> None:
    """The three runs once (one test: the runs take both cores, and a second xdist worker
    would only wait for them), then every check for every optimizer as a subtest."""
    _run_all(tmp_path)
    runs = _load(tmp_path)
    for check in CHECKS:
        for name in OPTIMIZERS:
            with subtests.test(msg=check.__name__, optimizer=name):
                check(runs, name)
