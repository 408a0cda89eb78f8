"""Fine-tune with CASA, SSFT or Circuit Breakers (LoRA, text-only) and save a checkpoint.

  python -m casa_jax.train --config=configs/casa_tiny.py:casa --workdir=workdir/casa_tiny
  python -m casa_jax.train --config=configs/casa_tiny.py:ssft --workdir=... --config.num_train_steps=100

Outputs in ``--workdir``: config.json, metrics.jsonl, tensorboard/, checkpoints/ (resumable: rerun the
same command to continue; SIGTERM saves first), checkpoint/ (the final model, for python -m
casa_jax.generate). A NaN/Inf loss stops the run (exit 1) and keeps the last good checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries

config_flags.DEFINE_config_file("config", None, "Training config file (e.g. configs/casa_tiny.py:casa).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (config, metrics, checkpoint).", required=True)
flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first (multi-host Cloud TPU pods; "
                  "launch/tpu.py run sets it).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    if FLAGS.jax_distributed:
        import jax
        jax.distributed.initialize()  # on Cloud TPU the coordinator and process ids are discovered
    from casa_jax.casa.trainer import train
    with exit_on_bad_input():
        try:
            final = train(FLAGS.config, FLAGS.workdir)
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    shown = {k: round(v, 4) for k, v in final.items() if isinstance(v, float)}
    print(f"done: {FLAGS.config.objective}, step {final.get('step')}: {shown}")
    print(f"checkpoint: {FLAGS.workdir}/checkpoint")


if __name__ == "__main__":
    app.run(main)
