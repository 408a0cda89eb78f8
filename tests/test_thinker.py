"""Multimodal thinker parity with transformers' Qwen2_5OmniThinkerForConditionalGeneration (fp32, eager,
sharp weights): logits for text+image, text+video, text+audio, mixed, two image sizes, the KV cache
after a multimodal prefill, and negative controls (the same check fails on a thinker broken on our side
in its text, vision or audio path)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as fx
from casa_jax.io.hf import load_hf_checkpoint
from casa_jax.model.kv_cache import KVCache
from casa_jax.model.thinker import Thinker
from casa_jax.parity import ParityResult, compare, logit_scale

TK = fx.THINKER_TOKENS
IMAGE, VIDEO, AUDIO = TK["image_token_index"], TK["video_token_index"], TK["audio_token_index"]
V_START, V_END, A_START, A_END = (TK["vision_start_token_id"], TK["vision_end_token_id"],
                                  TK["audio_start_token_id"], TK["audio_end_token_id"])
MERGE = 4  # spatial_merge_size ** 2


@pytest.fixture(scope="module")
def models(hf_root):
    path = fx.make_thinker(str(hf_root / "t_thinker"), seed=11)
    hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager").eval()
    loaded = load_hf_checkpoint(path, progress=False)
    thinker = Thinker.from_spec(loaded.spec)
    forward = jax.jit(lambda p, e, inputs: thinker(p, e, inputs).logits)
    return hf, thinker, loaded, forward


def _text(rng, n):
    return rng.integers(3, 80, n).tolist()


def _image(rng, grid):
    t, h, w = grid
    return rng.standard_normal((t * h * w, 3 * 2 * 14 * 14)).astype(np.float32), list(grid)


def _audio(rng, frames, total):
    feats = np.zeros((128, total), np.float32)
    feats[:, :frames] = rng.standard_normal((128, frames))
    mask = np.zeros(total, np.int64)
    mask[:frames] = 1
    return feats, mask


def _audio_tokens(frames):
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _batch(rows):
    """Left-pad token rows (as the processor does) -> ids, mask."""
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def _hf_logits(hf, ids, mask, media):
    torch_inputs = {k: torch.tensor(np.asarray(v)) for k, v in media.items() if k != "video_second_per_grid"}
    if "video_second_per_grid" in media:
        torch_inputs["video_second_per_grid"] = torch.tensor(media["video_second_per_grid"])
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **torch_inputs).logits.numpy()


def _result(ref, ours, mask, case="") -> ParityResult:
    diff, kl, n = compare(ref, ours, mask)
    return ParityResult(diff, kl, n, "Thinker", case=case, logit_scale=logit_scale(ref, mask))


def _compare(models, ids, mask, **media):
    """fp32 parity: max |logit diff| <= parity.DEFAULT_ATOL x max(1, max |logit|), on sharp logits."""
    hf, thinker, loaded, forward = models
    ref = _hf_logits(hf, ids, mask, media)
    inputs = thinker.prepare(input_ids=ids, attention_mask=mask, **media)
    result = _result(ref, np.asarray(forward(loaded.params, loaded.encoders, inputs)), mask)
    assert result.logit_scale >= 4 and result.passes("float32"), result
    return inputs


def _text_case():
    rng = np.random.default_rng(8)
    return (*_batch([_text(rng, 11), _text(rng, 6), _text(rng, 8)]), {})


def _image_case():
    rng = np.random.default_rng(0)
    (p1, g1), (p2, g2) = _image(rng, (1, 10, 6)), _image(rng, (1, 4, 8))
    rows = [_text(rng, 5) + [V_START] + [IMAGE] * (60 // MERGE) + [V_END] + _text(rng, 4),
            _text(rng, 3) + [V_START] + [IMAGE] * (32 // MERGE) + [V_END] + _text(rng, 2)]
    return (*_batch(rows), dict(pixel_values=np.concatenate([p1, p2]), image_grid_thw=np.array([g1, g2])))


def _audio_case():
    rng = np.random.default_rng(2)
    f1, m1 = _audio(rng, 45, 60)
    f2, m2 = _audio(rng, 60, 60)
    rows = [_text(rng, 4) + [A_START] + [AUDIO] * _audio_tokens(45) + [A_END] + _text(rng, 2),
            _text(rng, 2) + [A_START] + [AUDIO] * _audio_tokens(60) + [A_END] + _text(rng, 5)]
    return (*_batch(rows), dict(input_features=np.stack([f1, f2]), feature_attention_mask=np.stack([m1, m2])))


CASES = {"text": _text_case, "image": _image_case, "audio": _audio_case}


def test_text_only_batch(models):
    ids, mask, media = _text_case()
    _compare(models, ids, mask, **media)


def test_text_and_two_image_sizes(models):
    ids, mask, media = _image_case()
    _compare(models, ids, mask, **media)


def test_text_and_video(models):
    rng = np.random.default_rng(1)
    pix, grid = _image(rng, (3, 6, 4))
    rows = [_text(rng, 4) + [V_START] + [VIDEO] * (72 // MERGE) + [V_END] + _text(rng, 3)]
    ids, mask = _batch(rows)
    _compare(models, ids, mask, pixel_values_videos=pix, video_grid_thw=np.array([grid]),
             video_second_per_grid=[1.0])


def test_text_and_audio_batch(models):
    ids, mask, media = _audio_case()
    _compare(models, ids, mask, **media)


def test_mixed_image_audio_video(models):
    rng = np.random.default_rng(3)
    ip, ig = _image(rng, (1, 4, 4))
    vp, vg = _image(rng, (2, 4, 6))
    feats, fmask = _audio(rng, 33, 33)
    rows = [_text(rng, 3) + [V_START] + [IMAGE] * 4 + [V_END] + _text(rng, 2) + [A_START]
            + [AUDIO] * _audio_tokens(33) + [A_END] + [V_START] + [VIDEO] * 12 + [V_END] + _text(rng, 3)]
    ids, mask = _batch(rows)
    _compare(models, ids, mask, pixel_values=ip, image_grid_thw=np.array([ig]), pixel_values_videos=vp,
             video_grid_thw=np.array([vg]), video_second_per_grid=[0.5], input_features=feats[None],
             feature_attention_mask=fmask[None])


def test_kv_cache_after_multimodal_prefill(models):
    """Prefill an image prompt into the cache, decode two tokens at max position + 1, + 2: equal to
    transformers' full forward over the longer sequence."""
    hf, thinker, loaded, _ = models
    rng = np.random.default_rng(4)
    pix, grid = _image(rng, (1, 6, 4))
    prompt = _text(rng, 3) + [V_START] + [IMAGE] * 6 + [V_END] + _text(rng, 2)
    extra = _text(rng, 2)
    ids, mask = _batch([prompt])
    inputs = thinker.prepare(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=np.array([grid]))
    cache = KVCache.for_config(thinker.text, 1, ids.shape[1] + 2)
    out = thinker(loaded.params, loaded.encoders, inputs, cache=cache)
    logits = []
    cache = out.cache
    next_pos = int(np.asarray(inputs.positions).max()) + 1
    assert next_pos == mask.sum() + int(inputs.rope_deltas[0])
    for i, tok in enumerate(extra):
        step = thinker.decoder.apply({"params": loaded.params}, jnp.asarray([[tok]]), jnp.asarray([[next_pos + i]]),
                                     jnp.ones((1, 1), jnp.int32), cache=cache)
        cache = step.cache
        logits.append(np.asarray(step.logits[0, -1]))
    full_ids = np.asarray([prompt + extra])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(full_ids), attention_mask=torch.ones_like(torch.tensor(full_ids)),
                 pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor([grid])).logits.numpy()[0, -2:]
    result = _result(ref[None], np.stack(logits)[None], np.ones((1, 2)))
    assert result.passes("float32"), result


def test_placeholder_count_mismatch_is_an_error(models):
    _, thinker, _, _ = models
    rng = np.random.default_rng(5)
    pix, grid = _image(rng, (1, 4, 4))
    ids, mask = _batch([_text(rng, 3) + [V_START] + [IMAGE] * 3 + [V_END]])
    with pytest.raises(ValueError, match="image: the prompt has 3 placeholder tokens .* gives 4 image features"):
        thinker.prepare(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=np.array([grid]))
    feats, fmask = _audio(rng, 40, 40)
    ids, mask = _batch([_text(rng, 3) + [A_START] + [AUDIO] * 2 + [A_END]])
    with pytest.raises(ValueError, match="audio: the prompt has 2 placeholder tokens"):
        thinker.prepare(input_ids=ids, attention_mask=mask, input_features=feats[None],
                        feature_attention_mask=fmask[None])
    with pytest.raises(ValueError, match="image: the prompt has 0 placeholder tokens"):
        thinker.prepare(input_ids=_batch([[5, 6]])[0], attention_mask=None, pixel_values=pix,
                        image_grid_thw=np.array([grid]))


def test_sampler_generates_like_transformers_after_image_prefill(models):
    """Greedy multimodal generation (bucketed prefill, while_loop decode) gives transformers' tokens."""
    from casa_jax.infer.decode import Decoder, Weights
    hf, thinker, loaded, _ = models
    rng = np.random.default_rng(6)
    (p1, g1), (p2, g2) = _image(rng, (1, 6, 4)), _image(rng, (1, 4, 4))
    rows = [_text(rng, 4) + [V_START] + [IMAGE] * 6 + [V_END] + _text(rng, 2),
            _text(rng, 2) + [V_START] + [IMAGE] * 4 + [V_END] + _text(rng, 1)]
    ids, mask = _batch(rows)
    arrays = dict(input_ids=ids, attention_mask=mask, pixel_values=np.concatenate([p1, p2]),
                  image_grid_thw=np.array([g1, g2]))
    decoder = Decoder(thinker.decoder.config, eos_ids=(), thinker=thinker)
    ours = [g.tokens for g in decoder.generate_multimodal(Weights(loaded.params, encoders=loaded.encoders), arrays,
                                                          max_new_tokens=5)]
    with torch.no_grad():
        ref = hf.generate(**{k: torch.tensor(v) for k, v in arrays.items()}, max_new_tokens=5, min_new_tokens=5,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == ref[:, ids.shape[1]:].tolist()
    assert any(len(set(row)) > 1 for row in ours), ours  # not a degenerate constant output


# ---- negative controls: the thinker broken on our side only (transformers' logits stay the reference) ----

def _with(thinker, params, encoders, text=None, vision=None, audio=None):
    """The thinker with some fields of its text / vision / audio config replaced (a config read wrongly)."""
    changed = {k: dataclasses.replace(getattr(thinker, k), **v) for k, v in
               (("text", text), ("vision", vision), ("audio", audio)) if v}
    return dataclasses.replace(thinker, **changed), params, encoders, None


def _unit_norm(encoders, *path):
    """Encoder params with the norm at ``path`` reset to scale 1 and bias 0: a dropped norm."""
    return fx.replace_leaf(encoders, path, lambda norm: {k: (np.ones_like if k == "scale" else np.zeros_like)(v)
                                                         for k, v in norm.items()})


# path -> control -> (thinker, params, encoders) -> (thinker, params, encoders, attention-mask edit or None)
THINKER_CONTROLS = {
    "text": {
        "rope_theta_x10": lambda th, p, e: _with(th, p, e, text=dict(rope_theta=10 * th.text.rope_theta)),
        "pad_key_visible": lambda th, p, e: (th, p, e, fx.pad_key_visible),
        "no_qkv_bias": lambda th, p, e: (th, fx.zero_qkv_bias(p), e, None),
    },
    "image": {
        # M-RoPE sections in the wrong order: text tokens (equal streams) cannot see it, image tokens can
        "mrope_section_permuted": lambda th, p, e: _with(th, p, e, text=dict(mrope_section=(1, 2, 1))),
        "vision_rope_theta_x10": lambda th, p, e: _with(th, p, e,
                                                        vision=dict(rope_theta=10 * th.vision.rope_theta)),
        "window_attention_in_every_block": lambda th, p, e: _with(th, p, e, vision=dict(fullatt_block_indexes=())),
        "no_merger_norm": lambda th, p, e: (th, p, _unit_norm(e, "visual", "merger", "ln_q"), None),
    },
    "audio": {
        "audio_chunks_twice_as_long": lambda th, p, e: _with(th, p, e, audio=dict(n_window=2 * th.audio.n_window)),
        "no_audio_ln_post": lambda th, p, e: (th, p, _unit_norm(e, "audio_tower", "ln_post"), None),
    },
}


@pytest.fixture(scope="module")
def thinker_controls(models):
    """(path, control) -> ParityResult; transformers' logits per path and compiled forwards are shared."""
    hf, thinker, loaded, forward = models
    refs, forwards = {}, {thinker: forward}

    def run(path, control):
        ids, mask, media = CASES[path]()
        if path not in refs:
            refs[path] = _hf_logits(hf, ids, mask, media)
        broken = THINKER_CONTROLS[path].get(control, lambda th, p, e: (th, p, e, None))
        th, params, encoders, edit_mask = broken(thinker, loaded.params, loaded.encoders)
        inputs = th.prepare(input_ids=ids, attention_mask=mask, **media)
        if edit_mask is not None:
            inputs = inputs.replace(attention_mask=edit_mask(np.asarray(inputs.attention_mask)))
        if th not in forwards:
            forwards[th] = jax.jit(lambda p, e, x: th(p, e, x).logits)
        return _result(refs[path], np.asarray(forwards[th](params, encoders, inputs)), mask, control)
    return run


@pytest.mark.parametrize("path,control", [(path, name) for path, controls in THINKER_CONTROLS.items()
                                          for name in ("correct", *controls)])
def test_parity_check_fails_on_a_broken_thinker(thinker_controls, path, control):
    """The fp32 check passes the thinker and fails each break of its text, vision or audio path."""
    result = thinker_controls(path, control)
    limit = result.fp32_limit()
    print(f"{path} {control}: {result.max_abs_diff:.3e} = {result.max_abs_diff / limit:.3g} x tolerance")
    assert result.passes("float32") == (control == "correct"), result
