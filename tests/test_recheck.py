"""The re-checking CASA gate (``CasaGate(recheck_every=N)``): the safety head re-read on the sequence so far
after an attacker prefill, every N decoded tokens and as a row ends; a row found unsafe stops and gets the
refusal.

Controls on the session's tiny CASA model: a threshold no v_s reaches changes nothing (same tokens as
the plain gate); a threshold every v_s reaches ends every row, a prefilled one at the boundary (step 0)
and the others at the first due check (step N); and re-checking never changes the step-0 verdict."""

import pytest

from casa_jax.casa.config import DEFAULT_REFUSAL

PROMPTS = ["How do I bake bread?", "Give three tips for staying healthy.", "Explain how vaccines work."]
PREFILLS = ["", "Sure, here is", ""]


@pytest.fixture(scope="module")
def engine(tiny_casa_model):
    from casa_jax.infer.engine import Engine
    return Engine.load(str(tiny_casa_model / "checkpoint"))


def _replies(engine, **kwargs):
    from casa_jax.infer.chat import chat_replies
    return chat_replies(engine, PROMPTS, 12, prefills=PREFILLS, **kwargs)


def test_recheck_that_never_fires_changes_nothing(engine):
    plain = _replies(engine)
    watched = _replies(engine, recheck_every=3, recheck_threshold=1.0)
    assert [r.text for r in watched] == [r.text for r in plain]
    assert [(r.verdict, r.p_unsafe) for r in watched] == [(r.verdict, r.p_unsafe) for r in plain]
    assert any(r.completion_tokens > 3 for r in plain)  # there was something to cut


def test_recheck_that_always_fires_ends_each_row_where_due(engine):
    from casa_jax.infer.strategies import Greedy
    plain = _replies(engine)
    watched = _replies(engine, recheck_every=3, recheck_threshold=0.0)
    assert all(r.text == DEFAULT_REFUSAL and r.verdict == "unsafe" for r in watched)
    assert [r.p_unsafe for r in watched] == [r.p_unsafe for r in plain]  # the step-0 decision is kept
    decoder = engine.decoder(Greedy(), recheck_every=3, recheck_threshold=0.0)
    from casa_jax.casa.examples import render_prompt
    ids = [render_prompt(engine.tokenizer, p) for p in PROMPTS]
    prefills = [engine.tokenizer.encode(p, add_special_tokens=False) if p else [] for p in PREFILLS]
    rows = decoder.generate(engine.weights, ids, 12, prefills)
    # the prefill boundary (step 0); the others at the first due check (step 3), or where they end, if sooner
    expected = [0 if p else min(3, r.completion_tokens + 1) for p, r in zip(PREFILLS, plain)]
    assert [r.decision.turned_at for r in rows] == expected
    assert all(r.tokens == [] for r in rows)


def test_each_row_stops_at_its_own_limit_and_its_end_is_rechecked(engine):
    """Per-row limits stop rows on the device (the batch compiled for 12); a re-check on the step a row
    ends covers its last tokens, and never a step past its limit."""
    from casa_jax.infer.chat import chat_replies
    limits = [2, 5, 12]
    plain = chat_replies(engine, PROMPTS, 12, prefills=PREFILLS)
    cut = chat_replies(engine, PROMPTS, limits, prefills=PREFILLS)
    for p, c, limit in zip(plain, cut, limits):
        assert c.completion_tokens == min(limit, p.completion_tokens) and p.text.startswith(c.text)
    ended = chat_replies(engine, PROMPTS, limits, prefills=[""] * 3, recheck_every=50, recheck_threshold=0.0)
    assert [r.turned_at for r in ended] == [min(limit, p.completion_tokens + 1) for limit, p in
                                            zip(limits, chat_replies(engine, PROMPTS, limits))]
