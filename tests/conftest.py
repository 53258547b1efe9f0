"""Test session setup: 8 simulated CPU devices, set before JAX is imported.

The contract battery's sharding checks need several devices; forcing 8 host
devices costs nothing for single-device tests (they run on device 0).
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist runs one process per core; LAPACK's own threads (SVD, QR, eigh in the
# projection tests and the benchmark subprocess, which inherits this) would oversubscribe
# the cores, which made small SVDs 30x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

if len(jax.devices()) < 8:  # jax was imported before this conftest with other flags
    raise RuntimeError(
        f"tests need 8 simulated CPU devices, got {len(jax.devices())}: run pytest in a "
        "fresh process so tests/conftest.py can set XLA_FLAGS before jax is imported"
    )
