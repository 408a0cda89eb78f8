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
    max_position_embeddings=2048,
    dtype="float32",
    param_dtype="float32",
    remat_policy="none",
)
TINY_SEED = 0

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


def write_tiny_hf_dir(out_dir: str, model: dict | None = None, seed: int = TINY_SEED,
                      overwrite: bool = False) -> str:
    """A Hugging Face directory (safetensors, config.json, tokenizer) of a random tiny model."""
    import tempfile

    import flax.linen as nn

    from casa_jax.checkpoints.hf import write_hf_checkpoint
    from casa_jax.model.text_decoder import CausalLM, init_inputs

    spec = tiny_spec(model)
    params = nn.unbox(CausalLM(spec.text).init(jax.random.key(seed), *init_inputs())["params"])
    with tempfile.TemporaryDirectory() as sidecar:
        tokenizer = build_tokenizer(spec.text.vocab_size)
        if len(tokenizer) > spec.text.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {spec.text.vocab_size}")
        tokenizer.save_pretrained(sidecar)
        write_hf_checkpoint(out_dir, params, spec, sidecar_dir=sidecar, overwrite=overwrite, progress=False)
    return out_dir
