"""Test session setup: 8 simulated CPU devices, set before JAX is imported.

The contract battery's sharding checks need several devices; forcing 8 host
devices costs nothing for single-device tests (they run on device 0).
"""

import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist runs one process per core; LAPACK's own threads (SVD, QR, eigh in the
# projection tests and the benchmark subprocess, which inherits this) would oversubscribe
# the cores, which made small SVDs 30x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One persistent compilation cache for the session, shared by the xdist workers and the
# subprocesses (they inherit the environment the controller sets here, before it starts
# them): the battery compiles the same update in several checks. A fresh directory per
# session (removed at its end), so no run reads another's entries.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowbit-optax-jax-cache-")
    os.environ["LOWBIT_OPTAX_TEST_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax

if len(jax.devices()) < 8:  # jax was imported before this conftest with other flags
    raise RuntimeError(
        f"tests need 8 simulated CPU devices, got {len(jax.devices())}: run pytest in a "
        "fresh process so tests/conftest.py can set XLA_FLAGS before jax is imported"
    )


def pytest_unconfigure(config) -> None:
    """The controller removes the session's compilation cache (workers leave it)."""
    cache = os.environ.get("LOWBIT_OPTAX_TEST_CACHE")
    if cache and not hasattr(config, "workerinput"):
        shutil.rmtree(cache, ignore_errors=True)
