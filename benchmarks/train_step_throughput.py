"""Training-step throughput (tokens/s): the trainer's jitted LoRA step vs PEFT LoRA in PyTorch.

Both: the same mid-size random Qwen2 config, written as a Hugging Face checkpoint and converted through
casa-jax's importer (``hf_to_ckpt``), so both sides start from identical weights; the same batch (each row
a prompt half and an answer half); the same loss, next-token cross-entropy over the answer tokens, mean
over those tokens; backward; the same optimizer, the trainer's defaults (AdamW at ``learning_rate``
with its warmup-cosine schedule, ``weight_decay``, grad-norm clip ``grad_clip``); LoRA of the trainer's
default rank, alpha and targets, dropout 0, only the adapters trainable; fp32.

- JAX: the trainer's own step, ``casa_jax.train.trainer.load_base`` + ``build_run`` (the ``ssft`` objective's
  ``train.step.make_train_step``, sharded over the mesh, state donated), run under ``Run.context()``.
  With ``--objectives ssft,casa`` the CASA step (LoRA + safety head, safety tokens added to the base by
  ``load_base``; the safety token after the prompt, the LM loss on the answer after it) is a second row,
  compared with the same PEFT step (it has no PyTorch counterpart).
- PyTorch: transformers' ``Qwen2ForCausalLM`` (sdpa) wrapped by ``peft.get_peft_model`` with a matching
  ``LoraConfig``, ``torch.optim.AdamW`` + ``LambdaLR`` on the same schedule, ``clip_grad_norm_``.

Before timing, LoRA A is copied from the JAX adapters into PEFT's and B set to the same nonzero values on
both sides, and the first ``--check_steps`` losses (warm-up and compilation included) must agree within
``--rtol``, so both sides compute the same thing. Measured side by side in one process, rounds alternating
which side goes first; the last line is the ratio.

  pip install --no-deps peft==0.21.2 && python benchmarks/train_step_throughput.py \
      [--layers 4 --hidden 512 --batch 4 --seq 256 --rounds 5 --objectives ssft,casa]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np
import peft
import torch
import transformers

from casa_jax import tiny
from casa_jax.casa.config import CasaConfig
from casa_jax.casa.examples import TrainBatch
from casa_jax.io.convert_lib import hf_to_ckpt
from casa_jax.peft.lora import count_lora_params
from casa_jax.sharding import make_mesh, rules_context, rules_from_config
from casa_jax.train.config import default_train_config
from casa_jax.train.placement import global_batch
from casa_jax.train.step import OptimConfig, _schedule
from casa_jax.train.trainer import build_run, load_base


def make_batch(ids: np.ndarray, prompt_len: int, safety_ids=None) -> TrainBatch:
    """Rows of ``prompt_len`` prompt tokens then answer tokens, no padding; harmful / benign alternate.
    ``safety_ids`` (CASA): the row's safety token at ``prompt_len``, the answer after it."""
    rows, length = ids.shape
    ids = ids.copy()
    label = (np.arange(rows) % 2).astype(np.int32)
    start = prompt_len
    safety_index = np.full((rows,), -1, np.int32)
    if safety_ids is not None:
        ids[:, prompt_len] = np.where(label == 1, safety_ids.unsafe, safety_ids.safe)
        safety_index[:] = prompt_len
        start = prompt_len + 1
    loss_mask = np.zeros_like(ids)
    loss_mask[:, start:] = 1
    prompt_mask = np.zeros_like(ids)
    prompt_mask[:, :prompt_len] = 1
    return TrainBatch(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=loss_mask, prompt_mask=prompt_mask,
                      safety_index=safety_index, label=label, safety_weight=np.ones((rows,), np.float32))


def lora_pairs(lora: dict):
    """(torch module path suffix "group.name", a [L, *in, r], b [L, r, *out]) per adapted projection."""
    for group, modules in lora["layers"].items():
        for name, ab in modules.items():
            yield f"{group}.{name}", ab["lora_a"], ab["lora_b"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the trainer's, config.lora.rank)")
    p.add_argument("--objectives", default="ssft,casa", help="JAX rows: ssft (LoRA SFT, compared) and/or casa")
    p.add_argument("--check_steps", type=int, default=3)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0: every CPU core)")
    args = p.parse_args()
    objectives = [o for o in args.objectives.split(",") if o]
    if "ssft" not in objectives or not set(objectives) <= {"ssft", "casa"}:
        p.error("--objectives: ssft (the compared LoRA step), optionally with casa")
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)

    configs = {}
    for objective in objectives:
        c = default_train_config(objective)
        c.batch_size, c.dtype, c.remat_policy = args.batch, "float32", "none"
        if args.rank is not None:
            c.lora.rank = args.rank
        configs[objective] = c
    config = configs["ssft"]
    lora_cfg, casa_cfg = config.lora, CasaConfig.from_dict(config.casa.to_dict())
    optim = OptimConfig(learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                        total_steps=int(config.num_train_steps), weight_decay=config.weight_decay,
                        grad_clip=config.grad_clip)
    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes))
    rules = rules_from_config(config.logical_axis_rules)

    hf_cfg = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads)
    torch.manual_seed(0)
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        hf_dir, ckpt = os.path.join(d, "hf"), os.path.join(d, "ckpt")
        transformers.Qwen2ForCausalLM(hf_cfg).save_pretrained(hf_dir)
        tiny.build_tokenizer(min(512, args.vocab)).save_pretrained(hf_dir)  # CASA's load_base adds tokens to it
        hf_to_ckpt(hf_dir, ckpt)
        base_model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa",
                                                                   dtype=torch.float32)
        for objective, c in configs.items():
            c.base = ckpt
            base = load_base(c, casa_cfg, mesh, rules)
            runs[objective] = (base, build_run(c, base, casa_cfg, mesh, rules))

    # PEFT on the same base; A from the JAX adapters, B the same nonzero values on both sides
    ref = peft.get_peft_model(base_model, peft.LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=0.0, target_modules=list(lora_cfg.targets),
        bias="none", task_type="CAUSAL_LM")).train()
    rng = np.random.default_rng(1)
    lora = jax.tree.map(np.array, runs["ssft"][1].state.trainable["lora"])  # a host copy to fill B into
    for path, a, b in lora_pairs(lora):
        b[...] = rng.normal(0.0, 0.02, b.shape).astype(b.dtype)
        layers, rank = a.shape[0], a.shape[-1]
        for layer in range(layers):
            module = ref.get_submodule(f"base_model.model.model.layers.{layer}.{path}")
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(torch.from_numpy(a[layer].reshape(-1, rank).T.copy()))
                module.lora_B["default"].weight.copy_(torch.from_numpy(b[layer].reshape(rank, -1).T.copy()))
    for _, run in runs.values():
        run.state = run.state.replace(trainable=dict(run.state.trainable, lora=jax.tree.map(
            lambda old, new: jax.device_put(new, old.sharding), run.state.trainable["lora"], lora)))

    tokens_ids = np.random.default_rng(0).integers(0, min(512, args.vocab), (args.batch, args.seq)).astype(np.int32)
    prompt_len = args.seq // 2
    batches = {o: global_batch(make_batch(tokens_ids, prompt_len, base.ids if o == "casa" else None), run.mesh)
               for o, (base, run) in runs.items()}
    t_ids = torch.from_numpy(tokens_ids.astype(np.int64))
    t_labels = torch.from_numpy(np.where(make_batch(tokens_ids, prompt_len).loss_mask == 1, tokens_ids, -100)
                                .astype(np.int64))
    t_mask = torch.ones_like(t_ids)

    trainable = [q for q in ref.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    lrs = np.asarray(jax.vmap(_schedule(optim.learning_rate, optim))(np.arange(optim.total_steps + 1)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: float(lrs[min(s, len(lrs) - 1)]) / optim.learning_rate)
    key = jax.random.key(config.seed)
    states = {o: run.state for o, (_, run) in runs.items()}

    def jax_runner(objective):
        run = runs[objective][1]

        def go():
            states[objective], metrics = run.step_fn(states[objective], run.frozen, batches[objective], key)
            jax.block_until_ready((states[objective], metrics))
            return float(metrics["loss"])
        return go

    def run_torch():
        optimizer.zero_grad(set_to_none=True)
        loss = ref(input_ids=t_ids, attention_mask=t_mask, labels=t_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip)
        optimizer.step()
        scheduler.step()
        return float(loss.detach())

    fns = {"torch": run_torch, **{o: jax_runner(o) for o in runs}}
    with rules_context(mesh, rules):  # as the trainer runs its step (Run.context)
        losses = {name: [fn() for _ in range(max(1, args.check_steps))] for name, fn in fns.items()}  # + compile
        np.testing.assert_allclose(losses["ssft"], losses["torch"], rtol=args.rtol,
                                   err_msg="the JAX and PEFT LoRA steps differ: not the same computation")
        times = {name: [] for name in fns}
        for r in range(args.rounds):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for name in order:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    rate = {k: tokens / float(np.median(v)) for k, v in times.items()}
    n_torch = sum(q.numel() for q in trainable)
    n_params = {o: count_lora_params(run.state.trainable["lora"]) + (
        count_lora_params(run.state.trainable["safety"]) if "safety" in run.state.trainable else 0)
        for o, (_, run) in runs.items()}
    assert n_params["ssft"] == n_torch, (n_params["ssft"], n_torch)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"config: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq} tokens (loss on the last {args.seq - prompt_len}), fp32; LoRA rank "
          f"{lora_cfg.rank}, alpha {lora_cfg.alpha:g} on {','.join(lora_cfg.targets)}; AdamW lr {optim.learning_rate:g} "
          f"(warmup-cosine), weight decay {optim.weight_decay:g}, clip {optim.grad_clip:g}; median of {args.rounds}")
    print(f"losses of the first {len(losses['torch'])} steps: jax " + ", ".join(f"{x:.5f}" for x in losses["ssft"])
          + "; torch " + ", ".join(f"{x:.5f}" for x in losses["torch"]) + f" (agree within rtol {args.rtol:g})")
    print("| step | trainable params | tokens/s | ratio vs PEFT |")
    print("|---|---:|---:|---:|")
    print(f"| PEFT LoRA (transformers + torch AdamW) | {n_torch:,} | {rate['torch']:,.0f} | 1.00 |")
    names = {"ssft": "casa-jax LoRA SFT (trainer step, ssft)", "casa": "casa-jax CASA (LoRA + safety head)"}
    for o in runs:
        print(f"| {names[o]} | {n_params[o]:,} | {rate[o]:,.0f} | {rate[o] / rate['torch']:.2f} |")
    print("train_step_ratio_jax_over_torch " + " ".join(
        f"{'lora' if o == 'ssft' else o}={rate[o] / rate['torch']:.2f}" for o in runs))


if __name__ == "__main__":
    main()
