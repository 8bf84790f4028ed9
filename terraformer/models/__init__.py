"""Models built from layers: the dense baseline, Reformer and Terraformer."""

from terraformer.models.encoder_decoder import Reformer, Terraformer
from terraformer.models.reformer import ReformerLM
from terraformer.models.terraformer import TerraformerLM
from terraformer.models.transformer import TransformerLM
