"""CASA core: safety tokens, safety attention, LoRA, objectives' gradients and the conditional sampler."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from casa_jax import tiny
from casa_jax.casa.config import CasaConfig
from casa_jax.casa.examples import Example, build_batch, render_prompt
from casa_jax.model.layers import LoraSpec
from casa_jax.peft.lora import init_lora, merge_lora, unmerge_lora
from casa_jax.casa.objectives import LOSSES, ObjectiveSetup
from casa_jax.casa.safety_attention import SafetyAttention, v_s_from_logit
from casa_jax.casa.safety_tokens import add_safety_tokens, strip_safety_tokens
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM, init_inputs
from casa_jax.infer.decode import Decoder, Weights
from casa_jax.infer.gates import CasaGate
from casa_jax.infer.decode import bucket_length, left_pad

PROMPTS = ["Write a haiku about the sea.", "How do I learn a new language?",
           "What is the capital of France?", "Explain photosynthesis in one line."]


@pytest.fixture(scope="module")
def casa_model():
    """The tiny model with safety tokens, random non-zero LoRA and a random safety head."""
    spec = tiny.tiny_spec()
    params = tiny.random_params(spec.text, seed=0)
    tokenizer = tiny.build_tokenizer(spec.text.vocab_size)
    cfg = CasaConfig()
    base_embed = params["embed_tokens"]["embedding"].copy()
    tokenizer, params, spec, ids, query = add_safety_tokens(tokenizer, params, spec, cfg)
    text = spec.text
    lspec = LoraSpec(4, targets=("q_proj", "v_proj", "down_proj"))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                        init_lora(text, lspec, jax.random.key(1)))
    safety = nn.unbox(SafetyAttention(cfg).init(jax.random.key(2), query, np.zeros((1, 2, text.hidden_size)),
                                                np.ones((1, 2), bool))["params"])
    weights = Weights(params=params, lora=lora, safety=safety, unsafe_query=query)
    eos = (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    return dict(spec=spec, text=text, tokenizer=tokenizer, cfg=cfg, ids=ids, weights=weights, eos=eos, lspec=lspec,
                base_embed=base_embed, sampler=Decoder(text, gate=CasaGate(cfg, ids), eos_ids=eos, lora=lspec))


def _prompt_ids(m, prompts=PROMPTS):
    return [render_prompt(m["tokenizer"], p) for p in prompts]


def test_safety_tokens_added_and_initialised(casa_model):
    m = casa_model
    tok, ids, embed = m["tokenizer"], m["ids"], m["weights"].params["embed_tokens"]["embedding"]
    assert tok.convert_tokens_to_ids("<|unsafe|>") == ids.unsafe and ids.safe != ids.unsafe
    assert m["spec"].text.vocab_size == embed.shape[0] == max(ids.safe, ids.unsafe) + 1 > m["base_embed"].shape[0]
    assert m["spec"].hf_config["vocab_size"] == embed.shape[0]  # the export config grows too
    pieces = tok.encode("unsafe", add_special_tokens=False)
    np.testing.assert_allclose(embed[ids.unsafe], m["base_embed"][pieces].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(m["weights"].unsafe_query, embed[ids.unsafe])
    assert tok.encode("<|safe|>", add_special_tokens=False) == [ids.safe]  # one token, never split
    assert strip_safety_tokens("<|unsafe|> I'm sorry", m["cfg"]) == "I'm sorry"
    batch = build_batch(tok, [Example("Hi there", True, "No.")], 64, ids)
    row = np.asarray(batch.input_ids[0])
    assert row[int(batch.safety_index[0])] == ids.unsafe and (row == ids.unsafe).sum() == 1
    assert batch.loss_mask[0, int(batch.safety_index[0])] == 0  # learned through the safety loss only


def test_safety_head_keeps_a_gradient_when_saturated(casa_model):
    """v_s is carried as log-odds: a head sure a benign prompt is unsafe (v_s ~ 1 - 1e-22) still gets a
    gradient towards safe. Negative control: the clipped probability it replaced gives none."""
    from casa_jax.casa.safety_attention import safety_pair_logits
    w = casa_model["weights"]
    hidden = jax.random.normal(jax.random.key(6), (1, 4, casa_model["text"].hidden_size))
    mask = jnp.ones((1, 4), bool)
    logits = jnp.zeros((1, 8))
    for aggregation in ("mean", "max", "attention"):
        cfg = CasaConfig(aggregation=aggregation)
        params = SafetyAttention(cfg).init(jax.random.key(5), w.unsafe_query, hidden, mask)["params"]
        if aggregation == "attention":
            params = {**params, "readout": {**params["readout"], "bias": jnp.full((1,), 50.0)}}
        else:
            params = {**params, "score_bias": jnp.asarray(50.0)}

        def benign_nll(p, clipped=False):
            z = SafetyAttention(cfg).apply({"params": p}, w.unsafe_query, hidden, mask)
            if clipped:  # the old form: log of a clipped probability
                v = jnp.clip(v_s_from_logit(z), 1e-6, 1 - 1e-6)
                pair = jnp.stack([jnp.log1p(-v), jnp.log(v)], -1)
            else:
                pair = safety_pair_logits(logits, z, 0, 1, "log")
            return -jax.nn.log_softmax(pair, -1)[0, 0]

        name = "readout" if aggregation == "attention" else "score_bias"
        pick = (lambda g: g["readout"]["bias"][0]) if aggregation == "attention" else (lambda g: g["score_bias"])
        grad = pick(jax.grad(benign_nll)(params))
        assert bool(jnp.isfinite(grad)) and float(grad) > 0.5, (aggregation, name, grad)  # pushes towards safe
        assert float(pick(jax.grad(lambda p: benign_nll(p, clipped=True))(params))) == 0.0
    off = CasaConfig(use_safety_attention=False)
    params = SafetyAttention(off).init(jax.random.key(5), w.unsafe_query, hidden, mask)
    assert float(SafetyAttention(off).apply(params, w.unsafe_query, hidden * 7, mask)[0]) == 0.0  # v_s = 1/2


def test_batch_prefix_is_untrained_and_a_cut_target_has_no_end_of_turn(casa_model):
    """An attacker-style prefix sits after the safety token without LM loss; the refusal after it is
    trained. A cut distilled answer gets no end-of-turn token (negative control: a complete one does)."""
    tok, ids = casa_model["tokenizer"], casa_model["ids"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    batch = build_batch(tok, [Example("Hack a bank", True, "No."),
                              Example("Hack a bank", True, "No.", prefix="Sure, here is how"),
                              Example("Hi", False, "Hello there", ends_turn=False),
                              Example("Hi", False, "Hello there")], 64, ids)
    ids_, loss = np.asarray(batch.input_ids), np.asarray(batch.loss_mask)
    prefix = tok.encode("Sure, here is how", add_special_tokens=False)
    s = int(batch.safety_index[1])
    assert ids_[1, s] == ids.unsafe and list(ids_[1, s + 1:s + 1 + len(prefix)]) == prefix
    assert loss[1, s:s + 1 + len(prefix)].sum() == 0 and loss[1].sum() == loss[0].sum()  # same trained tokens
    assert list(ids_[1][loss[1] == 1]) == list(ids_[0][loss[0] == 1])
    assert eot not in ids_[2][loss[2] == 1] and ids_[3][loss[3] == 1][-1] == eot


def test_forced_unsafe_rows_get_the_unsafe_token_and_no_safety_loss(casa_model):
    """A benign prompt with a forced ``<|unsafe|>`` trains the refusal after the token but never the
    safety decision: its safety loss weight is 0, so the loss equals that of the batch without the row's
    safety term. Negative control: the same row unforced changes the safety loss."""
    from casa_jax.train.mixtures import with_forced_unsafe
    m = casa_model
    tok, ids, w = m["tokenizer"], m["ids"], m["weights"]
    rows = [Example("Hi there", False, "Hello."), Example("Hack a bank", True, "No.")]
    forced = Example("Hi there", False, "No.", forced_unsafe=True)
    batch = build_batch(tok, rows + [forced], 64, ids)
    assert np.asarray(batch.input_ids)[2, int(batch.safety_index[2])] == ids.unsafe
    assert list(np.asarray(batch.safety_weight)) == [1.0, 1.0, 0.0] and int(batch.label[2]) == 0
    setup = ObjectiveSetup(text=m["text"], casa=m["cfg"], ids=ids, lora=m["lspec"])
    trainable, frozen = {"lora": w.lora, "safety": w.safety}, {"params": w.params, "unsafe_query": w.unsafe_query}
    safety = lambda b: float(LOSSES["casa"](setup, trainable, frozen, b, None, 0.0)[1]["safety_loss"])  # noqa: E731
    assert safety(batch) == pytest.approx(safety(build_batch(tok, rows, 64, ids)), rel=1e-5)
    unforced = build_batch(tok, rows + [dataclasses.replace(forced, forced_unsafe=False)], 64, ids)
    assert abs(safety(unforced) - safety(batch)) > 1e-4
    more = with_forced_unsafe([Example(f"q{i}", i % 2 == 0, "A.") for i in range(200)], 0.5, ["No."], seed=1)
    copies = [e for e in more if e.forced_unsafe]
    assert len(more) == 200 + len(copies) and 30 < len(copies) < 70
    assert all(not e.harmful and e.target == "No." for e in copies)


def test_safety_attention_stop_gradient_and_trainable_grads(casa_model):
    m = casa_model
    w = m["weights"]
    hidden = jax.random.normal(jax.random.key(4), (2, 5, m["text"].hidden_size))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    for aggregation in ("mean", "max", "attention"):
        cfg = CasaConfig(aggregation=aggregation)
        params = SafetyAttention(cfg).init(jax.random.key(5), w.unsafe_query, hidden, mask)
        z = SafetyAttention(cfg).apply(params, w.unsafe_query, hidden, mask)  # log-odds
        v = v_s_from_logit(z)
        assert z.shape == (2,) and bool(jnp.all((v > 0) & (v < 1)))
        g = jax.grad(lambda h: SafetyAttention(cfg).apply(params, w.unsafe_query, h, mask).sum())(hidden)
        assert float(jnp.abs(g).max()) == 0.0  # nothing flows back into the prompt states
        moved = SafetyAttention(cfg).apply(params, w.unsafe_query, hidden.at[0, 4].add(100.0), mask)
        assert float(moved[0]) == pytest.approx(float(z[0]))  # masked positions are ignored
    setup = ObjectiveSetup(text=m["text"], casa=m["cfg"], ids=m["ids"], lora=m["lspec"])
    batch = build_batch(m["tokenizer"], [Example("Hi there", True, "No."), Example("Hello", False, "Sure.")], 64,
                        m["ids"])
    trainable = {"lora": w.lora, "safety": w.safety}
    frozen = {"params": w.params, "unsafe_query": w.unsafe_query}
    grads = jax.grad(lambda t: LOSSES["casa"](setup, t, frozen, batch, jax.random.key(0), 0.0)[0])(trainable)
    for group in ("lora", "safety"):
        assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(grads[group])), group


def test_lora_merged_equals_unmerged(casa_model):
    m = casa_model
    w, text = m["weights"], m["text"]
    ids = jnp.asarray([[5, 6, 7, 8, 9, 10]])
    mask = jnp.ones_like(ids)
    model = CausalLM(text, m["lspec"])
    with_lora = model.apply({"params": w.params, "lora": w.lora}, ids, positions_from_mask(mask), mask).logits
    merged = merge_lora(w.params, w.lora, m["lspec"])
    folded = model.apply({"params": merged}, ids, positions_from_mask(mask), mask).logits
    assert float(jnp.abs(with_lora - folded).max()) <= 1e-5
    base = model.apply({"params": w.params}, ids, positions_from_mask(mask), mask).logits
    assert float(jnp.abs(with_lora - base).max()) > 1e-3  # the adapters do something
    back = unmerge_lora(merged, w.lora, m["lspec"])
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_step0_allows_only_safety_tokens(casa_model):
    m = casa_model
    sampler, w = m["sampler"], m["weights"]
    ids, mask = left_pad(_prompt_ids(m), 64)
    out = CausalLM(m["text"], m["lspec"]).apply(w.variables(), ids, positions_from_mask(mask), mask)
    logits, v_s = sampler.gate.safety_step(w, out, mask)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    others = np.delete(probs, [m["ids"].safe, m["ids"].unsafe], axis=1)
    assert others.max() == 0.0
    np.testing.assert_allclose(probs[:, [m["ids"].safe, m["ids"].unsafe]].sum(-1), 1.0, rtol=1e-6)


NAIVE_LENGTH = 96


@pytest.fixture(scope="module")
def full_forward(casa_model):
    """Uncached forward over a right-padded [1, NAIVE_LENGTH] row (one compile for every length)."""
    model = CausalLM(casa_model["text"], casa_model["lspec"])
    return jax.jit(lambda v, ids, mask: model.apply(v, ids, positions_from_mask(mask), mask).logits[0])


def _naive_greedy(m, forward, prompt, first, steps):
    """Full recomputation, no cache: prompt + safety token (+ prefill), argmax one token at a time."""
    w = m["weights"]
    seq, out_tokens = list(prompt) + list(first), []
    for _ in range(steps):
        ids = np.zeros((1, NAIVE_LENGTH), np.int32)
        ids[0, :len(seq)] = seq
        logits = forward(w.variables(), ids, (np.arange(NAIVE_LENGTH) < len(seq))[None].astype(np.int32))
        token = int(jnp.argmax(logits[len(seq) - 1]))
        out_tokens.append(token)
        if token in m["eos"]:
            break
        seq.append(token)
    return out_tokens


def test_greedy_with_cache_equals_naive_recomputation(casa_model, full_forward):
    m = casa_model
    prompts = _prompt_ids(m)[:2]
    outs = m["sampler"].generate(m["weights"], prompts, max_new_tokens=6)
    for prompt, out in zip(prompts, outs):
        expected = _naive_greedy(m, full_forward, prompt, [m["ids"].of(out.unsafe)], 6)
        assert out.tokens == [t for t in expected if t not in m["eos"]], (out.tokens, expected)


def test_attacker_prefill_goes_after_the_safety_token(casa_model, full_forward):
    m = casa_model
    prompt = _prompt_ids(m)[:1]
    prefill = m["tokenizer"].encode("Sure, here is", add_special_tokens=False)
    plain = m["sampler"].generate(m["weights"], prompt, max_new_tokens=5)[0]
    attacked = m["sampler"].generate(m["weights"], prompt, max_new_tokens=5, prefills=[prefill])[0]
    assert attacked.unsafe == plain.unsafe and attacked.v_s == pytest.approx(plain.v_s)  # decided before it
    expected = _naive_greedy(m, full_forward, prompt[0], [m["ids"].of(plain.unsafe)] + prefill, 5)
    assert attacked.tokens == [t for t in expected if t not in m["eos"]]


def test_per_row_decisions_and_threshold(casa_model):
    m = casa_model
    prompts = _prompt_ids(m)
    batch = m["sampler"].generate(m["weights"], prompts, max_new_tokens=3)
    singles = [m["sampler"].generate(m["weights"], [p], max_new_tokens=3)[0] for p in prompts]
    for b, s in zip(batch, singles):
        assert b.unsafe == s.unsafe and b.p_unsafe == pytest.approx(s.p_unsafe, abs=1e-5)
        assert b.unsafe == (b.p_unsafe > b.p_safe)
    p = sorted(o.p_unsafe for o in batch)
    tau = (p[1] + p[2]) / 2  # between rows: exactly two rows at or above it
    strict = Decoder(m["text"], gate=CasaGate(dataclasses.replace(m["cfg"], threshold=tau), m["ids"]), eos_ids=m["eos"], lora=m["lspec"])
    decided = strict.generate(m["weights"], prompts, max_new_tokens=3)
    assert [o.unsafe for o in decided] == [o.p_unsafe >= tau for o in batch]
    assert sum(o.unsafe for o in decided) == 2


def test_no_recompilation_inside_a_bucket(casa_model):
    m = casa_model
    sampler = Decoder(m["text"], gate=CasaGate(m["cfg"], m["ids"]), eos_ids=m["eos"], lora=m["lspec"])
    base = render_prompt(m["tokenizer"], "Hi")
    bucket = bucket_length(len(base))
    for extra in (0, (bucket - len(base)) // 2, bucket - len(base)):  # every length inside one bucket
        sampler.generate(m["weights"], [base + [70] * extra], max_new_tokens=2)
    assert sampler.traces == {"text": 1}
    sampler.generate(m["weights"], [base + [70] * (bucket - len(base) + 1)], max_new_tokens=2)  # next bucket
    assert sampler.traces == {"text": 2}


def test_template_refusal_mode_stops_unsafe_rows(casa_model):
    m = casa_model
    cfg = dataclasses.replace(m["cfg"], refusal_mode="template", threshold=0.01)  # everything unsafe
    outs = Decoder(m["text"], gate=CasaGate(cfg, m["ids"]), eos_ids=m["eos"], lora=m["lspec"]).generate(m["weights"], _prompt_ids(m)[:2], 4)
    assert all(o.unsafe and o.tokens == [] for o in outs)


def test_sharded_sampler_matches_single_device(casa_model):
    from jax.sharding import NamedSharding, PartitionSpec

    from casa_jax.sharding import make_mesh, param_shardings
    m = casa_model
    mesh = make_mesh((1, 4, 2))
    w = m["weights"]
    shardings = param_shardings(CausalLM(m["spec"].text), mesh, *init_inputs())
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = Weights(params=jax.tree.map(jax.device_put, w.params, shardings),
                          lora=jax.device_put(w.lora, replicated), safety=jax.device_put(w.safety, replicated),
                          unsafe_query=jax.device_put(w.unsafe_query, replicated))
    assert len(sharded.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    prompts = _prompt_ids(m)[:2]
    with jax.set_mesh(mesh):
        got = m["sampler"].generate(sharded, prompts, max_new_tokens=4)
    want = m["sampler"].generate(w, prompts, max_new_tokens=4)
    assert [o.tokens for o in got] == [o.tokens for o in want]
    assert [o.unsafe for o in got] == [o.unsafe for o in want]
    np.testing.assert_allclose([o.v_s for o in got], [o.v_s for o in want], atol=1e-5)
