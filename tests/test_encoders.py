"""Vision and audio encoders against transformers' Qwen2_5OmniVisionEncoder / Qwen2_5OmniAudioEncoder
(fp32, eager), bucketed shapes, and config errors."""

import jax
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as fx
from casa_jax.io.hf import load_hf_checkpoint
from casa_jax.model.attention import exp_scores
from casa_jax.model.audio_encoder import AudioEncoder, audio_layout
from casa_jax.model.config import ConfigError
from casa_jax.model.encoder_config import AudioConfig, VisionConfig, encoder_configs
from casa_jax.model.layers import gelu_exact
from casa_jax.model.vision_encoder import VisionEncoder
from casa_jax.model.vision_layout import pad_patches, vision_layout


@pytest.fixture(scope="module")
def encoders(hf_root):
    path = fx.make_thinker(str(hf_root / "enc_thinker"), seed=5, vision=dict(depth=3, fullatt_block_indexes=[1]),
                           audio=dict(encoder_layers=2, n_window=6))
    hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager").eval()
    loaded = load_hf_checkpoint(path, progress=False)
    vision, audio = encoder_configs(loaded.spec)
    vision_fn = jax.jit(lambda p, x, lay: VisionEncoder(vision).apply({"params": p}, x, **lay))
    audio_fn = jax.jit(lambda p, lay: AudioEncoder(audio).apply({"params": p}, **lay))
    return hf, loaded, vision, audio, vision_fn, audio_fn


def test_vision_encoder_images_and_video_of_mixed_sizes(encoders):
    hf, loaded, vision, _, vision_fn, _ = encoders
    grid = np.array([[1, 10, 6], [2, 4, 4], [1, 16, 18], [1, 2, 2]])  # several windows; a video; a tiny image
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod(-1).sum()), vision.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    lay = vision_layout(grid, vision)
    out = np.asarray(vision_fn(loaded.encoders["visual"], pad_patches(pixels, lay, vision), lay.arrays()))
    assert lay.num_tokens == ref.shape[0]
    # float32 accumulation order differs by CPU: 1.09e-4 was seen on an AVX2-only EPYC, < 1e-4 with AVX-512;
    # a wrong window, rotary table or merge is off by O(0.1) or more
    assert np.abs(out[:lay.num_tokens] - ref).max() <= 2e-4


def test_audio_encoder_clips_of_different_lengths(encoders):
    hf, loaded, _, audio, _, audio_fn = encoders
    rng = np.random.default_rng(1)
    lengths = [300, 37, 12, 64, 5]  # chunk-straddling pools, a short tail chunk, the minimum-ish clip
    clips = [rng.standard_normal((128, n)).astype(np.float32) for n in lengths]
    with torch.no_grad():
        ref = hf.model.audio_tower(torch.tensor(np.concatenate(clips, axis=1)),
                                   feature_lens=torch.tensor(lengths)).last_hidden_state.numpy()
    lay = audio_layout(clips, audio)
    out = np.asarray(audio_fn(loaded.encoders["audio_tower"], lay.arrays()))
    assert lay.num_tokens == ref.shape[0]
    assert np.abs(out[:lay.num_tokens] - ref).max() <= 1e-4


def test_gelu_exact_is_pytorch_gelu_and_differentiable():
    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    ref = torch.nn.functional.gelu(torch.tensor(x)).numpy()
    assert np.abs(np.asarray(gelu_exact(jax.numpy.asarray(x))) - ref).max() <= 2e-6
    grad = np.asarray(jax.vmap(jax.grad(gelu_exact))(jax.numpy.asarray(x)))
    t = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(t).sum().backward()
    assert np.abs(grad - t.grad.numpy()).max() <= 2e-6
    # negative control: the tanh approximation is a different function at this tolerance
    assert np.abs(np.asarray(jax.nn.gelu(jax.numpy.asarray(x), approximate=True)) - ref).max() > 1e-4


def test_exp_scores_normalised_equal_a_masked_softmax_and_its_gradient():
    rng = np.random.default_rng(0)
    scores = jax.numpy.asarray(rng.standard_normal((3, 5, 7)) * 4, jax.numpy.float32)
    values = jax.numpy.asarray(rng.standard_normal((3, 7, 2)), jax.numpy.float32)
    mask = jax.numpy.asarray(rng.random((3, 1, 7)) < 0.6).at[1].set(False).at[:, :, 0].set(True)

    def normalised(s):
        weights, total = exp_scores(s, mask)
        return weights @ values / total[..., None]

    def softmax(s):
        return jax.nn.softmax(jax.numpy.where(mask, s, -jax.numpy.inf), axis=-1) @ values

    np.testing.assert_allclose(normalised(scores), softmax(scores), atol=2e-6)
    np.testing.assert_allclose(jax.grad(lambda s: (normalised(s) ** 2).sum())(scores),
                               jax.grad(lambda s: (softmax(s) ** 2).sum())(scores), atol=2e-5)
    # a row with every key masked gets uniform weights, not NaN
    empty = exp_scores(scores, jax.numpy.zeros_like(mask))[0]
    assert np.isfinite(np.asarray(empty)).all() and np.ptp(np.asarray(empty)) == 0
    # negative control: ignoring the mask changes the result
    assert np.abs(np.asarray(exp_scores(scores, True)[0] @ values / exp_scores(scores, True)[1][..., None])
                  - np.asarray(softmax(scores))).max() > 1e-2


def test_audio_layout_packs_exactly_the_real_states():
    """The packed states are the real post-conv frames in clip order, and pooling reads them in order;
    control: the padding of a short tail chunk is not among them."""
    audio = AudioConfig(**fx.AUDIO)  # chunks of 16 mel frames, 8 post-conv states each
    rng = np.random.default_rng(3)
    lay = audio_layout([rng.standard_normal((128, n)).astype(np.float32) for n in (37, 16)], audio)
    real = [8, 8, 3, 8]  # 37 frames: 16 + 16 + 5 (3 states after the stride-2 conv); 16 frames: one chunk
    expected = np.concatenate([c * 8 + np.arange(n) for c, n in enumerate(real)])
    packed = len(expected)
    assert lay.chunk_frames[:4].tolist() == [16, 16, 5, 16]
    np.testing.assert_array_equal(lay.state_index[:packed], expected)
    assert (lay.state_index[packed:] == lay.chunk_frames.size * 8).all()  # padding reads past the chunks
    assert 2 * 8 + 3 not in lay.state_index[:packed]  # the tail chunk's first padded state
    assert lay.tokens_per_clip == (9, 4)  # 19 states -> 9 pooled pairs; 8 -> 4
    np.testing.assert_array_equal(lay.pool_index[:13].reshape(-1), np.r_[0:18, 19:27])


def test_bucketed_shapes_do_not_depend_on_sizes():
    """Different image sizes / clip lengths within a bucket give identical array shapes (one compile)."""
    vision, audio = VisionConfig(**fx.VISION), AudioConfig(**fx.AUDIO)
    shapes = lambda lay: {k: v.shape for k, v in lay.arrays().items()}  # noqa: E731
    one_image = vision_layout([[1, 10, 6]], vision)  # 6 window slots
    three_images = vision_layout([[1, 8, 8], [1, 4, 4], [1, 2, 2]], vision)  # 4 + 1 + 1 slots
    assert shapes(one_image) == shapes(three_images)
    rng = np.random.default_rng(2)
    clip = lambda n: rng.standard_normal((128, n)).astype(np.float32)  # noqa: E731
    # 3 chunks each (16 frames per chunk), 20 and 17 post-conv states, 10 and 8 tokens
    assert shapes(audio_layout([clip(40)], audio)) == shapes(audio_layout([clip(17), clip(15)], audio))
    # negative control: a fourth chunk is another bucket
    assert shapes(audio_layout([clip(40)], audio)) != shapes(audio_layout([clip(17), clip(30)], audio))


def test_encoder_config_errors():
    with pytest.raises(ConfigError, match="fullatt_block_indexes \\[5\\] are outside"):
        VisionConfig(depth=2, fullatt_block_indexes=(5,))
    with pytest.raises(ConfigError, match="window_size=100 must be a multiple"):
        VisionConfig(window_size=100)
    with pytest.raises(ConfigError, match="audio_config: activation_function='relu'"):
        AudioConfig.from_hf({"activation_function": "relu"})
    with pytest.raises(ValueError, match="grid_thw\\[0\\]=\\[1, 3, 4\\]"):
        vision_layout([[1, 3, 4]], VisionConfig())
    with pytest.raises(ValueError, match="audio clip 0: features have shape \\[80, 10\\]"):
        audio_layout([np.zeros((80, 10), np.float32)], AudioConfig())
