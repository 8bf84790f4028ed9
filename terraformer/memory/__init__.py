"""Memory: placement of arrays in device or host memory; quantized storage.

- `placement`: memory kinds, `to_host` / `to_device` (the memory-efficient trainer that uses
  them is `training.memory_efficient`).
- `quantize`: bf16 / int8 (per-channel) weight storage, dequantized inside the compiled step;
  bf16 optimizer slots.
"""

from terraformer.memory.placement import (
    host_memory_kind,
    memory_kinds,
    offload_reason,
    to_device,
    to_host,
)
from terraformer.memory.quantize import (
    QuantizedArray,
    QuantizedModel,
    dequantize,
    quantize,
    quantized_apply,
    quantized_slots,
)

__all__ = [
    "QuantizedArray",
    "QuantizedModel",
    "dequantize",
    "host_memory_kind",
    "memory_kinds",
    "offload_reason",
    "quantize",
    "quantized_apply",
    "quantized_slots",
    "to_device",
    "to_host",
]
