"""Bad input gets one line that names it (exit 2) before any long work, and what would silently give a
wrong result is an error: flags, config keys, checkpoints (integer, truncated, incomplete), prompts past
the context, flags a model would ignore."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from casa_jax.io.hf_files import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _cli(module, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", f"casa_jax.{module}", *args], capture_output=True, text=True,
                          cwd=cwd, env=ONE_DEVICE)


def _one_error_line(r, *needles):
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("args,needles", [
    (["--temperature=-1"], ["--temperature=-1"]),
    (["--temperature=0.7", "--top_p=2"], ["--top_p=2.0", "(0, 1]"]),
    (["--max_new_tokens=0"], ["--max_new_tokens=0"]),
    (["--batch_size=0"], ["--batch_size=0"]),
    (["--top_p=0.9"], ["greedy"]),
    (["--prompts_file=p.jsonl", "--image=x.png", "--prefill=Sure"], ["--image, --prefill would be ignored"]),
    (["--max_new_tokens=abc"], ["--max_new_tokens=abc"]),
    (["--output_file=/nonexistent/dir/out.jsonl"], ["does not exist or is not writable"]),
    (["--recheck_every=-1"], ["--recheck_every=-1"]),
])
def test_generate_refuses_bad_flags_before_loading(args, needles):
    _one_error_line(_cli("generate", "--ckpt_dir=/nonexistent_ckpt", *args), *needles)


@pytest.mark.parametrize("args,needles", [
    (["--config.no_such_key=1"], ["unknown config key", "no_such_key"]),
    (["--config.num_train_steps=-5"], ["--config.num_train_steps=-5"]),
    (["--config.batch_size=0"], ["--config.batch_size=0"]),
    (["--config=configs/casa_tiny.py:nope"], ["unknown objective 'nope'"]),
    (["--config.data.benign_sets=('/nonexistent/mine.jsonl',)"], ["/nonexistent/mine.jsonl: file not found"]),
    (["--config.data.num_harmful=5000"], ["only", "harmful prompts", "need 5000"]),
])
def test_train_refuses_bad_config_before_training(tmp_path, args, needles):
    r = _cli("train", f"--workdir={tmp_path / 'w'}", *args)
    _one_error_line(r, *needles)
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_evaluate_checks_inputs_first(tmp_path):
    _one_error_line(_cli("evaluate", "--ckpt_dir=/nonexistent", "--suites=telepathy"), "unknown suites ['telepathy']")
    (tmp_path / "f").write_text("")
    _one_error_line(_cli("evaluate", "--ckpt_dir=/nonexistent", f"--workdir={tmp_path / 'f'}"), "is a file")
    _one_error_line(_cli("evaluate", "--ckpt_dir=/nonexistent"), "/nonexistent: not a casa-jax checkpoint")


def test_serve_and_demo_check_inputs_first():
    _one_error_line(_cli("serve", "--ckpt_dir=/nonexistent", "--max_batch=0"), "--max_batch=0")
    _one_error_line(_cli("serve", "--ckpt_dir=/nonexistent"), "/nonexistent: not a casa-jax checkpoint")
    _one_error_line(_cli("demo", "--model=tiny_thinker", "--workdir=gs://bucket/demo"), "needs a local workdir")


@pytest.mark.parametrize("module", ["train", "generate", "evaluate", "convert", "sizing", "demo", "parity",
                                    "serve"])
def test_help_exits_zero(module):
    r = _cli(module, "--help")
    assert r.returncode == 0 and "PyTorch was not found" not in r.stdout + r.stderr, r.stderr[-500:]


@pytest.mark.parametrize("module", ["generate", "serve"])
def test_weights_flag_lists_the_engines_formats(module):
    """The CLIs spell ``--weights``' choices out (they do not import jax to parse flags): they must stay the
    Engine's ``WEIGHT_FORMATS``, in order. Read from ``--help`` as a user sees them."""
    import re
    from casa_jax.infer.engine import WEIGHT_FORMATS
    r = _cli(module, "--help")
    found = re.findall(r"--weights: <([^>]*)>", r.stdout)
    assert found == ["|".join(WEIGHT_FORMATS)], (found, WEIGHT_FORMATS)


def test_sizing_runs_outside_the_repository(tmp_path):
    r = _cli("sizing", "--config=configs/qwen2_5_omni_3b.py", "--slice=v5p-8", "--mode=lora", cwd=str(tmp_path))
    assert r.returncode == 0 and "fits" in r.stdout, r.stderr[-1500:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 HF directory (context 64) and its converted casa-jax checkpoint."""
    from hf_fixtures import make_qwen2

    from casa_jax import tiny as tiny_lib
    from casa_jax.io.convert_lib import hf_to_ckpt
    root = tmp_path_factory.mktemp("tiny")
    hf = make_qwen2(str(root / "hf"), max_position_embeddings=64)
    tiny_lib.build_tokenizer(256).save_pretrained(hf)
    ckpt = str(root / "ckpt")
    hf_to_ckpt(hf, ckpt)
    return hf, ckpt


def test_integer_weights_are_refused(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    from casa_jax.io.hf import load_hf_checkpoint
    bad = tmp_path / "int"
    shutil.copytree(tiny[0], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key].astype(np.int32)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"not floating point: {key.replace('.', '[.]')} \\(I32\\)"):
        load_hf_checkpoint(str(bad))


def test_truncated_and_incomplete_checkpoints_name_the_file(tiny, tmp_path):
    from casa_jax.io.hf import load_hf_checkpoint
    from casa_jax.io.orbax_io import restore_checkpoint
    short = tmp_path / "short"
    shutil.copytree(tiny[0], short)
    weights = short / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_hf_checkpoint(str(short))
    stateless = tmp_path / "stateless"
    shutil.copytree(tiny[1], stateless)
    shutil.rmtree(stateless / "state")
    with pytest.raises(CheckpointError, match="has no weights"):
        restore_checkpoint(str(stateless))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny[1], corrupt)
    biggest = max((os.path.join(r, n) for r, _, names in os.walk(corrupt / "state") for n in names),
                  key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        restore_checkpoint(str(corrupt))


def test_prompt_past_the_context_and_ignored_casa_flags(tiny):
    from casa_jax.model.config import ConfigError
    from casa_jax.processing import InputError
    from casa_jax.infer.chat import chat_replies
    from casa_jax.infer.engine import Engine
    engine = Engine.load(tiny[1])
    with pytest.raises(InputError, match="more than the model's context of 64"):
        chat_replies(engine, ["word " * 80], max_new_tokens=4)
    with pytest.raises(ConfigError, match="apply to CASA models only"):
        chat_replies(engine, ["hi"], max_new_tokens=4, threshold=0.3)
    assert len(chat_replies(engine, ["hi"], max_new_tokens=2)) == 1  # negative control: a fitting prompt runs


def test_jsonl_errors_name_the_line(tmp_path):
    from casa_jax.eval.suites import items_from_file
    f = tmp_path / "p.jsonl"
    f.write_text('\n\n{"prompt": "a", "label": 0}\n\n{"prompt": 3, "label": 1}\n')
    with pytest.raises(ValueError, match="p.jsonl:5: each record"):
        items_from_file(str(f))


def test_output_locations_are_checked_before_reading(tiny, tmp_path):
    """An output path that is a file, or whose folder cannot be written, fails before the input is read."""
    from casa_jax.train.config import tiny_train_config
    from casa_jax.train.trainer import train
    from casa_jax.io.convert_lib import ckpt_to_hf, hf_to_ckpt
    from casa_jax.model.config import ConfigError
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file"):
        hf_to_ckpt(tiny[0], str(a_file), overwrite=True)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anyway: then only the file case is checked
            with pytest.raises(CheckpointError, match="is not a writable directory"):
                ckpt_to_hf(tiny[1], str(locked / "out"), 1 << 30)
    finally:
        locked.chmod(0o700)
    with pytest.raises(ConfigError, match="--workdir=.* is a file"):
        train(tiny_train_config("casa"), str(a_file), progress=False)
    assert a_file.read_text() == "keep me"


def test_generate_checks_every_media_path_first(tmp_path):
    """A bad image late in a prompts file stops generate before the first reply (naming file and line),
    instead of throwing away the replies that finished."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n\n{"prompt": "b", "image": "/nonexistent/cat.png"}\n')
    _one_error_line(_cli("generate", "--ckpt_dir=/nonexistent_ckpt", f"--prompts_file={prompts}",
                         f"--output_file={tmp_path / 'out.jsonl'}"), "p.jsonl:3: image '/nonexistent/cat.png'")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_judge_that_cannot_serve_fails_up_front(tmp_path):
    from casa_jax.eval.judges import get_judge
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a casa-jax checkpoint"):
        get_judge(f"llm:{tmp_path / 'empty'}:harmbench")


@pytest.mark.parametrize("through_cli", [True, False])
def test_no_pytorch_notice_from_the_clis(through_cli):
    """Without torch (a user's venv: torch is test-only), transformers prints "PyTorch was not found" on
    import; the CLIs silence it. Negative control: importing transformers directly still prints it."""
    code = ("import sys; sys.modules['torch'] = None\n" + ("import casa_jax.cli\n" if through_cli else "")
            + "import transformers\nfrom transformers import AutoTokenizer\n")
    env = {k: v for k, v in ONE_DEVICE.items() if k != "TRANSFORMERS_VERBOSITY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-1000:]
    assert ("PyTorch was not found" in r.stderr) == (not through_cli), r.stderr[-500:]
