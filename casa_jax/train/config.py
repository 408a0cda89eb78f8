"""Default training settings (an ml_collections ConfigDict) shared by ``configs/*`` files.

Key names follow flax's examples (``num_train_steps``, ``log_every_steps``, ``eval_every_steps``).
Sequences are tuples so they can be overridden on the command line:
``--config.data.benign_sets="('benign_freshqa', 'benign_jbb')"``.
"""

from __future__ import annotations

import ml_collections

from casa_jax.casa.config import CasaConfig
from casa_jax.model.layers import LORA_TARGETS


def default_train_config(objective: str = "casa") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = objective  # casa | ssft | circuit_breaker
    c.base = "tiny"  # "tiny" (the embedded random tiny model) or a casa-jax checkpoint directory
    c.seed = 0
    c.batch_size = 16  # global batch; per_device_batch_size (if set) overrides it
    c.per_device_batch_size = ml_collections.FieldReference(None, field_type=int)
    c.grad_accum_steps = 1
    c.dtype = "float32"  # compute dtype (bfloat16 on TPU); trained params stay float32 (master weights)
    c.remat_policy = "none"  # none | full | dots | dots_with_no_batch_dims | minimal
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 3
    # Mesh (data x fsdp x tensor; one -1 takes the remaining devices) and the logical-axis rules table
    # (empty: casa_jax.sharding.DEFAULT_RULES).
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1), axes=("data", "fsdp", "tensor")))
    c.logical_axis_rules = ()
    c.num_train_steps = 200
    c.log_every_steps = 25
    c.eval_every_steps = 100
    c.loss_chunk = 128  # positions per chunk of the LM loss: fp32 logits [B, chunk, V] at a time, never [B, T, V]
    c.eval_batch_size = 16  # held-out rows per micro-batch of the eval (its metrics are the whole set's)
    c.learning_rate = 2e-3
    c.safety_learning_rate = 3e-2
    c.warmup_steps = 10
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.data = ml_collections.ConfigDict(dict(
        harmful_sets=("harmful_advbench",), benign_sets=("benign_freshqa", "benign_mtbench"),
        # num_harmful harmful + round(benign_ratio * num_harmful) benign training prompts (train split; the
        # paper's mixture is ~6.2k : 10k, ratio 1.6), heldout_per_class of each from the validation split.
        num_harmful=300, benign_ratio=1.0, heldout_per_class=40, max_chars=120, max_length=128,
        benign_target="self",  # template | self (the base model's own greedy answers: self-distillation)
        harmful_target="template",  # template (refusal_templates) | model (its own refusal under the safety prompt)
        refusal_templates=(),  # empty: (casa.refusal_template,)
        self_answer_tokens=64,
        # fraction of harmful training rows whose refusal follows an untrained compliant opening
        # (casa.data.COMPLIANT_OPENINGS): refusals that hold after an attacker's prefill
        prefill_refusals=0.0,
        # fraction of benign training rows that continue their own partial answer (the start untrained)
        prefill_answers=0.0,
        # CASA: add a copy of this fraction of the benign rows with the unsafe token forced and a refusal
        # target (no safety loss), so the decoder follows the token rather than the topic
        forced_unsafe=0.0,
        # memory: the vendored sets streamed from RAM; tfds: the casa_prompts TFDS dataset (array_record,
        # built once into tfds_data_dir, default $TFDS_DATA_DIR or ~/tensorflow_datasets) read by grain
        source="memory"))
    c.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.targets_file = ""  # where examples + targets are cached ("": <workdir>/targets.json)
    c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.0, targets=tuple(LORA_TARGETS)))
    c.casa = ml_collections.ConfigDict(CasaConfig().to_dict())
    c.casa.threshold = ml_collections.FieldReference(None, field_type=float)
    # CASA: after training, set casa.threshold to the balanced-accuracy threshold on the held-out
    # (validation) prompts (casa_jax/casa/calibration.py); False keeps argmax (or casa.threshold).
    c.calibrate_threshold = False
    c.circuit_breaker = ml_collections.ConfigDict(dict(layers=(), alpha=5.0, retain_norm="absolute"))
    return c


def tiny_train_config(objective: str = "casa") -> ml_collections.ConfigDict:
    """Settings for the embedded random tiny models (``configs/casa_tiny.py``, the demo)."""
    config = default_train_config(objective)
    # A random model has no answers worth distilling; a fixed benign target keeps the tiny runs fast
    # (--config.data.benign_target=self shows self-distillation; it is the default for real models).
    config.data.benign_target = "template"
    # The random tiny model's hidden states have norms ~0.2, so the paper's absolute L2 retain term is too
    # weak to keep benign representations; the scale-free form balances it against the cosine term.
    config.circuit_breaker.retain_norm = "relative"
    return config


def smollm2_train_config(objective: str = "casa") -> ml_collections.ConfigDict:
    """CASA / SSFT on SmolLM2-135M-Instruct sized for 2 CPU cores (``configs/casa_smollm2.py``, the demo):
    short prompts, harmful AdvBench + HarmBench + PyRIT's red-team objectives against six benign sets at
    the paper's 1.6 ratio, benign answers self-distilled from the base model; half the refusals follow
    a compliant opening and half the answers continue their own start; attention-pooled safety head,
    per-example LM loss. Chosen on the validation split (WORKSPACE.md, "SmolLM2 recipe ablation")."""
    from casa_jax.train.mixtures import PAPER_BENIGN_RATIO
    config = default_train_config(objective)
    config.base = ""  # required: a converted checkpoint (the demo converts the GGUF file itself)
    config.batch_size = 8
    config.num_train_steps = 100  # the demo's 20-minute main job trains 60 (casa_jax/demos/smollm2.py)
    config.warmup_steps = 5
    config.learning_rate = 1e-3
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 50
    # Safety-loss weight 1 (re-decided on the validation split): at 4 the safety-token CE's gradient through
    # the LoRA (norm ~20 against the LM term's ~1) took over the clipped, Adam-normalised update, and in
    # the demo's 60 steps the refusals after a prefill were not learned (pooled ASR 20.3 % vs 0.6 %).
    # The safety head's learning rate stays low enough that v_s does not saturate at 0 or 1.
    config.casa.safety_loss_weight = 1.0
    config.safety_learning_rate = 3e-3
    data = config.data
    data.harmful_sets = ("harmful_advbench", "harmful_harmbench", "harmful_pyrit_airt")
    data.benign_sets = ("benign_freshqa", "benign_mtbench", "benign_jbb", "benign_refusal_scorer",
                        "benign_rho_overrefusal", "benign_ifeval")
    # refusals that hold after an attacker's prefill, without leaking refusals into benign answers
    data.prefill_refusals = data.prefill_answers = 0.5
    config.casa.aggregation = "attention"  # learns to ignore the template tokens every prompt shares
    config.casa.lm_loss_per = "example"  # long benign answers no longer outvote the short refusals
    data.num_harmful, data.benign_ratio = 200, PAPER_BENIGN_RATIO
    data.max_chars, data.max_length = 120, 96
    data.benign_target, data.harmful_target = "self", "template"
    data.self_answer_tokens = 48
    data.heldout_per_class = 40  # the validation split: held-out metrics and the threshold calibration
    config.calibrate_threshold = True
    return config
