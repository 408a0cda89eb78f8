"""int8 weight-only decoder layers: the int8 model computes exactly what its dequantized float weights
compute, stays close to the float model, and runs through the Engine (greedy replies, the CASA gate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from casa_jax import tiny
from casa_jax.infer.chat import chat_replies
from casa_jax.infer.engine import Engine, engine_from_parts
from casa_jax.model.layers import LoraSpec, model_variables
from casa_jax.model.quantize import dequantize, quantize_int8, weight_bytes
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
