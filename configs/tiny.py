"""The embedded tiny default: a 2-layer Qwen2.5-style decoder that runs in seconds on a laptop CPU.

Random-initialised; it shows the mechanics (conversion, decoding, later CASA training), not quality.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=512,  # matches the demo's byte-level BPE tokenizer (casa_jax.tiny)
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=None,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        mrope_section=None,  # plain 1-D RoPE; exports as a Qwen2ForCausalLM
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=2048,
        dtype="float32",
        param_dtype="float32",
        remat_policy="none",
    ))
    config.seed = 0
    return config
