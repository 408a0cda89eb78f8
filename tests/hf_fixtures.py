"""Tiny random Hugging Face checkpoints with sharp weights, made with transformers itself, in every layout
we read; plus the edits the negative controls break our side with."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

TEXT = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256)
VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=48, window_size=56,
              fullatt_block_indexes=[1], spatial_merge_size=2, patch_size=14, temporal_patch_size=2)
AUDIO = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=48,
             num_mel_bins=128, n_window=8, max_source_positions=64)


def make_qwen2(path: str, seed: int = 0, tie: bool = False, max_shard_size: str | None = None, **text) -> str:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**TEXT, **text}, tie_word_embeddings=tie,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    sharpen(model, seed)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def make_llama(path: str, seed: int = 0, tie: bool = True, rope_theta: float = 100000.0, **text) -> str:
    """A tiny LlamaForCausalLM (SmolLM2's family: no q/k/v bias, tied embeddings, plain RoPE)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TEXT, "rms_norm_eps": 1e-5, **text}, tie_word_embeddings=tie,
                                   rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    model = transformers.LlamaForCausalLM(cfg).eval()
    sharpen(model, seed)
    model.save_pretrained(path)
    return path


# Special tokens inside the tiny vocab (the real ones, ~151k, would not fit).
THINKER_TOKENS = dict(audio_token_index=90, image_token_index=91, video_token_index=92, vision_start_token_id=93,
                      vision_end_token_id=94, audio_start_token_id=95, audio_end_token_id=96)


def make_thinker(path: str, seed: int = 0, mrope_section=(2, 1, 1), tie: bool = False,
                 max_shard_size: str | None = None, vision: dict | None = None, audio: dict | None = None,
                 **text) -> str:
    """A thinker saved by transformers: keys ``model.*``, ``lm_head.*``, ``visual.*``, ``audio_tower.*``."""
    torch.manual_seed(seed)
    text_cfg = {**TEXT, **text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": list(mrope_section)}}
    cfg = transformers.Qwen2_5OmniThinkerConfig(text_config=text_cfg, vision_config={**VISION, **(vision or {})},
                                                audio_config={**AUDIO, **(audio or {})}, tie_word_embeddings=tie,
                                                **THINKER_TOKENS)
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    sharpen(model, seed)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def make_hub_omni(thinker_dir: str, path: str, shards: int = 1) -> str:
    """The hub layout of a Qwen2.5-Omni repo: ``qwen2_5_omni`` config with ``thinker_config`` nested,
    keys prefixed ``thinker.``, plus ``talker.*`` / ``token2wav.*`` tensors we must ignore."""
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name in sorted(os.listdir(thinker_dir)):
        if name.endswith(".safetensors"):
            tensors.update({"thinker." + k: v for k, v in load_file(os.path.join(thinker_dir, name)).items()})
    tensors["talker.model.embed_tokens.weight"] = torch.zeros(4, 3)
    tensors["token2wav.code2wav_dit_model.proj.weight"] = torch.zeros(2, 2)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(thinker_dir, "config.json")) as f:
        thinker_cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniModel"],
                   "enable_audio_output": False, "thinker_config": thinker_cfg}, f)
    return path


# Sharp weights (DESIGN "Tolerances"): default init (std 0.02) gives near-uniform attention and logits of
# ~0.1, under which a RoPE, mask or mapping bug hides; these give peaked attention and logits of O(1-10).
SHARP_GAIN = 1.6  # std = SHARP_GAIN / sqrt(fan_in); an embedding's fan-in is its width (it is the tied head)
SHARP_BIAS = 0.3  # bias std
SHARP_NORM = (0.5, 1.5)  # norm weights uniform in this range


def sharpen_tensors(tensors: dict, seed: int = 0) -> dict:
    """Redraw ``name -> tensor`` (torch layout ``[out, *in]``) in place, seeded, in sorted name order:
    matrices, convolutions and embeddings std SHARP_GAIN / sqrt(fan_in), biases std SHARP_BIAS, other 1-D
    weights (norms) uniform in SHARP_NORM."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            if not t.is_floating_point():
                continue
            if t.ndim >= 2:
                value = SHARP_GAIN / math.sqrt(t[0].numel()) * torch.randn(t.shape, generator=gen)
            elif name.endswith("bias"):
                value = SHARP_BIAS * torch.randn(t.shape, generator=gen)
            else:
                lo, hi = SHARP_NORM
                value = lo + (hi - lo) * torch.rand(t.shape, generator=gen)
            t.copy_(value.to(t.dtype))
    return tensors


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``sharpen_tensors`` on a transformers model's parameters (a tied head is drawn once, as the embedding)."""
    sharpen_tensors(dict(model.named_parameters()), seed)
    return model


def sharpen_dir(path: str, seed: int = 0) -> str:
    """``sharpen_tensors`` on every safetensors file of a checkpoint directory (written by anyone), rewritten
    in place; config, tokenizer and index are untouched."""
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    for i, name in enumerate(names):
        tensors = load_file(os.path.join(path, name))
        save_file(sharpen_tensors(tensors, seed + i), os.path.join(path, name), metadata={"format": "pt"})
    return path


def sharp_params(cfg, seed: int = 0) -> dict:
    """Decoder params (NumPy) for a casa-jax ``TextConfig``: ``sharpen_tensors`` draws them in the Hugging Face
    layout, our import rules (``name_map.text_rules``) map them to the params tree."""
    from casa_jax.io.name_map import text_rules
    rules = text_rules(cfg)
    keys = {r.path: [r.hf_key.format(layer=i) for i in range(r.num_layers)] if r.per_layer else [r.hf_key]
            for r in rules}
    tensors = sharpen_tensors({k: torch.empty(r.hf_shape) for r in rules for k in keys[r.path]}, seed)
    params: dict = {}
    for r in rules:
        values = [r.to_jax(tensors[k].numpy()) for k in keys[r.path]]
        node = params
        for name in r.path[:-1]:
            node = node.setdefault(name, {})
        node[r.path[-1]] = np.stack(values) if r.per_layer else values[0]
    return params


# Negative controls: breaks applied on our side only, so transformers' logits stay the reference.

def replace_leaf(tree: dict, path: tuple[str, ...], fn) -> dict:
    """A copy of the nested dict ``tree`` with the leaf at ``path`` replaced by ``fn(leaf)`` (the rest shared)."""
    head, *rest = path
    return {**tree, head: replace_leaf(tree[head], tuple(rest), fn) if rest else fn(tree[head])}


def zero_qkv_bias(params: dict) -> dict:
    """Decoder params with the q/k/v biases dropped (zero)."""
    for proj in ("q_proj", "k_proj", "v_proj"):
        params = replace_leaf(params, ("layers", "self_attn", proj, "bias"), np.zeros_like)
    return params


def pad_key_visible(mask):
    """The attention mask shifted by one slot: each left-padded row also attends to its last pad."""
    return mask | np.roll(mask, -1, axis=1)


def make_llama_gguf(path: str, seed: int = 0, types: dict | None = None, **text) -> str:
    """A tiny Llama written as llama.cpp's converter writes it: ``llama.*`` metadata, a byte-level BPE
    tokenizer (``gpt2``) with ChatML template, tensors named ``blk.N.attn_q`` ..., q/k rows permuted,
    quantized per ``types`` (name fragment -> GGMLQuantizationType name; F32 otherwise)."""
    import json as _json

    import gguf

    from casa_jax import tiny
    tok = tiny.build_tokenizer(320)
    cfg = {**TEXT, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "rms_norm_eps": 1e-5, **text}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **cfg, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0})).eval()
    sharpen(model, seed)
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w, n):  # convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_rope_dimension_count(cfg["hidden_size"] // h)
    writer.add_vocab_size(cfg["vocab_size"])
    spec = _json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    specials = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [t for t, _ in vocab] + ["[PAD%d]" % i for i in range(cfg["vocab_size"] - len(vocab))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials or t.startswith("[PAD") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(specials["<|im_start|>"])
    writer.add_eos_token_id(specials["<|im_end|>"])
    writer.add_pad_token_id(specials["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tiny.CHAT_TEMPLATE)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied
        w = value.float().numpy()
        if key.startswith("model.layers."):
            layer, rest = key[len("model.layers."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{block[part]}.{kind}"
            if part == "self_attn.q_proj":
                w = permute(w, h)
            elif part == "self_attn.k_proj":
                w = permute(w, kv)
        else:
            name = names[key]
        qtype = next((gguf.GGMLQuantizationType[t] for frag, t in (types or {}).items() if frag in name),
                     gguf.GGMLQuantizationType.F32)
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
