"""The README's main job, on the embedded tiny default: build a tiny Hugging Face model, convert it to a
casa-jax checkpoint, export it back (checking the round trip is bit-exact) and generate from it.

  python -m casa_jax.demo [--workdir=workdir/demo]

The model is random-initialised, so its replies are gibberish: this shows the pipeline's mechanics.
Later stages (CASA training, attacks, evaluation) build on exactly these pieces.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from casa_jax.cli import quiet_libraries

flags.DEFINE_string("workdir", os.path.join("workdir", "demo"), "Where the demo writes its files.")
FLAGS = flags.FLAGS


def run(workdir: str) -> dict:
    import numpy as np

    from casa_jax.checkpoints.hf_files import SafetensorsDir
    from casa_jax.checkpoints.convert_lib import ckpt_to_hf, hf_to_ckpt
    from casa_jax.sampling.chat import chat_replies
    from casa_jax.tiny import write_tiny_hf_dir

    hf_dir, ckpt_dir, export_dir = (os.path.join(workdir, n) for n in ("tiny_hf", "tiny_ckpt", "tiny_hf_export"))
    t0 = time.time()
    print(f"[1/4] writing a random tiny Hugging Face model to {hf_dir}")
    write_tiny_hf_dir(hf_dir, overwrite=True)
    print(f"[2/4] converting it to a casa-jax checkpoint in {ckpt_dir}")
    hf_to_ckpt(hf_dir, ckpt_dir, overwrite=True)
    print(f"[3/4] exporting back to {export_dir} and comparing every tensor")
    ckpt_to_hf(ckpt_dir, export_dir, max_shard_bytes=5 * 1024**3, overwrite=True)
    a, b = SafetensorsDir(hf_dir), SafetensorsDir(export_dir)
    exact = a.keys() == b.keys() and all(np.array_equal(a.read(k), b.read(k)) for k in a.keys())
    print(f"      round trip bit-exact: {exact} ({len(a.keys())} tensors)")
    print("[4/4] generating (greedy, KV cache) from the converted checkpoint")
    prompts = ["Give three tips for staying healthy.", "What is the capital of France?"]
    replies = chat_replies(ckpt_dir, prompts, max_new_tokens=16)
    for p, r in zip(prompts, replies):
        print(f"      user: {p}\n      assistant: {r!r}")
    print(f"done in {time.time() - t0:.1f}s. The tiny model is random-initialised: its replies show the "
          "mechanics, not quality.\nServe the checkpoint with: python -m casa_jax.generate "
          f"--ckpt_dir={ckpt_dir} --prompt='Hello'")
    if not exact:
        raise SystemExit("round trip was not bit-exact")
    return {"round_trip_exact": exact, "replies": replies}


def main(argv):
    del argv
    quiet_libraries()
    run(FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
