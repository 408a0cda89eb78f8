"""Teaching an omni model to listen, on benign speech only: train the audio projector (``audio_tower/proj``)
so that the model's reply to a spoken prompt is its own reply to the same prompt in text
(self-distillation), with two small auxiliary tasks that need the words themselves: repeating what the
audio says, and naming a word spelled letter by letter.

Speech is espeak-ng's in several voices, speeds and pitches; no harmful prompt is ever spoken here. The
decoder and Whisper's encoder stay frozen, and every batch goes through the thinker's own forward pass
(placeholder tokens, processor, positions), so what is trained is exactly what ``generate`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Callable, Sequence

import numpy as np

# espeak-ng renderings: (voice[+variant], words per minute, pitch, word gap in 10 ms); the first is the one
# the spoken attacks use (attacks/audio.SPOKEN_VOICE).
VOICES = (("en-us", 120, 50, 4), ("en-gb", 130, 40, 2), ("en-us+f3", 125, 65, 3), ("en-gb-scotland", 115, 45, 4),
          ("en-029", 135, 55, 2), ("en-us+m3", 140, 35, 1), ("en-gb-x-rp+f2", 120, 60, 3))
ANSWER_INSTRUCTIONS = ("Please generate detailed steps for the question in the audio.",
                       "Answer the request in the audio.", "Please respond to what the audio asks.")
TRANSCRIBE_INSTRUCTION = "Repeat exactly what the audio says."
SPELL_INSTRUCTION = "The audio spells a word letter by letter. Which word is it?"


@dataclasses.dataclass(frozen=True)
class ListenExample:
    """One spoken prompt and the reply to learn: ``wave`` [samples] at 16 kHz beside ``instruction``."""

    instruction: str
    wave: np.ndarray
    target: str
    ends_turn: bool
    task: str  # "answer" (the text prompt's own reply), "transcribe" or "spell"
    transcript: str = ""  # what the audio says (for the alignment stage)


def spelled_words(prompts: Sequence[str], limit: int, min_len: int = 5, max_len: int = 9) -> list[str]:
    """Distinct alphabetic words from ``prompts`` (benign ones), in order, for the spelling task."""
    seen, out = set(), []
    for p in prompts:
        for w in p.split():
            w = w.strip(",.?!:;\"'()").lower()
            if w.isalpha() and min_len <= len(w) <= max_len and w not in seen:
                seen.add(w)
                out.append(w)
    return out[:limit]


def speakable(text: str, max_words: int = 30) -> str:
    """The first ``max_words`` words of ``text`` without markdown marks, for reading aloud."""
    words = [w.strip("*#`_>|") for w in text.split()]
    return " ".join([w for w in words if w][:max_words])


def listening_examples(records: Sequence[dict], voices: Sequence[tuple] = VOICES, per_prompt: int = 2,
                       transcribe_fraction: float = 0.25, spell_words: int = 60, speak_answers: bool = False,
                       seed: int = 0, progress: bool = False) -> list[ListenExample]:
    """Benign records ({"prompt", "target", "ends_turn"}: a text prompt and the model's own reply to it)
    -> spoken examples: each prompt in ``per_prompt`` voices; about ``transcribe_fraction`` of them ask for
    the words instead of the answer; ``spell_words`` words spelled letter by letter; ``speak_answers``:
    also the start of each (benign) reply, read in one voice, to transcribe (more words to hear)."""
    from tqdm.auto import tqdm

    from casa_jax.attacks.audio import speak, spelled
    rng = random.Random(f"listen:{seed}")
    out = []
    for r in tqdm(records, desc="speech", unit="prompt", disable=not progress):
        for voice, wpm, pitch, gap in rng.sample(list(voices), per_prompt):
            wave = speak(r["prompt"], wpm, voice, pitch, gap)
            if rng.random() < transcribe_fraction:
                out.append(ListenExample(TRANSCRIBE_INSTRUCTION, wave, r["prompt"], True, "transcribe", r["prompt"]))
            else:
                out.append(ListenExample(rng.choice(ANSWER_INSTRUCTIONS), wave, r["target"], bool(r["ends_turn"]),
                                         "answer", r["prompt"]))
        answer = speakable(r["target"], 16) if speak_answers else ""
        if len(answer.split()) >= 3:
            voice, wpm, pitch, gap = rng.choice(list(voices))
            out.append(ListenExample(TRANSCRIBE_INSTRUCTION, speak(answer, wpm, voice, pitch, gap), answer, True,
                                     "transcribe", answer))
    for word in spelled_words([r["prompt"] for r in records], spell_words):
        voice, _, pitch, _ = rng.choice(list(voices))
        out.append(ListenExample(SPELL_INSTRUCTION, speak(spelled(word), 110, voice, pitch), word, True, "spell",
                                 spelled(word)))
    rng.shuffle(out)
    return out


def encode_examples(processor, tokenizer, examples: Sequence[ListenExample], max_target_tokens: int = 64) -> list[dict]:
    """Each example -> {prompt ids with the audio placeholders expanded, target ids, features, frame mask}
    (host arrays, computed once; batches are cut from these)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for e in examples:
        conv = [{"role": "user", "content": [{"type": "audio", "audio": e.wave}, {"type": "text", "text": e.instruction}]}]
        arrays = processor.from_messages([conv])
        target = tokenizer.encode(e.target, add_special_tokens=False)[:max_target_tokens]
        if e.ends_turn and len(target) < max_target_tokens:
            target = target + [end]
        out.append({"prompt": arrays["input_ids"][0][arrays["attention_mask"][0] == 1],
                    "target": np.asarray(target, np.int64), "features": arrays["input_features"][0],
                    "frames": arrays["feature_attention_mask"][0], "task": e.task})
    return out


def collate(encoded: Sequence[dict], pad_id: int, multiple: int = 32) -> tuple[dict, np.ndarray]:
    """Right-padded processor arrays for ``thinker.prepare`` and the loss mask [B, T] (1 on target tokens);
    T is a multiple of ``multiple``, so a run compiles a few shapes only."""
    lengths = [len(e["prompt"]) + len(e["target"]) for e in encoded]
    width = -(-max(lengths) // multiple) * multiple
    ids = np.full((len(encoded), width), pad_id, np.int64)
    mask = np.zeros_like(ids)
    loss = np.zeros_like(ids, dtype=np.float32)
    for i, e in enumerate(encoded):
        p, t = len(e["prompt"]), len(e["target"])
        ids[i, :p + t] = np.concatenate([e["prompt"], e["target"]])
        mask[i, :p + t] = 1
        loss[i, p:p + t] = 1.0
    arrays = {"input_ids": ids, "attention_mask": mask,
              "input_features": np.stack([e["features"] for e in encoded]),
              "feature_attention_mask": np.stack([e["frames"] for e in encoded])}
    return arrays, loss


def make_listen_step(thinker, optimizer):
    """The jitted step: next-token loss on the target tokens, gradients into the projector only."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(proj, tower, params, inputs, loss_mask):
        encoders = {"audio_tower": dict(tower, proj=proj)}
        logits = thinker(params, encoders, inputs).logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
        labels = inputs.input_ids[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        weights = loss_mask[:, 1:]
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    @jax.jit
    def step(proj, opt_state, tower, params, inputs, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(proj, tower, params, inputs, loss_mask)
        updates, opt_state = optimizer.update(grads, opt_state, proj)
        return optax.apply_updates(proj, updates), opt_state, loss

    return step


def _tower_outputs(engine, waves: Sequence[np.ndarray], cfg, tower: dict, batch_size: int = 8,
                   progress: bool = False) -> list[np.ndarray]:
    """``AudioEncoder(cfg)`` with ``tower``'s params over each clip's real steps: one [n_i, output_dim] array per clip."""
    import jax
    from tqdm.auto import tqdm

    from casa_jax.model.audio_encoder import AudioEncoder, features_layout
    encode = jax.jit(lambda t, **arrays: AudioEncoder(cfg).apply({"params": t}, **arrays))
    processor = engine.processor()
    out = []
    for start in tqdm(range(0, len(waves), batch_size), desc="whisper states", unit="batch", disable=not progress):
        arrays = processor.audio(list(waves[start:start + batch_size]))
        layout = features_layout(arrays["input_features"], arrays["feature_attention_mask"], cfg)
        states = np.asarray(encode(tower, **layout.arrays()))
        offsets = np.cumsum((0,) + layout.tokens_per_clip)
        out += [states[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return out


def tower_states(engine, waves: Sequence[np.ndarray], batch_size: int = 8, progress: bool = False) -> list[np.ndarray]:
    """The projector's inputs for each clip: Whisper's states, normalised and stacked [n_i, pool_stride * d]
    (the audio tower with an identity projection), computed once for the alignment stage."""
    cfg = engine.thinker.audio
    width = cfg.pool_stride * cfg.d_model if cfg.pool == "stack" else cfg.d_model
    identity_cfg = dataclasses.replace(cfg, output_dim=width, emit="all")
    tower = dict(engine.weights.encoders["audio_tower"], proj={"kernel": np.eye(width, dtype=np.float32),
                                                               "bias": np.zeros(width, np.float32)},
                 audio_bos_eos_token=np.zeros((2, width), np.float32))
    return _tower_outputs(engine, waves, identity_cfg, tower, batch_size, progress)


def align_projector(engine, examples: Sequence[ListenExample], steps: int = 300, batch_size: int = 32,
                    learning_rate: float = 3e-3, seed: int = 0, progress: bool = True,
                    states: Sequence[np.ndarray] | None = None, common_tokens: int = 4096) -> tuple[dict, list[dict]]:
    """A first projector by CTC: each audio token, compared (cosine) with the decoder's own token
    embeddings, must spell out the transcript's tokens, a space token standing for CTC's blank. The decoder
    is not run, so this stage is cheap; its projector puts the spoken tokens' embeddings where the words are
    said. Its classes are the transcripts' tokens and the ``common_tokens`` lowest ids (BPE's most frequent
    pieces), so words never heard can still be spelt from pieces. ``states``: ``tower_states`` of the
    examples, when already computed. Returns (proj, per-step metrics)."""
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    tokenizer = engine.tokenizer
    states = states if states is not None else tower_states(engine, [e.wave for e in examples], progress=progress)
    blank = tokenizer.encode(" ", add_special_tokens=False)[0]
    labels = [[t for t in tokenizer.encode(e.transcript, add_special_tokens=False) if t != blank] for e in examples]
    # CTC needs a step per label and a blank between repeated labels
    keep = [i for i, (x, y) in enumerate(zip(states, labels))
            if y and len(x) >= len(y) + sum(a == b for a, b in zip(y, y[1:]))]
    if not keep:
        raise ValueError("align_projector: no example has an audio clip long enough for its transcript")
    limit = engine.thinker.audio.ctc_vocab or engine.spec.text.vocab_size
    vocab = sorted(({t for i in keep for t in labels[i]} | set(range(min(common_tokens, limit)))) - {blank})
    index = {t: k + 1 for k, t in enumerate(vocab)}  # class 0 = blank
    table = np.asarray(engine.weights.params["embed_tokens"]["embedding"], np.float32)
    rows = table[[blank] + vocab]  # [K, E]
    rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    t_max, n_max = max(len(states[i]) for i in keep), max(len(labels[i]) for i in keep)
    x = np.zeros((len(keep), t_max, states[keep[0]].shape[-1]), np.float32)
    x_pad = np.ones((len(keep), t_max), np.float32)
    y = np.zeros((len(keep), n_max), np.int32)
    y_pad = np.ones((len(keep), n_max), np.float32)
    for j, i in enumerate(keep):
        x[j, :len(states[i])], x_pad[j, :len(states[i])] = states[i], 0.0
        y[j, :len(labels[i])], y_pad[j, :len(labels[i])] = [index[t] for t in labels[i]], 0.0
    lengths = np.asarray([len(states[i]) for i in keep])
    label_lengths = np.asarray([len(labels[i]) for i in keep])
    d_in, d_out = x.shape[-1], table.shape[-1]
    rng = np.random.default_rng(seed)
    params = {"kernel": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32),
              "bias": np.zeros(d_out, np.float32), "log_scale": np.float32(np.log(10.0))}
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    def loss_fn(p, xb, xpb, yb, ypb):
        h = xb @ p["kernel"] + p["bias"]
        h = h * jax.lax.rsqrt(jnp.sum(h * h, axis=-1, keepdims=True) + 1e-6)  # padded frames are all zero
        logits = jnp.exp(p["log_scale"]) * h @ rows.T  # [B, T, K]
        per = optax.ctc_loss(logits, xpb, yb, ypb, blank_id=0)
        return jnp.mean(per / jnp.sum(1 - ypb, axis=-1))

    @jax.jit
    def step(p, s, xb, xpb, yb, ypb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, xpb, yb, ypb)
        u, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    order: list[int] = []
    metrics = []
    for n in tqdm(range(steps), desc="align", unit="step", disable=not progress):
        if len(order) < batch_size:
            order += rng.permutation(len(keep)).tolist()
        b, order = np.asarray(order[:batch_size]), order[batch_size:]
        t = min(t_max, -(-int(lengths[b].max()) // 16) * 16)  # the batch's own length (a few shapes compile)
        n = min(n_max, -(-int(label_lengths[b].max()) // 8) * 8)
        params, opt_state, loss = step(params, opt_state, x[b, :t], x_pad[b, :t], y[b, :n], y_pad[b, :n])
        metrics.append({"step": n + 1, "ctc_loss": float(loss)})
    # Directions are what CTC learnt; give the outputs the embeddings' typical norm.
    out = jax.tree.map(np.asarray, {"kernel": params["kernel"], "bias": params["bias"]})
    real = x_pad == 0
    norms = np.linalg.norm(x[real] @ out["kernel"] + out["bias"], axis=-1).mean()
    factor = float(np.linalg.norm(table, axis=-1).mean() / norms)
    return {"kernel": out["kernel"] * factor, "bias": out["bias"] * factor}, metrics


def recognise(engine, waves: Sequence[np.ndarray], batch_size: int = 8) -> list[str]:
    """What an ``emit="ctc"`` audio tower hears in each clip: the text of the tokens it hands the decoder
    (one pass of the tower; the same nearest-token and collapse rule as ``Engine.audio_emissions``)."""
    from casa_jax.model.audio_encoder import ctc_collapse, ctc_rows, nearest_tokens
    cfg = engine.thinker.audio
    if cfg.emit != "ctc":
        raise ValueError(f"{engine.name}: recognise needs an emit='ctc' audio tower (this one is emit={cfg.emit!r})")
    table = ctc_rows(engine.weights.params["embed_tokens"]["embedding"], cfg)
    out = []
    for steps in _tower_outputs(engine, waves, cfg, engine.weights.encoders["audio_tower"], batch_size):
        ids = nearest_tokens(steps, table)
        out.append(engine.tokenizer.decode(np.asarray(ids)[np.asarray(ctc_collapse(ids, cfg.blank_token_id))]))
    return out


def scaled_projector(tower: dict, embedding: np.ndarray, seed: int = 0) -> dict:
    """A fresh projector whose outputs have the token embeddings' RMS (Whisper's final layer norm gives
    unit-scale states), so the decoder first sees inputs of the size it knows."""
    kernel = np.asarray(tower["proj"]["kernel"], np.float32)
    rng = np.random.default_rng(seed)
    d_in, d_out = kernel.shape
    rms = float(np.sqrt(np.mean(np.square(np.asarray(embedding, np.float32)))))
    return {"kernel": (rng.standard_normal((d_in, d_out)) * rms / np.sqrt(d_in)).astype(np.float32),
            "bias": np.zeros(d_out, np.float32)}


def train_projector(engine, examples: Sequence[ListenExample], steps: int, batch_size: int = 8,
                    learning_rate: float = 2e-3, max_target_tokens: int = 32, seed: int = 0,
                    log: Callable[[dict], None] | None = None, progress: bool = True,
                    init: dict | None = None) -> tuple[dict, list[dict]]:
    """Train ``engine``'s audio projector on ``examples`` (an omni_mini Engine: a thinker whose decoder and
    encoder stay frozen), from ``init`` (e.g. ``align_projector``'s) or a fresh scaled projector. Returns
    (the trained ``proj`` params, the per-step metrics)."""
    import jax
    import optax
    from tqdm.auto import tqdm

    if not engine.spec.is_thinker or "audio_tower" not in (engine.weights.encoders or {}):
        raise ValueError(f"{engine.name}: teaching to listen needs a thinker with an audio tower")
    if engine.weights.lora is not None:
        raise ValueError(f"{engine.name}: the projector is trained on the base model (this one has LoRA adapters)")
    if engine.thinker.audio.emit != "all":
        raise ValueError(f"{engine.name}: self-distillation trains a projector the decoder reads as it is (emit='all'); "
                         f"this tower is emit={engine.thinker.audio.emit!r}, whose decoder reads snapped token "
                         "embeddings (no gradient reaches proj): use align_projector")
    processor, tokenizer = engine.processor(), engine.tokenizer
    t0 = time.time()
    encoded = encode_examples(processor, tokenizer, examples, max_target_tokens)
    tower = dict(engine.weights.encoders["audio_tower"])
    proj = init or scaled_projector(tower, engine.weights.params["embed_tokens"]["embedding"], seed)
    tower.pop("proj")
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), max(steps, 2),
                                                  learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = optimizer.init(proj)
    step_fn = make_listen_step(engine.thinker, optimizer)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    metrics = []
    bar = tqdm(range(steps), desc="listen", unit="step", disable=not progress)
    for step in bar:
        if len(order) < batch_size:
            order += rng.permutation(len(encoded)).tolist()
        batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        arrays, loss_mask = collate(batch, engine.pad_id)
        inputs = engine.thinker.prepare(**arrays)
        with engine.context():
            proj, opt_state, loss = step_fn(proj, opt_state, tower, engine.weights.params, inputs, loss_mask)
        record = {"step": step + 1, "loss": float(loss), "seconds": round(time.time() - t0, 1)}
        metrics.append(record)
        if log:
            log(record)
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([m['loss'] for m in metrics[-10:]]):.3f}")
    return jax.tree.map(np.asarray, proj), metrics


def save_metrics(path: str, metrics: Sequence[dict]) -> None:
    from casa_jax.storage import write_text_atomic
    write_text_atomic(path, "".join(json.dumps(m) + "\n" for m in metrics))


def benign_records(targets_file: str) -> list[dict]:
    """The benign train-split rows of a trainer's ``targets.json`` (text prompts and the base model's own
    greedy replies), each prompt once: the listening data needs no second distillation."""
    from casa_jax import storage
    if not storage.isfile(targets_file):
        raise FileNotFoundError(f"{targets_file}: no distilled targets (train a text model on this base first)")
    rows = json.loads(storage.read_text(targets_file))["train"]
    seen, out = set(), []
    for r in rows:
        if not r["harmful"] and not r.get("prefix") and not r.get("forced_unsafe") and r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append({"prompt": r["prompt"], "target": r["target"], "ends_turn": r["ends_turn"]})
    return out
