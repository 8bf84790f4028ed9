"""The efficient-attention family of the Long Range Arena study, a module each.

Every layer follows the Reformer convention of `SelfAttention`/`LSHSelfAttention`
(`n_heads=, d_qk=, d_v=, causal=, output_dropout=, mode=`) and is registered by name in
`terraformer.layers.attention_types`. Import the modules directly
(`from terraformer.layers.efficient.performer import PerformerAttention`).
"""
