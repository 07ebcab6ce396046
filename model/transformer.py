"""A decoder-only transformer for the Llama / Qwen2 / Qwen3 families, written out in one file.

Parameter names are exactly those of Hugging Face's *ForCausalLM classes, so checkpoints load by name.
Notation: B batch, T new tokens in this call, S key positions (cache + new), H query heads, KV key/value heads,
D hidden size, hd head dim, V vocabulary (embedding rows).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .kv_cache import KVCache, KVCacheAt
from .linear import Linear
from .varlen import pad, take_rows, unpad_index

try:  # optional fused kernels on CUDA; SDPA everywhere else
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_func = flash_attn_varlen_func = None


def varlen_kernel(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """flash_attn_varlen_func where it runs (flash-attn importable, CUDA, fp16 / bf16 compute), else None (SDPA)."""
    if flash_attn_varlen_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return flash_attn_varlen_func
    return None


class Varlen(NamedTuple):
    """A padded batch's real tokens for a varlen kernel (see model/varlen.py); the T queries are the last T of the
    S key slots, so a row's real queries are its last real keys."""
    kernel: Callable  # flash_attn_varlen_func's signature
    q_index: torch.Tensor  # (Nq,) real queries in the flattened (B * T)
    k_index: torch.Tensor  # (Nk,) real keys in the flattened (B * S)
    cu_q: torch.Tensor  # (B + 1,) int32
    cu_k: torch.Tensor  # (B + 1,) int32
    max_q: int
    max_k: int


def varlen_mask(kernel: Callable, attention_mask: torch.Tensor, T: int) -> Varlen:
    """attention_mask (B, S) over every key slot, the queries its last T -> the Varlen of that batch."""
    k_index, cu_k, max_k = unpad_index(attention_mask)
    if attention_mask.shape[1] == T:  # no cache before these tokens: queries and keys are the same tokens
        return Varlen(kernel, k_index, k_index, cu_k, cu_k, max_k, max_k)
    q_index, cu_q, max_q = unpad_index(attention_mask[:, -T:])
    return Varlen(kernel, q_index, k_index, cu_q, cu_k, max_q, max_k)


def varlen_attention(q, k, v, vl: Varlen):
    """q (B, H, T, hd), k, v (B, KV, S, hd) -> (B, T, H * hd): the varlen kernel on the real tokens only, causal
    (flash-attn aligns it bottom-right: query i of a row of Lq real queries over Lk real keys sees keys up to
    Lk - Lq + i, its own slot), grouped-query heads as they are; zeros at padding positions."""
    B, _, T, _ = q.shape
    dtype = v.dtype  # under autocast q and k leave RoPE in fp32 while v is in the compute dtype; SDPA casts alike
    qu = take_rows(q.transpose(1, 2), vl.q_index).to(dtype)  # (Nq, H, hd)
    ku = take_rows(k.transpose(1, 2), vl.k_index).to(dtype)  # (Nk, KV, hd)
    vu = take_rows(v.transpose(1, 2), vl.k_index)
    y = vl.kernel(qu, ku, vu, vl.cu_q, vl.cu_k, vl.max_q, vl.max_k, causal=True)  # (Nq, H, hd)
    return pad(y, vl.q_index, B, T).reshape(B, T, -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as the reference implementation does)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, with Llama 3 / linear scaling when configured. (hd/2,)"""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / float(sc["factor"])
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between
    factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    medium = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return torch.where(medium, blended, out)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with RoPE. On CUDA in fp16 / bf16 with flash-attn installed, a padded prefill or
    training forward runs flash-attn's varlen kernel on the real tokens (no (B, 1, T, S) mask) and an unpadded one
    flash_attn_func; everything else runs SDPA.

    Decode steps with a cache stay on SDPA with a (B, 1, 1, S) mask. flash_attn_with_kvcache wants each row's keys
    in one run of slots ([cache_leftpad, cache_seqlens), in a (B, S_max, KV, hd) buffer), while the rows here share
    one write pointer in a (B, KV, S_max, hd) buffer and may have padding slots wherever the caller's mask says
    (left-padded prompts; the recommender's prefix, padding, suffix): a mask of that one-run form cannot be told
    from another without a host sync per step, which the sampler's decode loop is written to avoid."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = Linear(D, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.hd, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, S, hd), views into the preallocated buffers
        if isinstance(mask, Varlen):
            y = varlen_attention(q, k, v, mask)
        elif flash_attn_func is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) \
                and isinstance(mask, str):
            # flash-attn aligns the causal mask bottom-right, right for a prefill or a decode step alike
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=mask == "causal")
            y = y.reshape(B, T, -1)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask if torch.is_tensor(mask) else None,
                is_causal=mask == "causal", enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, hd)
            y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(D, F_, bias=cfg.mlp_bias)
        self.up_proj = Linear(D, F_, bias=cfg.mlp_bias)
        self.down_proj = Linear(F_, D, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class _PastKV:
    """The keys/values (B, KV, S0, hd) before a forward's tokens, as a cache that writes nothing: update returns
    them followed by the new ones and keeps the new ones in `new`. A checkpointed block runs on it, so that its
    recomputation in the backward sees the same keys and changes no buffer."""

    def __init__(self, k, v):
        self.k, self.v, self.new = k, v, None

    def update(self, layer: int, k, v):
        self.new = k, v
        return torch.cat([self.k, k.to(self.k.dtype)], dim=2), torch.cat([self.v, v.to(self.v.dtype)], dim=2)


def _block_on_past(block, x, cos, sin, mask, past_k, past_v):
    """One block over T new tokens after the cached keys/values past_k, past_v: -> x, and the tokens' k, v
    (B, KV, T, hd)."""
    past = _PastKV(past_k, past_v)
    x = block(x, cos, sin, mask, past, 0)
    return x, *past.new


class Decoder(nn.Module):
    """Holds the HF `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        # fp32 master weights computing in bf16 without FSDP: forward runs under torch.autocast(this dtype), so
        # the matmuls (and the lm_head's logits) are bf16 while norms, RoPE and the residual stream stay fp32.
        # None: compute in the weights' dtype (or FSDP's param_dtype).
        self.autocast_dtype: torch.dtype | None = None
        self.frozen_layers = 0  # the first this many blocks run under torch.no_grad() (see model/freeze.py)

    # ---- construction helpers -------------------------------------------------------------------------------
    def reset_rope(self):
        """Recompute the RoPE buffer (after building on the meta device)."""
        device = self.model.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init for models trained from scratch (tests, toys); pretrained weights come from the loader."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def compute_dtype(self) -> torch.dtype:
        """The dtype forward computes in (matmul outputs, keys, values): `autocast_dtype` when set, else the
        param_dtype of an FSDP mixed-precision policy on this module, else the weights' own. Under FSDP the
        weights seen outside forward are the fp32 sharded masters; forward multiplies by their gathered copies
        in param_dtype."""
        if self.autocast_dtype is not None:
            return self.autocast_dtype
        fsdp_state = self._get_fsdp_state() if hasattr(self, "_get_fsdp_state") else None  # set by fully_shard
        param_dtype = getattr(getattr(fsdp_state, "_mp_policy", None), "param_dtype", None)
        return param_dtype or self.model.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` positions, in the dtype forward writes into it."""
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len, self.compute_dtype(),
                       self.model.embed_tokens.weight.device)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids=None, attention_mask=None, kv_cache: KVCache | None = None,
                num_logits_to_keep: int = 0, return_hidden: bool = False, head=None,
                cache_index: torch.Tensor | None = None):
        """input_ids (B, T) -> logits (B, T, V) (or the last `num_logits_to_keep` positions).

        attention_mask: (B, S) with 1 for real tokens and 0 for padding over ALL key positions, i.e. the cache
            contents followed by these T tokens (S = kv_cache.pos + T), as in Hugging Face.
        position_ids: (B, T); by default cumsum(attention_mask) - 1 (right for left padding), else past + arange(T).
        kv_cache: keys/values of these tokens are written at kv_cache.pos and the cache advances by T.
        return_hidden: return the final normalised hidden states (B, T, D) instead of logits.
        head: a function (hidden (B, T', D), lm_head) -> anything, returned in place of lm_head(hidden); it runs
            inside forward's autocast and, under FSDP, while the root's parameters (the lm_head) are gathered.
            For log-probs a chunk of positions at a time, without the whole logit block (rl/logprobs.py).
        cache_index: a 0-d long tensor: the static-shape form of a cached forward, for a decode step that
            torch.compile and CUDA graphs capture (model/sampler.py's decode_step). The keys/values of these T
            tokens go to slots [cache_index, cache_index + T) and attention reads all kv_cache.max_len slots;
            attention_mask is then (B, max_len) over every slot (the slots after the new tokens are hidden whatever
            it says); position_ids default to cumsum(attention_mask) - 1 at the new slots (cache_index + arange(T)
            without a mask); kv_cache.pos is neither read nor moved. No host sync, no branch on a tensor's values.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        static = cache_index is not None
        if static and kv_cache is None:
            raise ValueError("cache_index needs a kv_cache")
        past = 0 if kv_cache is None or static else kv_cache.pos
        S = kv_cache.max_len if static else past + T  # key slots
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev, torch.bool)
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        if position_ids is None:
            if static:
                slots = cache_index + torch.arange(T, device=dev)  # (T,)
                position_ids = slots.expand(B, T) if attention_mask is None else \
                    (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, slots)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=dev).expand(B, T)

        with self._autocast(dev):
            if static:
                mask, cache = self._static_mask(attention_mask, cache_index, T, S, dev), kv_cache.at(cache_index)
            else:
                kernel = None
                if attention_mask is not None and T > 1:  # a padded prefill or training forward: varlen if it runs
                    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else \
                        self.compute_dtype()
                    kernel = varlen_kernel(dev, dtype)
                mask, cache = self._attention_mask(attention_mask, past, T, dev, kernel), kv_cache
            x = self._layers(input_ids, position_ids, mask, cache, num_logits_to_keep)  # (B, T', D)
            if head is not None:
                return head(x, self.lm_head)
            return x if return_hidden else self.lm_head(x)

    def hidden_states(self, input_ids, attention_mask=None):
        """input_ids (B, T) -> the final normalised hidden states (B, T, D): the trunk of `forward` without the
        lm_head (embeddings, blocks, final norm), with gradients when autograd is on. attention_mask (B, T), 1 for
        real tokens, may pad on either side; positions are cumsum(mask) - 1, as in forward. For embeddings
        (eval/retrieval.py) rather than next-token logits: lm_head(hidden_states(x)) == forward(x)."""
        return self(input_ids, attention_mask=attention_mask, return_hidden=True)  # through __call__: FSDP hooks

    def _autocast(self, dev):
        """torch.autocast in `autocast_dtype` when set; else nothing (a caller's own autocast stays in force)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=self.autocast_dtype)

    def _layers(self, input_ids, position_ids, mask, kv_cache: KVCache | KVCacheAt | None, num_logits_to_keep: int):
        """Embeddings, blocks and the final norm: (B, T) ids -> (B, T', D) hidden states, T' = num_logits_to_keep
        or T."""
        T = input_ids.shape[1]
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, hd/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        for i, block in enumerate(self.model.layers):
            if i < self.frozen_layers:  # frozen bottom: no graph, no activations kept for a backward
                with torch.no_grad():
                    x = block(x, cos, sin, mask, kv_cache, i)
            elif self.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            elif self.gradient_checkpointing and self.training and isinstance(kv_cache, KVCache):
                # a cached training forward (rl/rollout.py's shared prompts): the block reads the keys/values before
                # these tokens as inputs and returns its own, put in the cache outside the recomputed part
                pos = kv_cache.pos
                x, k, v = checkpoint(_block_on_past, block, x, cos, sin, mask, kv_cache.k[i][:, :, :pos],
                                     kv_cache.v[i][:, :, :pos], use_reentrant=False)
                kv_cache.put(i, k, v)
            else:
                x = block(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        return self.model.norm(x)

    @staticmethod
    def _static_mask(attention_mask, index: torch.Tensor, T: int, S: int, dev):
        """The bool (B or 1, 1, T, S) mask of a static-shape forward: the query at slot index + i sees the slots up
        to its own that attention_mask (B, S) allows, and always itself. No Python branch on index's value."""
        k_slot = torch.arange(S, device=dev)[None, :]  # (1, S)
        q_slot = (index + torch.arange(T, device=dev))[:, None]  # (T, 1)
        allowed = k_slot <= q_slot  # (T, S)
        if attention_mask is not None:
            allowed = allowed[None] & attention_mask[:, None, :]  # (B, T, S)
        allowed = allowed | (k_slot == q_slot)
        return allowed[:, None] if allowed.dim() == 3 else allowed[None, None]

    @staticmethod
    def _attention_mask(attention_mask, past: int, T: int, dev, kernel: Callable | None = None):
        """'causal' (let the kernel build it), None (a single query sees every key), a Varlen (padded tokens and a
        varlen kernel) or a bool (B, 1, T, S) mask."""
        if T == 1 and attention_mask is not None and past > 0:
            # a decode step with a mask (the sampler passes one only when prompts were padded): no host sync on
            # .all(), which would also break a torch.compile graph; the new token (the last key, S - 1) always
            # sees itself. Indexed from the end, not with `past`: an index from a Python int would make
            # torch.compile specialise on the mask's length and recompile at every step
            mask = attention_mask.clone()
            mask[:, -1] = True
            return mask[:, None, None, :]  # (B, 1, 1, S)
        if attention_mask is None or bool(attention_mask.all()):
            if past == 0:
                return "causal" if T > 1 else None
            if T == 1:
                return None
        if kernel is not None and attention_mask is not None and T > 1:
            return varlen_mask(kernel, attention_mask, T)
        S = past + T
        q_pos = torch.arange(past, S, device=dev)[:, None]  # (T, 1) absolute query positions
        k_pos = torch.arange(S, device=dev)[None, :]  # (1, S)
        allowed = k_pos <= q_pos  # (T, S) causal
        if attention_mask is not None:
            allowed = allowed[None] & attention_mask[:, None, :]  # (B, T, S)
        # a padding query would see no key at all and SDPA would return NaN: let it see itself
        allowed = allowed | (k_pos == q_pos)
        return allowed.expand(attention_mask.shape[0] if attention_mask is not None else 1, T, S)[:, None]
