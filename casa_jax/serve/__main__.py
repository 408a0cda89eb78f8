"""python -m casa_jax.serve --ckpt_dir=CKPT [--port=8000]: an OpenAI-compatible chat endpoint with the safety
verdict beside every answer.

  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model": "casa", "messages": [{"role": "user", "content": "Hi"}]}'

or any OpenAI client with ``base_url="http://localhost:8000/v1"``. SIGTERM (or Ctrl-C) finishes the
requests in flight, then exits.
"""

from __future__ import annotations

import os

from absl import flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries, run

flags.DEFINE_string("ckpt_dir", None, "casa-jax checkpoint to serve (local or gs://).", required=True)
flags.DEFINE_string("model_name", None, "The model id clients send (default: the checkpoint's report name).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0 for every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("max_tokens", 256, "The most tokens a reply may ask for, and the default.")
flags.DEFINE_integer("max_batch", 8, "The most requests decoded together.")
flags.DEFINE_float("max_wait_ms", 10.0, "How long the first request of a batch waits for others (ms).")
flags.DEFINE_enum("unsafe_policy", "model", ["model", "template", "error"], "CASA models, under an unsafe "
                  "verdict, unless a request names its own safety_policy: the model's own refusal, the fixed "
                  "refusal template, or a 400 error carrying the verdict.")
flags.DEFINE_integer("recheck_every", 0, "CASA models: re-check the safety head every N decoded tokens (and after "
                     "a prefilled assistant message); a reply found unsafe ends with the refusal (0: off).")
flags.DEFINE_enum("weights", "float", ["float", "int8", "bf16"], "How the decoder layers' kernels are held "
                  "(infer.engine.WEIGHT_FORMATS): float, as stored; int8 with per-channel scales (a quarter of the "
                  "bytes per decoded token); or bf16 with the LM head too (half, on CPUs with bf16 units: AMX, "
                  "avx512_bf16). int8 and bf16 run on a single device.")
flags.DEFINE_integer("graceful_shutdown_s", 30, "On SIGTERM, how long in-flight requests may take to finish.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    import uvicorn

    from casa_jax.eval.run import report_name
    from casa_jax.infer.engine import Engine
    from casa_jax.processing import InputError
    from casa_jax.serve.app import build_app
    with exit_on_bad_input():
        if FLAGS.recheck_every < 0:
            raise InputError(f"--recheck_every={FLAGS.recheck_every}: expected >= 0 (0 is off)")
        for name in ("max_tokens", "max_batch"):
            if getattr(FLAGS, name) < 1:
                raise InputError(f"--{name}={getattr(FLAGS, name)}: expected at least 1")
        if FLAGS.max_wait_ms < 0:
            raise InputError(f"--max_wait_ms={FLAGS.max_wait_ms}: expected >= 0")
        if not 0 < FLAGS.port < 65536:
            raise InputError(f"--port={FLAGS.port}: expected 1 to 65535")
        engine = Engine.load(FLAGS.ckpt_dir, weights=FLAGS.weights)
    name = FLAGS.model_name or report_name(FLAGS.ckpt_dir)
    app = build_app(engine, name, max_tokens=FLAGS.max_tokens, default_policy=FLAGS.unsafe_policy,
                    max_batch=FLAGS.max_batch, max_wait_s=FLAGS.max_wait_ms / 1000,
                    recheck_every=FLAGS.recheck_every)
    print(f"serving {FLAGS.ckpt_dir} as {name!r} (CASA: {engine.is_casa}) on http://{FLAGS.host}:{FLAGS.port}/v1 "
          f"(pid {os.getpid()})", flush=True)
    uvicorn.run(app, host=FLAGS.host, port=FLAGS.port, log_level="warning",
                timeout_graceful_shutdown=FLAGS.graceful_shutdown_s)


if __name__ == "__main__":
    run(main)
