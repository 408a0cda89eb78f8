"""Throughput of the jitted JAX vision and audio encoders vs transformers' PyTorch encoders.

Same mid-size Qwen2.5-Omni encoder configs, same random weights (converted through casa-jax's importer),
same inputs (a batch of images of two sizes; a batch of audio clips of different lengths), measured side by
side in this one process, interleaved round by round (alternating which side runs first). Layout/index
preparation on the host is included in the JAX timing. The ratio is the median of the per-round ratios (as
in casa_overhead.py), which a machine whose speed drifts between rounds moves less than a ratio of medians;
the last line repeats it.

  python benchmarks/encoder_throughput.py [--vision_depth 8 --audio_layers 8 --rounds 5]
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
from casa_jax.model.audio_encoder import AudioEncoder, audio_layout
from casa_jax.model.thinker import Thinker
from casa_jax.model.vision_encoder import VisionEncoder
from casa_jax.model.vision_layout import pad_patches, vision_layout


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vision_depth", type=int, default=8)
    p.add_argument("--vision_hidden", type=int, default=256)
    p.add_argument("--audio_layers", type=int, default=8)
    p.add_argument("--audio_hidden", type=int, default=256)
    p.add_argument("--out_hidden", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    text = dict(vocab_size=1024, hidden_size=args.out_hidden, intermediate_size=args.out_hidden,
                num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [8, 12, 12]})
    vision = dict(depth=args.vision_depth, hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden,
                  num_heads=args.vision_hidden // 64, out_hidden_size=args.out_hidden,
                  fullatt_block_indexes=list(range(args.vision_depth - 1, -1, -4))[::-1], window_size=112,
                  spatial_merge_size=2, patch_size=14, temporal_patch_size=2)
    audio = dict(d_model=args.audio_hidden, encoder_layers=args.audio_layers,
                 encoder_attention_heads=args.audio_hidden // 64, encoder_ffn_dim=4 * args.audio_hidden,
                 output_dim=args.out_hidden, num_mel_bins=128, n_window=100, max_source_positions=1500)
    cfg = transformers.Qwen2_5OmniThinkerConfig(text_config=text, vision_config=vision, audio_config=audio)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).save_pretrained(d)
        ref = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            d, attn_implementation="sdpa").eval()
        loaded = load_hf_checkpoint(d, progress=False)
    thinker = Thinker.from_spec(loaded.spec)

    rng = np.random.default_rng(0)
    grid = np.array([[1, 32, 32], [1, 24, 40]])  # two images: 448x448 and 336x560 pixels
    pixels = rng.standard_normal((int(grid.prod(-1).sum()), thinker.vision.patch_dim)).astype(np.float32)
    frames = [3000, 1800, 1000, 640]  # 30 s, 18 s, 10 s, 6.4 s of audio
    clips = [rng.standard_normal((128, n)).astype(np.float32) for n in frames]
    vision_fn = jax.jit(lambda prm, x, lay: VisionEncoder(thinker.vision).apply({"params": prm}, x, **lay))
    audio_fn = jax.jit(lambda prm, lay: AudioEncoder(thinker.audio).apply({"params": prm}, **lay))
    t_pixels, t_grid = torch.from_numpy(pixels), torch.from_numpy(grid)
    t_feats, t_lens = torch.from_numpy(np.concatenate(clips, axis=1)), torch.tensor(frames)

    def jax_vision():
        lay = vision_layout(grid, thinker.vision)
        vision_fn(loaded.encoders["visual"], pad_patches(pixels, lay, thinker.vision), lay.arrays()).block_until_ready()

    def jax_audio():
        audio_fn(loaded.encoders["audio_tower"], audio_layout(clips, thinker.audio).arrays()).block_until_ready()

    def torch_vision():
        with torch.inference_mode():
            ref.model.visual(t_pixels, grid_thw=t_grid)

    def torch_audio():
        with torch.inference_mode():
            ref.model.audio_tower(t_feats, feature_lens=t_lens)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads, sdpa)")
    print(f"vision: depth {args.vision_depth}, hidden {args.vision_hidden}, 2 images ({int(grid.prod(-1).sum())} "
          f"patches); audio: {args.audio_layers} layers, hidden {args.audio_hidden}, 4 clips ({sum(frames)} mel "
          f"frames); float32, median of {args.rounds}")
    ratios = {}
    for name, fns, unit, count in (("vision", (jax_vision, torch_vision), "patches", int(grid.prod(-1).sum())),
                                   ("audio", (jax_audio, torch_audio), "mel frames", sum(frames))):
        for fn in fns:
            fn()  # compile / warm up
        times = {"jax": [], "torch": []}
        for r in range(args.rounds):  # alternate which side runs first
            for label, fn in list(zip(("jax", "torch"), fns))[::1 if r % 2 else -1]:
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
        rate = {k: count / float(np.median(v)) for k, v in times.items()}
        # Each round's two runs are adjacent, so its ratio cancels the machine's drift between rounds.
        per_round = np.asarray(times["torch"]) / np.asarray(times["jax"])
        ratios[name] = float(np.median(per_round))
        low, high = np.percentile(per_round, [25, 75])
        print(f"{name}: transformers {rate['torch']:,.0f} {unit}/s, casa-jax {rate['jax']:,.0f} {unit}/s, "
              f"ratio {ratios[name]:.2f} (median of the per-round ratios; quartiles {low:.2f}-{high:.2f})")
    print(f"ratio jax/torch: vision {ratios['vision']:.2f}, audio {ratios['audio']:.2f}")


if __name__ == "__main__":
    main()
