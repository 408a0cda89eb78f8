"""The embedded tiny default: a random tiny model plus a real byte-level BPE tokenizer, built offline.

Nothing is downloaded: the tokenizer is trained on a short embedded text, and the model comes from
``configs/tiny.py`` with random weights. Used by the README's main job and by the tests.
"""

from __future__ import annotations

import jax

from casa_jax.model.config import ModelSpec, TextConfig, text_config_to_hf

# The tiny default model (configs/tiny.py wraps it in an ml_collections ConfigDict).
TINY_MODEL = dict(
    vocab_size=512,  # the tokenizer below is trained to exactly this size or less
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=None,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    mrope_section=None,  # plain 1-D RoPE: exports as a Qwen2ForCausalLM
    tie_word_embeddings=True,
    attention_bias=True,
    max_position_embeddings=8192,  # the longest jailbreak-wrapped prompt takes ~5,700 tiny-tokenizer tokens
    dtype="float32",
    param_dtype="float32",
    remat_policy="none",
)
TINY_SEED = 0

# The tiny thinker (``write_tiny_thinker_dir``): the same decoder with 3-D multimodal RoPE, plus small
# vision and audio encoders, so the image and audio attack suites run on 2 CPU cores.
TINY_THINKER_TEXT = dict(TINY_MODEL, mrope_section=(2, 3, 3), tie_word_embeddings=True)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
                   fullatt_block_indexes=[1], spatial_merge_size=2, patch_size=14, temporal_patch_size=2,
                   in_channels=3, hidden_act="silu")
TINY_AUDIO = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
                  num_mel_bins=128, n_window=50, max_source_positions=1500)
TINY_IMAGE_PIXELS = (28 * 28 * 4, 28 * 28 * 64)  # min / max pixels: images resized to at most ~224 x 224

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen's ChatML template, with its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = """You are a helpful assistant. Give three tips for staying healthy: eat a balanced diet,
exercise regularly, and get enough sleep. The capital of France is Paris. Water boils at one hundred
degrees Celsius at sea level. Write a short poem about the sea: the waves roll in, the tide goes out,
the gulls cry over the grey water. I cannot help with that request, because it could cause harm.
Sorry, but I can't assist with that. Here is a recipe for bread: flour, water, salt and yeast.
Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.
How do I learn a new language? Practice every day, read, listen and speak with others.
"""


def build_tokenizer(vocab_size: int, omni: bool = False):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens, trained on ``CORPUS``.

    ``omni=True`` adds Qwen2.5-Omni's media tokens (``<|IMAGE|>``, ``<|AUDIO|>``, ...) as special tokens.
    """
    from casa_jax.processing import OMNI_SPECIAL_TOKENS

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = list(SPECIAL_TOKENS) + (list(OMNI_SPECIAL_TOKENS.values()) if omni else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   **({"extra_special_tokens": dict(OMNI_SPECIAL_TOKENS)} if omni else {}))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_spec(model: dict | None = None) -> ModelSpec:
    text = TextConfig.from_dict(model or TINY_MODEL)
    return ModelSpec(text=text, model_type="qwen2", hf_config=text_config_to_hf(text))


def random_params(text: TextConfig, seed: int = TINY_SEED) -> dict:
    """Randomly initialised decoder params (NumPy) for ``text``: the tiny default's weights."""
    import flax.linen as nn
    import numpy as np

    from casa_jax.model.text_decoder import CausalLM, init_inputs
    params = nn.unbox(CausalLM(text).init(jax.random.key(seed), *init_inputs())["params"])
    return jax.tree.map(np.asarray, params)


def write_tiny_hf_dir(out_dir: str, model: dict | None = None, seed: int = TINY_SEED,
                      overwrite: bool = False) -> str:
    """A Hugging Face directory (safetensors, config.json, tokenizer) of a random tiny model."""
    import tempfile


    from casa_jax.io.hf import write_hf_checkpoint

    spec = tiny_spec(model)
    params = random_params(spec.text, seed)
    with tempfile.TemporaryDirectory() as sidecar:
        tokenizer = build_tokenizer(spec.text.vocab_size)
        if len(tokenizer) > spec.text.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {spec.text.vocab_size}")
        tokenizer.save_pretrained(sidecar)
        write_hf_checkpoint(out_dir, params, spec, sidecar_dir=sidecar, overwrite=overwrite, progress=False)
    return out_dir


def tiny_thinker_config(tokenizer, text: dict | None = None) -> dict:
    """A ``qwen2_5_omni_thinker`` config.json for the tiny thinker, with ``tokenizer``'s media token ids."""
    t = dict(TINY_THINKER_TEXT, **(text or {}))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("audio_token_index", "<|AUDIO|>"), ("image_token_index", "<|IMAGE|>"), ("video_token_index", "<|VIDEO|>"),
        ("vision_start_token_id", "<|vision_bos|>"), ("vision_end_token_id", "<|vision_eos|>"),
        ("audio_start_token_id", "<|audio_bos|>"), ("audio_end_token_id", "<|audio_eos|>"))}
    text_config = {
        "model_type": "qwen2_5_omni_text", "vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"], "num_hidden_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"], "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": t["rms_norm_eps"], "max_position_embeddings": t["max_position_embeddings"],
        "hidden_act": "silu", "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": t["rope_theta"],
                            "mrope_section": list(t["mrope_section"])}}
    return {"model_type": "qwen2_5_omni_thinker", "architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"],
            "text_config": text_config, "tie_word_embeddings": t["tie_word_embeddings"],
            "vision_config": {"model_type": "qwen2_5_omni_vision_encoder", **TINY_VISION},
            "audio_config": {"model_type": "qwen2_5_omni_audio_encoder", **TINY_AUDIO},
            "position_id_per_seconds": 25, "seconds_per_chunk": 2, **ids}


def write_tiny_thinker_dir(out_dir: str, seed: int = TINY_SEED, overwrite: bool = False) -> str:
    """A Hugging Face thinker directory (as transformers saves ``Qwen2_5OmniThinkerForConditionalGeneration``:
    config.json, safetensors with ``model.*`` / ``visual.*`` / ``audio_tower.*``, tokenizer with the media
    tokens, preprocessor_config.json) of a random tiny thinker."""
    import json
    import os
    import tempfile

    import flax.linen as nn

    from casa_jax.io.hf import write_hf_checkpoint
    from casa_jax.model.config import spec_from_hf_config
    from casa_jax.model.encoder_config import encoder_configs
    from casa_jax.model.text_decoder import CausalLM, init_inputs
    from casa_jax.model.thinker import init_encoders

    tokenizer = build_tokenizer(TINY_MODEL["vocab_size"], omni=True)
    spec = spec_from_hf_config(tiny_thinker_config(tokenizer))
    if len(tokenizer) > spec.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {spec.text.vocab_size}")
    key = jax.random.key(seed)
    params = nn.unbox(CausalLM(spec.text).init(jax.random.fold_in(key, 0), *init_inputs())["params"])
    encoders = init_encoders(*encoder_configs(spec), jax.random.fold_in(key, 1))
    with tempfile.TemporaryDirectory() as sidecar:
        tokenizer.save_pretrained(sidecar)
        with open(os.path.join(sidecar, "preprocessor_config.json"), "w") as f:
            json.dump({"min_pixels": TINY_IMAGE_PIXELS[0], "max_pixels": TINY_IMAGE_PIXELS[1], "feature_size": 128,
                       "sampling_rate": 16000, "patch_size": TINY_VISION["patch_size"],
                       "merge_size": TINY_VISION["spatial_merge_size"],
                       "temporal_patch_size": TINY_VISION["temporal_patch_size"]}, f, indent=2)
        write_hf_checkpoint(out_dir, params, spec, encoders=encoders, sidecar_dir=sidecar, overwrite=overwrite,
                            progress=False)
    return out_dir
