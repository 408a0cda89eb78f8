"""The jitted KV-cache sampler against naive full recomputation, and the end-to-end demo."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from casa_jax.model.config import TextConfig
from casa_jax.model.text_decoder import CausalLM, init_inputs
from casa_jax.infer.decode import Decoder, Weights, bucket_length, left_pad
from casa_jax.infer.strategies import Greedy, Temperature

CFG = TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True)
PROMPTS = [[4, 8, 15, 16, 23], [42, 7]]


@pytest.fixture(scope="module")
def model_params():
    model = CausalLM(CFG)
    return model, nn.unbox(model.init(jax.random.key(3), *init_inputs())["params"])


def _generate(decoder, params, prompts, max_new_tokens, **kw):
    return [g.tokens for g in decoder.generate(Weights(params), prompts, max_new_tokens, **kw)]


def _naive_greedy(model, params, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        ids = np.array([seq], np.int32)
        logits = model.apply({"params": params}, ids, np.arange(len(seq))[None]).logits
        seq.append(int(np.argmax(np.asarray(logits[0, -1]))))
    return seq[len(prompt):]


def test_greedy_sampler_equals_full_recompute(model_params):
    model, params = model_params
    sampler = Decoder(CFG, eos_ids=(-1,), strategy=Greedy())
    out = _generate(sampler, params, PROMPTS, 6)
    for prompt, got in zip(PROMPTS, out):
        assert got == _naive_greedy(model, params, prompt, 6)


def test_stops_at_eos_and_samples(model_params):
    model, params = model_params
    first = _generate(Decoder(CFG, eos_ids=(-1,)), params, PROMPTS, 4)
    eos = first[0][2]
    stopped = _generate(Decoder(CFG, eos_ids=(eos,)), params, PROMPTS, 4)
    assert stopped[0] == first[0][:first[0].index(eos)]
    sampled = _generate(Decoder(CFG, eos_ids=(-1,), strategy=Temperature(1.0, top_k=5)), params, PROMPTS, 4,
                        rng=jax.random.key(1))
    assert all(len(s) == 4 and all(0 <= t < CFG.vocab_size for t in s) for s in sampled)


def test_padding_helpers():
    assert bucket_length(5) == 16 and bucket_length(17) == 32
    ids, mask = left_pad([[1, 2], [3]], 4)
    assert ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 3]] and mask.sum() == 3
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        left_pad([[]], 4)
    with pytest.raises(ValueError, match="longer than the largest prefill bucket"):
        bucket_length(10**6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Temperature(0.0)


def test_demo_end_to_end(tmp_path):
    """The tiny-thinker demo, shortened: every suite and modality gets a row for the base model and CASA (the
    baselines' training and verdicts are tested in test_casa_cli; here they would add two more evaluations)."""
    import json

    from casa_jax.attacks.audio import espeak_available
    from casa_jax.demos.tiny_thinker import run
    workdir = tmp_path / "demo"
    result = run(str(workdir), casa_steps=20, baseline_steps=0, per_suite=2, max_new_tokens=4)
    assert result["round_trip_exact"]
    assert sum(result["data"]["sizes"].values()) == 2319
    assert list(result["reports"]) == ["base", "casa"]
    audio = espeak_available()
    if not audio and os.environ.get("CASA_REQUIRE_ESPEAK") == "1":
        pytest.fail("CASA_REQUIRE_ESPEAK=1 but espeak-ng is not installed: the audio rows would be missing")
    for name, report in result["reports"].items():
        rows = {(r["suite"], r["modality"]) for r in report["suites"]}
        expected = {("text", "text"), ("jailbreak", "text"), ("benign", "text"), ("figstep", "image"),
                    ("typo", "image")} | {(f"prefill_{n}", "text") for n in (2, 4, 9, 12)}
        expected |= {("spoken", "audio"), ("spelling", "audio")} if audio else set()
        assert rows == expected, (name, rows)
        assert json.load(open(workdir / "eval" / name / "report.json"))["n_items"] == report["n_items"]
    assert result["reports"]["casa"]["safety_token"]["accuracy"] is not None
    table = (workdir / "report.md").read_text()
    assert "random-initialised tiny model" in table and "| figstep | image |" in table
