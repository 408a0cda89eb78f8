"""Host-side index arrays that let the jitted vision encoder handle any mix of image/video sizes.

transformers computes window order, rotary positions and attention segments from ``grid_thw`` with
data-dependent Python. We compute the same arrays once per batch in NumPy and pad them to a bucket
length, so the encoder compiles once per bucket instead of once per image size.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from casa_jax.model.encoder_config import VisionConfig

PAD_SEGMENT = -1  # padding patches attend only to each other


def slot_bucket(n: int, minimum: int = 16, steps: int = 2) -> int:
    """Smallest bucket >= n on a ladder of ``steps`` sizes per doubling of ``minimum``: with 2,
    minimum * (1, 1.5, 2, 3, 4, 6, ...), so few compilations and at most 50 % padding; with 8, at most
    12.5 % padding for 4x the shapes. Every bucket past ``minimum`` is a multiple of its doubling's
    1 / ``steps``."""
    if n <= minimum:
        return minimum
    size = minimum
    while size * 2 < n:
        size *= 2
    grain = max(1, size // steps)
    return -(-n // grain) * grain


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Index arrays for one packed batch of images/videos (all NumPy, padded to ``num_patches_padded``).

    The encoder's sequence is window-ordered and slotted: window ``w`` occupies rows
    ``[w * C, (w + 1) * C)`` with ``C = window_capacity * merge_unit`` (edge windows padded), so window
    attention runs on [slots, C] blocks. ``patch_order[i]`` is the row of ``pixel_values`` that row ``i``
    reads; ``positions`` are its (row, column) patch coordinates; full-attention blocks attend within
    equal ``frame_segment`` ids; padding rows have segment ``PAD_SEGMENT``; ``restore_order`` gathers
    merged tokens back into the processor's order.
    """

    patch_order: np.ndarray  # [N_pad] int32
    positions: np.ndarray  # [N_pad, 2] int32 (h, w)
    frame_segment: np.ndarray  # [N_pad] int32
    restore_order: np.ndarray  # [M_pad] int32, M_pad = N_pad / merge_unit
    tokens_per_item: tuple[int, ...]  # merged tokens of each image/video, in input order

    @property
    def num_patches_padded(self) -> int:
        return int(self.patch_order.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(sum(self.tokens_per_item))

    def arrays(self) -> dict[str, np.ndarray]:
        """The device inputs of ``VisionEncoder`` (everything but the Python-side counts)."""
        return dict(patch_order=self.patch_order, positions=self.positions, frame_segment=self.frame_segment,
                    restore_order=self.restore_order)


def _check_grid(grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t <= 0 or h <= 0 or w <= 0 or h % m or w % m:
            raise ValueError(f"grid_thw[{i}]={[t, h, w]}: every entry must be positive and height/width "
                             f"multiples of spatial_merge_size={m}")
    return grid


def _window_order(t: int, h: int, w: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Merged-token order that groups windows of ``window x window`` merged tokens, per frame, and the
    window sizes (empty windows dropped), as ``get_vision_window_index`` builds them."""
    index = np.arange(t * h * w).reshape(t, h, w)
    pad_h, pad_w = window - h % window, window - w % window
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    nh, nw = (h + pad_h) // window, (w + pad_w) // window
    padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
    sizes = (padded >= 0).sum(-1).reshape(-1)
    order = padded.reshape(-1)
    return order[order >= 0], sizes[sizes > 0]


def vision_layout(grid_thw: Sequence[Sequence[int]] | np.ndarray, cfg: VisionConfig,
                  min_patches: int = 64) -> VisionLayout:
    """Build the ``VisionLayout`` for images/videos with patch grids ``grid_thw`` [n, 3] (t, h, w)."""
    grid = _check_grid(grid_thw, cfg)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    window = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    merged_order, positions, frames, tokens, window_sizes = [], [], [], [], []
    merged_offset = frame_offset = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        order, sizes = _window_order(t, lh, lw, window)
        merged_order.append(order + merged_offset)
        # Patch coordinates in the processor's order: merge blocks of m x m patches are contiguous.
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hh = hh.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        hw = np.tile(np.stack([hh, ww], -1), (t, 1)).reshape(t * lh * lw, unit, 2)
        positions.append(hw[order].reshape(-1, 2))
        frame_of_token = np.repeat(np.arange(t), lh * lw)
        frames.append(np.repeat(frame_of_token[order] + frame_offset, unit))
        tokens.append(t * lh * lw)
        window_sizes.append(sizes)
        merged_offset += t * lh * lw
        frame_offset += t
    # Window slots: each window gets a fixed slot of ``capacity`` merged tokens (smaller edge windows are
    # padded), so window attention is a batched attention over [slots, capacity] blocks.
    capacity = window_capacity(cfg)
    sizes = np.concatenate(window_sizes)
    merged = np.concatenate(merged_order)
    n_tokens = merged_offset
    min_slots = max(1, -(-min_patches // (capacity * unit)))
    n_slots = slot_bucket(len(sizes), min_slots)
    slot_of_window = np.arange(len(sizes)) * capacity
    within = np.arange(n_tokens) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    slot_index = np.repeat(slot_of_window, sizes) + within  # slotted merged position of each window-ordered token
    m_pad = n_slots * capacity
    n_pad = m_pad * unit
    slotted = np.full((m_pad,), -1, np.int64)
    slotted[slot_index] = merged
    real = slotted >= 0
    patch_real = np.repeat(real, unit)
    n_patches = n_tokens * unit
    patch_order = np.where(patch_real, (np.maximum(slotted, 0)[:, None] * unit + np.arange(unit)).reshape(-1),
                           min(n_patches, n_pad - 1))
    restore = np.zeros((m_pad,), np.int64)
    restore[merged] = slot_index  # original merged index -> its slot position
    restore[n_tokens:] = np.flatnonzero(~real)[:m_pad - n_tokens]

    patch_slot = (slot_index[:, None] * unit + np.arange(unit)).reshape(-1)  # window-ordered patch -> slot row

    def scatter(parts, fill):
        a = np.concatenate(parts)
        out = np.full((n_pad,) + a.shape[1:], fill, np.int64)
        out[patch_slot] = a
        return out.astype(np.int32)

    return VisionLayout(patch_order=patch_order.astype(np.int32), positions=scatter(positions, 0),
                        frame_segment=scatter(frames, PAD_SEGMENT),
                        restore_order=restore.astype(np.int32), tokens_per_item=tuple(tokens))


def window_capacity(cfg: VisionConfig) -> int:
    """Merged tokens in one full attention window (windows are square in merged-token units)."""
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    return side * side


def pad_patches(pixel_values: np.ndarray, layout: VisionLayout, cfg: VisionConfig) -> np.ndarray:
    """[N, patch_dim] processor patches -> [N_pad, patch_dim], zero rows appended."""
    pixel_values = np.asarray(pixel_values)
    n = layout.num_tokens * cfg.merge_unit
    if pixel_values.ndim != 2 or pixel_values.shape != (n, cfg.patch_dim):
        raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}; grid_thw needs [{n}, {cfg.patch_dim}] "
                         f"(patches x in_channels*temporal_patch_size*patch_size^2)")
    out = np.zeros((layout.num_patches_padded, cfg.patch_dim), pixel_values.dtype)
    out[:n] = pixel_values
    return out
