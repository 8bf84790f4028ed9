"""Models built from layers: the dense baseline, Reformer and Terraformer.

`stack` holds what they share: attention and feed-forward per layer, positions, the reversible
stack of blocks and the merge of its two streams.
"""

from terraformer.models.encoder_decoder import Reformer, Terraformer
from terraformer.models.reformer import ReformerLM
from terraformer.models.terraformer import TerraformerLM
from terraformer.models.transformer import TransformerLM
