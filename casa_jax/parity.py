"""Check a converted model against the transformers PyTorch implementation on the same inputs.

  python -m casa_jax.parity --hf_dir=IN [--dtype=bfloat16]

Runs both models on a padded batch and prints the max absolute logit difference and the mean
per-token KL(HF || JAX) over real (non-padding) tokens; exits 1 past ``--atol`` (fp32) or
``--max_kl`` (bf16/fp16). Needs torch (``pip install -r requirements-test.txt``).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries

DEFAULT_PROMPTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
)


@dataclasses.dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    mean_kl: float
    num_tokens: int
    model_class: str


def build_batch(hf_dir: str, vocab_size: int, lengths=(13, 9, 6), seed: int = 0,
                prompts=DEFAULT_PROMPTS) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [B, T], left-padded. Uses the directory's tokenizer when it has one,
    otherwise seeded random ids (below the special-token range)."""
    has_tokenizer = any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "vocab.json"))
    if has_tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        seqs = [tok(p)["input_ids"] for p in prompts]
    else:
        rng = np.random.default_rng(seed)
        seqs = [rng.integers(0, min(vocab_size, 151643), size=n).tolist() for n in lengths]
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask


def torch_logits(hf_dir: str, spec, ids: np.ndarray, mask: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    try:
        import torch
    except ImportError as e:  # torch is a test-only dependency
        raise SystemExit("casa_jax.parity needs torch: pip install -r requirements-test.txt") from e
    import transformers

    from casa_jax.model.rope import positions_from_mask
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cls = (transformers.Qwen2_5OmniThinkerForConditionalGeneration if spec.is_thinker
           else transformers.Qwen2ForCausalLM)
    model = cls.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="eager").eval()
    kwargs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask))
    if not spec.is_thinker:  # the thinker derives padding-aware positions itself (get_rope_index)
        kwargs["position_ids"] = torch.from_numpy(np.asarray(positions_from_mask(mask)).astype(np.int64))
    with torch.no_grad():
        logits = model(**kwargs).logits.float().numpy()
    return logits, cls.__name__


def jax_logits(hf_dir: str, ids: np.ndarray, mask: np.ndarray, dtype: str) -> np.ndarray:
    import jax

    from casa_jax.checkpoints.hf import load_hf_checkpoint
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.model.text_decoder import CausalLM
    loaded = load_hf_checkpoint(hf_dir, param_dtype=dtype, dtype=dtype, progress=False)
    model = CausalLM(loaded.spec.text)
    forward = jax.jit(lambda p, i, pos, m: model.apply({"params": p}, i, pos, m).logits)
    return np.asarray(forward(loaded.params, ids, positions_from_mask(mask), mask))


def compare(hf_logits: np.ndarray, our_logits: np.ndarray, mask: np.ndarray) -> tuple[float, float, int]:
    """Max |diff| and mean KL(HF || ours) over real tokens."""
    real = mask.astype(bool)
    a, b = hf_logits[real].astype(np.float64), our_logits[real].astype(np.float64)
    log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return float(np.max(np.abs(a - b))), float(np.mean(kl)), int(real.sum())


def run_parity(hf_dir: str, dtype: str = "float32") -> ParityResult:
    from casa_jax.model.config import load_hf_spec
    spec = load_hf_spec(hf_dir)
    ids, mask = build_batch(hf_dir, spec.text.vocab_size)
    hf, model_class = torch_logits(hf_dir, spec, ids, mask, dtype)
    ours = jax_logits(hf_dir, ids, mask, dtype)
    diff, kl, n = compare(hf, ours, mask)
    return ParityResult(diff, kl, n, model_class)


flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (any supported layout).", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Dtype both models run in.")
flags.DEFINE_float("atol", 1e-4, "Largest allowed max |logit diff| (checked in float32).")
flags.DEFINE_float("max_kl", 0.02, "Largest allowed mean per-token KL (checked in bfloat16/float16).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    with exit_on_bad_input():
        result = run_parity(FLAGS.hf_dir, FLAGS.dtype)
    print(f"reference: transformers {result.model_class} ({FLAGS.dtype}, eager attention)")
    print(f"tokens compared: {result.num_tokens} (padded batch)")
    print(f"max |logit diff|: {result.max_abs_diff:.3e}")
    print(f"mean per-token KL(HF || JAX): {result.mean_kl:.3e}")
    if FLAGS.dtype == "float32":
        ok = result.max_abs_diff <= FLAGS.atol
        print(f"{'PASS' if ok else 'FAIL'}: max diff {'<=' if ok else '>'} atol {FLAGS.atol:g}")
    else:
        ok = result.mean_kl <= FLAGS.max_kl
        print(f"{'PASS' if ok else 'FAIL'}: mean KL {'<=' if ok else '>'} max_kl {FLAGS.max_kl:g}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    app.run(main)
