"""Chat-formatted generation from a checkpoint: plain, LoRA-adapted, or CASA with its safety verdict.

Text prompts, optionally with an image / audio clip (Qwen2.5-Omni thinkers) and an attacker-controlled
assistant prefill (placed after the safety token for CASA models).
"""

from __future__ import annotations

import functools

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


def load_tokenizer(ckpt_dir: str):
    from transformers import AutoTokenizer

    from casa_jax.io.hf_files import CheckpointError
    from casa_jax.io.orbax_io import sidecar_dir
    path = sidecar_dir(ckpt_dir)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: has no tokenizer files (hf_sidecar/); convert from a Hugging Face "
                              "directory that contains tokenizer.json or vocab.json + merges.txt")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _eos_ids(tokenizer) -> tuple[int, ...]:
    vocab = tokenizer.get_vocab()
    return tuple(sorted({tokenizer.eos_token_id, *(vocab[t] for t in ("<|endoftext|>", "<|im_end|>") if t in vocab)}))


def chat_replies(ckpt_dir: str, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 threshold: float | None = None, refusal_mode: str | None = None,
                 images: Sequence | None = None, audios: Sequence | None = None,
                 prefills: Sequence[str] | None = None, safety_prompt: bool = False) -> list[Reply]:
    """One ``Reply`` per prompt. ``images`` / ``audios``: one per prompt (or None entries) for thinkers.
    A CASA model trained with the safety prompt (``casa.safety_prompt``) always gets it here too, so
    serving and threshold calibration see the prompts training saw."""
    import dataclasses as dc

    import jax

    from casa_jax.casa.examples import render_prompt
    from casa_jax.casa.refusal import is_refusal
    from casa_jax.casa.safety_tokens import strip_safety_tokens
    from casa_jax.infer.strategies import from_temperature

    model, tokenizer = _loaded(ckpt_dir)  # first: says plainly when ckpt_dir is no checkpoint
    safety_prompt = safety_prompt or bool(model.is_casa and model.casa.safety_prompt)
    if not model.is_casa and (threshold is not None or refusal_mode):
        from casa_jax.model.config import ConfigError
        raise ConfigError(f"{ckpt_dir}: --threshold/--refusal_mode apply to CASA models only; this checkpoint is "
                          f"{model.objective or 'an untrained base model'!s} and would ignore them")
    strategy = from_temperature(temperature, top_k, top_p)
    pad = tokenizer.pad_token_id or 0
    eos = _eos_ids(tokenizer)
    prefill_texts = list(prefills) if prefills else [""] * len(prompts)
    prefill_ids = [tokenizer.encode(p, add_special_tokens=False) if p else [] for p in prefill_texts]
    has_media = any(x is not None for x in list(images or []) + list(audios or []))
    rng = jax.random.key(seed)

    arrays = thinker = None
    if has_media:
        from casa_jax.processing import OmniProcessor
        from casa_jax.io.orbax_io import sidecar_dir
        if not model.spec.is_thinker:
            from casa_jax.model.config import ConfigError
            raise ConfigError(f"{ckpt_dir}: images/audio need a Qwen2.5-Omni thinker checkpoint; this one is "
                              f"{model.spec.model_type!r}")
        thinker = _thinker(ckpt_dir)
        processor = OmniProcessor.from_pretrained(sidecar_dir(ckpt_dir), thinker.vision, tokenizer=tokenizer)
        conversations = []
        for i, prompt in enumerate(prompts):
            content = []
            if images and images[i] is not None:
                content.append({"type": "image", "image": images[i]})
            if audios and audios[i] is not None:
                content.append({"type": "audio", "audio": audios[i]})
            content.append({"type": "text", "text": _with_safety_prompt(prompt, safety_prompt)})
            conversations.append([{"role": "user", "content": content}])
        arrays = processor.from_messages(conversations, resample_audio=True)
    ids = [render_prompt(tokenizer, p, safety_prompt) for p in prompts]
    lengths = (list(arrays["attention_mask"].sum(-1)) if has_media else [len(i) for i in ids])
    check_context(model.spec.text.max_position_embeddings, prompts, lengths, [len(p) for p in prefill_ids],
                  max_new_tokens)

    if model.is_casa:
        from casa_jax.infer.casa_gate import ConditionalSampler
        casa = dc.replace(model.casa, **({"threshold": threshold} if threshold is not None else {}),
                          **({"refusal_mode": refusal_mode} if refusal_mode else {}))
        sampler = _cached(ConditionalSampler, model.spec.text, casa, model.ids, eos, pad, strategy, thinker=thinker)
        weights = model.weights()
        if has_media:
            outs = sampler.generate_multimodal(weights, arrays, max_new_tokens, prefill_ids, rng)
        else:
            outs = sampler.generate(weights, ids, max_new_tokens, prefill_ids, rng)
        replies = []
        for prompt, prefix, out in zip(prompts, prefill_texts, outs):
            if out.unsafe and casa.refusal_mode == "template":
                text, prefix = casa.refusal_template, ""
            else:
                text = prefix + strip_safety_tokens(tokenizer.decode(out.tokens, skip_special_tokens=True), casa)
            replies.append(Reply(prompt, text, out.verdict, out.v_s, out.p_safe, out.p_unsafe, prefill=prefix))
        return replies

    from casa_jax.model.text_decoder import CausalLM
    from casa_jax.infer.decode import Sampler
    sampler = _cached(Sampler, CausalLM(model.spec.text), eos_ids=eos, pad_id=pad, strategy=strategy)
    variables = {"params": model.params, **({"lora": model.lora} if model.lora is not None else {})}
    if has_media:
        outs = sampler.generate_multimodal(thinker, variables, model.encoders, dict(arrays), max_new_tokens, rng)
    else:
        full = [i + p for i, p in zip(ids, prefill_ids)]
        outs = sampler.generate(variables, full, max_new_tokens, rng)
    cosines = [None] * len(prompts)
    if model.objective == "circuit_breaker":
        cosines = prompt_cosines(model, ids, thinker, arrays, pad)
    replies = []
    for prompt, prefix, out, cos in zip(prompts, prefill_texts, outs, cosines):
        text = prefix + tokenizer.decode(out, skip_special_tokens=True)
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


def prompt_cosines(model, prompt_ids, thinker=None, arrays=None, pad_id: int = 0) -> list[float]:
    """Mean cosine similarity, over each prompt's tokens and the Circuit-Breaker layers, between the
    adapted model's hidden states and the frozen (LoRA-free) model's. With ``thinker`` and processor
    ``arrays`` the prompts (images, audio) go through the thinker."""
    import numpy as np

    from casa_jax.casa.objectives import CircuitBreakerConfig, cosine
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.infer.decode import bucket_length, left_pad, pad_to_bucket

    cb = CircuitBreakerConfig(**model.meta_circuit_breaker) if model.meta_circuit_breaker else CircuitBreakerConfig()
    layers = cb.resolved_layers(model.spec.text.num_hidden_layers)
    if thinker is not None and arrays is not None:
        inputs = thinker.prepare(**pad_to_bucket(dict(arrays), pad_id))
        mask = np.asarray(inputs.attention_mask)
        hidden = _hidden_states_fn(thinker, layers)
        ours, ref = hidden(model.params, model.encoders, inputs, model.lora), hidden(model.params, model.encoders,
                                                                                     inputs, None)
    else:
        ids, mask = left_pad(prompt_ids, bucket_length(max(map(len, prompt_ids))))
        hidden = _hidden_states_fn(model.spec.text, layers)
        positions = positions_from_mask(mask)
        ours, ref = hidden(model.params, ids, positions, mask, model.lora), hidden(model.params, ids, positions,
                                                                                   mask, None)
    cos = np.asarray(cosine(ours, ref).mean(0))  # [B, T]
    return [float(cos[b][mask[b] == 1].mean()) for b in range(len(prompt_ids))]


@functools.lru_cache(maxsize=8)
def _hidden_states_fn(model, layers: tuple):
    """A jitted ``(params, *inputs, lora) -> hidden_states`` of a Thinker, or of the decoder of a
    ``TextConfig`` (cached per model and layers)."""
    import jax

    from casa_jax.model.config import TextConfig
    from casa_jax.model.text_decoder import CausalLM
    if isinstance(model, TextConfig):
        decoder = CausalLM(model)

        def run(params, ids, positions, mask, lora):
            variables = {"params": params, **({"lora": lora} if lora is not None else {})}
            return decoder.apply(variables, ids, positions, mask, hidden_layers=layers,
                                 return_logits=False).hidden_states
    else:
        def run(params, encoders, inputs, lora):
            return model(params, encoders, inputs, hidden_layers=layers, return_logits=False, lora=lora).hidden_states
    return jax.jit(run)


# Repeated calls (batches of an evaluation) reuse the loaded checkpoint and the samplers' compiled
# functions instead of reloading and recompiling.
_MODELS: dict = {}
_SAMPLERS: dict = {}


def _loaded(ckpt_dir: str):
    import os

    from casa_jax.io.trained import load_trained
    key = os.path.abspath(ckpt_dir)
    if key not in _MODELS:
        model = load_trained(ckpt_dir)
        _MODELS[key] = (model, load_tokenizer(ckpt_dir))
    return _MODELS[key]


def _thinker(ckpt_dir: str):
    import os

    from casa_jax.model.thinker import Thinker
    key = ("thinker", os.path.abspath(ckpt_dir))
    if key not in _SAMPLERS:
        _SAMPLERS[key] = Thinker.from_spec(_loaded(ckpt_dir)[0].spec)
    return _SAMPLERS[key]


def _cached(factory, *args, **kwargs):
    key = (factory, args, tuple(sorted(kwargs.items())))
    try:
        hash(key)
    except TypeError:
        return factory(*args, **kwargs)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = factory(*args, **kwargs)
    return _SAMPLERS[key]


def clear_cache() -> None:
    """Forget loaded checkpoints (e.g. after rewriting one in place)."""
    _MODELS.clear()
    _SAMPLERS.clear()


def _with_safety_prompt(prompt: str, on: bool) -> str:
    from casa_jax.casa.config import SAFETY_PROMPT
    return f"{SAFETY_PROMPT} {prompt}" if on else prompt


def raw_completions(ckpt_dir: str, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations of prompts that already carry their own markup (HarmBench's / Llama Guard's
    ``[INST] ... [/INST]`` judge prompts): each prompt is tokenized as-is (``tokenizer(prompt)``, with
    whatever BOS the tokenizer itself adds) and never wrapped in the checkpoint's chat template.

    The checkpoint's decoder runs plainly (LoRA applied if it has one; a CASA model's safety step is not
    run): use a plain model as judge. Returns the decoded new text per prompt, special tokens skipped."""
    import jax

    from casa_jax.model.text_decoder import CausalLM
    from casa_jax.infer.decode import Sampler
    from casa_jax.infer.strategies import from_temperature

    model, tokenizer = _loaded(ckpt_dir)
    if not prompts:
        return []
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    sampler = _cached(Sampler, CausalLM(model.spec.text), eos_ids=_eos_ids(tokenizer),
                      pad_id=tokenizer.pad_token_id or 0, strategy=from_temperature(0.0, None, None))
    variables = {"params": model.params, **({"lora": model.lora} if model.lora is not None else {})}
    outs = sampler.generate(variables, ids, max_new_tokens, jax.random.key(0))
    return [tokenizer.decode(out, skip_special_tokens=True) for out in outs]
