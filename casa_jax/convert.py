"""Convert checkpoints: Hugging Face safetensors -> casa-jax (orbax) and back.

  python -m casa_jax.convert --hf_dir=IN --out_dir=CKPT
  python -m casa_jax.convert --gguf=MODEL.gguf --out_dir=CKPT     # llama.cpp files (Llama family), no torch
  python -m casa_jax.convert --ckpt_dir=CKPT --export_hf_dir=OUT
"""

from __future__ import annotations

from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries, run

flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to import (config.json + safetensors).")
flags.DEFINE_string("gguf", None, "llama.cpp GGUF file to import (Llama-family; dequantized to float32).")
flags.DEFINE_string("out_dir", None, "Where to write the casa-jax checkpoint (with --hf_dir or --gguf).")
flags.DEFINE_string("ckpt_dir", None, "casa-jax checkpoint to export (with --export_hf_dir).")
flags.DEFINE_string("export_hf_dir", None, "Where to write the Hugging Face directory (with --ckpt_dir).")
flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                  "Cast weights on import (default: keep the file's dtype).")
flags.DEFINE_integer("max_shard_mb", 5120, "Largest safetensors shard written on export, in MiB.")
flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty output directory.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from casa_jax.io.convert_lib import ckpt_to_hf, gguf_to_ckpt, hf_to_ckpt
    quiet_libraries()
    importing = FLAGS.hf_dir is not None or FLAGS.gguf is not None or FLAGS.out_dir is not None
    exporting = FLAGS.ckpt_dir is not None or FLAGS.export_hf_dir is not None
    if importing == exporting:
        raise app.UsageError("use either --hf_dir or --gguf with --out_dir (import) or --ckpt_dir with "
                             "--export_hf_dir (export)")
    with exit_on_bad_input():
        if FLAGS.gguf:
            if FLAGS.hf_dir or not FLAGS.out_dir:
                raise app.UsageError("--gguf needs --out_dir (and no --hf_dir)")
            gguf_to_ckpt(FLAGS.gguf, FLAGS.out_dir, FLAGS.param_dtype, FLAGS.overwrite)
            print(f"wrote casa-jax checkpoint {FLAGS.out_dir}")
        elif importing:
            if not (FLAGS.hf_dir and FLAGS.out_dir):
                raise app.UsageError("import needs both --hf_dir and --out_dir")
            hf_to_ckpt(FLAGS.hf_dir, FLAGS.out_dir, FLAGS.param_dtype, FLAGS.overwrite)
            print(f"wrote casa-jax checkpoint {FLAGS.out_dir}")
        else:
            if not (FLAGS.ckpt_dir and FLAGS.export_hf_dir):
                raise app.UsageError("export needs both --ckpt_dir and --export_hf_dir")
            ckpt_to_hf(FLAGS.ckpt_dir, FLAGS.export_hf_dir, FLAGS.max_shard_mb * 1024**2, FLAGS.overwrite)
            print(f"wrote Hugging Face directory {FLAGS.export_hf_dir}")


if __name__ == "__main__":
    run(main)
