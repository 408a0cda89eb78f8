"""Logits parity with transformers on tiny random checkpoints in every layout (fp32, eager attention)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_fixtures as fx
from casa_jax.parity import run_parity


@pytest.fixture(scope="module")
def layouts(hf_root):
    """name -> HF dir; each a different config so a shape or mapping slip shows."""
    d = {
        "qwen2": fx.make_qwen2(str(hf_root / "p_qwen2"), seed=1),
        "qwen2_tied_sharded": fx.make_qwen2(str(hf_root / "p_qwen2_tied"), seed=2, tie=True, max_shard_size="20KB",
                                            num_attention_heads=3, num_key_value_heads=1),
        "thinker": fx.make_thinker(str(hf_root / "p_thinker"), seed=3),
        "thinker_tied_odd": fx.make_thinker(str(hf_root / "p_thinker_odd"), seed=4, tie=True,
                                            hidden_size=60, num_attention_heads=5, num_key_value_heads=5,
                                            mrope_section=(1, 4, 1)),
    }
    d["hub_sharded"] = fx.make_hub_omni(d["thinker"], str(hf_root / "p_hub"), shards=3)
    d["llama_tied"] = fx.make_llama(str(hf_root / "p_llama"), seed=5, num_attention_heads=3, num_key_value_heads=1)
    d["llama_untied_head_dim"] = fx.make_llama(str(hf_root / "p_llama_hd"), seed=6, tie=False, head_dim=12,
                                               rope_theta=500000.0)
    return d


@pytest.mark.parametrize("layout", ["qwen2", "qwen2_tied_sharded", "thinker", "thinker_tied_odd", "hub_sharded",
                                    "llama_tied", "llama_untied_head_dim"])
def test_logits_match_transformers(layouts, layout):
    result = run_parity(layouts[layout])
    assert result.num_tokens == 13 + 9 + 6  # a padded batch of three lengths
    assert result.max_abs_diff <= 1e-4, result
    assert result.mean_kl <= 1e-6, result


def test_bf16_parity_within_kl(layouts):
    result = run_parity(layouts["thinker"], dtype="bfloat16")
    assert result.mean_kl <= 0.02, result


def test_hidden_states_match_transformers(layouts):
    import jax
    import transformers

    from casa_jax.checkpoints.hf import load_hf_checkpoint
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.model.text_decoder import CausalLM
    from casa_jax.parity import build_batch

    hf_dir = layouts["qwen2"]
    loaded = load_hf_checkpoint(hf_dir, progress=False)
    ids, mask = build_batch(hf_dir, loaded.spec.text.vocab_size)
    positions = np.asarray(positions_from_mask(mask))
    model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions.astype(np.int64)), output_hidden_states=True)
    layers = loaded.spec.text.num_hidden_layers
    ours = CausalLM(loaded.spec.text).apply({"params": loaded.params}, ids, positions, mask,
                                            hidden_layers=tuple(range(layers)))
    real = mask.astype(bool)
    for i in range(layers):  # HF's last entry is after the final norm; ours there is final_hidden
        np.testing.assert_allclose(np.asarray(ours.hidden_states[i])[real], ref.hidden_states[i].numpy()[real],
                                   atol=1e-5, err_msg=f"hidden state {i}")
    np.testing.assert_allclose(np.asarray(ours.final_hidden)[real], ref.hidden_states[-1].numpy()[real], atol=1e-5)
    del jax


def test_parity_cli_passes_and_fails_on_tolerance(layouts):
    cmd = [sys.executable, "-m", "casa_jax.parity", f"--hf_dir={layouts['thinker_tied_odd']}"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "max |logit diff|" in ok.stdout
    strict = subprocess.run(cmd + ["--atol=0"], capture_output=True, text=True)
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def _write_wav(path, seconds=1.2, rate=22050):
    import wave
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 330 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return str(path)


def test_parity_cli_with_image_and_audio(hf_root, tmp_path):
    """A hub-layout (thinker.-prefixed, sharded) omni checkpoint with its own encoder shapes: prompts with
    an image (PNG), an audio clip (22.05 kHz WAV, resampled) and both all pass."""
    from PIL import Image
    thinker = fx.make_thinker(str(hf_root / "p_mm_thinker"), seed=7, hidden_size=40, num_attention_heads=4,
                              num_key_value_heads=2, mrope_section=(1, 2, 2),
                              vision=dict(hidden_size=24, num_heads=3, depth=3, fullatt_block_indexes=[0, 2],
                                          out_hidden_size=40, intermediate_size=20),
                              audio=dict(d_model=12, encoder_attention_heads=3, encoder_layers=2, output_dim=40,
                                         n_window=5))
    hub = fx.make_hub_omni(thinker, str(hf_root / "p_mm_hub"), shards=3)
    rng = np.random.default_rng(0)
    png = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(png)
    wav = _write_wav(tmp_path / "tone.wav")
    cmd = [sys.executable, "-m", "casa_jax.parity", f"--hf_dir={hub}", f"--image={png}", f"--audio={wav}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for case in ("text ", "text+image ", "text+audio ", "text+image+audio "):
        assert case in r.stdout, r.stdout
    assert "PASS: 4 case(s)" in r.stdout
    bad = subprocess.run(cmd[:4] + [f"--audio={png}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "picture.png: cannot read as a PCM WAV file" in bad.stderr


def test_tiny_thinker_we_write_is_a_real_transformers_thinker(tmp_path):
    """The demo's tiny thinker (written by casa-jax without torch) loads in transformers, and our logits
    equal its on prompts with an image, an audio clip and both."""
    from casa_jax.parity import run_multimodal_parity
    from casa_jax.tiny import write_tiny_thinker_dir
    hf_dir = write_tiny_thinker_dir(str(tmp_path / "tiny_thinker"))
    rng = np.random.default_rng(1)
    results = run_multimodal_parity(hf_dir, image=rng.integers(0, 256, (60, 84, 3), dtype=np.uint8),
                                    audio=(0.2 * np.sin(np.arange(16000) / 9)).astype(np.float32))
    assert [r.case for r in results] == ["text+image", "text+audio", "text+image+audio"]
    assert all(r.max_abs_diff < 1e-4 for r in results), results
