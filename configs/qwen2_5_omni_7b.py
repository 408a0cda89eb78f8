"""Qwen2.5-Omni-7B thinker, as published in Qwen/Qwen2.5-Omni-7B config.json (thinker_config)."""

from configs import qwen2_5_omni_common as common


def get_config():
    return common.thinker_config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
