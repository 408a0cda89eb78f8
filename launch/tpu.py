"""Cloud TPU launcher: create a TPU VM (or a queued resource for pods), install casa-jax on every worker,
sync code, run train/evaluate on all workers, stream logs, tear down.

  python launch/tpu.py create   --name=casa --zone=us-east5-a --project=P --accelerator=v5p-32 [--queued] [--spot]
  python launch/tpu.py setup    --name=casa --zone=... --project=P          # copy this checkout, pip install
  python launch/tpu.py sync     --name=casa ...                             # copy code again (after edits)
  python launch/tpu.py run      --name=casa ... -- --config=configs/casa_tiny.py:casa --workdir=/tmp/run
                                [--module=casa_jax.generate]               # any python -m module
  python launch/tpu.py logs     --name=casa ...
  python launch/tpu.py teardown --name=casa ... [--queued]
  python launch/tpu.py all      ... -- TRAIN ARGS                           # create, setup, run, logs, teardown

Every command takes ``--dry_run``: it prints the exact gcloud commands (one per line) and runs nothing.
Runs go to every worker at once (``--worker=all``), detached with ``nohup``, with TFDS_DATA_DIR and
(for the trainer) ``--jax_distributed`` set, so a pod starts one process per host.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/casa-jax"
REMOTE_VENV = "~/casa-venv"
LOG = "~/casa-jax-run.log"
PIDFILE = "~/casa-jax-run.pid"
ARCHIVE = "/tmp/casa-jax-code.tgz"
RUNTIMES = {"v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e",
            "v4": "tpu-ubuntu2204-base"}
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def runtime_for(accelerator: str) -> str:
    family = accelerator.rsplit("-", 1)[0]
    if family not in RUNTIMES:
        raise SystemExit(f"--accelerator={accelerator}: unknown TPU family {family!r}; known: {sorted(RUNTIMES)}")
    return RUNTIMES[family]


def _where(a) -> list[str]:
    return [f"--zone={a.zone}", f"--project={a.project}"]


def _ssh(a, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, f"--worker={worker}", *_where(a),
            f"--command={command}"]


def create_commands(a) -> list[list[str]]:
    runtime = a.runtime or runtime_for(a.accelerator)
    if a.queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}", *_where(a),
               f"--accelerator-type={a.accelerator}", f"--runtime-version={runtime}"]
        cmd += ["--spot"] if a.spot else []
        wait = ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name, *_where(a),
                "--format=value(state.state)"]
        return [cmd, wait]
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *_where(a), f"--accelerator-type={a.accelerator}",
           f"--version={runtime}"]
    return [cmd + (["--spot"] if a.spot else [])]


def sync_commands(a) -> list[list[str]]:
    pack = ["tar", "czf", ARCHIVE, "--exclude=.git", "--exclude=.venv", "--exclude=workdir", "-C", REPO, "."]
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{a.name}:{ARCHIVE}", "--worker=all", *_where(a)]
    unpack = _ssh(a, f"mkdir -p {REMOTE_DIR} && tar xzf {ARCHIVE} -C {REMOTE_DIR}")
    return [pack, copy, unpack]


def setup_commands(a) -> list[list[str]]:
    install = (f"python3 -m venv {REMOTE_VENV} && . {REMOTE_VENV}/bin/activate && pip install -q -U pip && "
               f"cd {REMOTE_DIR} && pip install -q -e . && pip install -q -U 'jax[tpu]' -f {LIBTPU_INDEX}")
    return sync_commands(a) + [_ssh(a, install)]


def run_commands(a, train_args: list[str]) -> list[list[str]]:
    env = f"TFDS_DATA_DIR={shlex.quote(a.tfds_data_dir)} " if a.tfds_data_dir else ""
    args = " ".join(shlex.quote(x) for x in train_args)
    distributed = "--jax_distributed " if a.module == "casa_jax.train" else ""
    command = (f"cd {REMOTE_DIR} && . {REMOTE_VENV}/bin/activate && {env}nohup python -m {a.module} "
               f"{distributed}{args} > {LOG} 2>&1 & echo $! > {PIDFILE}")
    return [_ssh(a, command)]


def logs_commands(a) -> list[list[str]]:
    # Follows the log until the run on worker 0 exits (tail --pid), so `all` goes on to teardown.
    return [_ssh(a, f"tail -n 200 -f --pid=$(cat {PIDFILE}) {LOG}", worker="0")]


def teardown_commands(a) -> list[list[str]]:
    if a.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", a.name, *_where(a), "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *_where(a), "--quiet"]]


def _execute(commands: list[list[str]], dry_run: bool, a=None) -> None:
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        if dry_run:
            continue
        if cmd[3:5] == ["queued-resources", "describe"]:  # wait until the slice is ACTIVE
            while (state := subprocess.run(cmd, capture_output=True, text=True).stdout.strip()) != "ACTIVE":
                print(f"  queued resource state: {state or 'unknown'}; waiting", flush=True)
                time.sleep(30)
            continue
        result = subprocess.run(cmd)
        if result.returncode:
            raise SystemExit(f"command failed with status {result.returncode}: {shlex.join(cmd)}")


def _interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["create", "setup", "sync", "run", "logs", "teardown", "all"])
    p.add_argument("--name", required=True, help="TPU VM / queued resource name.")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--accelerator", default="v5p-8", help="e.g. v5p-8, v5p-32, v4-32, v6e-16.")
    p.add_argument("--runtime", default=None, help="TPU software version (default: by accelerator family).")
    p.add_argument("--queued", action="store_true", help="Use a queued resource (recommended for pods).")
    p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible: the trainer resumes).")
    p.add_argument("--tfds_data_dir", default=None, help="e.g. gs://bucket/tfds, exported as TFDS_DATA_DIR.")
    p.add_argument("--module", default="casa_jax.train", help="run: the python -m module to start on all workers.")
    p.add_argument("--dry_run", action="store_true", help="Print the gcloud commands, run nothing.")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if a.action in ("run", "all") and not extra:
        p.error("run needs the program's flags after --, e.g. -- --config=configs/casa_tiny.py:casa --workdir=...")
    steps = {"create": lambda: create_commands(a), "setup": lambda: setup_commands(a),
             "sync": lambda: sync_commands(a), "run": lambda: run_commands(a, extra),
             "logs": lambda: logs_commands(a), "teardown": lambda: teardown_commands(a)}
    if a.action != "all":
        _execute(steps[a.action](), a.dry_run, a)
        return
    # `all` creates a slice that bills until deleted: teardown runs however the rest ends (a failed step,
    # Ctrl-C, SIGTERM, or SIGHUP when the terminal or ssh session that started it goes away).
    _execute(steps["create"](), a.dry_run, a)
    # SIGINT too: a launcher started in the background inherits SIGINT ignored, and Ctrl-C must still tear down
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for action in ("setup", "run", "logs"):
            _execute(steps[action](), a.dry_run, a)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("tearing down (runs however the steps above ended)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the delete
        _execute(steps["teardown"](), a.dry_run, a)


if __name__ == "__main__":
    main()
