"""Real sizes on paper: our 3B/7B configs have exactly transformers' parameter counts (meta device),
and the memory report's exact parts add up."""

import math

import pytest
import torch
import transformers

from casa_jax.sizing import configs_from, count_params, memory_report
from configs import qwen2_5_omni_3b, qwen2_5_omni_7b


def _hf_thinker(config):
    m = config.model
    text = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_key_value_heads, rms_norm_eps=m.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta,
                                 "mrope_section": list(m.mrope_section)})
    cfg = transformers.Qwen2_5OmniThinkerConfig(text_config=text, vision_config=config.vision.to_dict(),
                                                audio_config=config.audio.to_dict(),
                                                tie_word_embeddings=m.tie_word_embeddings)
    with torch.device("meta"):
        model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    parts = {"decoder": ("model.language_model.", "lm_head."), "vision": ("model.visual.",),
             "audio": ("model.audio_tower.",)}
    counts = {k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(v)) for k, v in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


@pytest.mark.parametrize("module", [qwen2_5_omni_3b, qwen2_5_omni_7b], ids=["3B", "7B"])
def test_parameter_counts_equal_transformers(module):
    config = module.get_config()
    ours = count_params(*configs_from(config))
    assert ours == _hf_thinker(config)


def test_memory_report_exact_parts():
    text, vision, audio = configs_from(qwen2_5_omni_7b.get_config())
    total = count_params(text, vision, audio)["total"]
    full = memory_report(text, vision, audio, devices=16, mode="full")
    gib = 1024 ** 3
    assert full.trainable_params == count_params(text)["decoder"]
    # fp32 params sharded over 16 devices, except dims fsdp cannot split (norms, biases, vision MLP 3420)
    assert total * 4 / 16 / gib <= full.params <= total * 4 / 16 / gib * 1.05
    assert math.isclose(full.optimizer, 2 * full.grads)
    lora = memory_report(text, vision, audio, devices=16, mode="lora", lora_rank=8)
    assert lora.trainable_params < full.trainable_params / 100 and lora.grads < full.grads / 100
    with pytest.raises(ValueError, match="does not use 16 devices"):
        memory_report(text, vision, audio, devices=16, mesh=(2, 2, 2))
