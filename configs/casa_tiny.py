"""Train the embedded tiny model with one objective: ``--config=configs/casa_tiny.py:casa`` (or ``ssft``,
``circuit_breaker``). Text-only, LoRA on every decoder projection, a few hundred steps on 2 CPU cores."""

from casa_jax.train.config import tiny_train_config


def get_config(objective: str = "casa"):
    return tiny_train_config(objective or "casa")
