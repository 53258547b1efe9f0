"""lowbit_optax: memory-efficient optimizer state as composable optax transforms."""

from lowbit_optax.memory import LeafMemory, MemoryReport, memory_report, state_bytes
from lowbit_optax.quantization import (
    Codec,
    QuantizedArray,
    dequantize,
    dynamic_exponent_levels,
    dynamic_tree_levels,
    linear_levels,
    quantize,
)
from lowbit_optax.quantized import (
    ScaleByQuantizedAdamState,
    adamw_4bit,
    adamw_8bit,
    scale_by_quantized_adam,
    solo_adamw,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "Codec",
    "LeafMemory",
    "MemoryReport",
    "QuantizedArray",
    "ScaleByQuantizedAdamState",
    "adamw_4bit",
    "adamw_8bit",
    "dequantize",
    "dynamic_exponent_levels",
    "dynamic_tree_levels",
    "linear_levels",
    "memory_report",
    "quantize",
    "scale_by_quantized_adam",
    "solo_adamw",
    "state_bytes",
]
