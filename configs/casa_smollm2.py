"""CASA (or SSFT, Circuit Breakers) on SmolLM2-135M-Instruct, sized for 2 CPU cores (the README's main job).

  python -m casa_jax.convert --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out_dir=workdir/smollm2/base
  python -m casa_jax.train --config=configs/casa_smollm2.py:casa --config.base=workdir/smollm2/base \
      --workdir=workdir/smollm2/casa
"""

from casa_jax.train.config import smollm2_train_config


def get_config(objective: str = "casa"):
    return smollm2_train_config(objective or "casa")
