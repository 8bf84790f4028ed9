"""Ring attention over a mesh's sequence axis: the kernel and the layer live in
`terraformer.layers.ring` (a layer, which `layers.attention_types` registers as 'ring'); this
module keeps the names where the mesh code and its users look for them."""

from terraformer.layers.ring import (  # noqa: F401
    RING_CHUNK_LEN,
    RingSelfAttention,
    ring_attention,
    sequence_shards,
)
