"""Evaluate checkpoints against attack suites (or a JSONL file) and write report.json / report.md.

  python -m casa_jax.evaluate --ckpt_dir=CKPT [--ckpt_dir=OTHER] --workdir=workdir/eval \
      [--suites=text,jailbreak,prefill,benign,figstep,typo,spoken,spelling] [--per_suite=20]
  python -m casa_jax.evaluate --ckpt_dir=CKPT --prompts=prompts.jsonl --workdir=...

Suites use test-split prompts (by id) of the vendored sets; image and audio suites need a Qwen2.5-Omni
thinker checkpoint and are skipped (and listed as skipped) otherwise. Each checkpoint gets its own
report under ``--workdir/<checkpoint name>/``; a summary table is printed.
"""

from __future__ import annotations

import os

from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries

flags.DEFINE_multi_string("ckpt_dir", None, "Checkpoint(s) to evaluate (repeat the flag).", required=True)
flags.DEFINE_string("workdir", os.path.join("workdir", "eval"), "Where reports are written.")
flags.DEFINE_list("suites", ["text", "jailbreak", "prefill", "benign", "figstep", "typo", "spoken", "spelling"],
                  "Attack suites to run.")
flags.DEFINE_string("prompts", None, "JSONL file of {\"prompt\", \"label\"} records, instead of --suites.")
flags.DEFINE_integer("per_suite", 20, "Harmful (or benign) prompts per suite.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per response.")
flags.DEFINE_bool("safety_prompt", False, "Prepend MM-SafetyBench's safety prompt.")
flags.DEFINE_integer("seed", 0, "Attack-builder seed.")
FLAGS = flags.FLAGS


def evaluate(ckpt_dir: str, workdir: str, suites, prompts_file=None, per_suite=20, max_new_tokens=32,
             safety_prompt=False, seed=0) -> dict:
    from casa_jax.eval.report import run_items, summarize, write_report
    from casa_jax.eval.suites import MODALITY, build_items, items_from_file
    from casa_jax.sampling.chat import _loaded
    model, tokenizer = _loaded(ckpt_dir)
    skipped = {}
    if prompts_file:
        items = items_from_file(prompts_file)
    else:
        runnable = []
        for suite in suites:
            modality = MODALITY.get(suite)
            if modality in ("image", "audio") and not model.spec.is_thinker:
                skipped[suite] = f"{modality} needs a Qwen2.5-Omni thinker checkpoint ({model.spec.model_type} is text-only)"
            elif suite in ("spoken", "spelling"):
                from casa_jax.attacks.audio import espeak_available
                if not espeak_available():
                    skipped[suite] = "espeak-ng is not installed"
                else:
                    runnable.append(suite)
            else:
                runnable.append(suite)
        items = build_items(runnable, per_suite, tokenizer, seed)
    results = run_items(ckpt_dir, items, max_new_tokens=max_new_tokens, safety_prompt=safety_prompt)
    report = summarize(results, ckpt_dir, skipped)
    write_report(report, results, workdir)
    return report


def main(argv):
    del argv
    quiet_libraries()
    from casa_jax.eval.report import _fmt
    with exit_on_bad_input():
        reports = {}
        for ckpt in FLAGS.ckpt_dir:
            name = os.path.basename(os.path.normpath(ckpt)) or "checkpoint"
            if name == "checkpoint":  # train workdirs: use the workdir's name
                name = os.path.basename(os.path.dirname(os.path.normpath(ckpt)))
            reports[name] = evaluate(ckpt, os.path.join(FLAGS.workdir, name), FLAGS.suites, FLAGS.prompts,
                                     FLAGS.per_suite, FLAGS.max_new_tokens, FLAGS.safety_prompt, FLAGS.seed)
    for name, report in reports.items():
        print(f"== {name} (judge: {report['judge']})")
        for row in report["suites"]:
            print(f"  {row['suite']:<12} {row['modality']:<6} n={row['n']:<4} ASR {_fmt(row['asr']):>7}  "
                  f"over-refusal {_fmt(row['over_refusal']):>7}")
        for suite, why in report["skipped"].items():
            print(f"  {suite:<12} skipped: {why}")
        print(f"  report: {os.path.join(FLAGS.workdir, name, 'report.md')}")


if __name__ == "__main__":
    app.run(main)
