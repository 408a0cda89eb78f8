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

from casa_jax.cli import exit_on_bad_input, quiet_libraries, run

flags.DEFINE_string("ckpt_dir", None, "casa-jax checkpoint (convert or train output).", required=True)
flags.DEFINE_multi_string("prompt", None, "User message(s); repeat for a batch.")
flags.DEFINE_string("prompts_file", None, "JSONL file of prompts (batch mode), instead of --prompt.")
flags.DEFINE_string("output_file", None, "Write replies as JSONL here (default: print them).")
flags.DEFINE_string("image", None, "Image file for every --prompt (Qwen2.5-Omni thinkers).")
flags.DEFINE_string("audio", None, "WAV file for every --prompt (Qwen2.5-Omni thinkers; resampled to 16 kHz).")
flags.DEFINE_string("prefill", None, "Assistant prefill (after the safety token): for prefill-attack tests.")
flags.DEFINE_integer("max_new_tokens", 64, "Most tokens generated per reply.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy decoding.")
flags.DEFINE_integer("top_k", None, "Sample only among the k most likely tokens (with --temperature > 0).")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass (with --temperature > 0).")
flags.DEFINE_float("threshold", None, "CASA: unsafe when p_unsafe >= threshold (default: argmax).")
flags.DEFINE_enum("refusal_mode", None, ["model", "template"], "CASA: after unsafe, the model's refusal or "
                  "the fixed template (default: the checkpoint's setting).")
flags.DEFINE_integer("recheck_every", 0, "CASA: re-check the safety head every N decoded tokens (and after a "
                     "--prefill); a reply found unsafe ends with the refusal (0: off).")
flags.DEFINE_float("recheck_threshold", 0.5, "CASA: the v_s at which a re-check ends a reply.")
flags.DEFINE_bool("safety_prompt", False, "Prepend MM-SafetyBench's safety prompt to every prompt.")
flags.DEFINE_integer("batch_size", 16, "Prompts per batch in batch mode.")
flags.DEFINE_enum("weights", "float", ["float", "int8", "bf16"], "How the decoder layers' kernels are held "
                  "(infer.engine.WEIGHT_FORMATS): float, as stored; int8 with per-channel scales (a quarter of the "
                  "bytes per decoded token); or bf16 with the LM head too (half, on CPUs with bf16 units: AMX, "
                  "avx512_bf16). int8 and bf16 run on a single device.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def _check_flags() -> None:
    """Refuse flag values and combinations that would fail late or be silently ignored (one line, exit 2)."""
    from casa_jax.processing import InputError
    checks = [
        (FLAGS.max_new_tokens < 1, f"--max_new_tokens={FLAGS.max_new_tokens}: expected at least 1"),
        (FLAGS.batch_size < 1, f"--batch_size={FLAGS.batch_size}: expected at least 1"),
        (FLAGS.temperature < 0, f"--temperature={FLAGS.temperature}: expected >= 0 (0 is greedy)"),
        (FLAGS.top_k is not None and FLAGS.top_k < 1, f"--top_k={FLAGS.top_k}: expected at least 1"),
        (FLAGS.top_p is not None and not 0 < FLAGS.top_p <= 1, f"--top_p={FLAGS.top_p}: expected a value in (0, 1]"),
        (FLAGS.temperature == 0 and (FLAGS.top_k is not None or FLAGS.top_p is not None),
         "--top_k/--top_p only apply to sampling; they would be ignored under greedy decoding (--temperature=0)"),
        (FLAGS.threshold is not None and not 0 < FLAGS.threshold < 1,
         f"--threshold={FLAGS.threshold}: expected a value in (0, 1)"),
        (FLAGS.prompts_file is not None and bool(FLAGS.prompt), "pass --prompt or --prompts_file, not both"),
        (FLAGS.recheck_every < 0, f"--recheck_every={FLAGS.recheck_every}: expected >= 0 (0 is off)"),
        (not 0 <= FLAGS.recheck_threshold <= 1, f"--recheck_threshold={FLAGS.recheck_threshold}: expected a value "
                                                 "in [0, 1]"),
    ]
    if FLAGS.prompts_file:
        given = [f"--{name}" for name in ("image", "audio", "prefill") if getattr(FLAGS, name)]
        checks.append((bool(given), f"{', '.join(given)} would be ignored with --prompts_file: give each record its "
                                    "own \"image\" / \"audio\" / \"prefill\" field"))
    for bad, message in checks:
        if bad:
            raise InputError(message)
    if FLAGS.output_file:
        from casa_jax.paths import refuse_overlap
        refuse_overlap({"--output_file": FLAGS.output_file},
                       {"--prompts_file": FLAGS.prompts_file, "--ckpt_dir": FLAGS.ckpt_dir}, InputError)
        _check_writable(FLAGS.output_file)


def _check_writable(path: str) -> None:
    import os

    from casa_jax import storage
    from casa_jax.processing import InputError
    if storage.is_remote(path):  # a bucket has no folders to check; a missing bucket fails on the first write
        if storage.isdir(path):
            raise InputError(f"--output_file={path} is a directory; expected a file path")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"--output_file={path} is a directory; expected a file path")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise InputError(f"--output_file={path}: its folder {parent} does not exist or is not writable")


def _records() -> list[dict]:
    """The prompts, each with its media loaded now, so a bad path stops the run before any generation."""
    from casa_jax.data.prompts_io import read_jsonl_lines
    from casa_jax.processing import InputError, load_image, load_wav
    if FLAGS.prompts_file:
        try:
            numbered = list(read_jsonl_lines(FLAGS.prompts_file))
        except (OSError, ValueError) as e:
            raise InputError(f"--prompts_file: {e}") from e
        where = [f"{FLAGS.prompts_file}:{line}" for line, _ in numbered]
        records = [r for _, r in numbered]
        for at, r in zip(where, records):
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
                raise InputError(f"{at}: each line needs a string 'prompt'")
    else:
        prompts = FLAGS.prompt or ["Give three tips for staying healthy."]
        records = [{"prompt": p, "image": FLAGS.image, "audio": FLAGS.audio, "prefill": FLAGS.prefill} for p in prompts]
        where = ["--image/--audio"] * len(records)
    for at, r in zip(where, records):
        for field, load in (("image", load_image), ("audio", load_wav)):
            if r.get(field):
                try:
                    r[field] = load(r[field])
                except (OSError, ValueError) as e:
                    raise InputError(f"{at}: {field} {r[field]!r}: {e}") from e
    return records


def _row(reply) -> dict:
    row = {"prompt": reply.prompt, "response": reply.text, "verdict": reply.verdict}
    if reply.v_s is not None:
        row.update(v_s=round(reply.v_s, 4), p_safe=round(reply.p_safe, 4), p_unsafe=round(reply.p_unsafe, 4))
    if reply.cosine is not None:
        row["cosine"] = round(reply.cosine, 4)
    return row


class _RepliesFile:
    """``--output_file``'s JSON lines, one per reply as each batch finishes. Locally through a ``.partial``
    sibling renamed into place at the end (what finished is kept, whatever stopped the rest); in a bucket,
    where an object cannot be appended to, the object is rewritten whole after each batch."""

    def __init__(self, path: str):
        import os

        from casa_jax import storage
        self.path, self._lines, self._remote = path, [], storage.is_remote(path)
        self._tmp = None if self._remote else f"{path}.partial-{os.getpid()}"
        self._file = None if self._remote else open(self._tmp, "w")

    def write(self, rows: list[dict]) -> None:
        from casa_jax import storage
        lines = [json.dumps(row) + "\n" for row in rows]
        self._lines += lines
        if self._remote:
            storage.write_text_atomic(self.path, "".join(self._lines))
        else:
            self._file.writelines(lines)
            self._file.flush()

    def close(self) -> None:
        import os
        if self._file is None:
            return
        self._file.close()
        if self._lines:
            os.replace(self._tmp, self.path)
        else:
            os.remove(self._tmp)


def main(argv):
    del argv
    quiet_libraries()
    from casa_jax.infer.chat import chat_replies
    from casa_jax.infer.engine import Engine
    with exit_on_bad_input():
        _check_flags()
        records = _records()
        engine = Engine.load(FLAGS.ckpt_dir, weights=FLAGS.weights)
        out_path = FLAGS.output_file
        out = _RepliesFile(out_path) if out_path else None
        done = 0
        try:
            for start in range(0, len(records), FLAGS.batch_size):
                chunk = records[start:start + FLAGS.batch_size]
                images = [r.get("image") for r in chunk]
                audios = [r.get("audio") for r in chunk]
                replies = chat_replies(
                    engine, [r["prompt"] for r in chunk], FLAGS.max_new_tokens, FLAGS.temperature,
                    FLAGS.top_k, FLAGS.top_p, FLAGS.seed, FLAGS.threshold, FLAGS.refusal_mode,
                    images if any(x is not None for x in images) else None,
                    audios if any(x is not None for x in audios) else None,
                    [r.get("prefill") or "" for r in chunk], FLAGS.safety_prompt,
                    recheck_every=FLAGS.recheck_every, recheck_threshold=FLAGS.recheck_threshold)
                rows = [_row(reply) for reply in replies]
                if out:
                    out.write(rows)
                else:
                    for reply, row in zip(replies, rows):
                        scores = f" v_s={row['v_s']:.3f} p_unsafe={row['p_unsafe']:.3f}" if "v_s" in row else ""
                        scores += f" cosine={row['cosine']:.3f}" if "cosine" in row else ""
                        print(f"user: {reply.prompt}\nverdict: {reply.verdict}{scores}\nassistant: {reply.text}\n")
                done += len(replies)
        finally:
            if out:
                out.close()
                if done < len(records):
                    print(f"stopped after {done} of {len(records)} replies; those are in {out_path}"
                          if done else "stopped before the first reply; nothing written", file=sys.stderr)
        if out_path:
            print(f"wrote {done} replies to {out_path}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
