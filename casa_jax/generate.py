"""Generate replies from a checkpoint; for a CASA model, print its safety verdict and v_s too.

  python -m casa_jax.generate --ckpt_dir=CKPT --prompt="What is the capital of France?"
  python -m casa_jax.generate --ckpt_dir=CKPT --prompt="Describe this." --image=cat.png --audio=q.wav
  python -m casa_jax.generate --ckpt_dir=CKPT --prompts_file=prompts.jsonl --output_file=replies.jsonl

A prompts file has one JSON object per line: {"prompt": ..., optional "image": PATH, "audio": PATH,
"prefill": TEXT}. Each reply line holds the prompt, the response, the verdict and (CASA) v_s, p_safe,
p_unsafe.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries

flags.DEFINE_string("ckpt_dir", None, "casa-jax checkpoint (convert or train output).", required=True)
flags.DEFINE_multi_string("prompt", None, "User message(s); repeat for a batch.")
flags.DEFINE_string("prompts_file", None, "JSONL file of prompts (batch mode), instead of --prompt.")
flags.DEFINE_string("output_file", None, "Write replies as JSONL here (default: print them).")
flags.DEFINE_string("image", None, "Image file for every --prompt (Qwen2.5-Omni thinkers).")
flags.DEFINE_string("audio", None, "WAV file for every --prompt (Qwen2.5-Omni thinkers; resampled to 16 kHz).")
flags.DEFINE_string("prefill", None, "Assistant prefill (after the safety token): for prefill-attack tests.")
flags.DEFINE_integer("max_new_tokens", 32, "Most tokens generated per reply.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy decoding.")
flags.DEFINE_integer("top_k", None, "Sample only among the k most likely tokens (with --temperature > 0).")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass (with --temperature > 0).")
flags.DEFINE_float("threshold", None, "CASA: unsafe when p_unsafe >= threshold (default: argmax).")
flags.DEFINE_enum("refusal_mode", None, ["model", "template"], "CASA: after unsafe, the model's refusal or "
                  "the fixed template (default: the checkpoint's setting).")
flags.DEFINE_bool("safety_prompt", False, "Prepend MM-SafetyBench's safety prompt to every prompt.")
flags.DEFINE_integer("batch_size", 16, "Prompts per batch in batch mode.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def _records() -> list[dict]:
    from casa_jax.data.prompts_io import read_jsonl
    from casa_jax.processing import InputError
    if FLAGS.prompts_file and FLAGS.prompt:
        raise InputError("pass --prompt or --prompts_file, not both")
    if FLAGS.prompts_file:
        try:
            records = list(read_jsonl(FLAGS.prompts_file))
        except (OSError, ValueError) as e:
            raise InputError(f"--prompts_file: {e}") from e
        for i, r in enumerate(records, 1):
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
                raise InputError(f"{FLAGS.prompts_file}:{i}: each line needs a string 'prompt'")
        return records
    prompts = FLAGS.prompt or ["Give three tips for staying healthy."]
    return [{"prompt": p, "image": FLAGS.image, "audio": FLAGS.audio, "prefill": FLAGS.prefill} for p in prompts]


def main(argv):
    del argv
    quiet_libraries()
    from casa_jax.processing import load_image, load_wav
    from casa_jax.sampling.chat import chat_replies
    with exit_on_bad_input():
        records = _records()
        replies = []
        for start in range(0, len(records), FLAGS.batch_size):
            chunk = records[start:start + FLAGS.batch_size]
            images = [load_image(r["image"]) if r.get("image") else None for r in chunk]
            audios = [load_wav(r["audio"]) if r.get("audio") else None for r in chunk]
            replies += chat_replies(
                FLAGS.ckpt_dir, [r["prompt"] for r in chunk], FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k,
                FLAGS.top_p, FLAGS.seed, FLAGS.threshold, FLAGS.refusal_mode,
                images if any(x is not None for x in images) else None,
                audios if any(x is not None for x in audios) else None,
                [r.get("prefill") or "" for r in chunk], FLAGS.safety_prompt)
    out = open(FLAGS.output_file, "w") if FLAGS.output_file else None
    for reply in replies:
        row = {"prompt": reply.prompt, "response": reply.text, "verdict": reply.verdict}
        if reply.v_s is not None:
            row.update(v_s=round(reply.v_s, 4), p_safe=round(reply.p_safe, 4), p_unsafe=round(reply.p_unsafe, 4))
        if reply.cosine is not None:
            row["cosine"] = round(reply.cosine, 4)
        if out:
            out.write(json.dumps(row) + "\n")
        else:
            scores = f" v_s={row['v_s']:.3f} p_unsafe={row['p_unsafe']:.3f}" if "v_s" in row else ""
            scores += f" cosine={row['cosine']:.3f}" if "cosine" in row else ""
            print(f"user: {reply.prompt}\nverdict: {reply.verdict}{scores}\nassistant: {reply.text}\n")
    if out:
        out.close()
        print(f"wrote {len(replies)} replies to {FLAGS.output_file}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
