"""The two safety tokens: added to the tokenizer and the model, placed at the start of the assistant
turn, stripped from what users see.

New embedding (and untied LM-head) rows start as the mean of the rows of a word's token pieces (e.g.
"safe" / "unsafe"), so the tokens begin with a meaning close to those words. When the tokenizer
outgrows the embedding table, rows are appended and the config's vocab size grows with them (also in
the Hugging Face config written on export).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from casa_jax.casa.config import CasaConfig
from casa_jax.distributed import to_host
from casa_jax.model.config import OMNI, OMNI_THINKER, ModelSpec


@dataclasses.dataclass(frozen=True)
class SafetyTokenIds:
    safe: int
    unsafe: int

    def of(self, unsafe: bool) -> int:
        return self.unsafe if unsafe else self.safe


def safety_token_ids(tokenizer, cfg: CasaConfig) -> SafetyTokenIds:
    """Ids of the safety tokens in ``tokenizer``; an error if they were never added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (cfg.safe_token, cfg.unsafe_token) if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer has no safety tokens {missing}; add them with add_safety_tokens")
    return SafetyTokenIds(vocab[cfg.safe_token], vocab[cfg.unsafe_token])


def with_vocab_size(spec: ModelSpec, vocab_size: int) -> ModelSpec:
    """``spec`` with the text vocab resized, in the TextConfig and in the HF config it will export."""
    hf = copy.deepcopy(dict(spec.hf_config))
    if spec.model_type == OMNI:
        hf["thinker_config"]["text_config"]["vocab_size"] = vocab_size
    elif spec.model_type == OMNI_THINKER:
        hf["text_config"]["vocab_size"] = vocab_size
    else:
        hf["vocab_size"] = vocab_size
    return dataclasses.replace(spec, text=spec.text.replace(vocab_size=vocab_size), hf_config=hf)


def _piece_mean(table, ids: list[int], word: str):  # table [V, E]
    if not ids:
        raise ValueError(f"the init word {word!r} has no token pieces")
    return table[np.asarray(ids)].astype(np.float32).mean(axis=0)


def add_safety_tokens(tokenizer, params: Mapping[str, Any], spec: ModelSpec, cfg: CasaConfig
                      ) -> tuple[Any, dict, ModelSpec, SafetyTokenIds, np.ndarray]:
    """Add the safety tokens to ``tokenizer`` (in place) and their rows to ``params``.

    NumPy tables stay NumPy; jax.Arrays (possibly sharded over several processes) are grown with jax
    ops where they lie, never gathered. Returns (tokenizer, params, spec, ids, unsafe_query):
    ``unsafe_query`` [E] (NumPy) is the unsafe token's initial embedding, the frozen query of the
    safety attention.
    """
    pieces = {word: tokenizer.encode(word, add_special_tokens=False)
              for word in (cfg.safe_init_word, cfg.unsafe_init_word)}
    tokenizer.add_tokens([cfg.safe_token, cfg.unsafe_token], special_tokens=True)
    ids = safety_token_ids(tokenizer, cfg)
    embed = params["embed_tokens"]["embedding"]
    vocab = max(spec.text.vocab_size, len(tokenizer), ids.safe + 1, ids.unsafe + 1)
    rows = _grow(embed, vocab, axis=0)
    head = None
    if not spec.text.tie_word_embeddings:
        head = _grow(params["lm_head"]["kernel"], vocab, axis=1)  # [E, V]
    for token_id, word in ((ids.safe, cfg.safe_init_word), (ids.unsafe, cfg.unsafe_init_word)):
        rows = _set(rows, (token_id,), _piece_mean(embed, pieces[word], word).astype(rows.dtype))
        if head is not None:
            kernel = params["lm_head"]["kernel"]
            head = _set(head, (slice(None), token_id), _piece_mean(kernel.T, pieces[word], word).astype(head.dtype))
    new_params = dict(params, embed_tokens={"embedding": rows})
    if head is not None:
        new_params["lm_head"] = {"kernel": head}
    unsafe_query = to_host(rows[ids.unsafe]).astype(np.float32).copy()
    return tokenizer, new_params, with_vocab_size(spec, vocab), ids, unsafe_query


def _set(table, index: tuple, value):
    """``table`` with ``table[index] = value``: in place for NumPy, ``.at[].set`` for jax.Arrays."""
    if isinstance(table, np.ndarray):
        table[index] = value
        return table
    return table.at[index].set(value)


def _grow(table, vocab: int, axis: int):
    """Copy of ``table`` with rows (axis 0) or columns (axis 1) appended up to ``vocab``, new entries set to
    the mean entry (a neutral start for unused ids)."""
    xp = np if isinstance(table, np.ndarray) else jnp
    extra = vocab - table.shape[axis]
    if extra <= 0:
        return table.copy()
    mean = table.mean(axis=axis, keepdims=True)
    return xp.concatenate([table, xp.repeat(mean, extra, axis=axis).astype(table.dtype)], axis=axis)


def strip_safety_tokens(text: str, cfg: CasaConfig) -> str:
    """User-visible text: the safety tokens removed (and the space they leave at the start)."""
    return text.replace(cfg.safe_token, "").replace(cfg.unsafe_token, "").lstrip()
