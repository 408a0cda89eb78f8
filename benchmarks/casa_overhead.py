"""Latency of the CASA conditional sampler over the plain sampler: same model, same prompts.

128 new tokens after a 256-token prompt, batch 1 and 8, greedy, no early stop (both decode every
step). The conditional sampler adds the safety attention and one extra cached step for the safety
token. The re-checking gate (``--recheck_every``, its threshold out of reach so every row decodes every step)
is timed beside them and compared with the plain CASA gate. Each set is measured side by side, interleaved round by round (alternating which goes first), and the
ratio is the median of the per-round ratios; the last two lines are the worst (largest) ratios:
``casa_overhead_ratio=<value>`` (goal <= 1.05) and ``recheck_overhead_ratio=<value>`` (re-checking vs the CASA gate).

  python benchmarks/casa_overhead.py [--layers 8 --hidden 512 --rounds 9]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import flax.linen as nn
import jax
import numpy as np

from casa_jax.casa.config import CasaConfig
from casa_jax.casa.safety_attention import SafetyAttention
from casa_jax.casa.safety_tokens import SafetyTokenIds
from casa_jax.model.config import TextConfig
from casa_jax.model.text_decoder import CausalLM, init_inputs
from casa_jax.infer.decode import Decoder, Weights
from casa_jax.infer.gates import CasaGate


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--recheck_every", type=int, default=16)
    args = p.parse_args()

    text = TextConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    params = nn.unbox(CausalLM(text).init(jax.random.key(0), *init_inputs())["params"])
    casa = CasaConfig()
    ids = SafetyTokenIds(safe=args.vocab - 2, unsafe=args.vocab - 1)
    query = np.asarray(params["embed_tokens"]["embedding"][ids.unsafe])
    safety = nn.unbox(SafetyAttention(casa).init(jax.random.key(1), query, np.zeros((1, 2, args.hidden), np.float32),
                                                 np.ones((1, 2), bool))["params"])
    weights = Weights(params=params, lora=None, safety=safety, unsafe_query=query)
    plain = Decoder(text, eos_ids=())
    conditional = Decoder(text, gate=CasaGate(casa, ids), eos_ids=())
    rechecking = Decoder(text, gate=CasaGate(casa, ids, recheck_every=args.recheck_every, recheck_threshold=2.0),
                         eos_ids=())
    rng = np.random.default_rng(0)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}; "
          f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy, median of {args.rounds}")
    ratios, recheck_ratios = [], []
    for batch in args.batches:
        prompts = rng.integers(0, args.vocab - 2, (batch, args.prompt)).tolist()
        runs = {"plain": lambda: plain.generate(Weights(params), prompts, args.new_tokens),
                "casa": lambda: conditional.generate(weights, prompts, args.new_tokens),
                "recheck": lambda: rechecking.generate(weights, prompts, args.new_tokens)}
        for fn in runs.values():
            fn()  # compile and warm up
        times = {k: [] for k in runs}
        for round_index in range(args.rounds):
            order = list(runs) if round_index % 2 == 0 else list(runs)[::-1]  # ABC CBA: cancels drift
            for name in order:
                start = time.perf_counter()
                runs[name]()  # returns host lists: the device work is finished
                times[name].append(time.perf_counter() - start)
        med = {k: float(np.median(v)) for k, v in times.items()}
        # the median of per-round ratios: each pair ran back to back, so machine noise mostly cancels
        ratio = float(np.median(np.asarray(times["casa"]) / np.asarray(times["plain"])))
        recheck = float(np.median(np.asarray(times["recheck"]) / np.asarray(times["casa"])))
        ratios.append(ratio)
        recheck_ratios.append(recheck)
        print(f"batch {batch}: plain sampler {med['plain'] * 1e3:.1f} ms, conditional sampler "
              f"{med['casa'] * 1e3:.1f} ms, ratio {ratio:.3f}; re-checking every {args.recheck_every} tokens "
              f"{med['recheck'] * 1e3:.1f} ms, {recheck:.3f}x the conditional sampler")
    print(f"casa_overhead_ratio={max(ratios):.3f}")
    print(f"recheck_overhead_ratio={max(recheck_ratios):.3f}")


if __name__ == "__main__":
    main()
