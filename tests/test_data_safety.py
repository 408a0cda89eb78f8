"""Nothing lost: the six careless commands that destroyed or mixed data before are refused, and what
they were pointed at is left as it was."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from casa_jax.io.convert_lib import ckpt_to_hf, gguf_to_ckpt, hf_to_ckpt
from casa_jax.io.hf_files import CheckpointError
from casa_jax.eval.run import report_names
from casa_jax.model.config import ConfigError
from casa_jax.paths import overlaps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _marked(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "precious.txt").write_text("a week of training")
    return path


def test_convert_refuses_outputs_that_touch_their_inputs(tmp_path):
    """Export onto the checkpoint, into the workdir that holds it, inside it; import onto the source
    weights; a GGUF output that contains the GGUF file. Negative control: a separate output is allowed
    past the guard (and then fails on the fake input, not on the guard)."""
    workdir = _marked(tmp_path / "run")
    ckpt = _marked(workdir / "checkpoint")
    for out in (ckpt, workdir, ckpt / "export"):
        with pytest.raises(CheckpointError, match="--export_hf_dir=.* (is|contains|lies inside) --ckpt_dir"):
            ckpt_to_hf(str(ckpt), str(out), 1 << 30, overwrite=True)
    hf = _marked(tmp_path / "hf")
    for out in (hf, tmp_path, hf / "ckpt"):
        with pytest.raises(CheckpointError, match="--out_dir=.* --hf_dir"):
            hf_to_ckpt(str(hf), str(out), overwrite=True)
    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="contains --gguf"):
        gguf_to_ckpt(str(gguf), str(gguf.parent), overwrite=True)
    assert (ckpt / "precious.txt").exists() and (workdir / "precious.txt").exists() and gguf.exists()
    assert (hf / "precious.txt").exists()
    with pytest.raises(CheckpointError, match="not a casa-jax checkpoint"):
        ckpt_to_hf(str(ckpt), str(tmp_path / "elsewhere"), 1 << 30)
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    assert overlaps(str(link), str(ckpt)) and not overlaps(str(tmp_path / "ab"), str(tmp_path / "a"))


def test_convert_cli_keeps_the_checkpoint(tmp_path):
    ckpt = _marked(tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-m", "casa_jax.convert", f"--ckpt_dir={ckpt}", f"--export_hf_dir={ckpt}",
                        "--overwrite"], capture_output=True, text=True, cwd=ROOT, env=ONE_DEVICE)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --export_hf_dir=") and "Traceback" not in r.stderr
    assert (ckpt / "precious.txt").exists()


def test_a_second_trainer_on_a_workdir_stops(tmp_path):
    """A live holder of the workdir lock (another process) stops a second trainer before it writes; the
    lock dies with its process, so after the holder is killed a trainer may take it."""
    from casa_jax.train.config import tiny_train_config
    from casa_jax.train.trainer import train
    from casa_jax.train.workdir import WorkdirLock
    workdir = _marked(tmp_path / "busy")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from casa_jax.train.workdir import WorkdirLock
        with WorkdirLock({str(workdir)!r}):
            print("locked", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another training run \\(process {holder.pid}\\)"):
            train(tiny_train_config("casa"), str(workdir), progress=False)
        assert sorted(os.listdir(workdir)) == [".lock", "precious.txt"]  # no config.json, no metrics
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WorkdirLock(str(workdir)):  # released by the kernel when the holder died
        pass


def test_report_names_never_collide():
    assert report_names(["a/casa/checkpoint", "b/casa/checkpoint"]) == ["a_casa", "b_casa"]
    assert report_names(["x/base", "x/casa/checkpoint"]) == ["base", "casa"]
    assert report_names(["r/a/b/casa", "s/a/b/casa"]) == ["r_a_b_casa", "s_a_b_casa"]
    with pytest.raises(ValueError, match="more than once"):
        report_names(["a/casa", "a/casa/"])


def _train(workdir, *extra):
    cmd = [sys.executable, "-m", "casa_jax.train", f"--workdir={workdir}", "--config.num_train_steps=3",
           "--config.log_every_steps=1", "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3",
           "--config.data.num_harmful=8", "--config.data.heldout_per_class=4", "--config.batch_size=4", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ONE_DEVICE)


def test_resume_with_changed_settings_is_refused(tmp_path):
    """The record (config.json) always describes the checkpoints: a changed resume is refused naming the
    keys and rewrites nothing; a shorter run than the finished one says so; with --allow_config_change
    the old record is kept beside the new one."""
    workdir = tmp_path / "run"
    r = _train(workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    record = (workdir / "config.json").read_text()
    metrics = (workdir / "metrics.jsonl").read_text()
    r = _train(workdir, "--config.learning_rate=0.5", "--config.objective=ssft")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "learning_rate: 0.002 -> 0.5" in r.stderr and "objective: 'casa' -> 'ssft'" in r.stderr
    assert (workdir / "config.json").read_text() == record and (workdir / "metrics.jsonl").read_text() == metrics
    r = _train(workdir, "--config.num_train_steps=2", "--allow_config_change")
    assert r.returncode == 2 and "trained to step 3, more than --config.num_train_steps=2" in r.stderr
    assert (workdir / "config.json").read_text() == record
    r = _train(workdir, "--config.num_train_steps=4", "--allow_config_change")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 4
    assert (workdir / "config.step_3.json").read_text() == record


def test_generate_never_overwrites_its_prompts(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    r = subprocess.run([sys.executable, "-m", "casa_jax.generate", f"--ckpt_dir={tmp_path / 'none'}",
                        f"--prompts_file={prompts}", f"--output_file={prompts}"], capture_output=True, text=True,
                       cwd=ROOT, env=ONE_DEVICE)
    assert r.returncode == 2 and "--output_file=" in r.stderr and "is --prompts_file" in r.stderr, r.stderr
    assert prompts.read_text() == '{"prompt": "hi"}\n'


FAKE_GCLOUD = """#!/bin/sh
echo "$*" >> "$GCLOUD_LOG"
case "$*" in
  *tail*) exec sleep 600 ;;                    # the logs step follows a run that never ends
  *"pip install"*) [ -n "$FAIL_SETUP" ] && exit 1 ;;
esac
exit 0
"""


@pytest.mark.parametrize("how", ["SIGINT", "SIGHUP", "SIGTERM", "failed_step"])
def test_launch_all_always_tears_down(tmp_path, how):
    """`launch/tpu.py all` with a fake gcloud on PATH: however it ends (Ctrl-C, a dropped ssh session, a
    kill, a failed step), the last gcloud call deletes the slice."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud.log"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log),
               **({"FAIL_SETUP": "1"} if how == "failed_step" else {}))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), "all", "--name=casa",
                             "--zone=z", "--project=p", "--accelerator=v4-8", "--", "--workdir=/tmp/w"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    if how != "failed_step":
        deadline = time.time() + 60
        while time.time() < deadline and not (log.exists() and "tail" in log.read_text()):
            time.sleep(0.05)
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    calls = log.read_text().splitlines()
    assert proc.returncode != 0 and "tearing down" in err, err
    assert calls[0].startswith("compute tpus tpu-vm create") and calls[-1].startswith("compute tpus tpu-vm delete")
