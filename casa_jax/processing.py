"""Chat messages with images, videos and 16 kHz audio -> thinker inputs, as Qwen2.5-Omni's processor does.

Images go through transformers' ``Qwen2VLImageProcessorPil`` and audio through its
``WhisperFeatureExtractor``; placeholders are expanded exactly as ``Qwen2_5OmniProcessor`` expands them
(tests/test_processing.py compares the two). ``Qwen2_5OmniProcessor`` itself cannot be built without
torchvision (its video processor needs it), so videos are handled here: each frame is resized and
normalised by the same image processor, then consecutive frames form the temporal patches.
Inputs are checked first, and a bad one is named: empty or non-finite audio, a wrong sample rate, a
too-small image, more media than placeholders.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from casa_jax.model.audio_encoder import audio_output_tokens
from casa_jax.model.encoder_config import AudioConfig, VisionConfig
from casa_jax.model.rope_index import chunk_slices

SAMPLING_RATE = 16_000
MAX_AUDIO_SECONDS = 30  # the feature extractor pads/truncates to 30 s; longer clips are refused
# Tokenizer attributes the processor needs, and the strings the Qwen2.5-Omni tokenizer uses for them.
OMNI_SPECIAL_TOKENS = {
    "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
}
# Qwen's ChatML with multimodal content items (text / image / video / audio).
OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif item['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif item['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-Omni's preprocessor defaults (min/max pixels of an image; videos get their own budget).
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_FPS = 2.0


class InputError(ValueError):
    """A media input or prompt that cannot be turned into model inputs."""


@dataclasses.dataclass(frozen=True)
class Audio:
    """A mono waveform with its sample rate (what an ``{"type": "audio"}`` message item carries)."""

    waveform: np.ndarray
    sampling_rate: int = SAMPLING_RATE


def _to_image_array(image: Any, name: str) -> np.ndarray:
    """PIL image or [H, W, 3] array -> uint8 [H, W, 3]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InputError(f"{name}: expected an RGB image [height, width, 3] or a PIL image, got shape "
                         f"{list(array.shape)}")
    if array.dtype != np.uint8:
        if not np.all(np.isfinite(array)):
            raise InputError(f"{name}: contains NaN or infinite pixel values")
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"{name}: float pixels must lie in [0, 255], got [{array.min()}, {array.max()}]")
        array = array.astype(np.uint8) if array.max() > 1 else (array * 255).round().astype(np.uint8)
    return array


def _check_image_size(array: np.ndarray, name: str, min_side: int) -> None:
    h, w = array.shape[:2]
    if min(h, w) < min_side:
        raise InputError(f"{name}: {w}x{h} pixels is too small; each side needs at least {min_side} pixels "
                         "(one vision patch)")
    if max(h, w) / min(h, w) > 200:
        raise InputError(f"{name}: aspect ratio {max(h, w) / min(h, w):.0f}:1 exceeds the vision encoder's 200:1")


def _to_waveform(audio: Any, name: str, resample: bool, pool_stride: int = 2) -> np.ndarray:
    """An ``Audio``, (waveform, rate) pair or bare 16 kHz array -> float32 mono waveform at 16 kHz."""
    if isinstance(audio, Audio):
        wave, rate = audio.waveform, audio.sampling_rate
    elif isinstance(audio, tuple) and len(audio) == 2:
        wave, rate = audio
    else:
        wave, rate = audio, SAMPLING_RATE
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2 and 1 in wave.shape:
        wave = wave.reshape(-1)
    if wave.ndim != 1:
        raise InputError(f"{name}: expected a mono waveform [samples], got shape {list(wave.shape)}")
    if wave.size == 0:
        raise InputError(f"{name}: the waveform is empty")
    if not np.all(np.isfinite(wave)):
        raise InputError(f"{name}: the waveform contains NaN or infinite samples")
    if int(rate) != SAMPLING_RATE:
        if not resample:
            raise InputError(f"{name}: sample rate {rate} Hz; the audio encoder needs {SAMPLING_RATE} Hz "
                             "(resample first, or pass resample=True)")
        from math import gcd

        from scipy.signal import resample_poly
        g = gcd(int(rate), SAMPLING_RATE)
        wave = resample_poly(wave, SAMPLING_RATE // g, int(rate) // g).astype(np.float32)
    seconds = wave.size / SAMPLING_RATE
    if seconds > MAX_AUDIO_SECONDS:
        raise InputError(f"{name}: {seconds:.1f} s is longer than the {MAX_AUDIO_SECONDS} s one clip may last; "
                         "split it into several clips")
    if audio_output_tokens(wave.size // 160, pool_stride) < 1:
        raise InputError(f"{name}: {wave.size} samples is too short to give one audio token (needs >= "
                         f"{0.02 * pool_stride + 0.01:.2f} s)")
    return wave


def _to_frames(video: Any, name: str) -> np.ndarray:
    frames = np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InputError(f"{name}: expected frames [time, height, width, 3], got shape {list(frames.shape)}")
    return np.stack([_to_image_array(f, f"{name} frame {i}") for i, f in enumerate(frames)])


class OmniProcessor:
    """Prompts + media -> the arrays ``Qwen2_5OmniProcessor`` returns (NumPy), for ``Thinker.prepare``.

    ``tokenizer`` may be None for media-only use (``images``, ``videos``, ``audio``). ``vision`` None: an
    audio-only thinker (images and videos are refused). ``audio``: the encoder's config, which decides the
    placeholder count per clip (its pooling) and the mel bins (Qwen2.5-Omni's when None).
    ``audio_emitter``: for an ``emit="ctc"`` encoder, (input_features, feature_attention_mask) -> one [steps]
    bool mask per clip of the steps that become tokens (the Engine passes its model's); the count of
    placeholders then follows what the audio says.
    """

    def __init__(self, tokenizer, vision: VisionConfig | None, image_min_pixels: int = IMAGE_MIN_PIXELS,
                 image_max_pixels: int = IMAGE_MAX_PIXELS, video_min_pixels: int = VIDEO_MIN_PIXELS,
                 video_max_pixels: int = VIDEO_MAX_PIXELS, video_fps: float = VIDEO_FPS, num_mel_bins: int | None = None,
                 audio: AudioConfig | None = None, audio_emitter=None):
        from transformers import Qwen2VLImageProcessorPil, WhisperFeatureExtractor

        missing = [attr for attr in OMNI_SPECIAL_TOKENS if getattr(tokenizer, attr, None) is None]
        if tokenizer is not None and missing:
            raise InputError(f"the tokenizer lacks the Qwen2.5-Omni special tokens {missing}; expected "
                             f"{ {k: OMNI_SPECIAL_TOKENS[k] for k in missing} } in its extra_special_tokens")
        self.tokenizer = tokenizer
        self.vision = vision
        self.pool_stride = audio.pool_stride if audio is not None else 2
        self.emit = audio.emit if audio is not None else "all"
        self.audio_emitter = audio_emitter
        self.image_processor = None if vision is None else Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size, min_pixels=image_min_pixels, max_pixels=image_max_pixels)
        self.video_pixels = (video_min_pixels, video_max_pixels)
        self.video_fps = float(video_fps)
        mel = num_mel_bins or (audio.num_mel_bins if audio is not None else 128)
        if audio is not None and mel != audio.num_mel_bins:
            raise InputError(f"the feature extractor computes {mel} mel bins but the audio encoder takes "
                             f"{audio.num_mel_bins} (preprocessor_config.json feature_size vs audio_config)")
        self.feature_extractor = WhisperFeatureExtractor(feature_size=mel, sampling_rate=SAMPLING_RATE)

    @classmethod
    def from_pretrained(cls, path: str, vision: VisionConfig | None, tokenizer=None,
                        audio: AudioConfig | None = None, audio_emitter=None) -> "OmniProcessor":
        """From a directory with tokenizer files and, optionally, ``preprocessor_config.json`` (``path`` None:
        a model in memory, with ``tokenizer`` given and the defaults)."""
        from transformers import AutoTokenizer

        if path is None and tokenizer is None:
            raise InputError("OmniProcessor.from_pretrained: give a directory or a tokenizer")
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        kwargs = {}
        pre = os.path.join(path, "preprocessor_config.json") if path else ""
        if pre and os.path.isfile(pre):
            with open(pre) as f:
                cfg = json.load(f)
            if "min_pixels" in cfg:
                kwargs["image_min_pixels"] = int(cfg["min_pixels"])
            if "max_pixels" in cfg:
                kwargs["image_max_pixels"] = int(cfg["max_pixels"])
            if "feature_size" in cfg:
                kwargs["num_mel_bins"] = int(cfg["feature_size"])
        return cls(tokenizer, vision, audio=audio, audio_emitter=audio_emitter, **kwargs)

    # -- media -------------------------------------------------------------------------------------
    def _need_vision(self, kind: str) -> None:
        if self.vision is None:
            raise InputError(f"{kind} given, but this thinker has no vision encoder (an audio-only model)")

    def images(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        self._need_vision("images")
        arrays = [_to_image_array(im, f"image {i}") for i, im in enumerate(images)]
        for i, a in enumerate(arrays):
            _check_image_size(a, f"image {i}", self.vision.patch_size)
        out = self.image_processor(images=arrays, return_tensors="np")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def videos(self, videos: Sequence[Any]) -> dict[str, np.ndarray]:
        """Each frame resized/normalised by the image processor; frames padded (last frame repeated) to a
        multiple of temporal_patch_size, and each group of frames forms one temporal patch."""
        self._need_vision("videos")
        tps, c, p = self.vision.temporal_patch_size, self.vision.in_channels, self.vision.patch_size
        lo, hi = self.video_pixels
        patches, grids = [], []
        for i, video in enumerate(videos):
            frames = _to_frames(video, f"video {i}")
            _check_image_size(frames[0], f"video {i}", self.vision.patch_size)
            if len(frames) % tps:
                frames = np.concatenate([frames, np.repeat(frames[-1:], tps - len(frames) % tps, axis=0)])
            per_frame = []
            for frame in frames:
                out = self.image_processor(images=[frame], min_pixels=lo, max_pixels=hi, return_tensors="np")
                _, gh, gw = out["image_grid_thw"][0]
                # [h*w, C, T, P, P] with T copies of the frame: keep one.
                per_frame.append(out["pixel_values"].reshape(-1, c, tps, p, p)[:, :, 0])
            stacked = np.stack(per_frame).reshape(len(frames) // tps, tps, gh * gw, c, p, p)
            grouped = stacked.transpose(0, 2, 3, 1, 4, 5)  # [t, h*w, C, T, P, P]
            patches.append(grouped.reshape(-1, c * tps * p * p))
            grids.append([len(frames) // tps, gh, gw])
        return {"pixel_values_videos": np.concatenate(patches).astype(np.float32),
                "video_grid_thw": np.asarray(grids, np.int64),
                "video_second_per_grid": np.asarray([tps / self.video_fps] * len(grids), np.float32)}

    def audio(self, clips: Sequence[Any], resample: bool = False) -> dict[str, np.ndarray]:
        waves = [_to_waveform(a, f"audio {i}", resample, self.pool_stride) for i, a in enumerate(clips)]
        out = self.feature_extractor(waves, sampling_rate=SAMPLING_RATE, padding="max_length",
                                     return_attention_mask=True, return_tensors="np")
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    # -- text --------------------------------------------------------------------------------------
    def _expand(self, texts: list[str], token: str, replacements: list[str], kind: str) -> list[str]:
        """Replace the k-th ``token`` (counting across all texts) by ``replacements[k]``."""
        found = sum(t.count(token) for t in texts)
        if found != len(replacements):
            raise InputError(f"the prompts hold {found} {token} placeholders but {len(replacements)} {kind} were "
                             f"given; each {kind[:-1]} needs exactly one placeholder")
        it = iter(replacements)
        return ["".join([parts[0]] + [next(it) + rest for rest in parts[1:]])
                for parts in (t.split(token) for t in texts)]

    def _video_with_audio(self, grid: np.ndarray, seconds_per_grid: float, audio_tokens: int,
                          seconds_per_chunk: float, position_id_per_seconds: float) -> str:
        """Video and audio placeholders interleaved in time chunks, as ``Qwen2_5OmniProcessor`` writes them."""
        tok = self.tokenizer
        m = self.vision.spatial_merge_size
        t, h, w = (int(x) for x in grid)
        video_index = np.repeat(np.arange(t), (h // m) * (w // m)) * seconds_per_grid * position_id_per_seconds
        per_chunk = int(position_id_per_seconds * seconds_per_chunk)
        video_chunks = chunk_slices(video_index, per_chunk)
        audio_chunks = chunk_slices(np.arange(audio_tokens), per_chunk)
        text = tok.audio_bos_token
        for j in range(max(len(video_chunks), len(audio_chunks))):
            if j < len(video_chunks):
                text += tok.video_token * (video_chunks[j][1] - video_chunks[j][0])
            if j < len(audio_chunks):
                text += tok.audio_token * (audio_chunks[j][1] - audio_chunks[j][0])
        return text + tok.audio_eos_token

    def __call__(self, text: str | Sequence[str], images: Sequence[Any] | None = None,
                 videos: Sequence[Any] | None = None, audio: Sequence[Any] | None = None,
                 resample_audio: bool = False, use_audio_in_video: bool = False, seconds_per_chunk: float = 2.0,
                 position_id_per_seconds: float = 25) -> dict[str, Any]:
        """Prompts holding one placeholder per medium (as the chat template writes them) -> arrays.

        ``use_audio_in_video``: ``audio[i]`` is the sound track of ``videos[i]``; each video placeholder
        becomes video and audio tokens interleaved in ``seconds_per_chunk`` chunks, and the prompts hold
        no separate audio placeholders.
        """
        texts = [text] if isinstance(text, str) else list(text)
        tok = self.tokenizer
        if tok is None:
            raise InputError("this OmniProcessor has no tokenizer; it can only process media (images/videos/audio)")
        images, videos, audio = list(images or []), list(videos or []), list(audio or [])
        out: dict[str, Any] = {}
        merge = self.vision.merge_unit if self.vision is not None else 1
        audio_tokens: list[int] = []
        if audio:
            out.update(self.audio(audio, resample=resample_audio))
            if self.emit == "ctc":
                if self.audio_emitter is None:
                    raise InputError("this audio encoder emits tokens by CTC: the processor needs the model's "
                                     "audio_emitter (use Engine.processor())")
                out["audio_emit"] = [np.asarray(m, bool) for m in self.audio_emitter(
                    out["input_features"], out["feature_attention_mask"])]
                audio_tokens = [int(m.sum()) for m in out["audio_emit"]]
            else:
                audio_tokens = audio_output_tokens(out["feature_attention_mask"].sum(-1), self.pool_stride).tolist()
        if images:
            out.update(self.images(images))
            texts = self._expand(texts, tok.image_token,
                                 [tok.image_token * n for n in (out["image_grid_thw"].prod(-1) // merge).tolist()],
                                 "images")
        if use_audio_in_video:
            if len(audio) != len(videos):
                raise InputError(f"use_audio_in_video needs one audio clip per video: got {len(videos)} videos and "
                                 f"{len(audio)} audio clips")
            if any(tok.audio_token in t for t in texts):
                raise InputError(f"with use_audio_in_video the audio clips are the videos' sound tracks; the prompts "
                                 f"must not hold separate {tok.audio_token} placeholders")
            out.update(self.videos(videos))
            replacements = [self._video_with_audio(g, s, n, seconds_per_chunk, position_id_per_seconds)
                            for g, s, n in zip(out["video_grid_thw"], out["video_second_per_grid"], audio_tokens)]
            texts = self._expand(texts, tok.video_token, replacements, "videos")
            out["use_audio_in_video"] = True
        else:
            if videos:
                out.update(self.videos(videos))
                texts = self._expand(texts, tok.video_token, [tok.video_token * n for n in (
                    out["video_grid_thw"].prod(-1) // merge).tolist()], "videos")
            if audio:
                texts = self._expand(texts, tok.audio_token, [tok.audio_token * n for n in audio_tokens],
                                     "audio clips")
        for kind, media, token in (("images", images, tok.image_token), ("videos", videos, tok.video_token),
                                   ("audio clips", audio, tok.audio_token)):
            if not media and any(token in t for t in texts):
                raise InputError(f"the prompts hold {token} placeholders but no {kind} were given")
        enc = tok(texts, padding=True, padding_side="left", return_tensors="np")
        out["input_ids"] = enc["input_ids"]
        out["attention_mask"] = enc["attention_mask"]
        return out

    @property
    def chat_template(self) -> str:
        """The tokenizer's own chat template when it renders media items (it names ``<|audio_bos|>``, as an
        ``io/omni_mini`` model's does), else Qwen2.5-Omni's."""
        own = getattr(self.tokenizer, "chat_template", None)
        return own if isinstance(own, str) and OMNI_SPECIAL_TOKENS["audio_bos_token"] in own else OMNI_CHAT_TEMPLATE

    def apply_chat_template(self, conversations: Sequence[Sequence[Mapping]], add_generation_prompt: bool = True,
                            audio_in_video: bool = False) -> tuple[list[str], dict[str, list]]:
        """Render conversations and collect their media in order: (texts, {"images", "videos", "audio"}).

        ``audio_in_video``: audio items are the videos' sound tracks and get no placeholder of their own.
        """
        media: dict[str, list] = {"images": [], "videos": [], "audio": []}
        field = {"image": "images", "video": "videos", "audio": "audio"}
        for c, conversation in enumerate(conversations):
            for m, message in enumerate(conversation):
                content = message.get("content")
                if isinstance(content, str):
                    continue
                for item in content or []:
                    kind = item.get("type")
                    if kind in field:
                        if kind not in item:
                            raise InputError(f"conversation {c}, message {m}: a {kind!r} item needs a {kind!r} key")
                        value = item[kind]
                        if kind == "audio" and "sampling_rate" in item:
                            value = Audio(np.asarray(value), int(item["sampling_rate"]))
                        media[field[kind]].append(value)
                    elif kind != "text":
                        raise InputError(f"conversation {c}, message {m}: unknown content type {kind!r}; "
                                         "expected text, image, video or audio")
        rendered = conversations
        if audio_in_video:  # sound tracks travel with their video placeholder
            rendered = [[dict(m, content=[i for i in m["content"] if i.get("type") != "audio"])
                         if not isinstance(m.get("content"), str) else m for m in conv] for conv in conversations]
        template = self.chat_template
        texts = [self.tokenizer.apply_chat_template(list(conv), tokenize=False, chat_template=template,
                                                    add_generation_prompt=add_generation_prompt)
                 for conv in rendered]
        return texts, media

    def from_messages(self, conversations: Sequence[Sequence[Mapping]], add_generation_prompt: bool = True,
                      **kwargs) -> dict[str, Any]:
        """Chat conversations (HF message format with content items) -> processor arrays.

        ``kwargs`` go to ``__call__`` (``resample_audio``, ``use_audio_in_video``, ...). With
        ``use_audio_in_video``, give each video's sound track as an ``audio`` item right after it.
        """
        texts, media = self.apply_chat_template(conversations, add_generation_prompt,
                                                 audio_in_video=kwargs.get("use_audio_in_video", False))
        return self(texts, images=media["images"], videos=media["videos"], audio=media["audio"], **kwargs)


def load_image(path: str) -> np.ndarray:
    """An image file -> uint8 RGB [H, W, 3], with an error naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: cannot read as an image ({e})") from e


def load_wav(path: str) -> Audio:
    """A PCM WAV file -> mono float32 ``Audio`` in [-1, 1] at the file's sample rate."""
    import wave

    try:
        with wave.open(path, "rb") as f:
            rate, width, channels, n = f.getframerate(), f.getsampwidth(), f.getnchannels(), f.getnframes()
            raw = f.readframes(n)
    except (FileNotFoundError, wave.Error, EOFError) as e:
        raise InputError(f"{path}: cannot read as a PCM WAV file ({e})") from e
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    else:
        raise InputError(f"{path}: {8 * width}-bit samples are not supported (use 8, 16 or 32-bit PCM)")
    return Audio(data.reshape(-1, channels).mean(axis=1), rate)
