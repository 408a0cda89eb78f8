"""Evaluate checkpoints against attack suites, public benchmarks on disk, or a JSONL file, and write
report.json / report.md (+ vs_histogram.png for CASA) per checkpoint.

  python -m casa_jax.evaluate --ckpt_dir=CKPT [--ckpt_dir=OTHER] --workdir=workdir/eval \
      [--suites=text,jailbreak,prefill,benign,figstep,typo,spoken,spelling] [--per_suite=20]
  python -m casa_jax.evaluate --ckpt_dir=CKPT --prompts=prompts.jsonl --workdir=...
  python -m casa_jax.evaluate --ckpt_dir=CKPT --suites= --benchmark=mmsafetybench:/data/MM-SafetyBench \
      --benchmark=jailbreakv:/data/JailBreakV_28K --benchmark=safebench:/data/FigStep --judge=llm:JUDGE_CKPT

Suites use test-split prompts (by id) of the vendored sets; image and audio items need a Qwen2.5-Omni
thinker checkpoint and are skipped (and listed as skipped) otherwise. ``--judge`` is ``keyword`` (refusal
phrases) or ``llm:<ckpt_dir>[:mmsafetybench|harmbench|llamaguard]`` (a local model served by our sampler
with that benchmark's judge prompt). Each checkpoint gets its own report under ``--workdir/<name>/``; a
summary table is printed.
"""

from __future__ import annotations

import os

from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries

DEFAULT_SUITES = ["text", "jailbreak", "prefill", "benign", "figstep", "typo", "spoken", "spelling"]

flags.DEFINE_multi_string("ckpt_dir", None, "Checkpoint(s) to evaluate (repeat the flag).", required=True)
flags.DEFINE_string("workdir", os.path.join("workdir", "eval"), "Where reports are written.")
flags.DEFINE_list("suites", DEFAULT_SUITES, "Attack suites to run (empty: none, e.g. with --benchmark).")
flags.DEFINE_string("prompts", None, "JSONL file of {\"prompt\", \"label\"} records, instead of --suites.")
flags.DEFINE_multi_string("benchmark", [], "name:ROOT of a public benchmark on disk (mmsafetybench, jailbreakv, "
                          "safebench); repeat the flag.")
flags.DEFINE_integer("per_suite", 20, "Harmful (or benign) prompts per suite, and items per benchmark.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per response.")
flags.DEFINE_bool("safety_prompt", False, "Prepend MM-SafetyBench's safety prompt.")
flags.DEFINE_string("judge", "keyword", "keyword, or llm:<ckpt_dir>[:template] (mmsafetybench|harmbench|llamaguard).")
flags.DEFINE_integer("seed", 0, "Attack-builder seed.")
FLAGS = flags.FLAGS


def benchmark_items(specs, limit: int):
    """Items of ``name:ROOT`` benchmark specs (``casa_jax.eval.benchmarks``)."""
    from casa_jax.eval.benchmarks import BENCHMARKS, load_benchmark
    from casa_jax.processing import InputError
    items = []
    for spec in specs:
        name, sep, root = spec.partition(":")
        if not sep or not root:
            raise InputError(f"--benchmark={spec!r}: expected NAME:ROOT with NAME one of {BENCHMARKS}")
        items += load_benchmark(name, root, limit=limit)
    return items


def evaluate(ckpt_dir: str, workdir: str, suites=(), prompts_file=None, per_suite=20, max_new_tokens=32,
             safety_prompt=False, seed=0, benchmarks=(), judge=None, progress: bool = True) -> dict:
    """Run one checkpoint over the chosen items, write its report into ``workdir``, return the report."""
    from casa_jax.attacks.audio import espeak_available
    from casa_jax.eval.judges import KeywordJudge
    from casa_jax.eval.report import run_items, summarize, write_report
    from casa_jax.eval.suites import MODALITY, build_items, items_from_file
    from casa_jax.sampling.chat import _loaded
    model, tokenizer = _loaded(ckpt_dir)
    judge = judge or KeywordJudge()
    skipped, runnable = {}, []
    text_only = f"needs a Qwen2.5-Omni thinker checkpoint ({model.spec.model_type} is text-only)"
    for suite in ([] if prompts_file else suites):
        modality = MODALITY.get(suite)
        if modality in ("image", "audio") and not model.spec.is_thinker:
            skipped[suite] = f"{modality} {text_only}"
        elif modality == "audio" and not espeak_available():
            skipped[suite] = "espeak-ng is not installed"
        else:
            runnable.append(suite)
    items = items_from_file(prompts_file) if prompts_file else build_items(runnable, per_suite, tokenizer, seed)
    for item in benchmark_items(benchmarks, per_suite):
        if item.modality != "text" and not model.spec.is_thinker:
            skipped[item.suite] = f"{item.modality} {text_only}"
        else:
            items.append(item)
    results = run_items(ckpt_dir, items, max_new_tokens=max_new_tokens, safety_prompt=safety_prompt,
                        progress=progress, judge=judge)
    report = summarize(results, ckpt_dir, skipped, judge.name)
    write_report(report, results, workdir)
    return report


def report_name(ckpt_dir: str) -> str:
    """A short name for a checkpoint's report: its folder, or the train workdir's for ``.../checkpoint``."""
    name = os.path.basename(os.path.normpath(ckpt_dir)) or "checkpoint"
    if name == "checkpoint":
        name = os.path.basename(os.path.dirname(os.path.normpath(ckpt_dir)))
    return name


def print_summary(reports: dict, workdir: str) -> None:
    from casa_jax.eval.report import _fmt
    for name, report in reports.items():
        print(f"== {name} (judge: {report['judge']})")
        for row in report["suites"]:
            print(f"  {row['suite']:<18} {row['modality']:<6} n={row['n']:<4} ASR {_fmt(row['asr']):>7}  "
                  f"over-refusal {_fmt(row['over_refusal']):>7}")
        for suite, why in report["skipped"].items():
            print(f"  {suite:<18} skipped: {why}")
        print(f"  report: {os.path.join(workdir, name, 'report.md')}")


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
        reports = {}
        for ckpt in FLAGS.ckpt_dir:
            name = report_name(ckpt)
            reports[name] = evaluate(ckpt, os.path.join(FLAGS.workdir, name), FLAGS.suites, FLAGS.prompts,
                                     FLAGS.per_suite, FLAGS.max_new_tokens, FLAGS.safety_prompt, FLAGS.seed,
                                     FLAGS.benchmark, judge)
    print_summary(reports, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
