"""The README's main job: CASA end to end on the embedded tiny default, a random-initialised Qwen2.5-Omni
*thinker* (text decoder + vision and audio encoders) small enough for 2 CPU cores.

  python -m casa_jax.demo --model=tiny_thinker [--workdir=workdir/demo_tiny] [--casa_steps=200] [--per_suite=8]

1. write the tiny thinker as a Hugging Face directory, convert it to a casa-jax checkpoint and export it
   back (the round trip must be bit-exact);
2. build the data: the ``casa_prompts`` TFDS dataset (train / validation / test splits by id);
3. train CASA (LoRA + safety head, text-only) and, briefly, the SSFT and Circuit-Breaker baselines;
4. evaluate the base model and all three over every attack suite and modality (text, jailbreak
   templates, 2/4/9/12-token prefills, FigStep and TYPO images, spoken requests, the audio spelling
   attack, benign prompts), write a report per model and print the ASR table.

A random tiny model shows the *mechanics*, not the paper's numbers: it has nothing to refuse and nothing
to keep, its replies are gibberish, and its CASA verdicts come from a few hundred text-only steps. The
real recipe (3B/7B, ``configs/casa_qwen2_5_omni.py``) is in the README.
"""

from __future__ import annotations

import json
import os
import time

SUITES = ("text", "jailbreak", "prefill", "figstep", "typo", "spoken", "spelling", "benign")
DISCLAIMER = ("This is a random-initialised tiny model: the table shows that every stage runs (data, training, "
              "attacks in three modalities, judging, reports), not the paper's numbers.")


def _round_trip(workdir: str) -> tuple[str, bool]:
    import numpy as np

    from casa_jax.io.convert_lib import ckpt_to_hf, hf_to_ckpt
    from casa_jax.io.hf_files import SafetensorsDir
    from casa_jax.tiny import write_tiny_thinker_dir

    hf_dir, ckpt_dir, export_dir = (os.path.join(workdir, n) for n in ("tiny_hf", "base", "tiny_hf_export"))
    write_tiny_thinker_dir(hf_dir, overwrite=True)
    hf_to_ckpt(hf_dir, ckpt_dir, overwrite=True)
    ckpt_to_hf(ckpt_dir, export_dir, max_shard_bytes=5 * 1024**3, overwrite=True)
    a, b = SafetensorsDir(hf_dir), SafetensorsDir(export_dir)
    exact = a.keys() == b.keys() and all(np.array_equal(a.read(k), b.read(k)) for k in a.keys())
    print(f"      {len(a.keys())} tensors (decoder, vision, audio); round trip bit-exact: {exact}")
    return ckpt_dir, exact


def _build_data(workdir: str) -> dict:
    import tensorflow_datasets as tfds

    from casa_jax.data.tfds_prompts import prepare
    tfds.disable_progress_bar()
    tfds_dir = os.path.join(workdir, "tfds")
    sizes = {split: len(prepare(tfds_dir, split)) for split in ("train", "validation", "test")}
    print(f"      casa_prompts in {tfds_dir}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return {"tfds_dir": tfds_dir, "sizes": sizes}


def _train(objective: str, base: str, workdir: str, steps: int, tfds_dir: str) -> tuple[str, dict]:
    from casa_jax.train.config import tiny_train_config
    from casa_jax.train.trainer import train
    config = tiny_train_config(objective)
    config.base = base
    config.num_train_steps = steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.data.source = "tfds"
    config.data.tfds_data_dir = tfds_dir
    out = os.path.join(workdir, objective)
    final = train(config, out, progress=False)
    shown = {k: round(v, 3) for k, v in final.items() if k.startswith("eval_") and isinstance(v, float)}
    print(f"      {objective}: {steps} steps, held-out {shown}")
    return os.path.join(out, "checkpoint"), final


def run(workdir: str, casa_steps: int = 200, baseline_steps: int = 100, per_suite: int = 8,
        max_new_tokens: int = 16) -> dict:
    from casa_jax.eval.report import comparison_table
    from casa_jax.eval.run import evaluate
    from casa_jax.infer.engine import Engine

    from casa_jax import storage
    from casa_jax.processing import InputError
    if storage.is_remote(workdir):  # its TFDS build writes through TensorFlow's own file system
        raise InputError(f"--workdir={workdir}: the tiny_thinker demo needs a local workdir (its TFDS data is built "
                         "with TensorFlow's file system); --model=smollm2 and omni_mini accept gs://")
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    print(f"[1/4] a random tiny Qwen2.5-Omni thinker: Hugging Face -> casa-jax -> Hugging Face ({workdir})")
    base, exact = _round_trip(workdir)
    if not exact:
        raise SystemExit("round trip was not bit-exact")
    print("[2/4] building the prompt data (TFDS, splits by id; test prompts never reach training)")
    data = _build_data(workdir)
    print(f"[3/4] training from {base}: CASA ({casa_steps} steps)"
          + (f", SSFT and Circuit Breakers ({baseline_steps} steps each)" if baseline_steps else ""))
    checkpoints, training = {"base": base}, {}
    plan = [("casa", casa_steps)] + ([("ssft", baseline_steps), ("circuit_breaker", baseline_steps)]
                                     if baseline_steps else [])
    for objective, steps in plan:
        checkpoints[objective], training[objective] = _train(objective, base, workdir, steps, data["tfds_dir"])
    print(f"[4/4] evaluating {', '.join(checkpoints)} on {len(SUITES)} suites ({per_suite} held-out prompts each)")
    reports = {}
    for name, ckpt in checkpoints.items():
        reports[name] = evaluate(Engine.load(ckpt), os.path.join(workdir, "eval", name), SUITES, per_suite=per_suite,
                                 max_new_tokens=max_new_tokens, progress=False)
    summary = comparison_table(reports, SUITES)
    casa_token = reports["casa"]["safety_token"] or {}
    from casa_jax.storage import write_text_atomic
    write_text_atomic(os.path.join(workdir, "report.md"),
                      f"# casa-jax demo\n\n{DISCLAIMER}\n\nJudge: {reports['base']['judge']}. ASR per attack suite "
                      f"(lower is better); the benign row is over-refusal.\n\n{summary}\n\nCASA safety token on the "
                      f"same items: {json.dumps(casa_token)}\n\nPer-model reports: eval/<model>/report.md\n")
    print(f"\nAttack success rate (judge: {reports['base']['judge']}); benign row = over-refusal\n{summary}")
    if casa_token:
        print(f"CASA safety token: accuracy {casa_token['accuracy']:.3f}, AUROC(v_s) {casa_token['auroc_v_s']}")
    print(f"\n{DISCLAIMER}\nThe real recipe: see README, 'Training CASA on Qwen2.5-Omni 3B/7B'.\n"
          f"Report: {os.path.join(workdir, 'report.md')}. Done in {time.time() - t0:.0f} s.\n"
          f"Try it: python -m casa_jax.generate --ckpt_dir={checkpoints['casa']} --prompt='...'")
    return {"round_trip_exact": exact, "data": data, "training": training, "reports": reports, "table": summary,
            "checkpoints": checkpoints}
