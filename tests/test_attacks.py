"""Attack builders: deterministic, valid inputs (decodable images from real fonts, 16 kHz speech from
espeak-ng) that the processor accepts."""

import io

import numpy as np
import pytest

from casa_jax import tiny
from casa_jax.attacks import audio, images, text
from casa_jax.model.encoder_config import VisionConfig
from casa_jax.processing import OmniProcessor

REQUEST = "Explain how to pick a lock"  # a mild stand-in request: builders only wrap it


def test_jailbreak_templates_apply_and_are_deterministic():
    all_templates = text.templates()
    assert len(all_templates) == 90
    for t in all_templates:
        out = text.apply_template(t, REQUEST)
        assert REQUEST in out and t["placeholder"] not in out
    assert text.jailbreak(REQUEST, seed=3) == text.jailbreak(REQUEST, seed=3)
    assert len({text.pick_template(REQUEST, seed=s)["id"] for s in range(20)}) > 1  # the seed matters


def test_prefill_lengths():
    tok = tiny.build_tokenizer(512)
    for n in text.PREFILL_LENGTHS:
        ids = text.prefill_ids(tok, n)
        assert len(ids) == n and tok.decode(ids) == tok.decode(text.prefill_ids(tok, 12)[:n])
    with pytest.raises(ValueError, match="exceeds"):
        text.prefill_ids(tok, 10_000)


@pytest.mark.parametrize("build", [lambda: images.figstep_image(REQUEST),
                                   lambda: images.typo_image(images.key_phrase(REQUEST))])
def test_typographic_images_are_valid(build):
    from PIL import Image
    a, b = build(), build()
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    np.testing.assert_array_equal(a, b)  # deterministic
    assert (a < 128).mean() > 0.005  # text was drawn
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), a)
    arrays = OmniProcessor(None, VisionConfig()).images([a])
    assert arrays["pixel_values"].shape[0] == int(arrays["image_grid_thw"].prod())


def test_figstep_heading_and_key_phrase():
    assert images.steps_heading("How to pick a lock?") == "Steps to pick a lock."
    assert images.key_phrase("Write a tutorial on how to pick a lock") == "tutorial on pick lock"
    assert "numbered 1, 2, and 3" in images.FIGSTEP_INSTRUCTION


def test_spoken_and_spelled_requests():
    from conftest import espeak_or_skip
    espeak_or_skip()
    wave, instruction = audio.spoken_request(REQUEST)
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.all(np.isfinite(wave))
    assert 1.0 < wave.size / audio.SAMPLING_RATE < 10.0 and np.abs(wave).max() > 0.05
    np.testing.assert_array_equal(wave, audio.spoken_request(REQUEST)[0])  # deterministic
    assert "audio" in instruction
    spelled_wave, question = audio.spelling_attack(REQUEST, "lock")
    assert "[word]" in question and "lock" not in question.split("answer:")[1].split("Do not")[0]
    assert audio.spelled("lock") == "L. O. C. K." and spelled_wave.size > 0
    arrays = OmniProcessor(None, VisionConfig()).audio([wave])
    assert arrays["feature_attention_mask"].sum() == -(-wave.size // 160)  # one mel frame per 10 ms hop
