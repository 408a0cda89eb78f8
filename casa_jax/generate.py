"""Generate a reply from a casa-jax checkpoint.

  python -m casa_jax.generate --ckpt_dir=CKPT --prompt="What is the capital of France?"
"""

from __future__ import annotations

from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries

flags.DEFINE_string("ckpt_dir", None, "casa-jax checkpoint (from python -m casa_jax.convert).", required=True)
flags.DEFINE_multi_string("prompt", ["Give three tips for staying healthy."], "User message(s); repeat for a batch.")
flags.DEFINE_integer("max_new_tokens", 32, "Most tokens generated per reply.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy decoding.")
flags.DEFINE_integer("top_k", None, "Sample only among the k most likely tokens (with --temperature > 0).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    from casa_jax.sampling.chat import chat_replies
    with exit_on_bad_input():
        replies = chat_replies(FLAGS.ckpt_dir, FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.temperature,
                               FLAGS.top_k, FLAGS.seed)
    for prompt, reply in zip(FLAGS.prompt, replies):
        print(f"user: {prompt}\nassistant: {reply}\n")


if __name__ == "__main__":
    app.run(main)
