"""GGUF import without torch: a tiny Llama in llama.cpp's layout (F32, F16, Q8_0 and Q4_1 tensors, q/k
rows permuted) converts to a casa-jax checkpoint whose logits equal transformers' own loading of the
same file, with the same tokenizer and chat template."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as fx
from casa_jax.io.hf_files import CheckpointError

TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q8_0", "attn_v": "F16", "ffn_": "Q4_1",
         "attn_output": "Q4_1"}
CHAT = [{"role": "user", "content": "Give three tips for staying healthy."}]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    # context 8192 (as SmolLM2): the demo pipeline test feeds jailbreak-wrapped prompts through the tiny
    # tokenizer (about one token per character, up to ~5,700)
    return fx.make_llama_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"), seed=3, types=TYPES,
                              max_position_embeddings=8192)


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gguf_ckpt") / "ckpt")
    r = subprocess.run([sys.executable, "-m", "casa_jax.convert", f"--gguf={gguf_file}", f"--out_dir={out}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_conversion_never_imports_torch(gguf_file, tmp_path):
    """The package's own GGUF path (weights and tokenizer) runs where torch is not installed."""
    code = ("import sys; from casa_jax.io.convert_lib import gguf_to_ckpt; "
            f"gguf_to_ckpt({gguf_file!r}, {str(tmp_path / 'new' / 'ckpt')!r}); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split()[-1] == "False", r.stdout + r.stderr[-2000:]


def test_file_uses_every_quantization_type(gguf_file):
    import gguf
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors}
    assert kinds == {"F32", "F16", "Q8_0", "Q4_1"}


@pytest.fixture(scope="module")
def gguf_parity(gguf_file, converted):
    """Chat ids, transformers' fp32 logits from its own GGUF loading, our checkpoint, and a compiled forward."""
    import jax

    from casa_jax.io.orbax_io import restore_checkpoint
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.model.text_decoder import CausalLM

    folder, name = os.path.dirname(gguf_file), os.path.basename(gguf_file)
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits.numpy()
    loaded = restore_checkpoint(converted)
    batch = np.asarray([ids]); mask = np.ones_like(batch)
    forwards = {}

    def ours(cfg, params):
        if cfg not in forwards:
            model = CausalLM(cfg)
            positions = positions_from_mask(mask)
            forwards[cfg] = jax.jit(lambda p: model.apply({"params": p}, batch, positions, mask).logits)
        return np.asarray(forwards[cfg](params))
    return ids, expected, loaded, ours, mask


def test_logits_and_tokens_equal_transformers_gguf_loading(gguf_file, converted, gguf_parity):
    from casa_jax.parity import compare, logit_scale
    from casa_jax.io.trained import load_tokenizer

    ids, expected, loaded, ours, mask = gguf_parity
    ours_tok = load_tokenizer(converted)
    assert ours_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    assert ours_tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert loaded.spec.model_type == "llama" and not loaded.spec.text.attention_bias
    diff, _, _ = compare(expected, ours(loaded.spec.text, loaded.params), mask)
    scale = logit_scale(expected, mask)
    print(f"tiny GGUF: max |logit diff| {diff:.3e}, logit scale {scale:.3g}")
    assert scale >= 4 and diff <= 1e-4 * scale, (diff, scale)  # sharp weights; parity.DEFAULT_ATOL


def _llama_cpp_order(kernel):
    """Our [embed, heads, head_dim] q/k kernel with each head's rows in llama.cpp's permuted order."""
    d = kernel.shape[-1]
    return np.asarray(kernel).reshape(*kernel.shape[:-1], 2, d // 2).swapaxes(-1, -2).reshape(kernel.shape)


@pytest.mark.parametrize("control", ["qk_rows_not_unpermuted", "rope_freq_base_ignored"])
def test_gguf_parity_fails_on_a_broken_import(gguf_parity, control):
    """Negative controls: q/k rows left in llama.cpp's order, or rope_freq_base (1e5) read as the usual
    1e4, fail the same check."""
    from casa_jax.parity import compare, logit_scale

    _, expected, loaded, ours, mask = gguf_parity
    cfg, params = loaded.spec.text, loaded.params
    if control == "qk_rows_not_unpermuted":
        for proj in ("q_proj", "k_proj"):
            params = fx.replace_leaf(params, ("layers", "self_attn", proj, "kernel"), _llama_cpp_order)
    else:
        assert cfg.rope_theta == 100000.0
        cfg = cfg.replace(rope_theta=10000.0)
    diff, _, _ = compare(expected, ours(cfg, params), mask)
    limit = 1e-4 * logit_scale(expected, mask)
    print(f"{control}: max |logit diff| {diff:.3e} = {diff / limit:.3g} x tolerance")
    assert diff > limit


def test_unpermute_inverts_llama_cpp_permute():
    from casa_jax.io.gguf_import import unpermute
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of 8 rows
    permuted = w.reshape(3, 2, 4, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute(permuted, 3), w)


def test_bad_gguf_inputs(tmp_path):
    from casa_jax.io.gguf_import import gguf_to_hf_dir, hf_config
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        gguf_to_hf_dir(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="junk.gguf: not a readable GGUF file"):
        gguf_to_hf_dir(str(junk), str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="general.architecture='mamba' is not supported"):
        hf_config({"general.architecture": "mamba"}, set(), "m.gguf")
    with pytest.raises(CheckpointError, match="metadata key llama.feed_forward_length is missing"):
        hf_config({"general.architecture": "llama", "llama.attention.head_count": 4,
                   "llama.embedding_length": 64}, set(), "m.gguf")
    assert not (tmp_path / "out").exists()


def test_real_model_demo_pipeline_on_a_tiny_gguf(gguf_file, gcs, tmp_path, monkeypatch):
    """The README's main job (``casa_jax.demos.smollm2``), shortened and on the tiny GGUF, with its workdir in
    a Cloud Storage bucket (the local emulator): convert, evaluate the base model, train CASA and SSFT on
    shared distilled data, evaluate, before/after table; a second run reuses the conversion and the finished
    training runs from the bucket. Negative controls: a changed key re-evaluates; nothing lands locally."""
    import json

    from casa_jax import storage
    from casa_jax.demos import smollm2
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here as a "gs:" folder
    workdir = "gs://demo/smollm2"
    small = {"batch_size": 8, "data.num_harmful": 8, "data.heldout_per_class": 4, "data.self_answer_tokens": 4,
             "data.max_length": 256}
    out = smollm2.run(workdir, gguf=gguf_file, steps=2, per_suite=2, benign=3, max_new_tokens=4, overrides=small)
    assert list(out["reports"]) == ["base", "casa", "ssft"]
    benign_n = sum(r["n"] for r in out["reports"]["casa"]["suites"] if r["suite"] in smollm2.BENIGN_SUITES)
    assert set(out["utility"]) == {"casa", "ssft"} and out["utility"]["casa"]["pooled"]["n"] == benign_n > 0
    for name, report in out["reports"].items():
        assert {r["suite"] for r in report["suites"]} == set(smollm2.TEXT_ATTACKS) | set(smollm2.BENIGN_SUITES), name
    assert "| benign (over-refusal) | text |" in out["table"] and set(out["goal"]) >= {"relative_reduction", "met"}
    assert out["goal"]["pooled"]["asr_n"] == 2 * len(smollm2.TEXT_ATTACKS) and out["goal"]["pooled"]["asr_ci"]
    md = storage.read_text(f"{workdir}/report.md")
    assert "ROUGE-L" in md and "Wilson 95 % interval" in md and "agreement" in md
    assert storage.isfile(f"{workdir}/asr.png") and storage.isfile(f"{workdir}/eval/casa/report.json")
    targets = json.loads(storage.read_text(f"{workdir}/targets.json"))
    assert sum(not e["harmful"] for e in targets["train"]) == round(8 * 10_000 / 6_200)  # shared by CASA and SSFT
    assert not storage.exists(f"{workdir}/casa/targets.json")
    assert storage.isfile(f"{workdir}/casa/checkpoint/casa_jax.json") and storage.isdir(f"{workdir}/casa/tensorboard")
    assert not smollm2._convert_once(gguf_file, f"{workdir}/base")  # reused
    assert smollm2._finished(f"{workdir}/casa", 2)["step"] == 2
    again = smollm2.run(workdir, gguf=gguf_file, steps=2, per_suite=2, benign=3, max_new_tokens=4,
                        overrides=small)  # every stage reused: the same table, nothing regenerated
    assert again["table"] == out["table"] and again["utility"] == out["utility"]
    storage.write_text_atomic(f"{workdir}/eval/casa/demo_key.json", "{}")  # a changed key re-evaluates
    assert smollm2._evaluate_once("casa", f"{workdir}/casa/checkpoint", f"{workdir}/eval/casa", {},
                                  lambda: {"fresh": True}) == {"fresh": True}
    assert os.listdir(tmp_path) == []
    assert not [n for n in storage.listdir("gs://demo/smollm2") if ".partial-" in n or ".old-" in n]


def test_omni_mini_demo_pipeline_on_a_tiny_gguf(gguf_file, gcs, tmp_path):
    """``--model=omni_mini`` shortened, on the tiny GGUF and the real Whisper tower: text-only CASA and SSFT,
    the CTC projector on benign speech, composition, the transfer table with spoken / spelling / text /
    benign rows, the listening measures; a second run reuses every stage. Its text stages are the SmolLM2
    demo test's, in the bucket (``text_workdir``, as ``--text_workdir`` takes): reused when that test ran
    first, trained there otherwise; the omni stages are local."""
    from conftest import espeak_or_skip
    espeak_or_skip()
    from casa_jax.demos import omni_mini
    small = {"batch_size": 8, "data.num_harmful": 8, "data.heldout_per_class": 4, "data.self_answer_tokens": 4,
             "data.max_length": 256}
    kwargs = dict(gguf=gguf_file, steps=2, align_steps=3, per_suite=2, benign=2, max_new_tokens=4, overrides=small,
                  listen_overrides={"pool_stride": 2, "per_prompt": 1, "spell_words": 2}, n_transcribe=2)
    from casa_jax import storage
    kwargs["text_workdir"] = "gs://demo/smollm2"
    out = omni_mini.run(str(tmp_path), **kwargs)
    assert list(out["reports"]) == ["base", "casa", "ssft"]
    for name, report in out["reports"].items():
        assert {r["suite"] for r in report["suites"]} == set(omni_mini.SUITES), name
    assert "| benign_spoken (over-refusal) | audio |" in out["table"] and "| spoken | audio |" in out["table"]
    assert set(out["goal"]) >= {"base_spoken_asr", "spoken_reduction", "spelling_reduction", "met"}
    listening = out["listening"]
    assert listening["recogniser_wer_harmful"]["n"] == 2 and listening["answer_agreement_rouge_l"]["n"] == 2
    assert (tmp_path / "report.md").exists() and (tmp_path / "omni" / "casa").is_dir()
    assert storage.isfile("gs://demo/smollm2/targets.json") and not (tmp_path / "text").exists()
    again = omni_mini.run(str(tmp_path), **kwargs)  # every stage reused
    assert again["table"] == out["table"] and again["listening"] == listening
