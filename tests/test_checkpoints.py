"""HF <-> casa-jax conversion: bit-exact round trips, exports transformers loads, and clear errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_fixtures as fx
from casa_jax.io import hf_files
from casa_jax.io.convert_lib import ckpt_to_hf, hf_to_ckpt
from casa_jax.io.hf import load_hf_checkpoint, write_hf_checkpoint
from casa_jax.io.hf_files import CheckpointError, SafetensorsDir
from casa_jax.io.orbax_io import restore_checkpoint


@pytest.fixture(scope="module")
def dirs(hf_root):
    d = {"thinker": fx.make_thinker(str(hf_root / "c_thinker"), seed=5),
         "qwen2": fx.make_qwen2(str(hf_root / "c_qwen2"), seed=6, max_shard_size="30KB")}
    d["hub"] = fx.make_hub_omni(d["thinker"], str(hf_root / "c_hub"), shards=2)
    return d


def _same_tensors(a_dir, b_dir, strip_prefix=""):
    a, b = SafetensorsDir(a_dir), SafetensorsDir(b_dir)
    assert a.keys() == b.keys()
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key
    return len(a.keys())


@pytest.mark.parametrize("layout", ["thinker", "qwen2", "hub"])
def test_round_trip_is_bit_exact(dirs, tmp_path, layout):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    hf_to_ckpt(dirs[layout], ckpt)
    ckpt_to_hf(ckpt, out, max_shard_bytes=20_000)
    n = _same_tensors(dirs[layout], out)  # canonical names: the hub's thinker. prefix is dropped
    assert n > 20
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))  # sharded at 20 kB
    if layout == "hub":  # exported as a thinker transformers can load on its own
        assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "qwen2_5_omni_thinker"


def test_bf16_round_trip_is_bit_exact(dirs, tmp_path):
    src = str(tmp_path / "bf16")
    shutil.copytree(dirs["thinker"], src)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, os.path.join(src, "model.safetensors"),
              metadata={"format": "pt"})
    hf_to_ckpt(src, str(tmp_path / "ckpt"))
    ckpt_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_bytes=1 << 30)
    _same_tensors(src, str(tmp_path / "out"))
    assert SafetensorsDir(str(tmp_path / "out")).dtype("lm_head.weight") == "BF16"


@pytest.mark.parametrize("layout,cls", [("thinker", "Qwen2_5OmniThinkerForConditionalGeneration"),
                                        ("qwen2", "Qwen2ForCausalLM")])
def test_transformers_loads_the_export(dirs, tmp_path, layout, cls):
    import transformers
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    hf_to_ckpt(dirs[layout], ckpt)
    ckpt_to_hf(ckpt, out, max_shard_bytes=1 << 30)
    original = getattr(transformers, cls).from_pretrained(dirs[layout]).eval()
    exported = getattr(transformers, cls).from_pretrained(out).eval()
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, exported(input_ids=ids).logits)


def test_restore_onto_a_mesh(dirs, tmp_path):
    import jax

    from casa_jax.model.text_decoder import CausalLM, init_inputs
    from casa_jax.sharding import make_mesh, param_shardings
    ckpt = str(tmp_path / "ckpt")
    hf_to_ckpt(dirs["qwen2"], ckpt)
    plain = load_hf_checkpoint(dirs["qwen2"], progress=False)
    mesh = make_mesh((1, 4, 2))
    shardings = param_shardings(CausalLM(plain.spec.text), mesh, *init_inputs())
    for loaded in (restore_checkpoint(ckpt, shardings=shardings),
                   load_hf_checkpoint(dirs["qwen2"], shardings=shardings, progress=False)):
        kernel = loaded.params["layers"]["mlp"]["gate_proj"]["kernel"]
        assert kernel.sharding == shardings["layers"]["mlp"]["gate_proj"]["kernel"]
        assert len(kernel.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain.params["layers"]["mlp"]["gate_proj"]["kernel"]))
    del jax


# ---- bad inputs: one clear error each, nothing written -------------------------------------------

def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshaped_keys_listed_together(dirs, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.extra.weight"] = torch.zeros(2)
        t["model.norm.weight"] = torch.zeros(7)
    bad = _broken_copy(dirs["thinker"], str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError) as err:
        hf_to_ckpt(bad, str(tmp_path / "out"))
    text = str(err.value)
    assert "missing (1)" in text and "model.layers.1.mlp.up_proj.weight" in text
    assert "unexpected (1)" in text and "model.layers.0.extra.weight" in text
    assert "wrong shape (1)" in text and "model.norm.weight: file has [7], config expects [48]" in text
    assert not os.path.exists(tmp_path / "out")


def test_encoder_keys_are_unexpected_for_a_plain_qwen2(dirs, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(dirs["thinker"], bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    text = {**cfg["text_config"], "model_type": "qwen2", "tie_word_embeddings": False}
    json.dump(text, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"unexpected \(\d+\):\n    audio_tower\."):
        load_hf_checkpoint(bad, progress=False)


def test_pickle_files_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", **fx.TEXT, "rope_theta": 1e4}))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*never loads pickle files: unpickling can execute"):
        load_hf_checkpoint(str(d), progress=False)


def test_mixed_key_styles_and_missing_shards(dirs, tmp_path):
    mixed = _broken_copy(dirs["thinker"], str(tmp_path / "mixed"),
                         lambda t: t.update({"thinker.model.extra": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="mixes key styles"):
        SafetensorsDir(mixed)
    gone = str(tmp_path / "gone")
    shutil.copytree(dirs["hub"], gone)
    os.remove(os.path.join(gone, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"lists shard files that are not in .*model-00002-of-00002"):
        SafetensorsDir(gone)


def test_tied_head_must_equal_embeddings(dirs, tmp_path):
    src = str(tmp_path / "tied")
    fx.make_qwen2(src, tie=True)
    path = os.path.join(src, "model.safetensors")
    t = load_file(path)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, path, metadata={"format": "pt"})
    load_hf_checkpoint(src, progress=False)  # equal copy: accepted
    t["lm_head.weight"] += 1
    save_file(t, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_hf_checkpoint(src, progress=False)


def test_outputs_are_never_clobbered_or_half_written(dirs, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    hf_to_ckpt(dirs["qwen2"], ckpt)
    with pytest.raises(CheckpointError, match="already exists and is not empty; pass --overwrite"):
        hf_to_ckpt(dirs["qwen2"], ckpt)
    loaded = restore_checkpoint(ckpt)

    def exploding():
        yield "model.embed_tokens.weight", np.zeros((2, 2), np.float32)
        raise KeyboardInterrupt  # e.g. the user interrupts the export half-way
    out = str(tmp_path / "export")
    with pytest.raises(KeyboardInterrupt):
        with hf_files.atomic_directory(out) as tmp:
            hf_files.write_safetensors(tmp, exploding(), 1 << 30)
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    write_hf_checkpoint(out, loaded.params, loaded.spec, progress=False)
    write_hf_checkpoint(out, loaded.params, loaded.spec, progress=False, overwrite=True)
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_in_memory_key_style_is_accepted(dirs, tmp_path):
    """transformers' in-memory thinker names: model.language_model.*, model.visual.*, model.audio_tower.*."""
    src = str(tmp_path / "in_memory")
    shutil.copytree(dirs["thinker"], src)
    path = os.path.join(src, "model.safetensors")
    renamed = {}
    for key, value in load_file(path).items():
        if key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        elif key.startswith(("visual.", "audio_tower.")):
            key = "model." + key
        renamed[key] = value
    save_file(renamed, path, metadata={"format": "pt"})
    a = load_hf_checkpoint(src, progress=False)
    b = load_hf_checkpoint(dirs["thinker"], progress=False)
    assert jax.tree.structure(a.encoders) == jax.tree.structure(b.encoders)
    np.testing.assert_array_equal(np.asarray(a.encoders["visual"]["merger"]["fc2"]["kernel"]),
                                  np.asarray(b.encoders["visual"]["merger"]["fc2"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(a.params["layers"]["self_attn"]["q_proj"]["kernel"]),
                                  np.asarray(b.params["layers"]["self_attn"]["q_proj"]["kernel"]))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a casa-jax checkpoint"):
        restore_checkpoint(str(tmp_path))


def test_convert_cli_round_trip_and_errors(dirs, tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    run = lambda *args: subprocess.run([sys.executable, "-m", "casa_jax.convert", *args], capture_output=True, text=True)
    r = run(f"--hf_dir={dirs['hub']}", f"--out_dir={ckpt}")
    assert r.returncode == 0, r.stderr
    r = run(f"--ckpt_dir={ckpt}", f"--export_hf_dir={out}")
    assert r.returncode == 0, r.stderr
    _same_tensors(dirs["thinker"], out)
    r = run(f"--hf_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "config.json: not found" in r.stderr
    r = run(f"--hf_dir={dirs['hub']}")
    assert r.returncode != 0 and "--out_dir" in r.stderr


def test_lora_settings_are_stored_apart_and_legacy_checkpoints_still_load(tmp_path):
    """A trained checkpoint keeps LoRA's rank/alpha/targets in its own "lora" entry, not in the text
    config; one written while they were TextConfig fields (lora_* keys in "text_config") loads with the
    same settings. Negative control: adapters without any LoRA settings are refused."""
    from casa_jax import tiny
    from casa_jax.io.trained import TrainedModel, load_trained, save_trained
    from casa_jax.model.layers import LoraSpec
    from casa_jax.peft.lora import init_lora
    spec = tiny.tiny_spec()
    lspec = LoraSpec(2, alpha=8.0, targets=("q_proj", "up_proj"))
    model = TrainedModel(spec=spec, params=tiny.random_params(spec.text), encoders={}, objective="ssft",
                         lora=init_lora(spec.text, lspec, jax.random.key(0)), lora_spec=lspec)
    ckpt = str(tmp_path / "ckpt")
    save_trained(ckpt, model, tiny.build_tokenizer(spec.text.vocab_size))
    meta_path = os.path.join(ckpt, "casa_jax.json")
    meta = json.load(open(meta_path))
    assert meta["lora"] == lspec.to_dict() and not any(k.startswith("lora") for k in meta["text_config"])
    assert load_trained(ckpt).lora_spec == lspec
    legacy = dict(meta, text_config={**meta["text_config"], "lora_rank": 2, "lora_alpha": 8.0, "lora_dropout": 0.0,
                                     "lora_targets": ["q_proj", "up_proj"]})
    del legacy["lora"]
    json.dump(legacy, open(meta_path, "w"))
    assert load_trained(ckpt).lora_spec == lspec
    del legacy["text_config"]["lora_rank"]
    json.dump(legacy, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="no LoRA settings"):
        load_trained(ckpt)
