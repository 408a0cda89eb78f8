"""Logits parity with transformers on tiny *sharp* checkpoints in every layout (fp32 and bf16, eager
attention), and negative controls: the same checks fail on models broken on our side only."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_fixtures as fx
from casa_jax.parity import ParityResult, compare, logit_scale, run_parity

BF16_MAX_KL = 1e-3  # tiny sharp models in bf16 (DESIGN "Tolerances"); fp32 uses parity.DEFAULT_ATOL
LAYOUTS = ["qwen2", "qwen2_tied_sharded", "thinker", "thinker_tied_odd", "hub_sharded", "llama_tied",
           "llama_untied_head_dim"]


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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(layouts, layout):
    result = run_parity(layouts[layout])
    print(f"{layout}: {result}")
    assert result.num_tokens == 13 + 9 + 6  # a padded batch of three lengths
    assert result.logit_scale >= 4, result  # sharp weights: logits of O(1-10), not default init's ~0.1
    assert result.passes("float32"), result
    assert result.mean_kl <= 1e-6, result


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_parity_within_kl(layouts, layout):
    result = run_parity(layouts[layout], dtype="bfloat16")
    print(f"{layout}: {result}")
    assert result.passes("bfloat16", max_kl=BF16_MAX_KL), result


# ---- negative controls: each break is on our side only, so transformers' logits stay the reference ----

# name -> (break: (cfg, params, attention mask) -> the same, broken; the dtypes whose check must catch it).
# Positions always come from the true mask. A 2x rope_theta or a 10x norm epsilon is below bf16 noise on
# 13-token prompts (the Llama fixture's theta 5e5 doubled gives 1.1x the bf16 tolerance): fp32 only.
BOTH, FP32 = ("float32", "bfloat16"), ("float32",)
CONTROLS = {
    "correct": (lambda cfg, p, m: (cfg, p, m), BOTH),
    "rope_theta_x10": (lambda cfg, p, m: (cfg.replace(rope_theta=10 * cfg.rope_theta), p, m), BOTH),
    "rope_theta_x2": (lambda cfg, p, m: (cfg.replace(rope_theta=2 * cfg.rope_theta), p, m), FP32),
    "pad_key_visible": (lambda cfg, p, m: (cfg, p, fx.pad_key_visible(m)), BOTH),
    "no_post_attention_norm": (lambda cfg, p, m: (
        cfg, fx.replace_leaf(p, ("layers", "post_attention_layernorm", "scale"), np.ones_like), m), BOTH),
    "no_qkv_bias": (lambda cfg, p, m: (cfg, fx.zero_qkv_bias(p), m), BOTH),
    "norm_eps_x10": (lambda cfg, p, m: (cfg.replace(rms_norm_eps=10 * cfg.rms_norm_eps), p, m), FP32),
}
CONTROL_CASES = [(layout, name, dtype) for layout in ("qwen2", "thinker", "llama_untied_head_dim")
                 for name, (_, dtypes) in CONTROLS.items() for dtype in dtypes
                 if not (layout.startswith("llama") and name == "no_qkv_bias")]  # Llama has no q/k/v bias


@pytest.fixture(scope="module")
def control_runner(layouts):
    """(layout, control, dtype) -> ParityResult; transformers' logits and our compiled forwards are shared."""
    import jax

    from casa_jax.io.hf import load_hf_checkpoint
    from casa_jax.model.config import load_hf_spec
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.model.text_decoder import CausalLM
    from casa_jax.parity import parity_batch, torch_logits
    refs, loaded, forwards = {}, {}, {}

    def run(layout, control, dtype):
        hf_dir = layouts[layout]
        if (layout, dtype) not in refs:
            spec = load_hf_spec(hf_dir)
            ids, mask = parity_batch(hf_dir, spec.text.vocab_size)
            refs[layout, dtype] = ids, mask, torch_logits(hf_dir, spec, ids, mask, dtype)[0]
            loaded[layout, dtype] = load_hf_checkpoint(hf_dir, param_dtype=dtype, dtype=dtype, progress=False)
        ids, mask, ref = refs[layout, dtype]
        ckpt = loaded[layout, dtype]
        cfg, params, attend = CONTROLS[control][0](ckpt.spec.text, ckpt.params, mask)
        if cfg not in forwards:
            model = CausalLM(cfg)
            forwards[cfg] = jax.jit(lambda p, i, pos, m: model.apply({"params": p}, i, pos, m).logits)
        ours = np.asarray(forwards[cfg](params, ids, positions_from_mask(mask), attend))
        diff, kl, n = compare(ref, ours, mask)
        return ParityResult(diff, kl, n, "CausalLM", case=control, logit_scale=logit_scale(ref, mask))
    return run


@pytest.mark.parametrize("layout,control,dtype", CONTROL_CASES)
def test_parity_check_fails_on_a_broken_model(control_runner, layout, control, dtype):
    """The fp32 (max |diff| relative to the logit scale) and bf16 (mean KL) checks pass the correct model
    and fail each broken one: wrong rotary frequencies, a padding mask shifted by one slot, a dropped norm,
    dropped q/k/v biases, a wrong norm epsilon."""
    result = control_runner(layout, control, dtype)
    limit = result.fp32_limit() if dtype == "float32" else BF16_MAX_KL
    measured = result.max_abs_diff if dtype == "float32" else result.mean_kl
    print(f"{layout} {control} {dtype}: {measured:.3e} = {measured / limit:.3g} x tolerance {limit:.3g}")
    assert result.passes(dtype, max_kl=BF16_MAX_KL) == (control == "correct"), result


def test_hidden_states_match_transformers(layouts):
    import jax
    import transformers

    from casa_jax.io.hf import load_hf_checkpoint
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.model.text_decoder import CausalLM
    from casa_jax.parity import parity_batch

    hf_dir = layouts["qwen2"]
    loaded = load_hf_checkpoint(hf_dir, progress=False)
    ids, mask = parity_batch(hf_dir, loaded.spec.text.vocab_size)
    positions = np.asarray(positions_from_mask(mask))
    model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions.astype(np.int64)), output_hidden_states=True)
    layers = loaded.spec.text.num_hidden_layers
    ours = CausalLM(loaded.spec.text).apply({"params": loaded.params}, ids, positions, mask,
                                            hidden_layers=tuple(range(layers)))
    real = mask.astype(bool)
    pairs = [(ours.hidden_states[i], ref.hidden_states[i]) for i in range(layers)]
    pairs.append((ours.final_hidden, ref.hidden_states[-1]))  # HF's last entry is after the final norm
    for i, (got, want) in enumerate(pairs):
        got, want = np.asarray(got)[real], want.numpy()[real]
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 1e-5 * scale, f"hidden state {i}: scale {scale}"
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
    hf_dir = fx.sharpen_dir(write_tiny_thinker_dir(str(tmp_path / "tiny_thinker")), seed=8)
    rng = np.random.default_rng(1)
    results = run_multimodal_parity(hf_dir, image=rng.integers(0, 256, (60, 84, 3), dtype=np.uint8),
                                    audio=(0.2 * np.sin(np.arange(16000) / 9)).astype(np.float32))
    assert [r.case for r in results] == ["text+image", "text+audio", "text+image+audio"]
    print(results)
    assert all(r.logit_scale >= 4 and r.passes("float32") for r in results), results
