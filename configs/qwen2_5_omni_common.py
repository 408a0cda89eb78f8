"""Shared pieces of the Qwen2.5-Omni configs: thinker token ids and the vision/audio encoders.

Values are those of the published ``config.json`` files (``thinker_config``); see WORKSPACE.md for
where each was checked.
"""

import ml_collections

THINKER_TOKENS = dict(
    audio_token_index=151646,
    image_token_index=151655,
    video_token_index=151656,
    audio_start_token_id=151647,
    audio_end_token_id=151648,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    vision_token_id=151654,
    bos_token_id=151644,  # <|im_start|>
    eos_token_id=151645,  # <|im_end|>
    pad_token_id=151643,  # <|endoftext|>
    user_token_id=872,
    position_id_per_seconds=25,
    seconds_per_chunk=2,
)


def vision(out_hidden_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        out_hidden_size=out_hidden_size, tokens_per_second=25, hidden_act="silu"))


def audio(output_dim: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
        n_window=100, output_dim=output_dim, max_source_positions=1500, activation_function="gelu"))


def text(**values) -> ml_collections.ConfigDict:
    base = dict(head_dim=None, rms_norm_eps=1e-6, rope_theta=1_000_000.0, mrope_section=(16, 24, 24),
                tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768,
                dtype="bfloat16", param_dtype="float32", remat_policy="dots_with_no_batch_dims")
    return ml_collections.ConfigDict({**base, **values})


def thinker_config(**text_values) -> ml_collections.ConfigDict:
    """A full thinker config: the text decoder with ``text_values``, encoders projecting to its width."""
    config = ml_collections.ConfigDict()
    config.model = text(**text_values)
    config.vision = vision(out_hidden_size=text_values["hidden_size"])
    config.audio = audio(output_dim=text_values["hidden_size"])
    config.thinker = ml_collections.ConfigDict(THINKER_TOKENS)
    config.seed = 0
    return config
