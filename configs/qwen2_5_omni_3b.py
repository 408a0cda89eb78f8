"""Qwen2.5-Omni-3B thinker, as published in Qwen/Qwen2.5-Omni-3B config.json (thinker_config)."""

from configs import qwen2_5_omni_common as common


def get_config():
    return common.thinker_config(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2)
