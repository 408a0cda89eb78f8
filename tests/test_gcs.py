"""A workdir in Cloud Storage, against a local emulator (tests/gcs_emulator.py, no network): the trainer
writes its config, targets, metrics, TensorBoard events, resumable states and final model to
``gs://``; a run SIGKILLed there and restarted resumes from the bucket; evaluate reads the checkpoint
from the bucket and writes its report there. Nothing lands on the local disk."""

import json
import os
import signal
import subprocess
import sys
import time

from orbax.checkpoint._src.path.atomicity import COMMIT_SUCCESS_FILE

from conftest import TINY_CASA_STEPS, tiny_casa_train_cmd


def _rows(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in text.splitlines() if line]


def test_train_killed_in_a_bucket_resumes_from_it_and_evaluate_reads_it(gcs, straight_casa_run, tmp_path):
    """Negative controls: the bucket run really was killed before its end (no final model then), the
    restart says it resumed from the bucket's step, and no ``gs:`` folder appeared on the local disk.
    The metrics must equal those of the same run on a local disk that was never stopped."""
    from casa_jax import storage
    bucket = "gs://casa/run"
    states = f"{bucket}/checkpoints"
    proc = subprocess.Popen(tiny_casa_train_cmd(bucket), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path)
    deadline = time.time() + 300

    def done():  # on a bucket orbax writes a step in place and marks it complete with commit_success.txt
        return [int(n) for n in storage.listdir(states) if n.isdigit()
                and storage.isfile(f"{states}/{n}/{COMMIT_SUCCESS_FILE}")]
    while time.time() < deadline and not any(s >= 10 for s in done()) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(done())
    assert 10 <= killed_at < TINY_CASA_STEPS and not storage.exists(f"{bucket}/checkpoint"), killed_at

    r = subprocess.run(tiny_casa_train_cmd(bucket), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {killed_at}" in r.stderr
    straight = _rows((straight_casa_run / "metrics.jsonl").read_text())
    assert _rows(storage.read_text(f"{bucket}/metrics.jsonl")) == straight and len(straight) == TINY_CASA_STEPS
    for name in ("config.json", "targets.json", "checkpoint/casa_jax.json", "checkpoint/hf_sidecar/tokenizer.json"):
        assert storage.isfile(f"{bucket}/{name}"), name
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{bucket}/tensorboard"))
    assert not [n for n in storage.listdir("gs://casa") if ".partial-" in n or ".old-" in n]

    r = subprocess.run([sys.executable, "-m", "casa_jax.evaluate", f"--ckpt_dir={bucket}/checkpoint",
                        "--workdir=gs://casa/eval", "--suites=text,benign", "--per_suite=2", "--max_new_tokens=4"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(storage.read_text("gs://casa/eval/run/report.json"))
    assert report["n_items"] == 4 and storage.isfile("gs://casa/eval/run/report.md")

    def cli(module, *flags):
        r = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    cli("casa_jax.generate", f"--ckpt_dir={bucket}/checkpoint", "--prompt=Hello", "--prompt=How are you?",
        "--max_new_tokens=3", "--output_file=gs://casa/replies.jsonl")
    replies = [json.loads(line) for line in storage.read_text("gs://casa/replies.jsonl").splitlines()]
    assert [r["prompt"] for r in replies] == ["Hello", "How are you?"] and all("verdict" in r for r in replies)
    cli("casa_jax.convert", f"--ckpt_dir={bucket}/checkpoint", "--export_hf_dir=gs://casa/hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(storage.listdir("gs://casa/hf"))
    cli("casa_jax.convert", "--hf_dir=gs://casa/hf", "--out_dir=gs://casa/reimported")
    assert storage.isfile("gs://casa/reimported/casa_jax.json")
    assert os.listdir(tmp_path) == []  # no stray local "gs:" folders
