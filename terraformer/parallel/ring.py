"""Attention over a mesh's sequence axis: the kernels live in `terraformer.layers.ring`
(ring attention for full and blockwise attention, a halo exchange for chunked local attention)
and the 'ring' layer in `terraformer.layers.attention` (layers may not import parallel); this
module keeps the names where the mesh code and its users look for them."""

from terraformer.layers.attention import RingSelfAttention  # noqa: F401
from terraformer.layers.ring import (  # noqa: F401
    RING_CHUNK_LEN,
    halo_attention,
    ring_attention,
    sequence_shards,
)
