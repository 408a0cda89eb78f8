"""The Cloud TPU launcher's dry runs print complete gcloud command sequences."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--name=casa", "--zone=us-east5-a", "--project=proj"]


def _dry(*args):
    args = list(args)
    cut = args.index("--") if "--" in args else len(args)  # --dry_run is the launcher's, not the program's
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu.py"), *args[:cut], "--dry_run",
                        *args[cut:]], capture_output=True, text=True)
    return r.returncode, r.stdout.splitlines(), r.stderr


def test_v5p_pod_full_sequence():
    code, lines, err = _dry("all", *COMMON, "--accelerator=v5p-32", "--queued", "--spot",
                            "--tfds_data_dir=gs://bucket/tfds", "--",
                            "--config=configs/casa_tiny.py:casa", "--workdir=/tmp/run")
    assert code == 0, err
    expected_starts = [
        "gcloud compute tpus queued-resources create casa --node-id=casa --zone=us-east5-a --project=proj "
        "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot",
        "gcloud compute tpus queued-resources describe casa",
        "tar czf /tmp/casa-jax-code.tgz",
        "gcloud compute tpus tpu-vm scp /tmp/casa-jax-code.tgz casa:/tmp/casa-jax-code.tgz --worker=all",
        "gcloud compute tpus tpu-vm ssh casa --worker=all",  # unpack
        "gcloud compute tpus tpu-vm ssh casa --worker=all",  # install
        "gcloud compute tpus tpu-vm ssh casa --worker=all",  # run
        "gcloud compute tpus tpu-vm ssh casa --worker=0",  # logs
        "gcloud compute tpus queued-resources delete casa --zone=us-east5-a --project=proj --force --quiet",
    ]
    assert len(lines) == len(expected_starts), lines
    for line, start in zip(lines, expected_starts):
        assert line.startswith(start), (line, start)
    assert "pip install -q -e ." in lines[5] and "jax[tpu]" in lines[5]
    assert ("TFDS_DATA_DIR=gs://bucket/tfds nohup python -m casa_jax.train --jax_distributed "
            "--config=configs/casa_tiny.py:casa --workdir=/tmp/run") in lines[6]


def test_single_vm_and_errors():
    code, lines, _ = _dry("create", *COMMON, "--accelerator=v4-8")
    assert code == 0 and lines == ["gcloud compute tpus tpu-vm create casa --zone=us-east5-a --project=proj "
                                   "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base"]
    code, _, err = _dry("create", *COMMON, "--accelerator=v9x-8")
    assert code != 0 and "unknown TPU family 'v9x'" in err
    code, _, err = _dry("run", *COMMON)
    assert code != 0 and "run needs the program's flags after --" in err
