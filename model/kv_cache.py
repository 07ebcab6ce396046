"""A preallocated key/value cache: one buffer per layer, written in place, never concatenated."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device=None):
        shape = (batch, n_kv_heads, max_len, head_dim)  # (B, KV, S_max, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = 0  # slots [0, pos) hold keys/values
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, KV, T, hd) at [pos, pos + T) of this layer; return the filled prefix (B, KV, pos + T, hd)."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """update's write, out of place: this layer's buffers become new tensors with k, v at [pos, pos + T), the
        old ones unchanged (autograd may hold views of them: a checkpointed block's inputs)."""
        end = self.pos + k.shape[2]
        for bufs, new in ((self.k, k), (self.v, v)):
            old = bufs[layer]
            bufs[layer] = torch.cat([old[:, :, :self.pos], new.to(old.dtype), old[:, :, end:]], dim=2)

    def advance(self, T: int):
        self.pos += T

    def at(self, index: torch.Tensor) -> "KVCacheAt":
        """This cache as a static-shape forward writes it: at slot `index`, a 0-d long tensor (see KVCacheAt)."""
        return KVCacheAt(self, index)

    def repeat_interleave(self, n: int | torch.Tensor, max_len: int | None = None,
                          rows: slice = slice(None)) -> "KVCache":
        """A new cache whose row b*n + j is a copy of row b (group sampling: one prefill, n continuations), of the
        rows `rows` only (a chunk of the prompts) when given. n may be a (B,) long tensor: row b copied n[b]
        times. Differentiable: with autograd on, gradients reaching the copies flow back to this cache's rows."""
        max_len = max_len or self.max_len
        out = KVCache.__new__(KVCache)
        out.k, out.v = [], []
        for buf_k, buf_v in zip(self.k, self.v):
            buf_k, buf_v = buf_k[rows], buf_v[rows]
            _, KV, _, hd = buf_k.shape
            R = int(n.sum()) if torch.is_tensor(n) else buf_k.shape[0] * n
            nk = buf_k.new_zeros(R, KV, max_len, hd)
            nv = buf_v.new_zeros(R, KV, max_len, hd)
            nk[:, :, :self.pos] = buf_k[:, :, :self.pos].repeat_interleave(n, dim=0)
            nv[:, :, :self.pos] = buf_v[:, :, :self.pos].repeat_interleave(n, dim=0)
            out.k.append(nk)
            out.v.append(nv)
        out.pos, out.max_len = self.pos, max_len
        return out


class KVCacheAt:
    """A KVCache as one static-shape forward sees it (a decode step that torch.compile and CUDA graphs capture): the
    keys/values of its T tokens go to slots [index, index + T), with `index` a 0-d long tensor rather than the
    Python int `pos`, and attention reads every slot of the buffers (the forward's mask hides the slots not written
    yet). Shapes never change from one step to the next; `pos` is neither read nor moved."""

    def __init__(self, cache: KVCache, index: torch.Tensor):
        self.cache, self.index = cache, index

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, KV, T, hd) at [index, index + T) of this layer; return the buffers (B, KV, S_max, hd)."""
        slots = self.index + torch.arange(k.shape[2], device=k.device)  # (T,)
        buf_k, buf_v = self.cache.k[layer], self.cache.v[layer]
        buf_k.index_copy_(2, slots, k.to(buf_k.dtype))
        buf_v.index_copy_(2, slots, v.to(buf_v.dtype))
        return buf_k, buf_v

    def advance(self, T: int):
        pass
