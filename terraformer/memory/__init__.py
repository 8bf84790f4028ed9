"""Memory: host offload of weights, optimizer slots and activations; quantized storage.

- `offload`: `MemoryEfficientTrainer` (the stack's weights and slots in pinned_host memory,
  per-block fused optimizer updates, chunked loss), memory-kind helpers.
- `quantize`: bf16 optimizer slots.
"""

from terraformer.memory.offload import (
    MemoryEfficientOptState,
    MemoryEfficientTrainer,
    host_memory_kind,
    make_memory_efficient_step,
    offload_reason,
    to_device,
    to_host,
)
from terraformer.memory.quantize import quantized_slots

__all__ = [
    "MemoryEfficientOptState",
    "MemoryEfficientTrainer",
    "host_memory_kind",
    "make_memory_efficient_step",
    "offload_reason",
    "quantized_slots",
    "to_device",
    "to_host",
]
