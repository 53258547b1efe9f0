"""lowbit_optax: memory-efficient optimizer state as composable optax transforms."""

from lowbit_optax.memory import LeafMemory, MemoryReport, memory_report, state_bytes

__version__ = "0.1.0.dev0"

__all__ = [
    "LeafMemory",
    "MemoryReport",
    "memory_report",
    "state_bytes",
]
