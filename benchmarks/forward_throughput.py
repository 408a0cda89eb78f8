"""Forward throughput (tokens/s) of the jitted JAX decoder vs the transformers PyTorch model.

Same mid-size Qwen2 config, same random weights (converted through casa-jax's importer), same batch,
measured side by side in this one process, interleaved round by round. The last line is the ratio.

  python benchmarks/forward_throughput.py [--layers 8 --hidden 512 --batch 4 --seq 256 --rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from casa_jax.io.hf import load_hf_checkpoint
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()

    cfg = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads)
    torch_dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
        ref = transformers.Qwen2ForCausalLM.from_pretrained(d, dtype=torch_dtype).eval()
        loaded = load_hf_checkpoint(d, param_dtype=args.dtype, dtype=args.dtype, progress=False)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    positions = np.asarray(positions_from_mask(mask))
    model = CausalLM(loaded.spec.text)
    forward = jax.jit(lambda prm, i, pos, m: model.apply({"params": prm}, i, pos, m).logits)
    t_ids, t_mask, t_pos = (torch.from_numpy(x.astype(np.int64)) for x in (ids, mask, positions))

    def run_jax():
        forward(loaded.params, ids, positions, mask).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            ref(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos).logits

    run_jax(), run_torch()  # compile / warm up
    times = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        for name, fn in (("jax", run_jax), ("torch", run_torch)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    rate = {k: tokens / float(np.median(v)) for k, v in times.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"config: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV, "
          f"vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, {args.dtype}, median of {args.rounds}")
    print(f"transformers (PyTorch): {rate['torch']:,.0f} tokens/s")
    print(f"casa-jax (jitted JAX):  {rate['jax']:,.0f} tokens/s")
    print(f"ratio jax/torch: {rate['jax'] / rate['torch']:.2f}")


if __name__ == "__main__":
    main()
