"""Input processing: equal to transformers' Qwen2_5OmniProcessor, our video path equal to its image
processor frame by frame, clear errors for bad media, and messages -> logits equal to transformers."""

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.processing_utils import ProcessorMixin

import hf_fixtures as fx
from casa_jax import tiny
from casa_jax.io.hf import load_hf_checkpoint
from casa_jax.model.encoder_config import VisionConfig
from casa_jax.model.thinker import Thinker
from casa_jax.processing import Audio, InputError, OmniProcessor

SMALL = dict(image_min_pixels=28 * 28 * 2, image_max_pixels=28 * 28 * 12)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(400, omni=True)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return OmniProcessor(tokenizer, VisionConfig(**{k: v for k, v in fx.VISION.items()}), **SMALL)


@pytest.fixture(scope="module")
def reference(tokenizer, processor, monkeypatch_module):
    """transformers' own processor from the same parts. Its constructor insists on a torchvision video
    processor; the type check is lifted for images and audio, which never touch it."""
    monkeypatch_module.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    return transformers.Qwen2_5OmniProcessor(image_processor=processor.image_processor, video_processor=None,
                                             feature_extractor=processor.feature_extractor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tone(seconds, hz=440.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _conversations(rng):
    return [
        [{"role": "user", "content": [{"type": "image", "image": _rgb(rng, 60, 90)},
                                      {"type": "text", "text": "What is in this picture?"}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": _tone(1.3)},
                                      {"type": "image", "image": _rgb(rng, 40, 30)},
                                      {"type": "text", "text": "Describe both."}]}],
    ]


def test_equal_to_transformers_processor(processor, reference):
    texts, media = processor.apply_chat_template(_conversations(np.random.default_rng(0)))
    ours = processor(texts, images=media["images"], audio=media["audio"])
    theirs = reference(text=texts, images=media["images"], audio=media["audio"], return_tensors="np", padding=True)
    assert set(ours) == set(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], np.asarray(theirs[key]), err_msg=key)


def test_video_frames_match_image_processor(processor):
    """A video [a, a, b, b] is two temporal patches: each equals the image processor's patches of a, b."""
    rng = np.random.default_rng(1)
    a, b = _rgb(rng, 56, 84), _rgb(rng, 56, 84)
    proc = OmniProcessor(processor.tokenizer, processor.vision, video_min_pixels=SMALL["image_min_pixels"],
                         video_max_pixels=SMALL["image_max_pixels"], **SMALL)
    video = proc.videos([np.stack([a, a, b])])  # 3 frames: the last is repeated to fill the temporal patch
    image = proc.images([a, b])
    assert video["video_grid_thw"].tolist() == [[2] + image["image_grid_thw"][0, 1:].tolist()]
    n = image["pixel_values"].shape[0] // 2
    first = video["pixel_values_videos"][:n]
    np.testing.assert_array_equal(first, image["pixel_values"][:n])
    second = video["pixel_values_videos"][n:].reshape(n, 3, 2, 14, 14)
    np.testing.assert_array_equal(second[:, :, 1], image["pixel_values"][n:].reshape(n, 3, 2, 14, 14)[:, :, 0])
    np.testing.assert_allclose(video["video_second_per_grid"], [1.0])


@pytest.mark.parametrize("media, message", [
    (dict(audio=[np.zeros(0, np.float32)]), "audio 0: the waveform is empty"),
    (dict(audio=[np.full(1600, np.nan, np.float32)]), "audio 0: the waveform contains NaN"),
    (dict(audio=[Audio(_tone(1.0, rate=8000), 8000)]), "audio 0: sample rate 8000 Hz"),
    (dict(audio=[_tone(31)]), "audio 0: 31.0 s is longer than"),
    (dict(images=[np.zeros((1, 1, 3), np.uint8)]), "image 0: 1x1 pixels is too small"),
    (dict(images=[np.zeros((40, 40), np.uint8), np.zeros((40, 40, 3), np.uint8)]),
     "1 <|IMAGE|> placeholders but 2 images"),
    (dict(videos=[np.zeros((2, 40, 40), np.uint8)]), "video 0: expected frames"),
])
def test_bad_inputs_are_named(processor, media, message):
    text = "a <|vision_bos|><|IMAGE|><|vision_eos|>" if "images" in media else (
        "<|AUDIO|>" if "audio" in media else "<|VIDEO|>")
    with pytest.raises(InputError) as err:
        processor(text, **media)
    assert message in str(err.value)


def test_resampling_on_request(processor):
    out = processor("<|audio_bos|><|AUDIO|><|audio_eos|>", audio=[Audio(_tone(1.0, rate=8000), 8000)],
                    resample_audio=True)
    assert out["feature_attention_mask"].sum() == 100


@pytest.fixture(scope="module")
def token_thinker(hf_root, tokenizer):
    """A tiny thinker whose special-token ids are the tiny tokenizer's."""
    ids = {attr: tokenizer.convert_tokens_to_ids(tok) for attr, tok in
           (("image_token_index", "<|IMAGE|>"), ("video_token_index", "<|VIDEO|>"),
            ("audio_token_index", "<|AUDIO|>"), ("vision_start_token_id", "<|vision_bos|>"),
            ("vision_end_token_id", "<|vision_eos|>"), ("audio_start_token_id", "<|audio_bos|>"),
            ("audio_end_token_id", "<|audio_eos|>"))}
    saved = dict(fx.THINKER_TOKENS)
    fx.THINKER_TOKENS.update(ids)
    try:
        path = fx.make_thinker(str(hf_root / "proc_thinker"), seed=21, vocab_size=len(tokenizer))
    finally:
        fx.THINKER_TOKENS.clear()
        fx.THINKER_TOKENS.update(saved)
    loaded = load_hf_checkpoint(path, progress=False)
    thinker = Thinker.from_spec(loaded.spec)
    hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager").eval()
    return thinker, loaded, hf


# Max |our logits - transformers' float32 logits| allowed. Both sides round in float32, and their errors add:
# on the audio-in-video prompt (max |logit| 7.3, 2-core AVX2 EPYC) ours were 6.4e-5 from transformers run in
# float64 and transformers' float32 ones 8.5e-5 from it, 1.02e-4 from each other. A position, mask or
# encoder bug moves logits by orders of magnitude more.
LOGITS_ATOL = 2e-4


def _logits_diff(token_thinker, arrays, **hf_kwargs):
    thinker, loaded, hf = token_thinker
    logits = np.asarray(jax.jit(lambda p, e, x: thinker(p, e, x).logits)(
        loaded.params, loaded.encoders, thinker.prepare(**arrays)))
    tensors = {k: torch.tensor(np.asarray(v)) for k, v in arrays.items() if k != "use_audio_in_video"}
    with torch.no_grad():
        ref = hf(**tensors, **hf_kwargs).logits.numpy()
    real = arrays["attention_mask"].astype(bool)
    return np.abs(logits[real] - ref[real]).max()


def test_messages_to_logits_match_transformers(token_thinker, processor, tokenizer):
    """Chat messages with an image, audio and a video -> our inputs -> logits equal to transformers'."""
    rng = np.random.default_rng(2)
    conversations = _conversations(rng)
    conversations[0][0]["content"].append({"type": "video", "video": rng.integers(0, 256, (4, 56, 56, 3),
                                                                                  dtype=np.uint8)})
    proc = OmniProcessor(tokenizer, processor.vision, video_min_pixels=28 * 28 * 2,
                         video_max_pixels=28 * 28 * 4, **SMALL)
    arrays = proc.from_messages(conversations)
    assert _logits_diff(token_thinker, arrays) <= LOGITS_ATOL


def test_audio_in_video_matches_transformers(token_thinker, tokenizer, processor, reference):
    """use_audio_in_video: the placeholder string equals Qwen2_5OmniProcessor's, and the thinker's logits
    (interleaved 3-D positions, both encoders) equal transformers' with use_audio_in_video=True."""
    from types import SimpleNamespace
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)  # 4 s at 2 fps -> 4 temporal patches
    conversation = [[{"role": "user", "content": [{"type": "video", "video": frames},
                                                  {"type": "audio", "audio": _tone(4.2)},
                                                  {"type": "text", "text": "What happens?"}]}]]
    proc = OmniProcessor(tokenizer, processor.vision, video_min_pixels=28 * 28 * 2, video_max_pixels=28 * 28 * 4,
                         **SMALL)
    arrays = proc.from_messages(conversation, use_audio_in_video=True)
    assert arrays["use_audio_in_video"] is True
    # transformers' own placeholder string for the same grid and audio length
    reference.video_processor = SimpleNamespace(merge_size=2)
    audio_inputs = {"num_audio_tokens": [int(((arrays["feature_attention_mask"].sum() - 1) // 2 + 1 - 2) // 2 + 1)]}
    expected = transformers.Qwen2_5OmniProcessor.replace_video_with_audio_token(
        reference, {"video_grid_thw": arrays["video_grid_thw"], "video_second_per_grid": [1.0]}, 0, audio_inputs, 0,
        position_id_per_seconds=25, seconds_per_chunk=2.0)
    text = tokenizer.decode(arrays["input_ids"][0])
    assert expected in text and "<|vision_bos|><|audio_bos|>" in text
    assert (arrays["input_ids"] == tokenizer.convert_tokens_to_ids("<|VIDEO|>")).sum() == 4 * 4
    assert _logits_diff(token_thinker, arrays, use_audio_in_video=True) <= LOGITS_ATOL
    with pytest.raises(InputError, match="one audio clip per video"):
        proc("<|VIDEO|>", videos=[frames], use_audio_in_video=True)


def test_casa_sampler_on_image_and_audio_prompts(token_thinker, tokenizer, processor):
    """The conditional sampler prefills a multimodal prompt through the thinker: its v_s and safety
    probabilities equal a direct thinker forward + safety head, and decoding continues per row."""
    import copy

    import flax.linen as nn

    from casa_jax.casa.config import CasaConfig
    from casa_jax.peft.lora import init_lora
    from casa_jax.casa.safety_attention import SafetyAttention, safety_pair_logits, v_s_from_logit
    from casa_jax.casa.safety_tokens import add_safety_tokens
    from casa_jax.infer.decode import Decoder, Weights
    from casa_jax.infer.gates import CasaGate
    from casa_jax.model.layers import LoraSpec

    thinker, loaded, _ = token_thinker
    tok = copy.deepcopy(tokenizer)
    cfg = CasaConfig()
    params = jax.tree.map(np.asarray, loaded.params)
    tok, params, spec, ids, query = add_safety_tokens(tok, params, loaded.spec, cfg)
    text, lspec = spec.text, LoraSpec(2, targets=("q_proj", "v_proj"))
    lora = jax.tree.map(lambda x: x + 0.05, init_lora(text, lspec, jax.random.key(0)))
    safety = nn.unbox(SafetyAttention(cfg).init(jax.random.key(1), query, np.zeros((1, 2, text.hidden_size)),
                                                np.ones((1, 2), bool))["params"])
    weights = Weights(params=params, lora=lora, safety=safety, unsafe_query=query, encoders=loaded.encoders)
    mm = Thinker(text, thinker.vision, thinker.audio, thinker.tokens, lspec)
    proc = OmniProcessor(tok, processor.vision, **SMALL)
    arrays = proc.from_messages(_conversations(np.random.default_rng(7)))
    sampler = Decoder(text, gate=CasaGate(cfg, ids), eos_ids=(tok.convert_tokens_to_ids("<|im_end|>"),), thinker=mm, lora=lspec)
    outs = sampler.generate_multimodal(weights, arrays, max_new_tokens=4)
    inputs = mm.prepare(**arrays)
    out = mm(params, loaded.encoders, inputs, lora=lora)
    v_logit = SafetyAttention(cfg).apply({"params": safety}, query, out.final_hidden, inputs.attention_mask.astype(bool))
    pair = jax.nn.softmax(safety_pair_logits(out.logits[:, -1], v_logit, ids.safe, ids.unsafe, cfg.scaling), -1)
    np.testing.assert_allclose([o.v_s for o in outs], np.asarray(v_s_from_logit(v_logit)), atol=1e-5)
    np.testing.assert_allclose([o.p_unsafe for o in outs], np.asarray(pair[:, 1]), atol=1e-5)
    assert all(len(o.tokens) <= 4 for o in outs) and sampler.traces == {"media": 1}
