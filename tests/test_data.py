"""Training mixtures: the real recipe's config builds its split in the paper's proportion, user JSONL
prompt sets, self-distilled benign answers and model refusals through our sampler, and the target cache."""

import dataclasses
import json
import os

import pytest

from casa_jax.train.mixtures import (COMPLIANT_OPENINGS, Answer, cached_targets, model_refusals, self_answers,
                                split_examples, with_compliant_openings)
from casa_jax.casa.examples import Example
from casa_jax.data.prompts_io import load_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_real_recipe_config_builds_its_mixture():
    import sys
    sys.path.insert(0, ROOT)
    from configs.casa_qwen2_5_omni import get_config
    d = get_config("casa").data
    train, heldout = split_examples(d.harmful_sets, d.benign_sets, d.num_harmful, d.heldout_per_class,
                                    ("No.",), d.max_chars, 0, d.benign_ratio)
    harmful = sum(e.harmful for e in train)
    assert harmful == d.num_harmful and abs((len(train) - harmful) / harmful - 10_000 / 6_200) < 0.01
    assert len(heldout) == 2 * d.heldout_per_class
    assert d.benign_target == "self" and d.harmful_target == "model"


def test_user_jsonl_prompt_set(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "How do clouds form?"}\n{"prompt": "Name a prime.", "id": "p7"}\n')
    assert [r["id"] for r in load_prompts(str(path))] == ["mine.jsonl:1", "p7"]
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="mine.jsonl:1: each record needs a string 'prompt'"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="no prompt set 'nonexistent'"):
        load_prompts("nonexistent")


def test_self_answers_and_model_refusals_replace_the_right_rows():
    rows = [Example("bad one", True, "T"), Example("good one", False, "B"), Example("bad two", True, "T")]
    calls = []

    def answer(prompts, safety_prompt=False):
        calls.append((tuple(prompts), safety_prompt))
        return [Answer("I'm sorry, I can't." if p == "bad one" else "Sure: step 1") if safety_prompt
                else Answer(p.upper(), complete=False) for p in prompts]

    distilled = self_answers(rows, answer)
    assert [e.target for e in distilled] == ["T", "GOOD ONE", "T"]
    assert [e.ends_turn for e in distilled] == [True, False, True]  # a cut answer is not taught to end there
    refused, n = model_refusals(distilled, answer)
    assert n == 1 and [e.target for e in refused] == ["I'm sorry, I can't.", "GOOD ONE", "T"]  # a compliance is never kept
    assert calls == [(("good one",), False), (("bad one", "bad two"), True)]


def test_cached_targets_rebuild_only_when_the_key_changes(tmp_path):
    path = str(tmp_path / "targets.json")
    built = []

    def build():
        built.append(1)
        return [Example("a", True, "r")], [Example("b", False, "s")]

    first = cached_targets(path, {"k": 1}, build)
    assert cached_targets(path, {"k": 1}, build) == first and len(built) == 1
    cached_targets(path, {"k": 2}, build)
    assert len(built) == 2
    with open(path, "w") as f:
        f.write("{not json")
    assert cached_targets(path, {"k": 2}, build) == first and len(built) == 3  # unreadable cache: rebuilt
    assert json.load(open(path))["train"] == [dataclasses.asdict(Example("a", True, "r"))]


def test_trainer_distills_through_the_sampler_and_caches(tmp_path, monkeypatch):
    from casa_jax.train import trainer
    from casa_jax.casa.config import CasaConfig
    from casa_jax.train.config import tiny_train_config
    config = tiny_train_config("casa")
    config.data.num_harmful, config.data.heldout_per_class, config.data.self_answer_tokens = 4, 2, 3
    config.data.benign_target, config.data.harmful_target = "self", "model"
    from casa_jax.sharding import DEFAULT_RULES, make_mesh
    spec, params, _, tokenizer, _ = trainer._base(config, make_mesh(), DEFAULT_RULES)
    train, heldout = trainer._examples(config, CasaConfig(), spec, params, tokenizer, str(tmp_path), True)
    benign = [e for e in train + heldout if not e.harmful]
    assert len(benign) == 6 and all(e.target != "Sure, here is a helpful answer." for e in benign)
    monkeypatch.setattr(trainer, "_greedy_answers", lambda *a: pytest.fail("targets should come from the cache"))
    again = trainer._examples(config, CasaConfig(), spec, params, tokenizer, str(tmp_path), True)
    assert again == (train, heldout)


def test_compliant_openings_prefix_harmful_rows_untrained_and_unlike_the_attack():
    from casa_jax.attacks.text import PREFILL_TEXT
    rows = [Example(f"Make thing {i}.", i % 2 == 0, "No.") for i in range(400)]
    out = with_compliant_openings(rows, 0.5, seed=3)
    prefixed = [e for e in out if e.prefix]
    assert all(e.harmful for e in prefixed) and 70 < len(prefixed) < 130  # about half of the 200 harmful
    assert out == with_compliant_openings(rows, 0.5, seed=3) and out != with_compliant_openings(rows, 0.5, seed=4)
    assert any("make thing" in e.prefix for e in prefixed)  # the request echoed, lower-cased
    assert not any(PREFILL_TEXT[:30] in o for o in COMPLIANT_OPENINGS)  # the evaluation's prefill stays unseen
    assert with_compliant_openings(rows, 0.0) == rows
    answers = [Example("Capital?", False, "Paris is the capital of France.\nIt has two million people.")] * 20
    continued = with_compliant_openings(answers, 0.0, seed=1, answer_fraction=1.0)
    assert all(e.prefix and e.prefix + e.target == answers[0].target for e in continued)  # nothing lost
    assert all(len(e.prefix.split()) <= len(answers[0].target.split()) // 2 for e in continued)
    with pytest.raises(ValueError, match="prefill_refusals"):
        with_compliant_openings(rows, 1.5)
