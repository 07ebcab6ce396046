"""The linear layer of our transformer: nn.Linear with a faster decode path on the CPU."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


_ONEDNN = torch.backends.mkldnn.is_available()
_inner_product = torch.ops.mkldnn._linear_pointwise.default if _ONEDNN else None  # y = x W^T + b, oneDNN


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) with a faster path for decode steps on the CPU.

    A decode step multiplies one new token per row, x (B, 1, in), by every weight W (out, in): a few rows against
    a weight read from memory, where the time goes into reading and repacking W, not into arithmetic. In fp32
    on the CPU such a step runs oneDNN's inner product, on `packed` when `packed_weights` has put a copy of W in
    oneDNN's blocked layout (no repacking per step: all of SmolLM2-135M's products at 16 rows in 49 ms instead of
    82 ms for F.linear's MKL sgemm), on W itself otherwise. Both give the same values bitwise, and a row's result
    does not depend on how many rows share the batch (one process and two FSDP ranks sample the same tokens) once
    a lone row is run as two; they differ from F.linear by float rounding only. Training (grad enabled), prefill
    (T > 1), other dtypes, autocast, CUDA and compiled code keep F.linear.
    """

    packed: torch.Tensor | None = None  # W in oneDNN's layout, while `packed_weights` holds it

    def forward(self, x):
        if x.dim() != 3 or x.shape[1] != 1 or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        w = self.packed
        if w is None:  # no packed copy: FSDP's gathered weight, or a decode step outside the sampler
            if not _ONEDNN or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
                return F.linear(x, self.weight, self.bias)
            w = self.weight
        if x.shape[0] == 1:  # oneDNN rounds a single row differently (another kernel): run it as two rows
            return _inner_product(x.expand(2, 1, -1), w, self.bias, "none", [], "")[:1]
        return _inner_product(x, w, self.bias, "none", [], "")


@contextlib.contextmanager
def packed_weights(model: nn.Module):
    """Within the block, every fp32 CPU `Linear` of the model holds a copy of its weight in oneDNN's layout for
    its decode steps (all of them together as large as the weights: 538 MB for SmolLM2-135M, made in ~0.2 s);
    they are dropped on exit, so a training step never sees stale copies. Does nothing for sharded (FSDP)
    models, whose weights exist whole only inside their forward, for a model computing under autocast, nor
    without oneDNN."""
    from . import is_sharded

    layers = [m for m in model.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"
              and m.weight.dtype == torch.float32]
    if is_sharded(model) or not _ONEDNN or getattr(model, "autocast_dtype", None) is not None:
        layers = []
    try:
        with torch.no_grad():
            for m in layers:
                m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 16)
        yield
    finally:
        for m in layers:
            m.packed = None
