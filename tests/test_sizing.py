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


MEMORY_CASES = [  # (remat, mesh, global batch, sequence, loss chunk): scaled-down, every remat kind, two meshes
    ("none", (1, 8, 1), 16, 128, 128), ("full", (1, 8, 1), 8, 512, 128),
    ("dots_with_no_batch_dims", (1, 8, 1), 16, 256, 64), ("none", (2, 2, 2), 16, 128, 64)]
MARGIN = (0.9, 1.35)  # estimate / XLA's peak: a slight over-estimate, never more than 10 % under


@pytest.mark.parametrize("remat,mesh,batch,seq,chunk", MEMORY_CASES)
def test_step_memory_estimate_matches_xla(remat, mesh, batch, seq, chunk):
    """``train_step_memory`` (shapes and sharding rules, no compile) against XLA's memory_analysis() of
    the trainer's real CASA step compiled for the same mesh on 8 simulated devices. Negative control: an
    estimate that forgets the logits chunk or the remat policy's saved activations falls outside the
    margin somewhere, so the terms are not padding."""
    from casa_jax.model.config import TextConfig
    from casa_jax.sizing import compiled_step_memory, train_step_memory
    text = TextConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, remat_policy=remat)
    measured = compiled_step_memory(text, mesh, batch, seq, lora_rank=8, loss_chunk=chunk)
    estimate = train_step_memory(text, mesh, batch // (mesh[0] * mesh[1]), seq, lora_rank=8, loss_chunk=chunk,
                                 frozen_dtype="float32")
    ratio = estimate.total / measured
    assert MARGIN[0] <= ratio <= MARGIN[1], (ratio, estimate, measured)
    without = estimate.total - max(estimate.loss, estimate.saved, estimate.gathered)
    assert without / measured < MARGIN[0], (without / measured, estimate)


def test_7b_recipe_fits_v5p_8_and_v5e_16():
    """The CLI prints, for the real 7B LoRA recipe, a mesh / remat / batch that fits each slice, and the
    estimate grows with what it is given: a 16 GiB v5e chip cannot hold the v5p-8 choice."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "casa_jax.sizing", "--config=configs/casa_qwen2_5_omni.py",
                          "--recipe=v5p-8,v5e-16"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {m.group(1): m for m in re.finditer(
        r"^(v5p-8|v5e-16): --config.mesh.shape='\((\d+), (\d+), (\d+)\)' --config.remat_policy=(\w+) "
        r"--config.per_device_batch_size=(\d+) --config.data.max_length=768: ([\d.]+) of (\d+) GiB", out.stdout, re.M)}
    assert set(lines) == {"v5p-8", "v5e-16"}, out.stdout
    for name, devices in (("v5p-8", 4), ("v5e-16", 16)):
        m = lines[name]
        assert int(m.group(2)) * int(m.group(3)) * int(m.group(4)) == devices
        assert float(m.group(7)) < float(m.group(8))
    from casa_jax.sizing import configs_from, train_step_memory
    text = configs_from(qwen2_5_omni_7b.get_config())[0]
    v5p = lines["v5p-8"]
    big = train_step_memory(text.replace(remat_policy=v5p.group(5)), (1, 16, 1), int(v5p.group(6)), 768, 16,
                            frozen_dtype="bfloat16")
    assert big.total > 16 * 1024 ** 3 or v5p.group(5) == lines["v5e-16"].group(5)
