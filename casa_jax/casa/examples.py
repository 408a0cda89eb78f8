"""Training examples -> padded token batches for the objectives.

An example is (prompt, harmful?, target). The chat template renders the user turn and opens the
assistant turn; CASA puts one safety token right there, then an optional untrained assistant prefix (a
compliant opening the refusal must overcome), the target (refusal or answer) and the end-of-turn token.
Only the target tokens carry the language-model loss; the safety token is learned through its own
two-way loss.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import numpy as np

from casa_jax.casa.config import SAFETY_PROMPT
from casa_jax.casa.safety_tokens import SafetyTokenIds


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    harmful: bool
    target: str
    # Assistant text placed before the target and never trained on: an attacker-style compliant opening
    # ("Sure, here is how to ...") that the refusal target must overcome (after the safety token for CASA).
    prefix: str = ""
    # False when the target is cut (a distilled answer that hit its token budget): no end-of-turn token
    # is appended, so the model is not taught to stop mid-answer.
    ends_turn: bool = True
    # CASA only: a benign prompt given the unsafe token and a refusal target, with no safety-token loss.
    # Such rows teach the decoder that the token, not the prompt's topic, decides whether it refuses
    # (without them it learns to refuse topic-matched benign prompts even after ``<|safe|>``).
    forced_unsafe: bool = False


@flax.struct.dataclass
class TrainBatch:
    input_ids: jax.Array  # [B, T] int32, right-padded
    attention_mask: jax.Array  # [B, T] int32
    loss_mask: jax.Array  # [B, T] int32: 1 where the token is a target the LM loss predicts
    prompt_mask: jax.Array  # [B, T] int32: the prompt positions the safety attention reads
    safety_index: jax.Array  # [B] int32: position of the safety token (-1: none, e.g. SSFT)
    label: jax.Array  # [B] int32: 1 harmful, 0 benign
    safety_weight: jax.Array  # [B] float32: 1 where the safety-token loss applies, 0 for forced-token rows


def render_prompt(tokenizer, prompt: str, safety_prompt: bool = False) -> list[int]:
    """Token ids of the chat-formatted user turn plus the opened assistant turn."""
    text = f"{SAFETY_PROMPT} {prompt}" if safety_prompt else prompt
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def render_conversation(tokenizer, messages: Sequence[dict], safety_prompt: bool = False) -> list[int]:
    """Token ids of a whole chat (system, earlier user / assistant turns, then the user turn being answered)
    plus the opened assistant turn; the safety prompt, if on, leads the last user message as in training."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a conversation must end with a user message")
    messages = [dict(m) for m in messages]
    if safety_prompt:
        messages[-1]["content"] = f"{SAFETY_PROMPT} {messages[-1]['content']}"
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def end_of_turn_id(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    return vocab.get("<|im_end|>", tokenizer.eos_token_id)


def build_batch(tokenizer, examples: Sequence[Example], length: int, ids: SafetyTokenIds | None,
                safety_prompt: bool = False) -> TrainBatch:
    """Examples -> a ``TrainBatch`` of ``length`` tokens (NumPy). ``ids=None`` builds SSFT-style rows
    without a safety token. Targets are cut to fit; a prompt that cannot fit is an error naming it."""
    b = len(examples)
    out = {k: np.zeros((b, length), np.int32) for k in ("input_ids", "attention_mask", "loss_mask", "prompt_mask")}
    safety_index = np.full((b,), -1, np.int32)
    label = np.asarray([int(e.harmful) for e in examples], np.int32)
    safety_weight = np.asarray([0.0 if e.forced_unsafe else 1.0 for e in examples], np.float32)
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id or 0
    out["input_ids"][:] = pad
    for row, ex in enumerate(examples):
        prompt = render_prompt(tokenizer, ex.prompt, safety_prompt)
        head = prompt + ([ids.of(ex.harmful or ex.forced_unsafe)] if ids is not None else [])
        head += tokenizer.encode(ex.prefix, add_special_tokens=False) if ex.prefix else []
        if len(head) + 1 > length:
            raise ValueError(f"example {row}: the prompt takes {len(head)} tokens, more than length={length} allows "
                             f"(prompt starts {ex.prompt[:40]!r}); raise the sequence length")
        target = tokenizer.encode(ex.target, add_special_tokens=False) + ([eot] if ex.ends_turn else [])
        target = target[:length - len(head)]
        seq = head + target
        out["input_ids"][row, :len(seq)] = seq
        out["attention_mask"][row, :len(seq)] = 1
        out["loss_mask"][row, len(head):len(seq)] = 1
        out["prompt_mask"][row, :len(prompt)] = 1
        if ids is not None:
            safety_index[row] = len(prompt)
    return TrainBatch(safety_index=safety_index, label=label, safety_weight=safety_weight, **out)
