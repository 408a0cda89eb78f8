"""3-D M-RoPE position ids equal transformers' get_rope_index exactly (text, image, video, audio, mixed)."""

import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as fx
from casa_jax.model.rope_index import ThinkerTokens, audio_token_count, get_rope_index

T = ThinkerTokens()
V_END, A_END = 151653, 151648


@pytest.fixture(scope="module")
def reference():
    cfg = transformers.Qwen2_5OmniThinkerConfig(text_config=fx.TEXT, vision_config=fx.VISION, audio_config=fx.AUDIO,
                                                vision_start_token_id=T.vision_start_token_id)
    return transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()


def text(n, seed=0):
    return np.random.default_rng(seed).integers(10, 90, n).tolist()


def image(grid):
    return [T.vision_start_token_id] + [T.image_token_id] * (int(np.prod(grid)) // 4) + [V_END]


def video(grid):
    return [T.vision_start_token_id] + [T.video_token_id] * (int(np.prod(grid)) // 4) + [V_END]


def audio(frames):
    return [T.audio_start_token_id] + [T.audio_token_id] * audio_token_count(frames) + [A_END]


def audio_in_video(grid, frames):
    return ([T.vision_start_token_id, T.audio_start_token_id] + [T.video_token_id] * (int(np.prod(grid)) // 4)
            + [T.audio_token_id] * audio_token_count(frames) + [A_END, V_END])


def batch(rows):
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def _check(reference, rows, images=None, videos=None, audios=None, seconds=None, in_video=False):
    ids, mask = batch(rows)
    arr = lambda x, dt=np.int64: None if x is None else np.asarray(x, dt)
    ours = get_rope_index(ids, mask, arr(images), arr(videos), arr(audios), arr(seconds, np.float32), in_video, T)
    t = lambda x, dt=torch.long: None if x is None else torch.tensor(x, dtype=dt)
    theirs = reference.get_rope_index(torch.from_numpy(ids), t(images), t(videos), torch.from_numpy(mask),
                                      in_video, t(audios), t(seconds, torch.float32))
    np.testing.assert_array_equal(ours[0], theirs[0].numpy())
    np.testing.assert_array_equal(ours[1], theirs[1].numpy())
    return ours


def test_text_only_and_audio_only(reference):
    _check(reference, [text(7), text(4, 1)])
    _check(reference, [text(3) + audio(97) + text(5), text(2) + audio(40)], audios=[97, 40])


def test_images_of_two_sizes_with_padding(reference):
    pos, delta = _check(reference, [text(4) + image([1, 4, 6]) + text(3), text(2) + image([1, 2, 2]) + text(6, 1)],
                        images=[[1, 4, 6], [1, 2, 2]])
    assert delta[0, 0] < 0  # a 2-D grid uses fewer positions than tokens


def test_video_with_fractional_seconds(reference):
    _check(reference, [text(3) + video([3, 4, 4]) + text(2), text(1) + video([2, 2, 4]) + text(4)],
           videos=[[3, 4, 4], [2, 2, 4]], seconds=[0.5, 1.3])


def test_mixed_image_audio_video(reference):
    row = text(2) + audio(133) + text(3) + image([1, 2, 4]) + text(2) + video([2, 2, 2]) + text(3)
    _check(reference, [row], images=[[1, 2, 4]], videos=[[2, 2, 2]], audios=[133], seconds=[2.0])


def test_audio_in_video_interleaves_chunks(reference):
    row = text(3) + audio_in_video([4, 4, 4], 400) + text(2)
    pos, _ = _check(reference, [row], videos=[[4, 4, 4]], audios=[400], seconds=[2.0], in_video=True)
    assert len(set(pos[0, 0].tolist())) < pos.shape[-1]  # shared bos/eos positions
