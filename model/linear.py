"""The linear layer of our transformer: nn.Linear with a faster decode path on the CPU."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) with a faster path for decode steps on the CPU.

    A decode step multiplies one new token per row, x (B, 1, in), by every weight W (out, in). MKL's sgemm runs
    y^T = W @ x^T (a tall, thin product) 1.2-2x faster than y = x @ W^T for B <= 128 on our 2-core machine (the
    lm_head of SmolLM2 at B = 16: 16 ms against 23 ms; bench/bench_sampler.py). The two differ only in float
    rounding. MKL picks another kernel below 16 columns, which rounds differently, so fewer rows are padded to
    16: a row's result then never depends on how many rows share the batch (one process and two FSDP ranks
    sample the same tokens). Training (grad enabled), prefill (T > 1) and CUDA keep F.linear.
    """

    MIN_COLS = 16
    CHUNK_ROWS = 2048  # a weight with more than 2 x this many rows (the lm_head) is multiplied a chunk at a time

    def forward(self, x):
        if x.is_cuda or torch.is_grad_enabled() or x.dim() != 3 or x.shape[1] != 1:
            return F.linear(x, self.weight, self.bias)
        B = x.shape[0]
        rows = x.reshape(B, -1)  # (B, in)
        if B < self.MIN_COLS:
            rows = torch.cat([rows, rows.new_zeros(self.MIN_COLS - B, rows.shape[1])])
        W, c = self.weight, self.CHUNK_ROWS
        if W.shape[0] > 2 * c:
            # SmolLM2's lm_head (49152 x 576) in chunks of 2048 rows: 11.4 instead of 13.7 ms at 16 rows, bitwise
            # the same result (only MKL's work split changes). The last chunk takes the remainder (c to 2c - 1
            # rows): MKL rounds a product of a few rows differently
            cuts = list(range(0, W.shape[0] - c + 1, c)) + [W.shape[0]]
            yt = torch.cat([torch.mm(W[a:b], rows.t()) for a, b in zip(cuts, cuts[1:])])  # (out, cols)
        else:
            yt = torch.mm(W, rows.t())
        y = yt.t()[:B].contiguous()  # (B, out), row-major for what follows
        if self.bias is not None:
            y = y + self.bias
        return y.unsqueeze(1)  # (B, 1, out)
