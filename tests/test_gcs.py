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

import pytest

from orbax.checkpoint._src.path.atomicity import COMMIT_SUCCESS_FILE

from gcs_emulator import GcsEmulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "casa_tiny.py")
STEPS = 60


@pytest.fixture(scope="module")
def gcs():
    """The emulator, with this process pointed at it (before its first gs:// use) and the env for children."""
    with GcsEmulator(("casa",)) as emulator:
        saved = {k: os.environ.get(k) for k in emulator.env}
        os.environ.update(emulator.env)
        import fsspec
        # anonymous, and no cached listings: this process watches a bucket that another one writes
        fsspec.config.conf.setdefault("gcs", {}).update(token="anon", use_listings_cache=False)
        yield emulator
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train(workdir) -> list[str]:
    return [sys.executable, "-m", "casa_jax.train", f"--config={CONFIG}:casa", f"--workdir={workdir}",
            f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=5", "--config.log_every_steps=1",
            "--config.eval_every_steps=15", "--config.data.num_harmful=40", "--config.data.heldout_per_class=8"]


def _rows(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in text.splitlines() if line]


def test_train_killed_in_a_bucket_resumes_from_it_and_evaluate_reads_it(gcs, tmp_path):
    """Negative controls: the bucket run really was killed before its end (no final model then), the
    restart says it resumed from the bucket's step, and no ``gs:`` folder appeared on the local disk."""
    from casa_jax import storage
    local = tmp_path / "local"
    r = subprocess.run(_train(local), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    bucket = "gs://casa/run"
    states = f"{bucket}/checkpoints"
    proc = subprocess.Popen(_train(bucket), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 300
    def done():  # on a bucket orbax writes a step in place and marks it complete with commit_success.txt
        return [int(n) for n in storage.listdir(states) if n.isdigit()
                and storage.isfile(f"{states}/{n}/{COMMIT_SUCCESS_FILE}")]
    while time.time() < deadline and not any(s >= 10 for s in done()) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(done())
    assert 10 <= killed_at < STEPS and not storage.exists(f"{bucket}/checkpoint"), killed_at

    r = subprocess.run(_train(bucket), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {killed_at}" in r.stderr
    assert _rows(storage.read_text(f"{bucket}/metrics.jsonl")) == _rows((local / "metrics.jsonl").read_text())
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
    assert sorted(os.listdir(tmp_path)) == ["local"]  # no stray local "gs:" folders
