"""End to end through the CLIs: train the tiny model with each objective, save, reload and generate
with the right verdicts on held-out prompts; each objective's loss falls, and CASA's held-out safety
accuracy reaches 95 %."""

import json
import os
import subprocess
import sys

import pytest

from casa_jax.casa.config import DEFAULT_REFUSAL
from casa_jax.train.mixtures import split_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "casa_tiny.py")
STEPS = {"casa": 200, "ssft": 200, "circuit_breaker": 200}
EXPECTED = {"casa": ("unsafe", "safe"), "ssft": ("refused", "answered"), "circuit_breaker": ("rerouted", "intact")}


@pytest.fixture(scope="module")
def heldout_prompts():
    """Two harmful and two benign prompts from the held-out part of the default split."""
    _, heldout = split_examples(["harmful_advbench"], ["benign_freshqa", "benign_mtbench"], 300, 40,
                                DEFAULT_REFUSAL, 120, 0)
    harmful = [e.prompt for e in heldout if e.harmful][:2]
    benign = [e.prompt for e in heldout if not e.harmful][:2]
    return harmful, benign


# One device: these runs check the method end to end; sharding is tested on 8 devices in test_training.
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=ONE_DEVICE)


@pytest.mark.parametrize("objective", ["casa", "ssft", "circuit_breaker"])
def test_train_save_reload_generate(objective, tmp_path, heldout_prompts, request):
    if objective == "casa":  # the session's shared run (conftest.tiny_casa_model): the same command
        workdir = request.getfixturevalue("tiny_casa_model")
    else:
        workdir = tmp_path / objective
        r = _run("casa_jax.train", f"--config={CONFIG}:{objective}", f"--workdir={workdir}",
                 f"--config.num_train_steps={STEPS[objective]}", "--config.log_every_steps=20")
        assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert records[-1]["step"] == STEPS[objective]
    if objective == "casa":  # the threshold chosen on the held-out prompts is recorded and stored
        calibration = records.pop()
        assert calibration["calibration_balanced_accuracy"] >= 0.95, calibration
        from casa_jax.io.trained import load_trained
        assert load_trained(str(workdir / "checkpoint")).casa.threshold == calibration["calibrated_threshold"]
    if objective == "circuit_breaker":
        # Its total is a schedule-weighted sum whose retain weight grows from 0; the term it optimises is the
        # harmful prompts' cosine to the frozen model, exactly 1 at step 0 (LoRA B starts at zero).
        assert records[-1]["eval_reroute_cos"] < 0.5, records[-1]
    else:
        assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
    if objective == "casa":
        assert records[-1]["eval_safety_accuracy"] >= 0.95, records[-1]
    assert json.load(open(workdir / "config.json"))["objective"] == objective

    harmful, benign = heldout_prompts
    out = tmp_path / "replies.jsonl"
    prompts = [f"--prompt={p}" for p in harmful + benign]
    r = _run("casa_jax.generate", f"--ckpt_dir={workdir / 'checkpoint'}", *prompts, "--max_new_tokens=16",
             f"--output_file={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    replies = [json.loads(line) for line in open(out)]
    bad, good = EXPECTED[objective]
    assert [x["verdict"] for x in replies] == [bad, bad, good, good], replies
    if objective == "casa":
        assert all(x["response"].startswith("I'm sorry") for x in replies[:2])
        assert all("<|" not in x["response"] for x in replies)  # safety tokens never shown
        assert all(x["v_s"] > 0.5 for x in replies[:2]) and all(x["p_unsafe"] < 0.5 for x in replies[2:])


def test_generate_cli_errors(tmp_path):
    r = _run("casa_jax.generate", f"--ckpt_dir={tmp_path}")
    assert r.returncode == 2 and "not a casa-jax checkpoint" in r.stderr
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "no prompt key"}\n')
    r = _run("casa_jax.generate", f"--ckpt_dir={tmp_path}", f"--prompts_file={bad}")
    assert r.returncode == 2 and "prompts.jsonl:2: each line needs a string 'prompt'" in r.stderr


def test_export_keeps_safety_tokens_and_merges_lora(tmp_path):
    """A trained checkpoint exports to Hugging Face with the resized vocab, the safety tokens in the
    tokenizer and LoRA merged: transformers' logits equal ours with the adapters applied."""
    import jax
    import numpy as np
    import torch
    import transformers

    from casa_jax.io.trained import load_trained
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.model.text_decoder import CausalLM

    workdir = tmp_path / "casa"
    r = _run("casa_jax.train", f"--config={CONFIG}:casa", f"--workdir={workdir}", "--config.num_train_steps=20",
             "--config.eval_every_steps=20")
    assert r.returncode == 0, r.stderr[-3000:]
    export = tmp_path / "hf"
    r = _run("casa_jax.convert", f"--ckpt_dir={workdir / 'checkpoint'}", f"--export_hf_dir={export}")
    assert r.returncode == 0, r.stderr[-3000:]
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert tok.convert_tokens_to_ids("<|unsafe|>") == 513 and tok.convert_tokens_to_ids("<|safe|>") == 512
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    assert hf.config.vocab_size == 514
    model = load_trained(str(workdir / "checkpoint"))
    ids = np.asarray([tok.encode("Hello there, how are you?") + [513]])
    mask = np.ones_like(ids)
    ours = CausalLM(model.spec.text, model.lora_spec).apply({"params": model.params, "lora": model.lora}, ids,
                                           positions_from_mask(mask), mask).logits
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    del jax


def test_train_cli_config_overrides_and_errors(tmp_path):
    r = _run("casa_jax.train", f"--config={CONFIG}:casa", f"--workdir={tmp_path / 'w'}",
             "--config.data.benign_sets=('benign_freshqa', 'benign_refusal_scorer')", "--config.data.max_length=16")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--config.data.max_length=16 is too short: the longest prompt takes" in r.stderr
    r = _run("casa_jax.train", f"--config={CONFIG}:casa", f"--workdir={tmp_path / 'w'}",
             "--config.casa.aggregation=median")
    assert r.returncode == 2 and "CasaConfig.aggregation='median'" in r.stderr
