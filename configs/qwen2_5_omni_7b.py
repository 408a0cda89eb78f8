"""Qwen2.5-Omni-7B thinker, as published in Qwen/Qwen2.5-Omni-7B config.json (thinker_config)."""

import ml_collections

from configs import qwen2_5_omni_common as common


def get_config():
    config = ml_collections.ConfigDict()
    config.model = common.text(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    config.vision = common.vision(out_hidden_size=3584)
    config.audio = common.audio(output_dim=3584)
    config.thinker = ml_collections.ConfigDict(common.THINKER_TOKENS)
    config.seed = 0
    return config
