"""The Engine on a simulated 8-device pod: weights placed by the rules, activations and the KV cache
really sharded under the rules context (read from the traced shardings), and replies equal to a
single-device run."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from casa_jax import tiny
from casa_jax.casa.config import CasaConfig
from casa_jax.casa.examples import render_prompt
from casa_jax.casa.safety_attention import SafetyAttention
from casa_jax.casa.safety_tokens import add_safety_tokens
from casa_jax.infer.chat import chat_replies
from casa_jax.infer.decode import bucket_length, left_pad
from casa_jax.infer.engine import Engine
from casa_jax.io.trained import TrainedModel
from casa_jax.model.kv_cache import KVCache
from casa_jax.model.layers import LoraSpec, model_variables
from casa_jax.model.quantize import quantize_int8
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM, unstack_layers
from casa_jax.peft.lora import init_lora
from casa_jax.sharding import make_mesh

PROMPTS = ["Write a haiku about the sea.", "How do I learn a new language?", "What is the capital of France?",
           "Explain photosynthesis in one line."]


@pytest.fixture(scope="module")
def engines():
    """One tiny CASA model (sharp LoRA, random safety head): an Engine without a mesh and one on a
    data=1 x fsdp=4 x tensor=2 mesh of the 8 simulated devices."""
    spec = tiny.tiny_spec()
    params = tiny.random_params(spec.text, seed=0)
    cfg = CasaConfig()
    tokenizer, params, spec, ids, query = add_safety_tokens(tiny.build_tokenizer(spec.text.vocab_size), params,
                                                           spec, cfg)
    text, lspec = spec.text, LoraSpec(4, targets=("q_proj", "v_proj", "down_proj"))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                        init_lora(text, lspec, jax.random.key(1)))
    safety = nn.unbox(SafetyAttention(cfg).init(jax.random.key(2), query, np.zeros((1, 2, text.hidden_size)),
                                                np.ones((1, 2), bool))["params"])
    model = TrainedModel(spec=spec, params=params, encoders={}, objective="casa", lora=lora, casa=cfg, ids=ids,
                         safety=safety, unsafe_query=query, lora_spec=lspec)
    mesh = make_mesh((1, 4, 2))
    return Engine(model, tokenizer, name="single"), Engine(model, tokenizer, mesh=mesh, name="pod"), mesh


def _spec(x) -> tuple:
    """A traced array's sharding spec, padded with None to its rank."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _batch_axes(entry) -> tuple:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _ways(entry, mesh) -> int:
    """Into how many pieces a dimension with this spec entry is cut (size-1 mesh axes drop out)."""
    return int(np.prod([mesh.shape[a] for a in _batch_axes(entry)]))


DATA_WAYS = 4  # data=1 x fsdp=4: the batch dimension's cut under ("data", "fsdp")


def test_weights_are_placed_by_the_rules(engines):
    _, pod, mesh = engines
    kernel = pod.weights.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and "tensor" in str(kernel.sharding.spec)
    assert pod.weights.safety is not None and all(len(x.sharding.device_set) == 8
                                                  for x in jax.tree.leaves(pod.weights.safety))


def test_replies_on_the_mesh_equal_a_single_device(engines):
    single, pod, _ = engines
    prefills = ["", "Sure, here", "", "Step 1:"]
    want = chat_replies(single, PROMPTS, max_new_tokens=6, prefills=prefills)
    got = chat_replies(pod, PROMPTS, max_new_tokens=6, prefills=prefills)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.verdict for r in got] == [r.verdict for r in want]
    np.testing.assert_allclose([r.v_s for r in got], [r.v_s for r in want], atol=1e-5)
    np.testing.assert_allclose([r.p_unsafe for r in got], [r.p_unsafe for r in want], atol=1e-5)


def _forward(engine, params, lora, quant):
    """A prefill into a cache: (logits, every layer's hidden states, cache keys, cache values)."""
    decoder = CausalLM(engine.spec.text, engine.model.lora_spec)
    prompts = [render_prompt(engine.tokenizer, p) for p in PROMPTS]
    ids, mask = left_pad(prompts, bucket_length(max(map(len, prompts))))
    cache = KVCache.for_config(engine.spec.text, ids.shape[0], ids.shape[1] + 4)
    out = decoder.apply(model_variables(params, lora, quant), ids, positions_from_mask(mask), mask, cache=cache,
                        hidden_layers=(0, 1, 2))
    return out.logits, out.hidden_states, out.cache.keys, out.cache.values


def test_unrolled_layers_compute_what_the_scan_computes(engines):
    """The per-layer layout (the Engine's default on one CPU device) equals the scan over stacked weights:
    logits, hidden states and the KV cache, with LoRA, in float and int8; with two layers' weights swapped
    it does not (negative control: the unrolled loop really reads layer i's own weights)."""
    single, pod, _ = engines
    assert single.layer_loop == "unrolled" and pod.layer_loop == "scan"
    assert "layers" not in single.weights.params and "layers_1" in single.weights.lora
    model = single.model
    kept, quant = quantize_int8(model.params)
    for params, q in ((model.params, None), (kept, quant)):
        want = _forward(single, params, model.lora, q)
        got = _forward(single, unstack_layers(params), unstack_layers(model.lora), unstack_layers(q))
        for w, g in zip(want, got):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    swapped = unstack_layers(model.params)
    swapped["layers_0"], swapped["layers_1"] = swapped["layers_1"], swapped["layers_0"]
    wrong = _forward(single, swapped, unstack_layers(model.lora), None)[0]
    assert np.abs(np.asarray(wrong) - np.asarray(_forward(single, model.params, model.lora, None)[0])).max() > 1e-2
    with pytest.raises(ValueError, match="'lora' collection is in the stacked layout"):
        _forward(single, unstack_layers(model.params), model.lora, None)  # mixed: LoRA would silently drop
    with pytest.raises(ValueError, match="'quant' collection is in the per-layer layout"):
        _forward(single, kept, None, unstack_layers(quant))


def test_layer_loop_is_checked(engines):
    single, _, mesh = engines
    with pytest.raises(ValueError, match="layer_loop='rolled'"):
        Engine(single.model, single.tokenizer, layer_loop="rolled")
    with pytest.raises(ValueError, match="one device"):
        Engine(single.model, single.tokenizer, mesh=mesh, layer_loop="unrolled")


def _prefill(engine):
    """A jitted prefill under the engine's context returning the cache and the hidden states."""
    decoder = CausalLM(engine.spec.text, engine.model.lora_spec)
    ids, mask = left_pad([render_prompt(engine.tokenizer, p) for p in PROMPTS],
                         bucket_length(max(len(render_prompt(engine.tokenizer, p)) for p in PROMPTS)))
    positions = positions_from_mask(mask)
    seen = {}

    def run(weights, ids, positions, mask):
        cache = KVCache.for_config(engine.spec.text, ids.shape[0], ids.shape[1] + 4)
        out = decoder.apply(weights.variables(), ids, positions, mask, cache=cache, hidden_layers=(0, 1))
        # the shardings as traced: what the constraints made of them inside the computation
        jax.debug.inspect_array_sharding(out.cache.keys, callback=lambda s: seen.__setitem__("keys", s))
        jax.debug.inspect_array_sharding(out.hidden_states, callback=lambda s: seen.__setitem__("hidden", s))
        jax.debug.inspect_array_sharding(out.logits, callback=lambda s: seen.__setitem__("logits", s))
        return out.cache, out.hidden_states

    with engine.context():
        cache, hidden = jax.jit(run)(engine.weights, ids, positions, mask)
    return cache, hidden, seen


def test_activations_and_cache_are_sharded_as_the_rules_say(engines):
    """cache_batch -> (data, fsdp), cache_kv_heads -> tensor; activation_batch -> (data, fsdp);
    activation_vocab -> tensor. Read from the traced shardings and from the results."""
    _, pod, mesh = engines
    cache, hidden, seen = _prefill(pod)
    keys = _spec_of(seen["keys"], 5)  # [layers, batch, length, kv_heads, head_dim]
    assert _ways(keys[1], mesh) == DATA_WAYS and keys[3] == "tensor", seen["keys"]
    assert _ways(_spec_of(seen["hidden"], 4)[1], mesh) == DATA_WAYS, seen["hidden"]  # [L, B, T, E]
    logits = _spec_of(seen["logits"], 3)
    assert _ways(logits[0], mesh) == DATA_WAYS and logits[2] == "tensor", seen["logits"]
    assert _ways(_spec(cache.keys)[1], mesh) == DATA_WAYS and _spec(cache.keys)[3] == "tensor"
    assert len(cache.keys.sharding.device_set) == 8


def test_negative_control_without_the_rules_nothing_is_sharded(engines):
    """The same prefill outside the rules context: the constraints are no-ops, and the cache comes out
    on one device (a test that could not tell would pass here too)."""
    single, _, _ = engines
    cache, hidden, seen = _prefill(single)
    assert len(cache.keys.sharding.device_set) == 1
    assert all(a is None for a in _spec_of(seen["keys"], 5))


def _spec_of(sharding, rank: int) -> tuple:
    spec = tuple(getattr(sharding, "spec", ()))
    return spec + (None,) * (rank - len(spec))


def test_decode_loop_carries_a_sharded_cache(engines):
    """The while_loop's cache is constrained too: the lowered decode of the pod engine constrains the
    cache (batch over data x fsdp, KV heads over tensor) inside the loop; the single-device one has no
    constraint at all."""
    single, pod, _ = engines
    ids, mask = left_pad([render_prompt(pod.tokenizer, p) for p in PROMPTS], 64)
    texts = {}
    for engine in (single, pod):
        decoder = engine.decoder()
        chunk_ids, chunk_mask = decoder.gate.chunk([[]] * len(PROMPTS), engine.pad_id)
        with engine.context():
            limits = np.full((len(PROMPTS),), 3, np.int32)
            texts[engine.name] = decoder._text_jit.lower(engine.weights, ids, mask, chunk_ids, chunk_mask,
                                                         jax.random.key(0), limits, 3).as_text()
    cache_rule = '<@mesh, [{}, {"data", "fsdp"}, {}, {"tensor"}, {}]>'  # [layers, batch, length, kv_heads, dim]
    loop = texts["pod"][texts["pod"].index("stablehlo.while"):]  # the while_loop and what follows it
    assert cache_rule in texts["pod"] and loop.count(cache_rule) >= 2  # prefill's cache and each step's
    assert "<@mesh," not in texts["single"]  # no constraint names a mesh there
