"""Evaluate one checkpoint over attack suites, benchmark items or a JSONL file, and write its report
(the library behind ``python -m casa_jax.evaluate`` and the demo)."""

from __future__ import annotations

import os
import urllib.parse

from casa_jax import storage

DEFAULT_SUITES = ("text", "jailbreak", "prefill", "benign", "benign_jbb", "benign_edgy", "figstep", "typo", "spoken",
                  "spelling")
DEFAULT_MAX_NEW_TOKENS = 64  # short replies hide compliance that starts after a polite opening


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


def evaluate(engine, workdir: str, suites=(), prompts_file=None, per_suite: int | None = 20,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, safety_prompt=False, seed=0, benchmarks=(), judge=None,
             progress: bool = True, benign_limit: int | None = None, split: str = "test",
             recheck_every: int = 0) -> dict:
    """Run one model (an ``infer.engine.Engine``) over the chosen items of ``split`` (test for reports,
    validation for recipe decisions; ``per_suite=None``: the whole split), write its report into
    ``workdir``, return the report. ``recheck_every`` > 0: CASA's re-checking gate (``infer.gates.CasaGate``)."""
    from casa_jax.attacks.audio import espeak_available
    from casa_jax.eval.judges import KeywordJudge
    from casa_jax.eval.report import run_items, summarize, write_report
    from casa_jax.eval.suites import MODALITY, build_items, items_from_file
    model, tokenizer = engine.model, engine.tokenizer
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
    items = (items_from_file(prompts_file) if prompts_file
             else build_items(runnable, per_suite, tokenizer, seed, benign_limit, split))
    for item in benchmark_items(benchmarks, per_suite):
        if item.modality != "text" and not model.spec.is_thinker:
            skipped[item.suite] = f"{item.modality} {text_only}"
        else:
            items.append(item)
    results = run_items(engine, items, max_new_tokens=max_new_tokens, safety_prompt=safety_prompt,
                        progress=progress, judge=judge, recheck_every=recheck_every)
    threshold = model.casa.threshold if model.is_casa else None
    report = summarize(results, engine.name, skipped, judge, threshold, "file" if prompts_file else split)
    write_report(report, results, workdir)
    return report


def rejudge(workdir: str, judge) -> dict:
    """Judge the responses saved in ``workdir/results.jsonl`` again (e.g. with a better judge) and rewrite
    that report, without generating anything; the items, split and threshold stay those of the run."""
    import json

    from casa_jax.eval.judges import KeywordJudge
    from casa_jax.eval.report import judge_results, summarize, write_report
    from casa_jax.processing import InputError
    paths = [storage.join(workdir, n) for n in ("results.jsonl", "report.json")]
    missing = [p for p in paths if not storage.isfile(p)]
    if missing:
        raise InputError(f"{missing[0]}: not found; --from_results re-judges a finished evaluation's report folder")
    results = [json.loads(line) for line in storage.read_text(paths[0]).splitlines() if line.strip()]
    old = json.loads(storage.read_text(paths[1]))
    judge = judge or KeywordJudge()
    judge_results(results, judge)
    threshold = (old.get("safety_token") or {}).get("threshold")
    report = summarize(results, old["checkpoint"], old.get("skipped"), judge, threshold, old.get("split", "test"))
    write_report(report, results, workdir)
    return report


def report_name(ckpt_dir: str, depth: int = 1) -> str:
    """A short name for a checkpoint's report: its folder (or the train workdir's for ``.../checkpoint``),
    with ``depth - 1`` more parent folders joined by ``_`` where shorter names collide."""
    path = storage.resolve(ckpt_dir)
    if storage.is_remote(path):  # a bucket URL's folders, without its scheme and bucket
        path = urllib.parse.urlsplit(path).path
    parts = [p for p in path.split("/") if p]
    if len(parts) > 1 and parts[-1] == "checkpoint":
        parts = parts[:-1]
    return "_".join(parts[-depth:]) or "checkpoint"


def report_names(ckpt_dirs) -> list[str]:
    """One distinct report name per checkpoint (``a/casa/checkpoint`` and ``b/casa/checkpoint`` become
    ``a_casa`` and ``b_casa``); the same checkpoint given twice is an error."""
    from casa_jax.processing import InputError
    real = [c if storage.is_remote(c) else os.path.realpath(c) for c in ckpt_dirs]
    twice = sorted({c for c, r in zip(ckpt_dirs, real) if real.count(r) > 1})
    if twice:
        raise InputError(f"--ckpt_dir given more than once for the same checkpoint: {twice}")
    depth = 1
    while True:
        names = [report_name(c, depth) for c in ckpt_dirs]
        if len(set(names)) == len(names):
            return names
        depth += 1


def print_summary(reports: dict, workdir: str) -> None:
    """Per checkpoint: judged and decision-level rates with intervals per suite, and the judge's agreement."""
    from casa_jax.eval.report import agreement_line, fmt_ci
    for name, report in reports.items():
        print(f"== {name} ({report['split']} split)\n  {agreement_line(report)}")
        for row in report["suites"]:
            metric = "asr" if row["n_harmful"] else "over_refusal"
            label = "ASR" if row["n_harmful"] else "over-refusal"
            print(f"  {row['suite']:<18} {row['modality']:<6} {label} {fmt_ci(row, metric):<28} "
                  f"decision {fmt_ci(row, metric + '_decision')}")
        for suite, why in report["skipped"].items():
            print(f"  {suite:<18} skipped: {why}")
        print(f"  report: {storage.join(workdir, name, 'report.md')}")
