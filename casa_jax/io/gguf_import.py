"""Import a llama.cpp GGUF file of a Llama-family model (e.g. SmolLM2) without torch.

Tensors are read with the ``gguf`` package (NumPy) and dequantized to float32 (F32, F16, BF16, Q8_0,
Q4_0/Q4_1, Q5_0/Q5_1, K-quants: whatever ``gguf.quants`` supports); llama.cpp names (``token_embd``,
``blk.N.attn_q``, ...) map to Hugging Face ones, and llama.cpp's row permutation of the q/k projections
(its rotary layout) is undone. The config comes from the file's ``llama.*`` metadata, the tokenizer and
chat template from its ``tokenizer.*`` metadata (through transformers' GGUF tokenizer support). The
result is an ordinary Hugging Face directory, which ``hf_to_ckpt`` then converts.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from casa_jax.io import hf_files
from casa_jax.io.hf_files import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)
TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PER_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _reader(path: str):
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def metadata(reader, keys_prefix: str = "") -> dict:
    """Scalar and string metadata of a GGUF file (arrays, e.g. the vocabulary, are left out)."""
    import gguf
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(keys_prefix) and field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            out[key] = field.contents()
    return out


def hf_config(meta: dict, tensor_names: set[str], path: str = "GGUF") -> dict:
    """A transformers ``LlamaConfig`` dict from the file's metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture={arch!r} is not supported; expected one of "
                              f"{SUPPORTED_ARCHITECTURES}")

    def need(key):
        if f"{arch}.{key}" not in meta:
            raise CheckpointError(f"{path}: metadata key {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta.get(f"{arch}.rope.dimension_count", hidden // heads))
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise CheckpointError(f"{path}: rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    vocab = meta.get(f"{arch}.vocab_size")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0))},
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    return cfg


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``): per head, rows
    were interleaved (r0, r_half, r1, r_half+1, ...); transformers expects the two halves in turn."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face key of a llama.cpp tensor name (None for tensors we do not use, e.g. rope_freqs)."""
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in PER_BLOCK:
        return f"model.layers.{int(parts[1])}.{PER_BLOCK[parts[2]]}.{parts[3]}"
    return None


def dequantized_tensors(reader, config: dict, path: str = "GGUF") -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, float32 array) for every model tensor, dequantized and with q/k un-permuted."""
    from gguf.quants import dequantize
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name.startswith(("rope_freqs", "rope_factors")):
                continue
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has no Llama counterpart")
        try:
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {tensor.name} uses {tensor.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize ({e})") from e
        array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # GGUF lists dims fastest first
        if name.endswith("q_proj.weight"):
            array = unpermute(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = unpermute(array, config["num_key_value_heads"])
        yield name, np.ascontiguousarray(array)


def gguf_to_hf_dir(gguf_path: str, out_dir: str, overwrite: bool = False) -> dict:
    """Write ``gguf_path`` as a Hugging Face directory (float32 safetensors, config.json, tokenizer with
    its chat template); returns the config. Atomic: an interrupted write leaves ``out_dir`` untouched."""
    reader = _reader(gguf_path)
    meta = metadata(reader)
    config = hf_config(meta, {t.name for t in reader.tensors}, gguf_path)
    tokenizer = gguf_tokenizer(gguf_path, reader)
    if config["vocab_size"] is None:
        config["vocab_size"] = len(tokenizer)
    with hf_files.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        hf_files.write_safetensors(tmp, dequantized_tensors(reader, config, gguf_path), 5 * 1024**3)
        hf_files.write_json(os.path.join(tmp, "config.json"), config)
        tokenizer.save_pretrained(tmp)
    return config


TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores")


def gguf_tokenizer(gguf_path: str, reader=None):
    """The file's tokenizer and chat template from its ``tokenizer.*`` metadata, built by transformers'
    GGUF tokenizer converter (the same one ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` uses) but
    fed by the ``gguf`` reader, so no torch is needed."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    reader = reader or _reader(gguf_path)
    meta = metadata(reader)
    for key in TOKENIZER_ARRAYS:
        if key in reader.fields:
            meta[key] = reader.fields[key].contents()
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{gguf_path}: no tokenizer.ggml.tokens in its metadata; cannot build a tokenizer")
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # as transformers does for sentencepiece files without the flag
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise CheckpointError(f"{gguf_path}: cannot build a tokenizer from its metadata ({e})") from e
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in {**config, **extra}.items()
                                                                if v is not None})
