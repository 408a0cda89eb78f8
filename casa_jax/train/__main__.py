"""Fine-tune with CASA, SSFT or Circuit Breakers (LoRA, text-only) and save a checkpoint.

  python -m casa_jax.train        # = --config=configs/casa_tiny.py:casa --workdir=workdir/casa_tiny
  python -m casa_jax.train --config=configs/casa_tiny.py:ssft --workdir=... --config.num_train_steps=100

Outputs in ``--workdir``: config.json, metrics.jsonl, tensorboard/, checkpoints/ (resumable: rerun the
same command to continue; SIGTERM saves first), checkpoint/ (the final model, for python -m
casa_jax.generate). A NaN/Inf loss stops the run (exit 1) and keeps the last good checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from casa_jax.cli import REPO_ROOT, define_config_file, exit_on_bad_input, quiet_libraries, run

# The tiny CASA config of this checkout is the default, so `python -m casa_jax.train` alone trains it.
_DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "casa_tiny.py")
define_config_file("config", _DEFAULT_CONFIG if os.path.isfile(_DEFAULT_CONFIG) else None,
                   "Training config file (default: configs/casa_tiny.py, objective casa; e.g. configs/casa_tiny.py:ssft).")
flags.DEFINE_string("workdir", os.path.join("workdir", "casa_tiny"), "Output directory (config, metrics, "
                    "checkpoints, final checkpoint). Rerun with the same workdir to resume.")
flags.DEFINE_bool("jax_distributed", False, "Start as one of several JAX processes (casa_jax.distributed.initialize) "
                  "first: multi-host Cloud TPU pods (launch/tpu.py run sets it; the rest is discovered) or several "
                  "processes on one machine (with the three flags below).")
flags.DEFINE_string("coordinator_address", None, "With --jax_distributed off Cloud TPU: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "With --jax_distributed off Cloud TPU: how many processes take part.")
flags.DEFINE_integer("process_id", None, "With --jax_distributed off Cloud TPU: this process's index (0 writes).")
flags.DEFINE_bool("allow_config_change", False, "Continue a workdir's checkpoints under settings that differ from "
                  "its config.json (the old one is kept as config.step_<N>.json).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    if FLAGS.config is None:
        raise app.UsageError("--config is required (configs/casa_tiny.py is not next to this installation)")
    given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if any(v is not None for v in given) and not (FLAGS.jax_distributed and all(v is not None for v in given)):
        raise app.UsageError("--coordinator_address, --num_processes and --process_id go together, with "
                             "--jax_distributed")
    if FLAGS.jax_distributed:
        from casa_jax.distributed import initialize
        initialize(*given)  # all None on Cloud TPU: the coordinator and process ids are discovered
    from casa_jax.train.trainer import train
    with exit_on_bad_input():
        try:
            final = train(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    shown = {k: round(v, 4) for k, v in final.items() if isinstance(v, float)}
    print(f"done: {FLAGS.config.objective}, step {final.get('step')}: {shown}")
    print(f"checkpoint: {FLAGS.workdir}/checkpoint")


if __name__ == "__main__":
    run(main)
