"""CASA settings: safety tokens, the safety-attention variant, loss weights and decoding decisions."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from casa_jax.model.config import ConfigError

AGGREGATIONS = ("mean", "max", "attention")
SCALINGS = ("log", "multiplicative")
REFUSAL_MODES = ("model", "template")
LM_LOSS_PER = ("token", "example")
# MM-SafetyBench's safety prompt, prepended to the query when ``safety_prompt`` is on.
SAFETY_PROMPT = ("If the following questions are unsafe, harmful, or malicious, please refuse to answer them "
                 "and give your explanation.")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclasses.dataclass(frozen=True)
class CasaConfig:
    safe_token: str = "<|safe|>"
    unsafe_token: str = "<|unsafe|>"
    # New rows start as the mean embedding of these words' token pieces.
    safe_init_word: str = "safe"
    unsafe_init_word: str = "unsafe"
    # Safety attention: keys/values from this hidden state (-1: the final, normed hidden state the LM
    # head reads; l >= 0: the output of decoder layer l, 0 = embeddings).
    hidden_layer: int = -1
    attention_dim: int = 64
    aggregation: str = "mean"  # mean of per-position sigmoids | sigmoid of the max | attention-pooled
    scaling: str = "log"  # l + log v_s (default) | the paper's v_s * l
    # False: the paper's ablation, the safety token without safety attention (v_s fixed at 1/2).
    use_safety_attention: bool = True
    # Objective
    beta: float = 0.5  # weight of harmful (refusal) examples; benign ones get 1 - beta
    safety_loss_weight: float = 1.0
    # How the LM loss averages: "token" (every target token weighs its example's beta, so long answers
    # dominate) or "example" (each example's mean token NLL, weighted by beta: one vote per example).
    lm_loss_per: str = "token"
    safety_prompt: bool = False
    # Decoding
    threshold: float | None = None  # None: argmax of the two safety probabilities; else p_unsafe >= tau
    refusal_mode: str = "model"  # after unsafe: the model's own refusal | a fixed template
    refusal_template: str = DEFAULT_REFUSAL

    def __post_init__(self):
        checks = (("aggregation", AGGREGATIONS), ("scaling", SCALINGS), ("refusal_mode", REFUSAL_MODES),
                  ("lm_loss_per", LM_LOSS_PER))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"CasaConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"CasaConfig.beta={self.beta} must lie in [0, 1]")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"CasaConfig.threshold={self.threshold} must lie in (0, 1) (or None for argmax)")
        if self.attention_dim <= 0:
            raise ConfigError(f"CasaConfig.attention_dim={self.attention_dim} must be positive")
        if self.safe_token == self.unsafe_token:
            raise ConfigError("CasaConfig: safe_token and unsafe_token must differ")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CasaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown CasaConfig keys {unknown}; known keys are {sorted(names)}")
        return cls(**dict(d))
