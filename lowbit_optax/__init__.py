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
from lowbit_optax.snr import (
    ScaleBySlimAdamState,
    SNRCalibrationState,
    candidate_axes,
    flax_default_rules,
    removed_fraction,
    resolve_rules,
    rules_from_json,
    rules_from_snr,
    rules_to_json,
    scale_by_slim_adam,
    slim_adamw,
    slim_state_from_adam,
    snr,
    snr_calibration,
    snr_records,
    snr_table,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "Codec",
    "LeafMemory",
    "MemoryReport",
    "QuantizedArray",
    "SNRCalibrationState",
    "ScaleByQuantizedAdamState",
    "ScaleBySlimAdamState",
    "adamw_4bit",
    "adamw_8bit",
    "candidate_axes",
    "dequantize",
    "dynamic_exponent_levels",
    "dynamic_tree_levels",
    "flax_default_rules",
    "linear_levels",
    "memory_report",
    "quantize",
    "removed_fraction",
    "resolve_rules",
    "rules_from_json",
    "rules_from_snr",
    "rules_to_json",
    "scale_by_quantized_adam",
    "scale_by_slim_adam",
    "slim_adamw",
    "slim_state_from_adam",
    "snr",
    "snr_calibration",
    "snr_records",
    "snr_table",
    "solo_adamw",
    "state_bytes",
]
