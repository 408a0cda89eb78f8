"""Training-step throughput (tokens/s): our jitted JAX step vs the equivalent PyTorch step.

Both: the same mid-size Qwen2 config and random weights (converted through casa-jax's importer), the
same batch, next-token cross-entropy over every position, backward, AdamW (lr 1e-4, weight decay 0.01,
grad-norm clip 1.0), full fine-tuning in fp32. JAX: one ``jax.jit`` step with the state donated;
PyTorch: transformers' ``Qwen2ForCausalLM`` + ``torch.optim.AdamW``. Measured side by side in one
process, rounds alternating which goes first; the last line is the ratio.

  python benchmarks/train_step_throughput.py [--layers 4 --hidden 512 --batch 4 --seq 256 --rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np
import optax
import torch
import transformers

from casa_jax.io.hf import load_hf_checkpoint
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    cfg = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
        ref = transformers.Qwen2ForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
        loaded = load_hf_checkpoint(d, progress=False)

    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    positions = np.asarray(positions_from_mask(mask))
    model = CausalLM(loaded.spec.text)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01))

    def loss_fn(params):
        logits = model.apply({"params": params}, ids, positions, mask).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jax_step = jax.jit(step, donate_argnums=(0, 1))
    state = {"params": loaded.params, "opt": tx.init(loaded.params)}
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.01)
    t_ids = torch.from_numpy(ids.astype(np.int64))

    def run_jax():
        state["params"], state["opt"], loss = jax_step(state["params"], state["opt"])
        return float(loss)

    def run_torch():
        optimizer.zero_grad(set_to_none=True)
        loss = ref(input_ids=t_ids, labels=t_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        optimizer.step()
        return float(loss)

    first = {"jax": run_jax(), "torch": run_torch()}  # compile / warm up; same weights, same first loss
    times = {"jax": [], "torch": []}
    for r in range(args.rounds):
        order = [("jax", run_jax), ("torch", run_torch)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    rate = {k: tokens / float(np.median(v)) for k, v in times.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"config: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq} tokens, fp32, full fine-tuning, AdamW, median of {args.rounds}")
    print(f"first-step loss: jax {first['jax']:.5f}, torch {first['torch']:.5f} (same weights and batch)")
    print(f"transformers + torch.optim.AdamW: {rate['torch']:,.0f} tokens/s")
    print(f"casa-jax jitted step:             {rate['jax']:,.0f} tokens/s")
    print(f"ratio jax/torch: {rate['jax'] / rate['torch']:.2f}")


if __name__ == "__main__":
    main()
