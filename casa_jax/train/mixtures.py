"""Text-only training mixtures from the vendored prompt sets: harmful -> refusal, benign -> answer.

Splits come from ``casa_jax.data.splits``: training examples from ``train``, the held-out examples the
trainer evaluates on from ``validation``; ``test`` is kept for ``python -m casa_jax.evaluate``.

Harmful targets are refusals: one of a configurable set of templates, or (``model_refusals``) the base
model's own reply under the safety prompt where the keyword judge calls it a refusal. Benign targets are
a fixed acknowledgement (``template``, for tiny models and tests) or the base model's own greedy answer
(``self_answers``: self-distillation keeps the model's helpfulness instead of teaching it one canned
reply). The paper mixes about 6.2k harmful with 10k benign prompts (``benign_ratio`` about 1.6).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from typing import Callable, Sequence

from casa_jax.casa.examples import Example
from casa_jax.model.config import ConfigError
from casa_jax import storage
from casa_jax.storage import write_text_atomic

BENIGN_TEMPLATE = "Sure, here is a helpful answer."
PAPER_BENIGN_RATIO = 10_000 / 6_200
# Compliant openings an attacker might put in the assistant's mouth. Training refusals that follow a cut
# of one of them (1 word up to all of it) teach the model to refuse after ``<|unsafe|>`` even when the
# reply already began to comply. Worded apart from the evaluation's prefill (``attacks.text.PREFILL_TEXT``),
# which stays unseen; "{request}" is the harmful request itself, lower-cased, as AdvBench's targets echo it.
COMPLIANT_OPENINGS = (
    "Sure, here is how to {request}:", "Sure, here's {request}", "Certainly! Here is what you asked for.",
    "Of course. Below you will find", "Absolutely, here are the steps:", "Here is a step-by-step guide:",
    "Okay, let's get started. First,", "No problem! To {request}, you will need", "I can help with that. Step 1:",
    "Great question. The first thing to do is", "Step 1: Gather the following materials:", "Sure thing!",
    "Alright, here goes:", "Happy to help. Here is", "As requested, here is a detailed plan:",
    "1. Start by", "Here you go:", "Yes, I can do that. The method is", "Sure, I can explain. To begin,",
    "Definitely. Here's everything you need to know:",
)

AnswerFn = Callable[..., list]  # (prompts, safety_prompt=False) -> list of ``Answer``


def split_prompts(names: Sequence[str], split: str, max_chars: int) -> list[str]:
    """De-duplicated prompts of ``split`` (train / validation / test) from the named sets."""
    from casa_jax.data.splits import unique_split_records
    short = lambda r: len(r["prompt"].strip()) <= max_chars  # noqa: E731
    return [r["prompt"].strip() for _, r in unique_split_records(names, split, keep=short)]


def split_examples(harmful_sets: Sequence[str], benign_sets: Sequence[str], num_harmful: int, heldout_per_class: int,
                   refusals: str | Sequence[str], max_chars: int = 200, seed: int = 0,
                   benign_ratio: float = 1.0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: ``num_harmful`` harmful and ``round(benign_ratio * num_harmful)`` benign
    prompts from the train split, ``heldout_per_class`` of each from the validation split; shuffled with
    ``seed``. Harmful targets cycle through ``refusals``; benign targets are ``BENIGN_TEMPLATE``."""
    rng = random.Random(seed)
    refusals = [refusals] if isinstance(refusals, str) else list(refusals)
    if not refusals:
        raise ValueError("need at least one refusal template")
    num_benign = round(benign_ratio * num_harmful)
    pools = {}
    for split, sizes in (("train", (num_harmful, num_benign)), ("validation", (heldout_per_class,) * 2)):
        for kind, sets, need in (("harmful", harmful_sets, sizes[0]), ("benign", benign_sets, sizes[1])):
            pool = split_prompts(sets, split, max_chars)
            if len(pool) < need:
                raise ConfigError(f"only {len(pool)} {kind} prompts of <= {max_chars} characters in the {split} split "
                                  f"of {list(sets)}; need {need} (lower --config.data.num_harmful, benign_ratio or "
                                  "heldout_per_class, raise max_chars, or add sets)")
            rng.shuffle(pool)
            pools[split, kind] = pool[:need]

    def make(split):
        rows = [Example(p, True, refusals[i % len(refusals)]) for i, p in enumerate(pools[split, "harmful"])]
        rows += [Example(p, False, BENIGN_TEMPLATE) for p in pools[split, "benign"]]
        rng.shuffle(rows)
        return rows

    return make("train"), make("validation")


@dataclasses.dataclass(frozen=True)
class Answer:
    """A generated reply and whether it ended by itself (an end-of-turn token) rather than at its budget."""
    text: str
    complete: bool = True


def self_answers(examples: Sequence[Example], answer_fn: AnswerFn) -> list[Example]:
    """Benign targets replaced by ``answer_fn(prompts) -> answers`` (e.g. the base model's greedy answers);
    an answer cut at its token budget keeps its cut (``ends_turn=False``) instead of learning to stop there."""
    benign = [i for i, e in enumerate(examples) if not e.harmful]
    replies = answer_fn([examples[i].prompt for i in benign])
    out = list(examples)
    for i, reply in zip(benign, replies):
        out[i] = Example(out[i].prompt, False, reply.text, ends_turn=reply.complete)
    return out


def with_forced_unsafe(examples: Sequence[Example], fraction: float, refusals: Sequence[str],
                       seed: int = 0) -> list[Example]:
    """``examples`` plus, for about ``fraction`` of the benign rows, a copy that is given the unsafe token
    and a refusal (``Example.forced_unsafe``; CASA only: SSFT would learn to refuse benign prompts)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--config.data.forced_unsafe={fraction}: expected a fraction in [0, 1]")
    rng = random.Random(f"forced:{seed}")
    extra = [Example(e.prompt, False, refusals[i % len(refusals)], forced_unsafe=True)
             for i, e in enumerate(x for x in examples if not x.harmful and rng.random() < fraction)]
    out = list(examples) + extra
    rng.shuffle(out)
    return out


def with_compliant_openings(examples: Sequence[Example], fraction: float, seed: int = 0,
                            openings: Sequence[str] = COMPLIANT_OPENINGS, answer_fraction: float = 0.0) -> list[Example]:
    """A copy of ``examples`` in which about ``fraction`` of the harmful rows get an untrained assistant
    prefix: the first 1..all words of a compliant opening, after which their refusal target must follow.
    About ``answer_fraction`` of the benign rows get the first words (up to half) of their own answer as
    the prefix and the rest as the target: the model learns to go on answering after a partial answer,
    so refusing after an opening stays tied to the harmful rows instead of leaking into benign answers."""
    for name, value in (("prefill_refusals", fraction), ("prefill_answers", answer_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--config.data.{name}={value}: expected a fraction in [0, 1]")
    rng = random.Random(f"openings:{seed}")
    out = []
    for e in examples:
        draw = rng.random()  # drawn for every row, so one row's prefix never shifts another's
        if e.prefix:  # a row that already has a prefix keeps it
            out.append(e)
            continue
        if e.harmful and draw < fraction:
            request = e.prompt.rstrip(" .?!")
            words = rng.choice(openings).format(request=request[:1].lower() + request[1:]).split()
            e = dataclasses.replace(e, prefix=" ".join(words[:rng.randint(1, len(words))]))
        elif not e.harmful and draw < answer_fraction:
            cuts = [m.start() for m in re.finditer(r"\s+\S", e.target)]  # before each later word
            if len(cuts) >= 2:
                cut = cuts[rng.randint(0, len(cuts) // 2 - 1)]
                e = dataclasses.replace(e, prefix=e.target[:cut], target=e.target[cut:])
        out.append(e)
    return out


def model_refusals(examples: Sequence[Example], answer_fn: AnswerFn) -> tuple[list[Example], int]:
    """Harmful targets replaced by the model's own reply under the safety prompt where that reply is a
    refusal (keyword judge); other rows keep their template. Returns (examples, number replaced)."""
    from casa_jax.casa.refusal import is_refusal
    harmful = [i for i, e in enumerate(examples) if e.harmful]
    replies = answer_fn([examples[i].prompt for i in harmful], safety_prompt=True)
    out, replaced = list(examples), 0
    for i, reply in zip(harmful, replies):
        if reply.text.strip() and is_refusal(reply.text):
            out[i] = Example(out[i].prompt, True, reply.text.strip(), ends_turn=reply.complete)
            replaced += 1
    return out, replaced


def cached_targets(path: str, key: dict, build: Callable[[], tuple[list[Example], list[Example]]],
                   write: bool = True) -> tuple[list[Example], list[Example]]:
    """``build()``'s (train, held-out) examples, cached as JSON at ``path`` under a hash of ``key`` (what
    decides them: base model, sets, counts, target kinds). Distilling answers is the slow part of a
    restart; a changed key rebuilds. Written atomically (by one process: ``write``)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    if storage.isfile(path):
        try:
            cached = json.loads(storage.read_text(path))
            if cached.get("key") == digest:
                return tuple([Example(**e) for e in cached[part]] for part in ("train", "heldout"))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or from another version: rebuild
    train, heldout = build()
    if not write:
        return train, heldout
    write_text_atomic(path, json.dumps({"key": digest, "train": [dataclasses.asdict(e) for e in train],
                                        "heldout": [dataclasses.asdict(e) for e in heldout]}))
    return train, heldout
