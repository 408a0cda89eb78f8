"""Training as a pod runs it: two JAX processes on 127.0.0.1 (gloo collectives, 2 CPU devices each), one
mesh spanning both, each started the way launch/tpu.py's run step starts the trainer (``--jax_distributed``).

One module fixture runs the uninterrupted 2-process job and the 1-process job on the same 4-device
global mesh; the tests compare them, and SIGKILL one process of a third job mid-run, restart both and
compare that with the uninterrupted one.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "casa_tiny.py")
PROCESSES, DEVICES_PER_PROCESS, STEPS = 2, 2, 20
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(workdir) -> list[str]:
    return [sys.executable, "-m", "casa_jax.train", f"--config={CONFIG}:casa", f"--workdir={workdir}",
            f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=5", "--config.log_every_steps=1",
            "--config.eval_every_steps=10", "--config.eval_batch_size=6", "--config.data.num_harmful=40",
            "--config.data.heldout_per_class=8"]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def _start(workdir, logs, processes: int = PROCESSES) -> list[subprocess.Popen]:
    """``processes`` trainers on one workdir, one coordinator port, or a plain one-process trainer."""
    if processes == 1:
        args = [_train_args(workdir)]
        env = _env(PROCESSES * DEVICES_PER_PROCESS)
    else:
        port = _free_port()
        args = [_train_args(workdir) + ["--jax_distributed", f"--coordinator_address=127.0.0.1:{port}",
                                        f"--num_processes={processes}", f"--process_id={i}"] for i in range(processes)]
        env = _env(DEVICES_PER_PROCESS)
    return [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=open(f"{logs}.{i}.log", "w"), cwd=ROOT, env=env)
            for i, a in enumerate(args)]


def _finish(procs, logs) -> None:
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {i} did not finish in {TIMEOUT_S} s:\n{open(f'{logs}.{i}.log').read()[-3000:]}")
        assert p.returncode == 0, f"process {i}:\n{open(f'{logs}.{i}.log').read()[-3000:]}"


def _rows(workdir):
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in open(workdir / "metrics.jsonl")]


def _finished_steps(workdir):
    root = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if root.is_dir() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"two": workdir of the 2-process run, "one": of the 1-process run}, both finished."""
    root = tmp_path_factory.mktemp("multiprocess")
    out = {}
    for name, processes in (("two", PROCESSES), ("one", 1)):
        procs = _start(root / name, root / name, processes)
        _finish(procs, root / name)
        out[name] = root / name
    out["root"] = root
    return out


def test_two_processes_agree_with_one_on_the_same_global_mesh(runs):
    """Step for step, the 2-process run's losses, gradient norms and held-out metrics equal the 1-process
    run's on the same 4-device mesh within float tolerance (the collectives cross processes, the sums are
    the same), and the final checkpoint written by both processes loads with the same trained LoRA.
    Negative control: the losses move over the run (a run that trained nothing would agree trivially)."""
    two, one = _rows(runs["two"]), _rows(runs["one"])
    assert [r["step"] for r in two] == list(range(1, STEPS + 1)) == [r["step"] for r in one]
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-6), (a["step"], k, a[k], b[k])
    losses = [r["loss"] for r in two]
    assert max(losses) - min(losses) > 0.03 * abs(losses[0]), losses  # 20 steps move it by about 4.5 %
    assert "eval_loss" in two[9] and "eval_loss" in two[-1]

    from casa_jax.io.trained import load_trained
    a, b = load_trained(str(runs["two"] / "checkpoint")), load_trained(str(runs["one"] / "checkpoint"))
    assert a.objective == b.objective == "casa"
    for x, y in zip(*(map(np.asarray, __import__("jax").tree.leaves(m.lora)) for m in (a, b))):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    leftovers = [n for n in os.listdir(runs["two"]) if ".partial-" in n or ".old-" in n]
    assert not leftovers, leftovers


def test_sigkill_one_process_then_restart_all_resumes_exactly(runs):
    """One process SIGKILLed after a checkpoint (the other, stuck in a collective, is killed too, as a
    preempted pod loses its VMs), then both restarted: they resume from the last complete checkpoint and
    metrics.jsonl equals the uninterrupted 2-process run's, every field exact but the wall clock."""
    workdir = runs["root"] / "killed"
    procs = _start(workdir, workdir)
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and not any(s >= 10 for s in _finished_steps(workdir)):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    try:
        procs[0].wait(timeout=20)  # it may notice its peer is gone and stop, or hang in a collective
    except subprocess.TimeoutExpired:
        procs[0].kill()
    procs[0].wait()
    killed_at = max(_finished_steps(workdir))
    assert 10 <= killed_at < STEPS, killed_at
    assert not (workdir / "checkpoint").exists()  # it really stopped before the end

    restarted = _start(workdir, workdir.with_name("restarted"))
    _finish(restarted, workdir.with_name("restarted"))
    assert f"resumed from step {killed_at}" in open(f"{workdir.with_name('restarted')}.0.log").read()
    assert _rows(workdir) == _rows(runs["two"])
