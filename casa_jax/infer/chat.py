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

    @property
    def continuation(self) -> str:
        """What the model itself wrote: ``text`` after the attacker's prefill (what judges read)."""
        return self.text[len(self.prefill):] if self.prefill and self.text.startswith(self.prefill) else self.text


def chat_replies(engine, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 threshold: float | None = None, refusal_mode: str | None = None,
                 images: Sequence | None = None, audios: Sequence | None = None,
                 prefills: Sequence[str] | None = None, safety_prompt: bool = False) -> list[Reply]:
    """One ``Reply`` per prompt from ``engine`` (an ``infer.engine.Engine``). ``images`` / ``audios``: one per
    prompt (or None entries) for thinkers. A CASA model trained with the safety prompt
    (``casa.safety_prompt``) always gets it here too, so serving and threshold calibration see the
    prompts training saw."""
    import jax

    from casa_jax.casa.examples import render_prompt
    from casa_jax.casa.refusal import is_refusal
    from casa_jax.casa.safety_tokens import strip_safety_tokens
    from casa_jax.infer.strategies import from_temperature
    from casa_jax.model.config import ConfigError

    tokenizer = engine.tokenizer
    safety_prompt = safety_prompt or bool(engine.is_casa and engine.casa.safety_prompt)
    if not engine.is_casa and (threshold is not None or refusal_mode):
        raise ConfigError(f"{engine.name}: --threshold/--refusal_mode apply to CASA models only; this checkpoint is "
                          f"{engine.objective or 'an untrained base model'!s} and would ignore them")
    strategy = from_temperature(temperature, top_k, top_p)
    prefill_texts = list(prefills) if prefills else [""] * len(prompts)
    prefill_ids = [tokenizer.encode(p, add_special_tokens=False) if p else [] for p in prefill_texts]
    has_media = any(x is not None for x in list(images or []) + list(audios or []))
    rng = jax.random.key(seed)

    arrays = None
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
    ids = [render_prompt(tokenizer, p, safety_prompt) for p in prompts]
    lengths = (list(arrays["attention_mask"].sum(-1)) if has_media else [len(i) for i in ids])
    check_context(engine.spec.text.max_position_embeddings, prompts, lengths, [len(p) for p in prefill_ids],
                  max_new_tokens)

    decoder = engine.decoder(strategy, threshold=threshold, refusal_mode=refusal_mode, media=has_media)
    if has_media:
        outs = decoder.generate_multimodal(engine.weights, arrays, max_new_tokens, prefill_ids, rng)
    else:
        outs = decoder.generate(engine.weights, ids, max_new_tokens, prefill_ids, rng)

    if engine.is_casa:
        casa = decoder.gate.casa
        replies = []
        for prompt, prefix, out in zip(prompts, prefill_texts, outs):
            d = out.decision
            if d.unsafe and casa.refusal_mode == "template":
                text, prefix = casa.refusal_template, ""
            else:
                text = prefix + strip_safety_tokens(tokenizer.decode(out.tokens, skip_special_tokens=True), casa)
            replies.append(Reply(prompt, text, d.verdict, d.v_s, d.p_safe, d.p_unsafe, prefill=prefix))
        return replies

    cosines = [None] * len(prompts)
    if engine.objective == "circuit_breaker":
        cosines = prompt_cosines(engine, ids, arrays)
    replies = []
    for prompt, prefix, out, cos in zip(prompts, prefill_texts, outs, cosines):
        text = prefix + tokenizer.decode(out.tokens, skip_special_tokens=True)
        if cos is not None:
            verdict = "rerouted" if cos < CB_REROUTED_BELOW else "intact"
        else:
            verdict = "refused" if is_refusal(text[len(prefix):]) else "answered"
        replies.append(Reply(prompt, text, verdict, cosine=cos, prefill=prefix))
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
