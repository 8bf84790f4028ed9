"""Memory: placement of arrays in device or host memory; quantized storage.

- `placement`: memory kinds, `to_host` / `to_device` (the memory-efficient trainer that uses
  them is `training.memory_efficient`).
- `quantize`: bf16 optimizer slots (int8 weights for decoding are `layers.core.PackedKernel`).
"""

from terraformer.memory.placement import (
    host_memory_kind,
    memory_kinds,
    offload_reason,
    to_device,
    to_host,
)
from terraformer.memory.quantize import quantized_slots

__all__ = [
    "host_memory_kind",
    "memory_kinds",
    "offload_reason",
    "quantized_slots",
    "to_device",
    "to_host",
]
