"""Chat-formatted generation through an ``Engine``: plain, LoRA-adapted, or CASA with its safety verdict.

Text prompts, optionally with an image / audio clip (Qwen2.5-Omni thinkers) and an attacker-controlled
assistant prefill (placed after the safety token for CASA models).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Reply:
    prompt: str
    text: str  # what the user sees (safety token stripped; prefill included)
    # CASA: "safe" / "unsafe"; Circuit Breakers: "rerouted" / "intact" (prompt representations vs the frozen
    # model's); others: "refused" / "answered" (keyword refusal detector on the text)
    verdict: str
    v_s: float | None = None
    p_safe: float | None = None
    p_unsafe: float | None = None
    cosine: float | None = None  # Circuit Breakers: mean cosine(adapted, frozen) over the prompt tokens
    prefill: str = ""  # the attacker-controlled assistant prefix that ``text`` starts with (if any)
    prompt_tokens: int = 0  # the rendered prompt's length (media placeholders included)
    completion_tokens: int = 0  # tokens the model generated (after the safety token and any prefill)
    turned_at: int = -1  # re-checking gate: the decode step at which the reply was found unsafe (-1: never)

    @property
    def continuation(self) -> str:
        """What the model itself wrote: ``text`` after the attacker's prefill (what judges read)."""
        return self.text[len(self.prefill):] if self.prefill and self.text.startswith(self.prefill) else self.text


def chat_replies(engine, prompts: Sequence[str | Sequence[dict]], max_new_tokens: int | Sequence[int] = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 threshold: float | None = None, refusal_mode: str | None = None,
                 images: Sequence | None = None, audios: Sequence | None = None,
                 prefills: Sequence[str] | None = None, safety_prompt: bool = False,
                 decode_length: int | None = None, recheck_every: int = 0,
                 recheck_threshold: float = 0.5) -> list[Reply]:
    """One ``Reply`` per prompt from ``engine`` (an ``infer.engine.Engine``). A prompt is a user message, or a
    whole conversation (``[{"role": ..., "content": str}, ...]``, system and earlier turns included, ending
    with a user turn). ``max_new_tokens``: one limit, or one per prompt (the batch is compiled for the
    largest and each row stops at its own; ``decode_length``: compile for that many steps instead, e.g. a
    bucket, so a server compiles one shape for many limits). ``recheck_every`` > 0 (CASA): re-check the
    safety head during decoding, after an attacker prefill, every that many tokens and as a row ends; a
    reply found unsafe ends and becomes the refusal template (``gates.CasaGate``). ``images`` /
    ``audios``: one per prompt (or None entries) for thinkers. A CASA model trained with the safety prompt
    (``casa.safety_prompt``) always gets it here too, so serving and threshold calibration see the
    prompts training saw."""
    import jax

    from casa_jax.casa.examples import render_conversation, render_prompt
    from casa_jax.casa.refusal import is_refusal
    from casa_jax.casa.safety_tokens import strip_safety_tokens
    from casa_jax.infer.strategies import from_temperature
    from casa_jax.model.config import ConfigError

    tokenizer = engine.tokenizer
    safety_prompt = safety_prompt or bool(engine.is_casa and engine.casa.safety_prompt)
    if not engine.is_casa and (threshold is not None or refusal_mode or recheck_every):
        raise ConfigError(f"{engine.name}: --threshold/--refusal_mode/--recheck_every apply to CASA models only; this "
                          f"checkpoint is {engine.objective or 'an untrained base model'!s} and would ignore them")
    strategy = from_temperature(temperature, top_k, top_p)
    limits = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(map(int, max_new_tokens))
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens limits for {len(prompts)} prompts")
    max_new_tokens = max(limits)
    if decode_length is not None:
        if decode_length < max_new_tokens:
            raise ValueError(f"decode_length={decode_length} is below the largest max_new_tokens {max_new_tokens}")
        max_new_tokens = decode_length
    prefill_texts = list(prefills) if prefills else [""] * len(prompts)
    prefill_ids = [tokenizer.encode(p, add_special_tokens=False) if p else [] for p in prefill_texts]
    has_media = any(x is not None for x in list(images or []) + list(audios or []))
    rng = jax.random.key(seed)

    arrays = None
    if has_media and not all(isinstance(p, str) for p in prompts):
        raise ValueError("images/audio go with single user messages, not whole conversations")
    if has_media:
        if not engine.spec.is_thinker:
            raise ConfigError(f"{engine.name}: images/audio need a Qwen2.5-Omni thinker checkpoint; this one is "
                              f"{engine.spec.model_type!r}")
        conversations = []
        for i, prompt in enumerate(prompts):
            content = []
            if images and images[i] is not None:
                content.append({"type": "image", "image": images[i]})
            if audios and audios[i] is not None:
                content.append({"type": "audio", "audio": audios[i]})
            content.append({"type": "text", "text": _with_safety_prompt(prompt, safety_prompt)})
            conversations.append([{"role": "user", "content": content}])
        arrays = engine.processor().from_messages(conversations, resample_audio=True)
    ids = [render_prompt(tokenizer, p, safety_prompt) if isinstance(p, str) else
           render_conversation(tokenizer, p, safety_prompt) for p in prompts]
    prompts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    lengths = (list(arrays["attention_mask"].sum(-1)) if has_media else [len(i) for i in ids])
    check_context(engine.spec.text.max_position_embeddings, prompts, lengths, [len(p) for p in prefill_ids],
                  max_new_tokens)

    decoder = engine.decoder(strategy, threshold=threshold, refusal_mode=refusal_mode, media=has_media,
                             recheck_every=recheck_every, recheck_threshold=recheck_threshold)
    if has_media:
        outs = decoder.generate_multimodal(engine.weights, arrays, max_new_tokens, prefill_ids, rng, limits=limits)
    else:
        outs = decoder.generate(engine.weights, ids, max_new_tokens, prefill_ids, rng, limits=limits)

    if engine.is_casa:
        casa = decoder.gate.casa
        replies = []
        for prompt, prefix, out, n in zip(prompts, prefill_texts, outs, lengths):
            d = out.decision
            if (d.unsafe and casa.refusal_mode == "template") or d.turned:
                text, prefix = casa.refusal_template, ""
            else:
                text = prefix + strip_safety_tokens(tokenizer.decode(out.tokens, skip_special_tokens=True), casa)
            replies.append(Reply(prompt, text, d.verdict, d.v_s, d.p_safe, d.p_unsafe, prefill=prefix,
                                 prompt_tokens=int(n), completion_tokens=len(out.tokens), turned_at=d.turned_at))
        return replies

    cosines = [None] * len(prompts)
    if engine.objective == "circuit_breaker":
        cosines = prompt_cosines(engine, ids, arrays)
    replies = []
    for prompt, prefix, out, cos, n in zip(prompts, prefill_texts, outs, cosines, lengths):
        text = prefix + tokenizer.decode(out.tokens, skip_special_tokens=True)
        if cos is not None:
            verdict = "rerouted" if cos < CB_REROUTED_BELOW else "intact"
        else:
            verdict = "refused" if is_refusal(text[len(prefix):]) else "answered"
        replies.append(Reply(prompt, text, verdict, cosine=cos, prefill=prefix, prompt_tokens=int(n),
                             completion_tokens=len(out.tokens)))
    return replies


def check_context(context: int, prompts: Sequence[str], lengths: Sequence[int], prefill_lengths: Sequence[int],
                  max_new_tokens: int) -> None:
    """Refuse a prompt that, with its prefill, the safety token and ``max_new_tokens``, would run past the
    model's context (positions beyond it are out of distribution: the verdict is no longer meaningful)."""
    from casa_jax.processing import InputError
    for prompt, n, extra in zip(prompts, lengths, prefill_lengths):
        need = int(n) + int(extra) + 1 + max_new_tokens
        if need > context:
            raise InputError(f"prompt {prompt[:40]!r}... takes {int(n)} tokens; with the prefill, the safety token "
                             f"and max_new_tokens={max_new_tokens} it needs {need} positions, more than the model's "
                             f"context of {context}")


CB_REROUTED_BELOW = 0.5  # mean cosine under which a Circuit-Breaker model counts as having rerouted


def prompt_cosines(engine, prompt_ids, arrays=None) -> list[float]:
    """Mean cosine similarity, over each prompt's tokens and the Circuit-Breaker layers, between the
    adapted model's hidden states and the frozen (LoRA-free) model's. With processor ``arrays`` the
    prompts (images, audio) go through the thinker."""
    import numpy as np

    from casa_jax.casa.objectives import CircuitBreakerConfig, cosine
    from casa_jax.infer.decode import bucket_length, left_pad, pad_to_bucket
    from casa_jax.model.rope import positions_from_mask

    model = engine.model
    cb = CircuitBreakerConfig(**model.meta_circuit_breaker) if model.meta_circuit_breaker else CircuitBreakerConfig()
    layers = tuple(cb.resolved_layers(model.spec.text.num_hidden_layers))
    if arrays is not None:
        inputs = engine.thinker.prepare(**pad_to_bucket(dict(arrays), engine.pad_id))
        mask = np.asarray(inputs.attention_mask)
        ours = engine.hidden_states(layers, inputs, media=True)
        ref = engine.hidden_states(layers, inputs, media=True, lora=False)
    else:
        ids, mask = left_pad(prompt_ids, bucket_length(max(map(len, prompt_ids))), engine.pad_id)
        positions = positions_from_mask(mask)
        ours = engine.hidden_states(layers, ids, positions, mask)
        ref = engine.hidden_states(layers, ids, positions, mask, lora=False)
    cos = np.asarray(cosine(ours, ref).mean(0))  # [B, T]
    return [float(cos[b][mask[b] == 1].mean()) for b in range(len(prompt_ids))]


def _with_safety_prompt(prompt: str, on: bool) -> str:
    from casa_jax.casa.config import SAFETY_PROMPT
    return f"{SAFETY_PROMPT} {prompt}" if on else prompt


def raw_completions(engine, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations of prompts that already carry their own markup (HarmBench's / Llama Guard's
    ``[INST] ... [/INST]`` judge prompts): each prompt is tokenized as-is (``tokenizer(prompt)``, with
    whatever BOS the tokenizer itself adds) and never wrapped in the checkpoint's chat template.

    The engine's decoder runs plainly (LoRA applied if it has one; a CASA model's safety gate is not
    run): use a plain model as judge. Returns the decoded new text per prompt, special tokens skipped."""
    import jax

    if not prompts:
        return []
    ids = [list(engine.tokenizer(p)["input_ids"]) for p in prompts]
    outs = engine.decoder(gated=False).generate(engine.weights, ids, max_new_tokens, rng=jax.random.key(0))
    return [engine.tokenizer.decode(out.tokens, skip_special_tokens=True) for out in outs]
