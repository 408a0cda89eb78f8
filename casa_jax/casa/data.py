"""Text-only training mixtures from the vendored prompt sets: harmful -> refusal, benign -> answer.

Harmful examples always target a refusal. Benign targets are a fixed acknowledgement (``template``,
for tiny models and tests) or the base model's own greedy answer (``self``: self-distillation keeps the
model's helpfulness instead of teaching it one canned reply).
"""

from __future__ import annotations

import random
from typing import Sequence

from casa_jax.casa.examples import Example
from casa_jax.data.prompts_io import load_prompts

BENIGN_TEMPLATE = "Sure, here is a helpful answer."


def _prompts(names: Sequence[str], max_chars: int) -> list[str]:
    """Prompts of the train split (by id; the test split is kept for evaluation), de-duplicated."""
    from casa_jax.eval.splits import split_of
    seen, out = set(), []
    for name in names:
        for record in load_prompts(name):
            if split_of(record["id"]) == "test":
                continue
            text = record["prompt"].strip()
            key = " ".join(text.lower().split())
            if key not in seen and len(text) <= max_chars:
                seen.add(key)
                out.append(text)
    return out


def split_examples(harmful_sets: Sequence[str], benign_sets: Sequence[str], per_class: int, heldout_per_class: int,
                   refusal: str, max_chars: int = 200, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples, balanced per class, de-duplicated across sets, shuffled with ``seed``;
    prompts of the evaluation test split (``casa_jax.eval.splits``) are never used.

    Benign targets are ``BENIGN_TEMPLATE``; replace them with ``self_answers`` for real models.
    """
    rng = random.Random(seed)
    harmful, benign = _prompts(harmful_sets, max_chars), _prompts(benign_sets, max_chars)
    need = per_class + heldout_per_class
    for name, pool, sets in (("harmful", harmful, harmful_sets), ("benign", benign, benign_sets)):
        if len(pool) < need:
            raise ValueError(f"only {len(pool)} {name} prompts of <= {max_chars} characters in {list(sets)}; "
                             f"need {need} (per_class + heldout_per_class)")
    rng.shuffle(harmful)
    rng.shuffle(benign)

    def make(h, b):
        rows = [Example(p, True, refusal) for p in h] + [Example(p, False, BENIGN_TEMPLATE) for p in b]
        rng.shuffle(rows)
        return rows

    return (make(harmful[:per_class], benign[:per_class]),
            make(harmful[per_class:need], benign[per_class:need]))


def self_answers(examples: Sequence[Example], answer_fn) -> list[Example]:
    """Benign targets replaced by ``answer_fn(prompts) -> replies`` (e.g. the base model's greedy answers)."""
    benign = [i for i, e in enumerate(examples) if not e.harmful]
    replies = answer_fn([examples[i].prompt for i in benign])
    out = list(examples)
    for i, reply in zip(benign, replies):
        out[i] = Example(out[i].prompt, False, reply)
    return out
