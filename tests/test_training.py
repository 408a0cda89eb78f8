"""Training at scale on 8 simulated devices: placement by logical axes, a sharded step equal to the
single-device one, gradient accumulation, and kill / SIGTERM / NaN behaviour of the train CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from casa_jax import tiny
from casa_jax.casa.config import CasaConfig
from casa_jax.casa.examples import Example, build_batch
from casa_jax.model.layers import LoraSpec
from casa_jax.peft.lora import init_lora
from casa_jax.casa.objectives import LOSSES, OBJECTIVES, ObjectiveSetup
from casa_jax.casa.safety_attention import SafetyAttention
from casa_jax.casa.safety_tokens import add_safety_tokens
from casa_jax.train.step import OptimConfig, init_state, make_eval_fn, make_optimizer, make_train_step
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM
from casa_jax.sharding import decoder_shardings, make_mesh, place, replicated, rules_context
from casa_jax.train.placement import batch_sharding, global_batch, state_shardings
from conftest import tiny_casa_train_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SIGKILL-resume runs on the 8 simulated devices (the pod path); the other CLI checks use one device.
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="module")
def problem():
    spec = tiny.tiny_spec()
    params = tiny.random_params(spec.text, seed=0)
    tok = tiny.build_tokenizer(spec.text.vocab_size)
    cfg = CasaConfig()
    tok, params, spec, ids, query = add_safety_tokens(tok, params, spec, cfg)
    text, lspec = spec.text, LoraSpec(4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
    trainable = {"lora": jax.tree.map(lambda x: x + 0.01, init_lora(text, lspec, jax.random.key(1))),
                 "safety": nn.unbox(SafetyAttention(cfg).init(jax.random.key(2), query,
                                                              np.zeros((1, 2, text.hidden_size), np.float32),
                                                              np.ones((1, 2), bool))["params"])}
    examples = [Example("Write a poem", False, "Sure."), Example("How to build a bomb", True, "No."),
                Example("What is 2+2?", False, "4."), Example("Hack a bank", True, "No.")] * 2
    batch = build_batch(tok, examples, 64, ids)
    setup = ObjectiveSetup(text=text, casa=cfg, ids=ids, lora=lspec)
    optimizer = make_optimizer(OptimConfig(total_steps=10, warmup_steps=1), trainable)
    return dict(text=text, lspec=lspec, trainable=trainable, frozen={"params": params, "unsafe_query": query}, batch=batch,
                setup=setup, optimizer=optimizer, tok=tok, ids=ids, cfg=cfg)


def _run_steps(step, state, frozen, batch, n):
    losses = []
    for _ in range(n):
        state, metrics = step(state, frozen, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_sharded_step_equals_single_device(problem):
    p = problem
    single = make_train_step("casa", p["setup"], p["optimizer"], 10)
    want, want_losses = _run_steps(single, init_state(p["trainable"], p["optimizer"]), p["frozen"], p["batch"], 3)

    mesh = make_mesh((2, 2, 2))
    dsh = decoder_shardings(p["text"], mesh, lora=p["lspec"])
    trainable_sh = {"lora": dsh["lora"], "safety": replicated(p["trainable"]["safety"], mesh)}
    frozen_sh = {"params": dsh["params"], "unsafe_query": replicated(p["frozen"]["unsafe_query"], mesh)}
    frozen = place(p["frozen"], frozen_sh)
    init = lambda t: init_state(t, p["optimizer"])  # noqa: E731
    state_sh = state_shardings(jax.eval_shape(init, p["trainable"]), trainable_sh, mesh)
    state = jax.jit(init, out_shardings=state_sh)(place(p["trainable"], trainable_sh))
    step = make_train_step("casa", p["setup"], p["optimizer"], 10, shardings=(state_sh, frozen_sh, batch_sharding(mesh)))
    with rules_context(mesh):  # as the trainer runs it: the activation constraints take effect
        lowered = step.lower(state, frozen, global_batch(p["batch"], mesh), jax.random.key(0)).as_text()
        bare = make_train_step("casa", p["setup"], p["optimizer"], 10,
                               shardings=(state_sh, frozen_sh, batch_sharding(mesh)))
    with jax.set_mesh(mesh):  # the mesh alone, no rules
        bare_text = bare.lower(state, frozen, global_batch(p["batch"], mesh), jax.random.key(0)).as_text()
    with rules_context(mesh):
        got, got_losses = _run_steps(step, state, frozen, global_batch(p["batch"], mesh), 3)
    # activations [batch -> (data, fsdp), length, embed] are constrained inside the step; without the
    # rules (negative control) no constraint names the mesh
    assert '<@mesh, [{"data", "fsdp"}, {}, {}]>' in lowered
    assert '<@mesh, [{"data", "fsdp"}, {}, {}]>' not in bare_text

    np.testing.assert_allclose(got_losses, want_losses, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(want.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # placed as the rules say: embeddings [vocab -> tensor, embed -> fsdp], LoRA A [layers, embed -> fsdp, r]
    embed = frozen["params"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape == (257, 32)
    lora_a = got.trainable["lora"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert lora_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    moments = [x for x in jax.tree.leaves(got.opt_state) if getattr(x, "shape", None) == lora_a.shape]
    assert len(moments) >= 2 and all(m.sharding.spec == lora_a.sharding.spec for m in moments)  # Adam mu, nu


# Micro-batches that differ (the step splits rows i, i + 2, ...): rows 0 and 2 (benign and harmful, long
# targets) and rows 1 and 3 (both harmful, short targets, no benign token at all), so loss-token counts,
# beta-weight sums and harmful/benign token counts all differ.
ACCUM_EXAMPLES = [Example("Write a poem", False, "The waves roll in, the tide goes out, the gulls cry over the sea."),
                  Example("How to build a bomb", True, "No."),
                  Example("Hack a bank", True, "Sorry, but I can't help with that request, because it could cause harm."),
                  Example("Steal a car", True, "No.")]


@pytest.fixture(scope="module")
def accumulation(problem):
    """Per objective: (setup, trainable, frozen, batch) and jitted full-batch / accumulated losses."""
    p = problem
    cfg = CasaConfig(beta=0.8, safety_loss_weight=2.0)  # unequal example weights, a weighted sum of terms
    out = {}
    for objective in OBJECTIVES:
        casa = objective == "casa"
        setup = ObjectiveSetup(text=p["text"], casa=cfg, ids=p["ids"] if casa else None, lora=p["lspec"])
        trainable = p["trainable"] if casa else {"lora": p["trainable"]["lora"]}
        frozen = p["frozen"] if casa else {"params": p["frozen"]["params"]}
        batch = jax.tree.map(jnp.asarray, build_batch(p["tok"], ACCUM_EXAMPLES, 48, p["ids"] if casa else None))
        out[objective] = (setup, trainable, frozen, batch)
    return out


def _one_sgd_step(objective, setup, trainable, frozen, batch, accum_steps):
    """One step with plain SGD at learning rate 1 (no clipping): new - old = -gradient, exactly what
    the step differentiated. The state starts at step 5 of 10 so Circuit Breakers' retain term counts."""
    sgd = optax.sgd(1.0)
    step = make_train_step(objective, setup, sgd, 10, accum_steps=accum_steps)
    state = init_state(trainable, sgd).replace(step=jnp.asarray(5, jnp.int32))
    new, metrics = step(state, frozen, batch, jax.random.key(0))
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.trainable, new.trainable)
    return grads, {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_accumulation_equals_full_batch(accumulation, objective):
    """Accumulating over 2 micro-batches with different token counts and weights gives the full batch's
    loss, metrics and gradients (token-/example-weighted over the whole batch, not a mean of micro-batch
    means). Negative control: the mean of the micro-batches' own losses differs from the full batch."""
    setup, trainable, frozen, batch = accumulation[objective]
    full_grads, full = _one_sgd_step(objective, setup, trainable, frozen, batch, 1)
    acc_grads, acc = _one_sgd_step(objective, setup, trainable, frozen, batch, 2)
    assert set(full) == set(acc)
    for k in full:
        assert acc[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7), (k, acc[k], full[k])
    for path, g in jax.tree_util.tree_leaves_with_path(full_grads):
        a = acc_grads
        for key in path:
            a = a[key.key]
        scale = float(np.abs(g).max())
        assert scale > 0, path
        np.testing.assert_allclose(a, g, atol=1e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path))

    own_mean = jax.jit(lambda h: LOSSES[objective](setup, trainable, frozen, h, None, 0.5)[0])
    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]  # the step's split: rows i, i + 2
    naive = np.mean([float(own_mean(h)) for h in halves])
    assert abs(naive - full["loss"]) > 1e-3 * abs(full["loss"]), (naive, full["loss"])


def test_lm_loss_per_example_gives_each_example_one_vote(accumulation):
    """``lm_loss_per="example"``: the LM term is the beta-weighted mean of each example's mean token NLL
    (a long answer no longer outvotes short refusals), and accumulation still reproduces the full batch.
    Negative control: the token-weighted loss differs on these unequal lengths."""
    from casa_jax.casa.objectives import _example_weights, lm_loss
    setup, trainable, frozen, batch = accumulation["ssft"]
    per_example = dataclasses.replace(setup, casa=dataclasses.replace(setup.casa, lm_loss_per="example"))
    logits = setup.decoder.apply({"params": frozen["params"], "lora": trainable["lora"]}, batch.input_ids,
                                 positions_from_mask(batch.attention_mask), batch.attention_mask).logits
    weights = _example_weights(batch, setup.casa.beta)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(batch.input_ids)[:, 1:, None], -1)[..., 0]
    mask = np.asarray(batch.loss_mask)[:, 1:]
    means = (nll * mask).sum(-1) / mask.sum(-1)
    want = float((np.asarray(weights) * means).sum() / np.asarray(weights).sum())
    variables = {"params": frozen["params"], "lora": trainable["lora"]}
    hidden = setup.decoder.apply(variables, batch.input_ids, positions_from_mask(batch.attention_mask),
                                 batch.attention_mask, return_logits=False).final_hidden
    head = lambda h: setup.decoder.apply(variables, h, method=CausalLM.head)  # noqa: E731
    for chunk in (5, 64):  # uneven chunks of the sequence (padded last one), and one chunk
        got = float(lm_loss(head, hidden, batch, weights, per="example", chunk=chunk))
        assert got == pytest.approx(want, rel=1e-5), chunk
    assert abs(float(lm_loss(head, hidden, batch, weights)) - want) > 1e-3 * want
    _, full = _one_sgd_step("ssft", per_example, trainable, frozen, batch, 1)
    _, acc = _one_sgd_step("ssft", per_example, trainable, frozen, batch, 2)
    assert acc["loss"] == pytest.approx(full["loss"], rel=1e-5) and full["loss"] == pytest.approx(want, rel=1e-5)


def test_hand_written_backward_rules_equal_autodiff():
    """The two custom VJPs of the training step, against autodiff of the plain computation: the chunked
    LM loss's gradient taken in its forward pass (``token_nll``: uneven chunks with a padded last one,
    and one chunk; with ``needed`` positions packed and the chunks without any skipped), and the LoRA up-projection's (``lora_up``, with a [r, heads, head_dim] adapter).
    Negative control: a head 1 % off is caught at the tolerance used; and a gradient through the head's
    own weights, which the fused rule does not give, raises instead of coming back wrong; NaN hidden
    states in skipped chunks stay out, and come through without ``needed``."""
    from casa_jax.casa.objectives import token_nll
    from casa_jax.model.layers import lora_up
    keys = jax.random.split(jax.random.key(0), 5)
    hidden, head_w = jax.random.normal(keys[0], (2, 9, 6)), jax.random.normal(keys[1], (11, 6))
    targets, weights = jax.random.randint(keys[2], (2, 9), 0, 11), jax.random.uniform(keys[3], (2, 9))

    def reference_nll(h, w):  # [B, T]
        logits = jnp.einsum("bte,ve->btv", h, w)
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]

    def reference(h, w):
        return jnp.sum(reference_nll(h, w) * weights)

    def fused(h, w, chunk):
        return jnp.sum(token_nll(lambda x: jnp.einsum("bte,ve->btv", x, w), h, targets, chunk) * weights)

    want = jax.grad(reference)(hidden, head_w)
    for chunk in (4, 9):
        assert float(fused(hidden, head_w, chunk)) == pytest.approx(float(reference(hidden, head_w)), rel=1e-6)
        np.testing.assert_allclose(jax.grad(fused)(hidden, head_w, chunk), want, rtol=1e-5, atol=1e-5)
    off = jax.grad(reference)(hidden, head_w * 1.01)
    assert not np.allclose(off, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(jax.errors.UnexpectedTracerError):
        jax.grad(fused, argnums=1)(hidden, head_w, 4)

    # ``needed``: rows with different counts of scattered needed positions, packed to the front
    needed = jnp.array([[0, 1, 1, 0, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    sparse = jnp.where(needed, weights, 0.0)
    want_sparse = jax.grad(lambda h: jnp.sum(jnp.where(needed, reference_nll(h, head_w), 0.0) * sparse))(hidden)

    def fused_needed(h, chunk):
        return token_nll(lambda x: jnp.einsum("bte,ve->btv", x, head_w), h, targets, chunk, needed=needed)

    for chunk in (2, 4, 9):
        got = fused_needed(hidden, chunk)
        np.testing.assert_allclose(got, jnp.where(needed, reference_nll(hidden, head_w), 0.0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(jax.grad(lambda h: jnp.sum(fused_needed(h, chunk) * sparse))(hidden), want_sparse,
                                   rtol=1e-5, atol=1e-5)
    # a chunk with no needed position never reaches the head: NaN there stays out (4 needed at most, chunk 2:
    # packed chunks 2.. are skipped); negative control: without ``needed`` the NaN comes through
    poisoned = hidden.at[1, 4:].set(jnp.nan).at[0, 6:8].set(jnp.nan)
    assert np.isfinite(np.asarray(fused_needed(poisoned, 2))).all()
    assert np.isfinite(np.asarray(jax.grad(lambda h: jnp.sum(fused_needed(h, 2) * sparse))(poisoned))).all()
    assert np.isnan(np.asarray(token_nll(lambda x: jnp.einsum("bte,ve->btv", x, head_w), poisoned, targets, 2))).any()

    down, b = jax.random.normal(keys[4], (2, 9, 3)), jax.random.normal(keys[1], (3, 4, 5))
    got = jax.grad(lambda d, b: jnp.sum(jnp.sin(lora_up(d, b))), (0, 1))(down, b)
    ref = jax.grad(lambda d, b: jnp.sum(jnp.sin(jnp.tensordot(d, b, axes=1))), (0, 1))(down, b)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[1], jax.grad(lambda b: jnp.sum(jnp.sin(jnp.tensordot(down, b * 1.01, axes=1))))(b),
                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_eval_step_applies_no_dropout(accumulation, objective):
    """With lora.dropout > 0 the eval step is the dropout-free model: its metrics equal those of the same
    weights with dropout 0 (the eval step takes no rng, so no key can change them). Negative control: the
    training loss with dropout does change with the key and differs from the dropout-free one."""
    setup, trainable, frozen, batch = accumulation[objective]
    dropped = dataclasses.replace(setup, lora=dataclasses.replace(setup.lora, dropout=0.5))
    got = jax.tree.map(float, make_eval_fn(objective, dropped)(trainable, frozen, batch))
    want = jax.tree.map(float, make_eval_fn(objective, setup)(trainable, frozen, batch))
    assert got == want
    train_loss = jax.jit(lambda key: LOSSES[objective](dropped, trainable, frozen, batch, key, 1.0)[0])
    a, b = float(train_loss(jax.random.key(0))), float(train_loss(jax.random.key(1)))
    assert a != b and abs(a - want["loss"]) > 1e-4 * abs(want["loss"]), (a, b, want["loss"])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_micro_batched_eval_equals_one_pass(accumulation, objective):
    """The held-out eval runs a few rows at a time (its logits never whole) and still gives the one-pass
    metrics, uneven last micro-batch included. Negative control: the mean of the micro-batches' own
    metrics (each normalised by itself) differs."""
    setup, trainable, frozen, batch = accumulation[objective]
    rows = batch.input_ids.shape[0]
    one_pass = jax.tree.map(float, make_eval_fn(objective, setup, micro_batch=rows)(trainable, frozen, batch))
    parts = jax.tree.map(float, make_eval_fn(objective, setup, micro_batch=rows // 2 + 1)(trainable, frozen, batch))
    assert parts == pytest.approx(one_pass, rel=1e-5)
    halves = [jax.tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, rows // 2 + 1), slice(rows // 2 + 1, None))]
    naive = np.mean([float(make_eval_fn(objective, setup, rows)(trainable, frozen, h)["loss"]) for h in halves])
    assert abs(naive - one_pass["loss"]) > 1e-4 * abs(one_pass["loss"])


_train_cmd = tiny_casa_train_cmd


WALL_CLOCK = "elapsed_s"  # seconds since the process started: the one field a resumed run cannot repeat


def _rows(workdir, drop=(WALL_CLOCK,)):
    """Every row of metrics.jsonl, every field but those in ``drop``."""
    return [{k: v for k, v in r.items() if k not in drop} for r in map(json.loads, open(workdir / "metrics.jsonl"))]


def _assert_same_metrics(resumed, straight):
    """All rows, all fields, exact, except ``elapsed_s`` (which must differ: it restarts at the resume)."""
    got, want = _rows(resumed), _rows(straight)
    assert got == want
    assert len(want) == 40 and [r["step"] for r in want] == list(range(1, 41))
    assert {"loss", "grad_norm", "lm_loss", "eval_loss", "eval_lm_loss"} <= set(want[19]), want[19]
    assert all(WALL_CLOCK in r for r in _rows(straight, drop=()))  # the excluded field is really there...
    assert _rows(resumed, drop=()) != _rows(straight, drop=())  # ...and is why the raw files differ


def _finished_steps(workdir):
    root = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if root.is_dir() else []


def test_kill_and_resume_is_bitwise_identical(straight_casa_run, tmp_path):
    """A run SIGKILLed after its step-20 checkpoint and restarted writes the same metrics.jsonl as one
    that never stopped: every row and every field exactly (losses, gradient norm, safety metrics, eval_*),
    except ``elapsed_s``, the wall clock since the process started, which is excluded by name."""
    straight = straight_casa_run
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_train_cmd(resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and not any(s >= 20 for s in _finished_steps(resumed)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_finished_steps(resumed))
    assert 20 <= killed_at < 40, killed_at
    r = subprocess.run(_train_cmd(resumed), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {killed_at}" in r.stderr
    _assert_same_metrics(resumed, straight)  # every step, every field but elapsed_s, bitwise
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(straight / "tensorboard"))
    assert json.load(open(straight / "config.json"))["num_train_steps"] == 40


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_checkpoints_then_exits(tmp_path, sig, status):
    """SIGTERM (preemption) and Ctrl-C (SIGINT) both checkpoint the current step, say what they saved and
    exit with 128 + the signal number."""
    workdir = tmp_path / "term"
    proc = subprocess.Popen(_train_cmd(workdir, "--config.num_train_steps=400"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ONE_DEVICE)
    deadline = time.time() + 240
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 13):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    last = _rows(workdir)[-1]["step"]
    assert f"{sig.name}: saved step {last} of 400" in err and last in _finished_steps(workdir)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "nan"
    r = subprocess.run(_train_cmd(workdir, "--config.learning_rate=1e30", "--config.safety_learning_rate=1e30",
                                  "--config.grad_clip=1e30", "--config.checkpoint_every_steps=1"),
                       capture_output=True, text=True, cwd=ROOT, env=ONE_DEVICE)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "the loss is nan" in r.stderr and "the last good checkpoint is step" in r.stderr.lower()
    steps = _finished_steps(workdir)
    bad = int(r.stderr.split("error: step ")[1].split(":")[0])
    assert steps and max(steps) == bad - 1


def test_tfds_grain_pipeline_resumes_exactly(tmp_path):
    """data.source=tfds: the casa_prompts TFDS dataset is built as array_record without TensorFlow, read
    by grain; a run stopped by SIGTERM and restarted gives the same metrics.jsonl as one that never
    stopped (every row and field exactly, except the wall-clock ``elapsed_s``)."""
    tfds_dir = tmp_path / "tfds"
    extra = ["--config.data.source=tfds", f"--config.data.tfds_data_dir={tfds_dir}"]
    straight = tmp_path / "straight"
    r = subprocess.run(_train_cmd(straight, *extra), capture_output=True, text=True, cwd=ROOT, env=ONE_DEVICE)
    assert r.returncode == 0, r.stderr[-3000:]
    from casa_jax.data.tfds_prompts import CasaPrompts
    built = tfds_dir / "casa_prompts" / str(CasaPrompts.VERSION)
    files = [n for n in os.listdir(built) if ".array_record" in n]
    assert files, os.listdir(built)

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(_train_cmd(stopped, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=ONE_DEVICE)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 7):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    data_state = json.load(open(next((stopped / "checkpoints" / str(max(_finished_steps(stopped))) / "data").glob("*"))))
    assert "grain" in data_state["stream"] and len(data_state["rng"]) == 2  # iterator position + RNG key
    r = subprocess.run(_train_cmd(stopped, *extra), capture_output=True, text=True, cwd=ROOT, env=ONE_DEVICE)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_metrics(stopped, straight)
    probe = subprocess.run([sys.executable, "-c", PROBE.format(str(tfds_dir))], capture_output=True, text=True,
                           cwd=ROOT)
    sizes = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else probe.stderr[-2000:]
    # Every vendored prompt once, in exactly one split, roughly 80/10/10; TensorFlow never imported.
    assert sizes["total"] == sizes["distinct_prompts"] == 2319 and not sizes["tensorflow"], sizes
    assert 0.75 < sizes["train"] / 2319 < 0.85 and 0.07 < sizes["test"] / 2319 < 0.13, sizes


PROBE = """
import json, sys
from casa_jax.data.tfds_prompts import decode, prepare
rows = {{s: [decode(r) for r in prepare({0!r}, s)] for s in ("train", "validation", "test")}}
prompts = {{" ".join(r["prompt"].lower().split()) for part in rows.values() for r in part}}
out = {{s: len(v) for s, v in rows.items()}}
out.update(total=sum(out.values()), distinct_prompts=len(prompts), tensorflow="tensorflow" in sys.modules)
print(json.dumps(out))
"""
