"""Train the embedded tiny model with one objective: ``--config=configs/casa_tiny.py:casa`` (or ``ssft``,
``circuit_breaker``). Text-only, LoRA on every decoder projection, a few hundred steps on 2 CPU cores."""

from casa_jax.casa.train_config import default_train_config


def get_config(objective: str = "casa"):
    config = default_train_config(objective or "casa")
    # A random model has no answers worth distilling; a fixed benign target keeps the tiny runs fast.
    # (--config.data.benign_target=self shows self-distillation; it is the default for real models.)
    config.data.benign_target = "template"
    # The random tiny model's hidden states have norms ~0.2, so the paper's absolute L2 retain term is too
    # weak to keep benign representations; the scale-free form balances it against the cosine term.
    config.circuit_breaker.retain_norm = "relative"
    return config
