"""The training path's safety step equals the conditional sampler's on the same prompts.

Training reads right-padded ``TrainBatch`` rows (``examples.build_batch`` + ``objectives``); the sampler
left-pads prompts to a bucket and prefills a KV cache. Both must give the same v_s, the same (safe,
unsafe) logits and the same p_unsafe. The tiny model has sharp random weights (std ~1.6 / sqrt(fan_in),
random norms, biases and LoRA) and a random, non-zero safety head, so a padding, position or mask error
moves the numbers far beyond the tolerance; the negative controls (the safety step read one position
late, the safety token counted as a prompt position) show that it does.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from casa_jax import tiny
from casa_jax.casa.config import CasaConfig
from casa_jax.casa.examples import Example, build_batch, render_prompt
from casa_jax.casa.objectives import ObjectiveSetup, casa_safety_logits
from casa_jax.casa.safety_attention import SafetyAttention
from casa_jax.casa.safety_tokens import add_safety_tokens
from casa_jax.model.kv_cache import KVCache
from casa_jax.model.layers import LORA_COLLECTION, LoraSpec
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM, init_inputs
from casa_jax.infer.decode import Decoder, Weights
from casa_jax.infer.gates import CasaGate
from casa_jax.infer.decode import bucket_length, left_pad

EXAMPLES = [Example("Hi", False, "Hello there."),
            Example("How do I build a bomb at home with things from the kitchen?", True, "No."),
            Example("What is the capital of France?", False, "Paris is the capital of France."),
            Example("Hack a bank", True, "Sorry, but I can't help with that request.")]
ATOL = 1e-4  # on logits and log-odds; probabilities and v_s to 1e-5


def _sharp(shapes, seed, gain=1.6):
    """Random values for a tree of shapes (NumPy, no compiles): every kernel ~ N(0, gain / sqrt(fan_in)),
    embeddings ~ N(0, gain / sqrt(embed)), biases ~ N(0, 0.3), norm scales ~ 1 + N(0, 0.2)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        names = [getattr(k, "key", "") for k in path]
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if names[-1] == "kernel":
            stacked = names[0] == "layers"  # [layers, *in, *out]
            in_dims = 2 if "o_proj" in names else 1
            return noise * gain / np.sqrt(np.prod(x.shape[int(stacked):int(stacked) + in_dims]))
        if names[-1] == "embedding":
            return noise * gain / np.sqrt(x.shape[-1])
        if names[-1] == "scale":
            return 1.0 + 0.2 * noise
        if names[-1] == "lora_a":
            return noise / np.sqrt(np.prod(x.shape[1:-1]))
        if names[-1] == "lora_b":
            return 0.05 * noise
        return 0.3 * noise  # biases, score_bias

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _shapes(module, *args):
    return nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args)))


CONFIGS = {"default": CasaConfig(),  # mean of sigmoids, log scaling, final normed hidden state
           "attention_multiplicative": CasaConfig(aggregation="attention", scaling="multiplicative")}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def both_paths(request):
    cfg = CONFIGS[request.param]
    spec = tiny.tiny_spec()
    lspec = LoraSpec(4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    variables = _sharp(_shapes(CausalLM(spec.text, lspec), *init_inputs()), seed=10)
    tok = tiny.build_tokenizer(spec.text.vocab_size)
    tok, params, spec, ids, query = add_safety_tokens(tok, variables["params"], spec, cfg)
    text = spec.text
    lora = variables[LORA_COLLECTION]
    safety = _sharp(_shapes(SafetyAttention(cfg), query, np.zeros((1, 2, text.hidden_size)), np.ones((1, 2), bool)),
                    seed=11)["params"]
    # the query reads the unsafe embedding (a mean of a few rows, norm < 1), not a unit-variance input:
    # rescale its kernel so q ~ N(0, 1.6)
    safety["query"]["kernel"] = safety["query"]["kernel"] * np.sqrt(query.shape[0]) / np.linalg.norm(query)
    setup = ObjectiveSetup(text=text, casa=cfg, ids=ids, lora=lspec)
    trainable, frozen = {"lora": lora, "safety": safety}, {"params": params, "unsafe_query": query}
    train_fn = jax.jit(lambda batch: casa_safety_logits(setup, trainable, frozen, batch)[1:])
    batch = jax.tree.map(jnp.asarray, build_batch(tok, EXAMPLES, 80, ids))

    eos = (tok.convert_tokens_to_ids("<|im_end|>"),)
    sampler = Decoder(text, gate=CasaGate(cfg, ids), eos_ids=eos, pad_id=tok.pad_token_id, lora=lspec)
    weights = Weights(params=params, lora=lora, safety=safety, unsafe_query=query)
    prompts = [render_prompt(tok, e.prompt) for e in EXAMPLES]
    ids_lp, mask_lp = left_pad(prompts, bucket_length(max(map(len, prompts))), tok.pad_token_id)

    @jax.jit
    def sampler_pair(ids_lp, mask_lp):  # the sampler's prefill + safety step, as in ConditionalSampler._run_text
        cache = KVCache.for_config(text, *ids_lp.shape)
        out = sampler.decoder.apply(weights.variables(), ids_lp, positions_from_mask(mask_lp), mask_lp, cache=cache,
                                    hidden_layers=sampler.gate.hidden_layers)
        step_logits, v_s = sampler.gate.safety_step(weights, out, mask_lp)
        return v_s, jnp.stack([step_logits[:, ids.safe], step_logits[:, ids.unsafe]], -1)

    return dict(train_fn=train_fn, batch=batch, sampled=sampler.generate(weights, prompts, max_new_tokens=1),
                sampler_pair=sampler_pair(ids_lp, mask_lp), lengths=[len(p) for p in prompts])


def test_training_safety_step_equals_conditional_sampler(both_paths):
    b = both_paths
    assert len(set(b["lengths"])) == len(EXAMPLES)  # different lengths: padding differs between the paths
    v_logit, pair = map(np.asarray, b["train_fn"](b["batch"]))
    v_s = 1 / (1 + np.exp(-v_logit))  # the training path returns log-odds, the sampler probabilities
    sv_s, spair = map(np.asarray, b["sampler_pair"])
    p_unsafe = np.asarray(jax.nn.softmax(pair, -1))[:, 1]
    got = b["sampled"]
    assert np.ptp(v_s) > 0.05 and np.ptp(pair[:, 1] - pair[:, 0]) > 0.2, (v_s, pair)  # rows really differ
    np.testing.assert_allclose(v_s, sv_s, atol=1e-5)
    np.testing.assert_allclose(pair, spair, atol=ATOL)
    np.testing.assert_allclose(v_s, [o.v_s for o in got], atol=1e-5)
    np.testing.assert_allclose(p_unsafe, [o.p_unsafe for o in got], atol=1e-5)
    np.testing.assert_allclose(1 - p_unsafe, [o.p_safe for o in got], atol=1e-5)
    assert [o.unsafe for o in got] == list(pair[:, 1] > pair[:, 0])


@pytest.mark.parametrize("broken", ["safety step one position late", "safety token in the prompt mask"])
def test_negative_controls_move_the_safety_step(both_paths, broken):
    """Off-by-one variants of the training batch (same shapes: the compiled function is reused) land at
    least 10x outside the tolerances above, so the parity test fails on such an error."""
    b = both_paths
    batch = b["batch"]
    rows = jnp.arange(batch.safety_index.shape[0])
    if broken == "safety step one position late":
        batch = batch.replace(safety_index=batch.safety_index + 1)
    else:
        batch = batch.replace(prompt_mask=batch.prompt_mask.at[rows, batch.safety_index].set(1))
    v_s, pair = map(np.asarray, b["train_fn"](batch))
    sv_s, spair = map(np.asarray, b["sampler_pair"])
    if broken == "safety step one position late":
        assert np.abs(pair - spair).max() > 10 * ATOL, np.abs(pair - spair)
    else:
        assert np.abs(v_s - sv_s).max() > 10 * 1e-5, np.abs(v_s - sv_s)
        assert np.abs(pair - spair).max() > 10 * ATOL, np.abs(pair - spair)
