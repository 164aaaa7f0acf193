"""Row surgery on a transformers KV cache, for continuous batching (pure tensor ops, no model).

A continuous batch adds sequences between decode steps and drops finished ones. Rows are
left-padded, so every row's newest token sits in the last column; joining two batches
left-pads the shorter cache to the longer one's length (the padding is masked), and columns
that only padding uses are trimmed after rows leave.
"""

from __future__ import annotations

import torch


def _layers(cache) -> list:
    return list(cache.layers)


def select_rows(cache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep `rows` (1-D long) of `cache` in place; returns the mask (B, T) -> (R, T') with the
    columns no kept row uses (leading all-padding ones) trimmed from cache and mask alike."""
    mask = mask.index_select(0, rows)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, rows)[:, :, start:, :]
        layer.values = layer.values.index_select(0, rows)[:, :, start:, :]
    return mask[:, start:]


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` in place (time axes aligned on the right); returns the
    joined mask. cache/mask: (B, H, T, D) per layer / (B, T); other: (B2, H, T2, D) / (B2, T2)."""
    T, T2 = mask.shape[1], other_mask.shape[1]
    width = max(T, T2)
    for layer, extra in zip(_layers(cache), _layers(other)):
        layer.keys = torch.cat([_pad_left(layer.keys, width - T, 2), _pad_left(extra.keys, width - T2, 2)], dim=0)
        layer.values = torch.cat([_pad_left(layer.values, width - T, 2), _pad_left(extra.values, width - T2, 2)], dim=0)
    return torch.cat([_pad_left(mask, width - T, 1), _pad_left(other_mask, width - T2, 1)], dim=0)
