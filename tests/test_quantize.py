"""Weight-only decoder formats. int8: the int8 model computes exactly what its dequantized float weights
compute, stays close to the float model, and runs through the Engine (greedy replies, the CASA gate).
bf16: a bf16 product, close to float with its LM head in bf16 too, and decoded by the Engine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from casa_jax import tiny
from casa_jax.infer.chat import chat_replies
from casa_jax.infer.engine import Engine, engine_from_parts
from casa_jax.model.layers import LoraSpec, bf16_dot, model_variables
from casa_jax.model.quantize import decode_bytes, dequantize, quantize_bf16, quantize_int8, weight_bytes
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM
from casa_jax.peft.lora import init_lora

from hf_fixtures import sharp_params


@pytest.fixture(scope="module")
def model():
    spec = tiny.tiny_spec()
    params = sharp_params(spec.text, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, spec.text.vocab_size, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :3].set(0)  # left padding on one row
    return spec, params, ids, mask


def _logits(cfg, variables, ids, mask, lora=LoraSpec()):
    return CausalLM(cfg, lora).apply(variables, ids, positions_from_mask(mask), mask).logits


def test_int8_equals_its_dequantized_weights_and_is_close_to_float(model):
    spec, params, ids, mask = model
    kept, quant = quantize_int8(params)
    assert "kernel" not in kept["layers"]["self_attn"]["q_proj"]  # a float reader of kept fails loudly
    assert quant["layers"]["self_attn"]["o_proj"]["kernel"].dtype == jnp.int8
    int8 = _logits(spec.text, model_variables(kept, quant=quant), ids, mask)
    deq = _logits(spec.text, model_variables(dequantize(kept, quant)), ids, mask)
    ref = _logits(spec.text, model_variables(params), ids, mask)
    np.testing.assert_allclose(int8, deq, rtol=2e-5, atol=2e-5)
    assert weight_bytes(kept, quant) < 0.6 * weight_bytes(params)
    # Close to float, and the error is the quantization's: a model with one layer's scales doubled
    # (a wrong-scale bug) is far off, so the tolerance can fail.
    err = float(jnp.max(jnp.abs(int8 - ref)))
    spread = float(jnp.max(jnp.abs(ref)))
    assert err < 0.05 * spread
    broken = jax.tree.map(lambda x: x, quant)
    broken["layers"]["mlp"]["down_proj"]["scale"] = broken["layers"]["mlp"]["down_proj"]["scale"] * 2
    bad = _logits(spec.text, model_variables(kept, quant=broken), ids, mask)
    assert float(jnp.max(jnp.abs(bad - ref))) > 4 * err


def test_int8_with_lora_adds_the_float_adapters(model):
    spec, params, ids, mask = model
    lspec = LoraSpec(4, targets=("q_proj", "down_proj"))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                        init_lora(spec.text, lspec, jax.random.key(1)))
    kept, quant = quantize_int8(params)
    int8 = _logits(spec.text, model_variables(kept, lora, quant), ids, mask, lspec)
    deq = _logits(spec.text, model_variables(dequantize(kept, quant), lora), ids, mask, lspec)
    np.testing.assert_allclose(int8, deq, rtol=2e-5, atol=2e-5)


def test_engine_int8_replies_match_the_dequantized_model(model):
    spec, params, _, _ = model
    tokenizer = tiny.build_tokenizer(spec.text.vocab_size)
    int8 = engine_from_parts(spec, params, tokenizer, weights="int8")
    kept, quant = quantize_int8(params)
    deq = engine_from_parts(spec, dequantize(kept, quant), tokenizer)
    prompts = ["Write a haiku about the sea.", "What is the capital of France?"]
    a = chat_replies(int8, prompts, max_new_tokens=8)
    b = chat_replies(deq, prompts, max_new_tokens=8)
    assert [r.text for r in a] == [r.text for r in b]
    with pytest.raises(ValueError, match="weights='bf4'"):
        Engine(int8.model, tokenizer, weights="bf4")


# -- bfloat16 weights -------------------------------------------------------------------------------------

def test_bf16_dot_is_a_bf16_product_and_one_row_equals_its_batched_row():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)  # [B, T, in]
    kernel = jnp.asarray(rng.standard_normal((40, 64)), jnp.bfloat16)  # [out, in]
    y = bf16_dot(x, kernel, 1)
    ref = jnp.einsum("bti,oi->bto", x.astype(jnp.bfloat16).astype(jnp.float32), kernel.astype(jnp.float32))
    assert y.shape == (3, 2, 40) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    one = bf16_dot(x[:1, :1], kernel, 1)  # a single row takes the padded path
    np.testing.assert_allclose(one, y[:1, :1], rtol=1e-6, atol=1e-6)
    # Control: a square kernel read input-major (the float layout) is a different product.
    square = kernel[:, :40]  # [40, 40]
    ref_square = jnp.einsum("bti,oi->bto", x[..., :40].astype(jnp.bfloat16).astype(jnp.float32),
                            square.astype(jnp.float32))
    np.testing.assert_allclose(bf16_dot(x[..., :40], square, 1), ref_square, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(bf16_dot(x[..., :40], square.T, 1) - ref_square))) > 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_model_is_close_to_float_with_a_bf16_head(model, tied):
    spec, params, ids, mask = model
    cfg = spec.text if tied else dataclasses.replace(spec.text, tie_word_embeddings=False)
    if not tied:  # an untied head: its own kernel [E, V]
        head = 0.2 * jax.random.normal(jax.random.key(5), (cfg.hidden_size, cfg.vocab_size))
        params = dict(params, lm_head={"kernel": head})
    kept, quant = quantize_bf16(params)
    assert "kernel" not in kept["layers"]["mlp"]["up_proj"]
    layers, n = quant["layers"], cfg.num_hidden_layers
    assert layers["mlp"]["gate_up_kernel"].shape == (n, 2 * cfg.intermediate_size, cfg.hidden_size)
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.resolved_head_dim
    assert layers["self_attn"]["qkv_kernel"].shape == (n, qkv, cfg.hidden_size)
    assert layers["self_attn"]["qkv_kernel"].dtype == jnp.bfloat16 and "q_proj" not in layers["self_attn"]
    assert layers["self_attn"]["o_proj"]["kernel"].dtype == jnp.bfloat16
    if tied:
        assert quant["embed_tokens"]["attend"].dtype == jnp.bfloat16
        assert decode_bytes(kept, quant) < 0.55 * weight_bytes(params)
    else:
        assert "kernel" not in kept["lm_head"] and quant["lm_head"]["kernel"].shape == (cfg.vocab_size, cfg.hidden_size)
    bf16 = _logits(cfg, model_variables(kept, quant=quant), ids, mask)
    ref = _logits(cfg, model_variables(params), ids, mask)
    deq = _logits(cfg, model_variables(dequantize(kept, quant, cfg)), ids, mask)
    with pytest.raises(ValueError, match="pass text="):
        dequantize(kept, quant)
    spread = float(jnp.max(jnp.abs(ref)))
    err = float(jnp.max(jnp.abs(bf16 - ref)))
    assert err < 0.03 * spread
    assert float(jnp.max(jnp.abs(bf16 - deq))) < 0.03 * spread  # the weights it holds are the ones it uses
    # Control: one layer's kernel scaled (a wrong-conversion bug) is far off, so the tolerance can fail.
    broken = jax.tree.map(lambda x: x, quant)
    broken["layers"]["mlp"]["down_proj"]["kernel"] = broken["layers"]["mlp"]["down_proj"]["kernel"] * 2
    bad = _logits(cfg, model_variables(kept, quant=broken), ids, mask)
    assert float(jnp.max(jnp.abs(bad - ref))) > 4 * err
    # Control for the fused split: q/k/v joined in another order (a wrong-offset bug) is far off too.
    swapped = jax.tree.map(lambda x: x, quant)
    fused = swapped["layers"]["self_attn"]["qkv_kernel"]
    q_size = cfg.num_attention_heads * cfg.resolved_head_dim
    swapped["layers"]["self_attn"]["qkv_kernel"] = jnp.concatenate([fused[:, q_size:], fused[:, :q_size]], 1)
    bad = _logits(cfg, model_variables(kept, quant=swapped), ids, mask)
    assert float(jnp.max(jnp.abs(bad - ref))) > 4 * err


def test_bf16_with_lora_adds_the_float_adapters_to_the_fused_products(model):
    spec, params, ids, mask = model
    lspec = LoraSpec(4, targets=("q_proj", "v_proj", "up_proj"))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                        init_lora(spec.text, lspec, jax.random.key(1)))
    kept, quant = quantize_bf16(params)
    with_lora = _logits(spec.text, model_variables(kept, lora, quant), ids, mask, lspec)
    without = _logits(spec.text, model_variables(kept, quant=quant), ids, mask, lspec)
    deq = _logits(spec.text, model_variables(dequantize(kept, quant, spec.text), lora), ids, mask, lspec)
    spread = float(jnp.max(jnp.abs(deq)))
    err = float(jnp.max(jnp.abs(with_lora - deq)))
    assert err < 0.03 * spread
    assert float(jnp.max(jnp.abs(without - deq))) > 4 * err  # the adapters matter at this size


def test_engine_bf16_decodes_what_its_model_scores(model):
    """The Engine's bf16 sampler (unrolled layers, KV cache) picks the bf16 model's own greedy tokens."""
    spec, params, _, _ = model
    tokenizer = tiny.build_tokenizer(spec.text.vocab_size)
    engine = engine_from_parts(spec, params, tokenizer, weights="bf16")
    assert engine.weights.quant["embed_tokens"]["attend"].dtype == jnp.bfloat16
    prompt = tokenizer.encode("Write a haiku about the sea.")
    tokens = engine.decoder(eos_ids=()).generate(engine.weights, [prompt], 6)[0].tokens  # no early stop
    kept, quant = quantize_bf16(params)
    ids = jnp.asarray([prompt + list(tokens)], jnp.int32)
    logits = _logits(spec.text, model_variables(kept, quant=quant), ids, jnp.ones_like(ids))
    assert list(tokens) == list(np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1)))
    with pytest.raises(ValueError, match="weights='bf16' runs on one device"):
        Engine(engine.model, tokenizer, weights="bf16", mesh=jax.sharding.Mesh(jax.devices()[:1], ("data",)))
