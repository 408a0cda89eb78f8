"""Chat-formatted generation from a casa-jax checkpoint (tokenizer from the checkpoint's hf_sidecar/)."""

from __future__ import annotations


def load_tokenizer(ckpt_dir: str):
    from transformers import AutoTokenizer

    from casa_jax.checkpoints.hf_files import CheckpointError
    from casa_jax.checkpoints.orbax_io import sidecar_dir
    path = sidecar_dir(ckpt_dir)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: has no tokenizer files (hf_sidecar/); convert from a Hugging Face "
                              "directory that contains tokenizer.json or vocab.json + merges.txt")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def chat_replies(ckpt_dir: str, prompts, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0) -> list[str]:
    """Apply the chat template to each user prompt, decode, and return the reply texts."""
    import jax

    from casa_jax.checkpoints.orbax_io import restore_checkpoint
    from casa_jax.model.text_decoder import CausalLM
    from casa_jax.sampling.sampler import Sampler
    from casa_jax.sampling.strategies import from_temperature

    loaded = restore_checkpoint(ckpt_dir)  # first: says plainly when ckpt_dir is no checkpoint
    tokenizer = load_tokenizer(ckpt_dir)
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False) for p in prompts]
    eos = tuple(sorted({tokenizer.eos_token_id, *(
        [tokenizer.convert_tokens_to_ids("<|endoftext|>")] if "<|endoftext|>" in tokenizer.get_vocab() else [])}))
    sampler = Sampler(CausalLM(loaded.spec.text), eos_ids=eos, pad_id=tokenizer.pad_token_id or 0,
                      strategy=from_temperature(temperature, top_k))
    out = sampler.generate(loaded.params, ids, max_new_tokens, jax.random.key(seed))
    return [tokenizer.decode(t, skip_special_tokens=True) for t in out]
