"""Padded batches <-> the real tokens packed end to end, as varlen attention kernels take them.

A padded batch x (B, T, ...) with attention_mask (B, T) (1 for real tokens, anywhere in the row) packs into
x_unpadded (N, ...), N = number of real tokens, rows one after another; cu_seqlens (B + 1,) int32 are the offsets
of each row's tokens in it (row b: [cu_seqlens[b], cu_seqlens[b + 1])) and max_seqlen the longest row.
"""
from __future__ import annotations

import torch


def unpad_index(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """attention_mask (B, T) -> indices (N,) of the real tokens in the flattened (B * T) batch, cu_seqlens (B + 1,)
    int32, max_seqlen. Two host syncs (the count of real tokens, the longest row): once per forward, not per layer."""
    mask = attention_mask.bool()
    lens = mask.sum(-1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(mask.flatten()).flatten()  # (N,)
    cu_seqlens = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    return indices, cu_seqlens, int(lens.max()) if lens.numel() else 0


def take_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> x at the flattened (B * T) positions `indices`, (N, ...)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, indices)


def unpad(x: torch.Tensor, attention_mask: torch.Tensor):
    """x (B, T, ...), attention_mask (B, T) -> x_unpadded (N, ...), indices (N,), cu_seqlens (B + 1,), max_seqlen."""
    indices, cu_seqlens, max_seqlen = unpad_index(attention_mask)
    return take_rows(x, indices), indices, cu_seqlens, max_seqlen


def pad(x_unpadded: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of unpad: x_unpadded (N, ...) back to (batch, seqlen, ...), zeros at the padding positions.
    Differentiable in x_unpadded."""
    rest = x_unpadded.shape[1:]
    out = x_unpadded.new_zeros(batch * seqlen, *rest).index_copy(0, indices, x_unpadded)
    return out.view(batch, seqlen, *rest)
