import json

import pytest

from casa_jax.model.config import ConfigError, TextConfig, spec_from_hf_config

# The thinker_config.text_config of Qwen/Qwen2.5-Omni-3B config.json as published (older rope_scaling spelling).
PUBLISHED_3B_TEXT = {
    "model_type": "qwen2_5_omni_text", "hidden_act": "silu", "hidden_size": 2048, "init_std": 0.02,
    "intermediate_size": 11008, "vocab_size": 151936, "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "max_position_embeddings": 32768, "max_window_layers": 70, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "use_cache": True, "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 32768,
    "attention_dropout": 0.0, "tie_word_embeddings": False}
PUBLISHED_7B_TEXT = {**PUBLISHED_3B_TEXT, "hidden_size": 3584, "intermediate_size": 18944, "vocab_size": 152064,
                     "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4}


def _omni(text, tie=False):
    return {"model_type": "qwen2_5_omni",
            "thinker_config": {"model_type": "qwen2_5_omni_thinker", "text_config": text,
                               "tie_word_embeddings": tie}}


@pytest.mark.parametrize("name,text", [("qwen2_5_omni_3b", PUBLISHED_3B_TEXT), ("qwen2_5_omni_7b", PUBLISHED_7B_TEXT)])
def test_published_configs_match_config_files(name, text):
    import importlib
    cfg = importlib.import_module(f"configs.{name}").get_config()
    ours = TextConfig.from_dict(cfg.model.to_dict())
    theirs = spec_from_hf_config(_omni(text)).text
    runtime = dict(dtype=ours.dtype, param_dtype=ours.param_dtype, remat_policy=ours.remat_policy)
    assert ours == theirs.replace(**runtime)
    assert ours.mrope_section == (16, 24, 24) and not ours.tie_word_embeddings


def test_tiny_config_builds():
    from configs.tiny import get_config
    assert TextConfig.from_dict(get_config().model.to_dict()).num_hidden_layers == 2


def test_rope_spellings_agree():
    new = dict(PUBLISHED_3B_TEXT)
    del new["rope_scaling"], new["rope_theta"]
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    assert spec_from_hf_config(_omni(new)).text == spec_from_hf_config(_omni(PUBLISHED_3B_TEXT)).text


def test_model_types():
    qwen2 = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 1e4,
             "tie_word_embeddings": True}
    spec = spec_from_hf_config(qwen2)
    assert spec.text.tie_word_embeddings and spec.text.mrope_section is None and not spec.is_thinker
    thinker = _omni(PUBLISHED_3B_TEXT, tie=True)["thinker_config"]
    spec = spec_from_hf_config(thinker)
    assert spec.is_thinker and spec.text.tie_word_embeddings  # the thinker level decides tying
    assert spec.thinker_config() == thinker


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"mrope_section": [16, 24, 23]}}, "must sum to head_dim // 2"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "multiple of"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "not supported"),
])
def test_bad_text_configs_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        spec_from_hf_config(_omni({**PUBLISHED_3B_TEXT, **change}))


def test_unknown_model_type_and_keys():
    with pytest.raises(ConfigError, match="model_type='llama4'"):
        spec_from_hf_config({"model_type": "llama4"})
    with pytest.raises(ConfigError, match="unknown TextConfig keys"):
        TextConfig.from_dict({"vocab_size": 1, "hidden": 2})


def test_load_hf_spec_errors(tmp_path):
    from casa_jax.model.config import load_hf_spec
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_hf_spec(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(_omni(PUBLISHED_3B_TEXT)))
    assert load_hf_spec(str(tmp_path)).text.hidden_size == 2048


def test_qwen2_export_config_refuses_mrope():
    from casa_jax.model.config import text_config_to_hf
    text = spec_from_hf_config(_omni(PUBLISHED_3B_TEXT)).text
    with pytest.raises(ConfigError, match="exports only as a Qwen2.5-Omni thinker"):
        text_config_to_hf(text)
    plain = text_config_to_hf(text.replace(mrope_section=None))
    assert spec_from_hf_config(plain).text == text.replace(mrope_section=None)
