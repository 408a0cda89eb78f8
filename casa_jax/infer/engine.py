"""The Engine: the one way to run a model. Loaded once from a checkpoint (or built from a model in
memory), optionally placed on a mesh, and passed explicitly to generation, evaluation, judges,
calibration and serving.

It owns the weights (as one ``decode.Weights`` pytree, placed by the logical-axis rules when a mesh is
given), the tokenizer, the thinker for media prompts, and the compiled functions it has built, keyed
by what changes them (sampling strategy, gate, CASA overrides, hidden layers). There is no module-level
cache: two Engines share nothing, and dropping one frees its weights and compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax

from casa_jax.casa.config import CasaConfig
from casa_jax.infer.decode import Decoder, Weights
from casa_jax.infer.gates import CasaGate, NoGate
from casa_jax.infer.strategies import Greedy
from casa_jax.io.trained import TrainedModel, load_trained, load_tokenizer
from casa_jax.model.quantize import QUANTIZERS
from casa_jax.sharding import DEFAULT_RULES, decoder_shardings, place, replicated, rules_context

WEIGHT_FORMATS = ("float",) + tuple(QUANTIZERS)  # how the decoder layers' kernels are held (``Engine(weights=...)``)
LAYER_LOOPS = ("auto", "scan", "unrolled")  # how the decoder runs its layers (``Engine(layer_loop=...)``)


class Engine:
    """A model ready to run (see the module docstring). ``mesh``: place the decoder's params and LoRA by
    their logical axes (the rest replicated) and run every compiled function under the mesh and
    ``rules``, so activation and KV-cache constraints take effect. ``weights="int8"``: the decoder layers'
    kernels as int8 with per-channel scales (``model.quantize``; single device), a quarter of the bytes a
    CPU decode step reads; ``weights="bf16"``: the layer kernels and the LM head as bfloat16, half the
    bytes, multiplied on the CPU's bf16 units (AMX / avx512_bf16) with float32 accumulation. ``layer_loop``:
    ``"scan"`` runs the decoder layers as one scanned layer over stacked weights; ``"unrolled"`` holds each layer's weights as separate arrays (``unstack_layers``) and
    unrolls the loop, which XLA's CPU compiler reads in place instead of copying a layer's slice before
    each matrix product (SmolLM2 batch-1 decode 1.4-1.7x faster on the 2-core
    AVX-512 machines measured; compiles slower); ``"auto"``: unrolled on
    a single CPU device, the scan otherwise (a mesh keeps the stacked layout its shardings describe)."""

    def __init__(self, model: TrainedModel, tokenizer, *, mesh=None, rules=DEFAULT_RULES, name: str = "model",
                 sidecar: str | None = None, weights: str = "float", layer_loop: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = tuple(rules)
        self.name = name  # where it came from: a checkpoint directory, or a name for a model in memory
        self.sidecar = sidecar  # the checkpoint's hf_sidecar/ (processor files for media prompts)
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_FORMATS}")
        if weights != "float" and mesh is not None:
            raise ValueError(f"weights={weights!r} runs on one device; drop the mesh or use weights='float'")
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop={layer_loop!r}: expected one of {LAYER_LOOPS}")
        if layer_loop == "unrolled" and mesh is not None:
            raise ValueError("layer_loop='unrolled' runs on one device; drop the mesh or use layer_loop='scan'")
        if layer_loop == "auto":
            layer_loop = "unrolled" if mesh is None and jax.default_backend() == "cpu" else "scan"
        self.layer_loop = layer_loop
        params, quant, lora = model.params, None, model.lora
        if weights != "float":
            params, quant = jax.jit(QUANTIZERS[weights])(model.params)
        if layer_loop == "unrolled":
            from casa_jax.model.text_decoder import unstack_layers
            params, quant, lora = unstack_layers(params), unstack_layers(quant), unstack_layers(lora)
        self.weights = self._place(Weights(params=params, lora=lora, encoders=model.encoders or None,
                                           safety=model.safety, unsafe_query=model.unsafe_query, quant=quant))
        self._thinker = None
        self._processor = None
        self._decoders: dict = {}
        self._compiled: dict = {}

    @classmethod
    def load(cls, ckpt_dir: str, *, mesh=None, rules=DEFAULT_RULES, weights: str = "float",
             layer_loop: str = "auto") -> "Engine":
        """Any casa-jax checkpoint: converted (objective None) or trained by ``casa_jax.train``."""
        from casa_jax.io.orbax_io import sidecar_dir
        model = load_trained(ckpt_dir)  # first: says plainly when ckpt_dir is no checkpoint
        return cls(model, load_tokenizer(ckpt_dir), mesh=mesh, rules=rules, name=ckpt_dir,
                   sidecar=sidecar_dir(ckpt_dir), weights=weights, layer_loop=layer_loop)

    # -- what the model is ------------------------------------------------------------------------------
    @property
    def spec(self):
        return self.model.spec

    @property
    def objective(self) -> str | None:
        return self.model.objective

    @property
    def is_casa(self) -> bool:
        return self.model.is_casa

    @property
    def casa(self) -> CasaConfig | None:
        return self.model.casa

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @functools.cached_property
    def eos_ids(self) -> tuple[int, ...]:  # once per Engine: get_vocab() builds the whole vocabulary dict
        vocab = self.tokenizer.get_vocab()
        return tuple(sorted({self.tokenizer.eos_token_id,
                             *(vocab[t] for t in ("<|endoftext|>", "<|im_end|>") if t in vocab)}))

    # -- placement and context ----------------------------------------------------------------------------
    def _place(self, weights: Weights) -> Weights:
        if self.mesh is None:
            return weights
        decoder = decoder_shardings(self.spec.text, self.mesh, self.rules, self.model.lora_spec)
        rest = {k: getattr(weights, k) for k in ("encoders", "safety", "unsafe_query")}
        return Weights(params=place(weights.params, decoder["params"]),
                       lora=None if weights.lora is None else place(weights.lora, decoder["lora"]),
                       **{k: None if v is None else place(v, replicated(v, self.mesh)) for k, v in rest.items()})

    def context(self):
        """The mesh + logical-axis rules context every compiled function is traced and run under."""
        return rules_context(self.mesh, self.rules)

    # -- compiled functions, built on first use -------------------------------------------------------------
    @property
    def thinker(self):
        if self._thinker is None:
            from casa_jax.model.thinker import Thinker
            self._thinker = Thinker.from_spec(self.spec, self.model.lora_spec)
        return self._thinker

    def processor(self):
        """The ``OmniProcessor`` of a thinker checkpoint (from its sidecar files)."""
        if self._processor is None:
            from casa_jax.processing import OmniProcessor
            emitter = self.audio_emissions if self.thinker.audio.emit == "ctc" else None
            from casa_jax.storage import local_dir
            with local_dir(self.sidecar) if self.sidecar else contextlib.nullcontext() as sidecar:
                self._processor = OmniProcessor.from_pretrained(sidecar, self.thinker.vision, tokenizer=self.tokenizer,
                                                                audio=self.thinker.audio, audio_emitter=emitter)
        return self._processor

    def audio_emissions(self, input_features, feature_attention_mask) -> list:
        """Per clip, the [steps] mask of the audio steps that become tokens (``AudioConfig.emit="ctc"``): the
        audio tower run on the clips, then ``ctc_emissions`` against the decoder's embedding table."""
        import numpy as np

        from casa_jax.model.audio_encoder import AudioEncoder, ctc_emissions, ctc_rows, features_layout
        audio = self.thinker.audio
        layout = features_layout(np.asarray(input_features), np.asarray(feature_attention_mask), audio)
        if "emissions" not in self._compiled:
            def emissions(params, encoders, arrays):
                tokens = AudioEncoder(audio).apply({"params": encoders["audio_tower"]}, **arrays)
                return ctc_emissions(tokens, ctc_rows(params["embed_tokens"]["embedding"], audio), audio.blank_token_id)
            self._compiled["emissions"] = jax.jit(emissions)
        with self.context():
            emit = np.asarray(self._compiled["emissions"](self.weights.params, self.weights.encoders, layout.arrays()))
        offsets = np.cumsum((0,) + layout.tokens_per_clip)
        return [emit[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    def decoder(self, strategy=Greedy(), *, gated: bool = True, threshold: float | None = None,
                refusal_mode: str | None = None, media: bool = False,
                eos_ids: tuple[int, ...] | None = None, recheck_every: int = 0,
                recheck_threshold: float = 0.5) -> Decoder:
        """The Decoder for ``strategy``: a CASA model's runs under its safety gate (``threshold`` /
        ``refusal_mode`` override the stored ones) unless ``gated=False``; others under ``NoGate``. ``eos_ids``:
        stop tokens other than the tokenizer's end-of-text / end-of-turn ids. ``recheck_every`` > 0: the CASA
        gate re-checks the sequence during decoding (``gates.CasaGate``)."""
        gate = NoGate()
        if self.is_casa and gated:
            casa = dataclasses.replace(self.casa, **({"threshold": threshold} if threshold is not None else {}),
                                       **({"refusal_mode": refusal_mode} if refusal_mode else {}))
            gate = CasaGate(casa, self.model.ids, recheck_every=recheck_every, recheck_threshold=recheck_threshold)
        eos_ids = tuple(eos_ids) if eos_ids is not None else self.eos_ids
        key = (strategy, gate, media, eos_ids)
        if key not in self._decoders:
            self._decoders[key] = Decoder(self.spec.text, eos_ids, self.pad_id, strategy, gate,
                                          thinker=self.thinker if media else None, context=self.context,
                                          lora=self.model.lora_spec)
        return self._decoders[key]

    def hidden_states(self, layers: tuple[int, ...], *inputs, lora: bool = True, media: bool = False):
        """Hidden states after ``layers`` [L, B, T, E] for text (ids, positions, mask) or thinker (inputs)
        prompts, with or without the LoRA adapters (Circuit Breakers compare the two)."""
        key = ("hidden", layers, media)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(_hidden_states_fn(self, layers, media))
        lora_tree = self.weights.lora if lora else None
        with self.context():
            return self._compiled[key](self.weights.params, self.weights.encoders, lora_tree, self.weights.quant,
                                       *inputs)


def _hidden_states_fn(engine: Engine, layers: tuple[int, ...], media: bool):
    if media:
        thinker = engine.thinker

        def run(params, encoders, lora, quant, inputs):
            return thinker(params, encoders, inputs, hidden_layers=layers, return_logits=False, lora=lora,
                           quant=quant).hidden_states
        return run
    from casa_jax.model.layers import model_variables
    from casa_jax.model.text_decoder import CausalLM
    decoder = CausalLM(engine.spec.text, engine.model.lora_spec)

    def run(params, encoders, lora, quant, ids, positions, mask):
        del encoders
        return decoder.apply(model_variables(params, lora, quant), ids, positions, mask, hidden_layers=layers,
                             return_logits=False).hidden_states
    return run


def engine_from_parts(spec, params, tokenizer, encoders=None, name: str = "model", **kwargs: Any) -> Engine:
    """An Engine over an untrained model in memory (e.g. the base model a trainer self-distills from)."""
    return Engine(TrainedModel(spec=spec, params=params, encoders=encoders or {}, objective=None), tokenizer,
                  name=name, **kwargs)

