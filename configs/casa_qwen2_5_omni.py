"""The real recipe: CASA (or a baseline) with LoRA on a converted Qwen2.5-Omni 3B/7B thinker, on a TPU slice.

  python -m casa_jax.convert --hf_dir=/models/Qwen2.5-Omni-7B --out_dir=/ckpt/omni7b
  python -m casa_jax.train --config=configs/casa_qwen2_5_omni.py:casa --config.base=/ckpt/omni7b \
      --workdir=/work/casa7b --jax_distributed        # (launch/tpu.py runs this on every worker)

Text-only training, as in the paper: every vendored harmful set against every benign set in the paper's
proportion (about 1.6 benign per harmful), benign answers self-distilled from the base model, refusals
from the model itself under the safety prompt where it refuses (the template otherwise).
"""

from casa_jax.train.mixtures import PAPER_BENIGN_RATIO
from casa_jax.train.config import default_train_config
from casa_jax.data.prompts_io import BENIGN, HARMFUL


def get_config(objective: str = "casa"):
    config = default_train_config(objective or "casa")
    config.base = ""  # required: --config.base=<converted checkpoint>
    config.dtype = "bfloat16"
    config.remat_policy = "dots_with_no_batch_dims"
    config.per_device_batch_size = 4
    config.num_train_steps = 2000
    config.warmup_steps = 100
    config.learning_rate = 1e-4
    config.safety_learning_rate = 1e-3
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 200
    config.lora.rank, config.lora.alpha = 16, 32.0
    data = config.data
    data.harmful_sets, data.benign_sets = HARMFUL, BENIGN
    # The vendored benign sets hold ~610 train-split prompts, so 375 harmful x 1.6; add a large benign JSONL
    # (the paper: 10k Alpaca) with --config.data.benign_sets="('benign_freshqa', '/data/alpaca.jsonl')".
    data.num_harmful = 375
    data.benign_ratio = PAPER_BENIGN_RATIO
    data.heldout_per_class = 40
    data.max_chars, data.max_length = 1000, 768
    data.benign_target, data.harmful_target = "self", "model"
    data.self_answer_tokens = 256
    data.source = "tfds"
    return config
