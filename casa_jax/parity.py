"""Check a converted model against the transformers PyTorch implementation on the same inputs.

  python -m casa_jax.parity --hf_dir=IN [--dtype=bfloat16] [--image=PNG] [--audio=WAV]

Runs both models on a padded text batch and prints the max absolute logit difference, the logit scale
(max |HF logit|) and the mean per-token KL(HF || JAX) over real (non-padding) tokens; exits 1 past the
tolerance. float32: max |logit diff| <= ``--atol`` * max(1, logit scale), i.e. relative to the scale,
since fp32 rounding grows with the logits (default 1e-4; measured: tiny sharp models 1e-6 to 7e-6 of
their scale, SmolLM2-135M 3e-6). bf16/fp16: mean KL <= ``--max_kl`` (default 0.02, for real 7B
checkpoints; the tests hold tiny sharp models to 1e-3 and SmolLM2-135M to 5e-3). For a Qwen2.5-Omni
thinker, ``--image`` / ``--audio`` add prompts that carry the image, the audio clip, and both (through
the vision/audio encoders). Needs torch (``pip install -r requirements-test.txt``).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import app, flags

from casa_jax.cli import exit_on_bad_input, quiet_libraries, run

DEFAULT_PROMPTS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
)
DEFAULT_ATOL = 1e-4  # float32: max |logit diff| per unit of max(1, max |HF logit|)
DEFAULT_MAX_KL = 0.02  # bf16/fp16: mean per-token KL(HF || JAX), real 7B checkpoints


@dataclasses.dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    mean_kl: float
    num_tokens: int
    model_class: str
    case: str = "text"
    logit_scale: float = 0.0  # max |HF logit| over real tokens

    def fp32_limit(self, atol: float = DEFAULT_ATOL) -> float:
        """The float32 tolerance on ``max_abs_diff``: ``atol`` per unit of logit scale (at least 1)."""
        return atol * max(1.0, self.logit_scale)

    def passes(self, dtype: str, atol: float = DEFAULT_ATOL, max_kl: float = DEFAULT_MAX_KL) -> bool:
        """float32: max |diff| within ``fp32_limit``; bf16/fp16: mean KL within ``max_kl``."""
        return self.max_abs_diff <= self.fp32_limit(atol) if dtype == "float32" else self.mean_kl <= max_kl


def parity_batch(hf_dir: str, vocab_size: int, lengths=(13, 9, 6), seed: int = 0,
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
    from casa_jax.model.config import CAUSAL_LM_CLASSES
    cls = (transformers.Qwen2_5OmniThinkerForConditionalGeneration if spec.is_thinker
           else getattr(transformers, CAUSAL_LM_CLASSES.get(spec.model_type, "Qwen2ForCausalLM")))
    model = cls.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="eager").eval()
    kwargs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask))
    if not spec.is_thinker:  # the thinker derives padding-aware positions itself (get_rope_index)
        kwargs["position_ids"] = torch.from_numpy(np.asarray(positions_from_mask(mask)).astype(np.int64))
    with torch.no_grad():
        logits = model(**kwargs).logits.float().numpy()
    return logits, cls.__name__


def jax_logits(hf_dir: str, ids: np.ndarray, mask: np.ndarray, dtype: str) -> np.ndarray:
    import jax

    from casa_jax.io.hf import load_hf_checkpoint
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.model.text_decoder import CausalLM
    loaded = load_hf_checkpoint(hf_dir, param_dtype=dtype, dtype=dtype, progress=False)
    model = CausalLM(loaded.spec.text)
    forward = jax.jit(lambda p, i, pos, m: model.apply({"params": p}, i, pos, m).logits)
    return np.asarray(forward(loaded.params, ids, positions_from_mask(mask), mask))


def logit_scale(hf_logits: np.ndarray, mask: np.ndarray) -> float:
    """Max |HF logit| over real tokens: what the float32 tolerance is relative to."""
    return float(np.max(np.abs(hf_logits[mask.astype(bool)])))


def compare(hf_logits: np.ndarray, our_logits: np.ndarray, mask: np.ndarray) -> tuple[float, float, int]:
    """Max |diff| and mean KL(HF || ours) over real tokens."""
    real = mask.astype(bool)
    a, b = hf_logits[real].astype(np.float64), our_logits[real].astype(np.float64)
    log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return float(np.max(np.abs(a - b))), float(np.mean(kl)), int(real.sum())


def run_parity(hf_dir: str, dtype: str = "float32") -> ParityResult:
    """Text-only parity on a padded batch of three prompts."""
    from casa_jax.model.config import load_hf_spec
    spec = load_hf_spec(hf_dir)
    ids, mask = parity_batch(hf_dir, spec.text.vocab_size)
    hf, model_class = torch_logits(hf_dir, spec, ids, mask, dtype)
    ours = jax_logits(hf_dir, ids, mask, dtype)
    diff, kl, n = compare(hf, ours, mask)
    return ParityResult(diff, kl, n, model_class, logit_scale=logit_scale(hf, mask))


def multimodal_cases(spec, image=None, audio=None, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Processor-style inputs for prompts that carry the image, the audio clip, and both (thinkers only).

    Text pieces are seeded random ids around the placeholders, so no tokenizer is needed.
    """
    from casa_jax.model.encoder_config import encoder_configs
    from casa_jax.model.rope_index import ThinkerTokens
    from casa_jax.processing import OmniProcessor

    if not spec.is_thinker:
        raise ValueError("--image/--audio need a Qwen2.5-Omni thinker checkpoint; this one is "
                         f"{spec.model_type!r} (text only)")
    thinker_cfg = spec.thinker_config()
    tokens = ThinkerTokens.from_thinker_config(thinker_cfg)
    vision, _ = encoder_configs(spec)
    proc = OmniProcessor(None, vision)
    rng = np.random.default_rng(seed)
    v_end = thinker_cfg.get("vision_end_token_id", tokens.vision_start_token_id + 1)
    a_end = thinker_cfg.get("audio_end_token_id", tokens.audio_start_token_id + 1)
    special = [tokens.image_token_id, tokens.video_token_id, tokens.audio_token_id, tokens.vision_start_token_id,
               tokens.audio_start_token_id, v_end, a_end]
    plain = np.setdiff1d(np.arange(min(spec.text.vocab_size, 151643) // 2), special)  # never a media token
    text = lambda n: rng.choice(plain, n).tolist()  # noqa: E731
    pieces: dict[str, tuple[list[int], dict]] = {}
    if image is not None:
        arrays = proc.images([image])
        n = int(arrays["image_grid_thw"].prod()) // vision.merge_unit
        pieces["image"] = ([tokens.vision_start_token_id] + [tokens.image_token_id] * n + [v_end], arrays)
    if audio is not None:
        arrays = proc.audio([audio], resample=True)
        from casa_jax.model.audio_encoder import audio_output_tokens
        n = int(audio_output_tokens(arrays["feature_attention_mask"].sum()))
        pieces["audio"] = ([tokens.audio_start_token_id] + [tokens.audio_token_id] * n + [a_end], arrays)
    cases = {}
    names = list(pieces)
    combos = [[k] for k in names] + ([names] if len(names) == 2 else [])
    for combo in combos:
        ids = text(5)
        arrays: dict[str, np.ndarray] = {}
        for kind in combo:
            ids += pieces[kind][0] + text(3)
            arrays.update(pieces[kind][1])
        arrays["input_ids"] = np.asarray([ids], np.int64)
        arrays["attention_mask"] = np.ones_like(arrays["input_ids"])
        cases["+".join(["text"] + combo)] = arrays
    return cases


def run_multimodal_parity(hf_dir: str, image=None, audio=None, dtype: str = "float32") -> list[ParityResult]:
    """Parity of the whole thinker (encoders + decoder) on prompts with the image, the audio, and both."""
    import jax
    import torch
    import transformers

    from casa_jax.io.hf import load_hf_checkpoint
    from casa_jax.model.thinker import Thinker

    loaded = load_hf_checkpoint(hf_dir, param_dtype=dtype, dtype=dtype, progress=False)
    cases = multimodal_cases(loaded.spec, image, audio)
    thinker = Thinker.from_spec(loaded.spec, dtype=dtype, param_dtype=dtype)
    forward = jax.jit(lambda p, e, x: thinker(p, e, x).logits)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cls = transformers.Qwen2_5OmniThinkerForConditionalGeneration
    model = cls.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="eager").eval()
    results = []
    for name, arrays in cases.items():
        ours = np.asarray(forward(loaded.params, loaded.encoders, thinker.prepare(**arrays)))
        inputs = {k: torch.tensor(np.asarray(v)) for k, v in arrays.items()}
        for k in ("pixel_values", "input_features"):
            if k in inputs:
                inputs[k] = inputs[k].to(torch_dtype)
        with torch.no_grad():
            ref = model(**inputs).logits.float().numpy()
        diff, kl, n = compare(ref, ours, arrays["attention_mask"])
        results.append(ParityResult(diff, kl, n, cls.__name__, case=name,
                                    logit_scale=logit_scale(ref, arrays["attention_mask"])))
    return results


flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (any supported layout).", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Dtype both models run in.")
flags.DEFINE_float("atol", DEFAULT_ATOL, "float32 check: largest allowed max |logit diff| per unit of logit scale, "
                   "i.e. max |diff| <= atol * max(1, max |HF logit|).")
flags.DEFINE_float("max_kl", DEFAULT_MAX_KL, "bfloat16/float16 check: largest allowed mean per-token KL(HF || JAX).")
flags.DEFINE_string("image", None, "Image file (PNG, JPEG, ...): also check prompts carrying it (thinkers).")
flags.DEFINE_string("audio", None, "PCM WAV file: also check prompts carrying it (thinkers; resampled to 16 kHz).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quiet_libraries()
    from casa_jax.processing import load_image, load_wav
    with exit_on_bad_input():
        image = load_image(FLAGS.image) if FLAGS.image else None
        audio = load_wav(FLAGS.audio) if FLAGS.audio else None
        results = [run_parity(FLAGS.hf_dir, FLAGS.dtype)]
        if image is not None or audio is not None:
            results += run_multimodal_parity(FLAGS.hf_dir, image, audio, FLAGS.dtype)
    print(f"reference: transformers {results[0].model_class} ({FLAGS.dtype}, eager attention)")
    limit = (f"atol {FLAGS.atol:g} x max(1, logit scale)" if FLAGS.dtype == "float32"
             else f"max_kl {FLAGS.max_kl:g}")
    all_ok = True
    for r in results:
        ok = r.passes(FLAGS.dtype, FLAGS.atol, FLAGS.max_kl)
        all_ok &= ok
        print(f"{r.case:<22} tokens {r.num_tokens:>5}  max |logit diff| {r.max_abs_diff:.3e}  "
              f"logit scale {r.logit_scale:.3g}  mean KL(HF || JAX) {r.mean_kl:.3e}  {'PASS' if ok else 'FAIL'}")
    print(f"{'PASS' if all_ok else 'FAIL'}: {len(results)} case(s) against {limit}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    run(main)
