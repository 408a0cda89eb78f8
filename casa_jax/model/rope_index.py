"""Qwen2.5-Omni's 3-D (temporal, height, width) position ids for M-RoPE, in NumPy.

A port of transformers' ``Qwen2_5OmniPreTrainedModel.get_rope_index``, kept equal to it value for value
(tests/test_rope_index.py): text advances all three streams together; an image or video patch grid
gets (t, h, w) coordinates from the start index, with time in units of ``position_id_per_seconds``;
audio advances like text; with ``use_audio_in_video`` the video and audio positions are interleaved in
chunks of ``seconds_per_chunk``. Runs on the host while inputs are prepared (it is data-dependent).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ThinkerTokens:
    """The thinker's special token ids and time resolution (``thinker_config`` values)."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_token_id: int = 151646
    vision_start_token_id: int = 151652
    audio_start_token_id: int = 151647
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    spatial_merge_size: int = 2

    @classmethod
    def from_thinker_config(cls, cfg: dict) -> "ThinkerTokens":
        vision = cfg.get("vision_config") or {}
        return cls(image_token_id=cfg.get("image_token_index", cls.image_token_id),
                   video_token_id=cfg.get("video_token_index", cls.video_token_id),
                   audio_token_id=cfg.get("audio_token_index", cls.audio_token_id),
                   vision_start_token_id=cfg.get("vision_start_token_id", cls.vision_start_token_id),
                   audio_start_token_id=cfg.get("audio_start_token_id", cls.audio_start_token_id),
                   position_id_per_seconds=cfg.get("position_id_per_seconds", cls.position_id_per_seconds),
                   seconds_per_chunk=cfg.get("seconds_per_chunk", cls.seconds_per_chunk),
                   spatial_merge_size=vision.get("spatial_merge_size", cls.spatial_merge_size))


def audio_token_count(mel_frames: int) -> int:
    """Audio placeholder tokens for ``mel_frames`` log-mel frames (two stride-2 reductions)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def _run(length: int, start: int) -> np.ndarray:  # [3, length]: text-like positions
    return np.broadcast_to(np.arange(length, dtype=np.int64) + start, (3, length))


def _vision_positions(start: int, grid_thw: np.ndarray, merge: int, t_index: np.ndarray) -> np.ndarray:
    h, w = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    t = np.repeat(t_index.astype(np.int64), h * w)
    hh = np.tile(np.repeat(np.arange(h, dtype=np.int64), w), len(t_index))
    ww = np.tile(np.arange(w, dtype=np.int64), len(t_index) * h)
    return np.stack([t, hh, ww]) + start


def chunk_slices(values: np.ndarray, per_chunk: int, offset: int = 0) -> list[tuple[int, int]]:
    """(start, end) slices of increasing ``values`` that fall in successive windows of ``per_chunk``."""
    out, start, chunk = [], 0, 1
    for i, v in enumerate(values):
        if v - offset >= chunk * per_chunk:
            out.append((start, i))
            start, chunk = i, chunk + 1
    out.append((start, len(values)))
    return out


def get_rope_index(
    input_ids: np.ndarray,  # [B, T]
    attention_mask: np.ndarray | None = None,  # [B, T], 1 = real token
    image_grid_thw: np.ndarray | None = None,  # [n_images, 3]
    video_grid_thw: np.ndarray | None = None,  # [n_videos, 3]
    audio_seqlens: np.ndarray | None = None,  # [n_audios] mel frames
    second_per_grids: np.ndarray | None = None,  # [n_videos] seconds per temporal grid step
    use_audio_in_video: bool = False,
    tokens: ThinkerTokens = ThinkerTokens(),
) -> tuple[np.ndarray, np.ndarray]:
    """Positions [3, B, T] (padding gets 1) and the per-row delta [B, 1] that decoding continues from."""
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if image_grid_thw is None and video_grid_thw is None:
        # transformers takes this branch for text and for audio-only inputs alike
        positions = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1).astype(np.int64)
        positions = np.broadcast_to(positions[None], (3,) + positions.shape).copy()
        deltas = positions.max(axis=(0, 2))[:, None] + 1 - mask.sum(-1, keepdims=True)
        return positions, deltas

    tk, merge, per_sec = tokens, tokens.spatial_merge_size, tokens.position_id_per_seconds
    positions = np.ones((3,) + input_ids.shape, np.int64)
    deltas = []
    image_idx = video_idx = audio_idx = 0
    for row in range(input_ids.shape[0]):
        real = mask[row] == 1
        ids = input_ids[row][real]
        seq = ids.tolist()
        after_vision_start = ids[np.flatnonzero(ids == tk.vision_start_token_id) + 1]
        n_audio = int(np.sum(ids == tk.audio_start_token_id))
        n_image = int(np.sum(after_vision_start == tk.image_token_id))
        n_video = int(np.sum(after_vision_start == (tk.audio_start_token_id if use_audio_in_video
                                                    else tk.video_token_id)))
        parts: list[np.ndarray] = []

        def next_start() -> int:
            return int(parts[-1].max()) + 1 if parts else 0

        def find(token, remaining, st):
            return seq.index(token, st) if token in seq and remaining > 0 else len(seq) + 1

        st = 0
        remain_image, remain_video, remain_audio = n_image, n_video, n_audio
        for _ in range(n_image + n_audio if use_audio_in_video else n_image + n_video + n_audio):
            ed_image = find(tk.image_token_id, remain_image, st)
            ed_video = find(tk.video_token_id, remain_video, st)
            ed_audio = find(tk.audio_token_id, remain_audio, st)
            first = min(ed_image, ed_video, ed_audio)
            interleaved = first == ed_video and first not in (ed_audio, ed_image) and use_audio_in_video
            text_len = first - st - (2 if interleaved else 1)
            if text_len:
                parts.append(_run(text_len, next_start()))
            parts.append(_run(1, next_start()))  # <|audio_bos|> or <|vision_bos|>
            if interleaved:
                parts.append(_run(1, next_start() - 1))  # the second bos shares the position
            start = next_start()
            if first == ed_audio:
                length = audio_token_count(int(audio_seqlens[audio_idx]))
                parts.append(_run(length, start))
                audio_idx, remain_audio = audio_idx + 1, remain_audio - 1
            elif first == ed_image:
                grid = np.asarray(image_grid_thw[image_idx])
                t_index = np.arange(int(grid[0]), dtype=np.int64) * per_sec
                parts.append(_vision_positions(start, grid, merge, t_index))
                length = int(np.prod(grid)) // merge**2
                image_idx, remain_image = image_idx + 1, remain_image - 1
            else:
                grid = np.asarray(video_grid_thw[video_idx])
                seconds = np.float32(second_per_grids[video_idx])
                t_index = (np.arange(int(grid[0])).astype(np.float32) * seconds * np.float32(per_sec)).astype(np.int64)
                video_pos = _vision_positions(start, grid, merge, t_index)
                length = int(np.prod(grid)) // merge**2
                if not interleaved:
                    parts.append(video_pos)
                    video_idx, remain_video = video_idx + 1, remain_video - 1
                else:
                    audio_len = audio_token_count(int(audio_seqlens[audio_idx]))
                    audio_pos = _run(audio_len, start)
                    per_chunk = int(per_sec * tk.seconds_per_chunk)
                    v_chunks = chunk_slices(video_pos[0], per_chunk, start)
                    a_chunks = chunk_slices(audio_pos[0], per_chunk, start)
                    for j in range(max(len(v_chunks), len(a_chunks))):
                        if j < len(v_chunks):
                            parts.append(video_pos[:, v_chunks[j][0]:v_chunks[j][1]])
                        if j < len(a_chunks):
                            parts.append(audio_pos[:, a_chunks[j][0]:a_chunks[j][1]])
                    length += audio_len
                    audio_idx, video_idx = audio_idx + 1, video_idx + 1
                    remain_audio, remain_video = remain_audio - 1, remain_video - 1
            parts.append(_run(1, next_start()))  # <|audio_eos|> or <|vision_eos|>
            if interleaved:
                parts.append(_run(1, next_start() - 1))
            st += text_len + length + (4 if interleaved else 2)
        if st < len(seq):
            parts.append(_run(len(seq) - st, next_start()))
        row_positions = np.concatenate(parts, axis=1)
        positions[:, row, real] = row_positions
        deltas.append(int(row_positions.max()) + 1 - len(seq))
    return positions, np.asarray(deltas, np.int64)[:, None]
