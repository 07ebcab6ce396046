"""Per-token log-probabilities and entropies of logits, in float32.

Pure functions of tensors. Conventions used across rl/: B = batch (sequences), T = sequence positions,
V = vocabulary; a "mask" is a (B, T) float tensor of 0s and 1s, 1 where a token counts in the loss (built by
position in rl/rollout.make_batch). The causal-LM off-by-one is handled once, in rl/rollout.completion_logprobs:
the logits at position t are the model's distribution over the token at t + 1.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0.0):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32, making at most one copy of the (b, T, V) block."""
    z = logits.float()  # a copy unless logits already are fp32
    if temperature == 1.0:
        return z
    if z is logits:
        return z / temperature  # never scale the caller's tensor in place
    return z.div_(temperature)  # z is our own copy: scale it in place (autograd-safe: ToCopy keeps no output)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """log p(tokens) under softmax(logits / temperature), in float32.

    logits: (B, T, V) any float dtype; tokens: (B, T) int64 already aligned with the logits (the token each
    position's logits predict, see rl/rollout.completion_logprobs). Returns (B, T) float32.

    Computed as gather(z, token) - logsumexp(z) with z = logits / temperature, so no (B, T, V) log_softmax
    is materialised beyond the fp32 copy logsumexp needs. chunk_size rows are processed at a time (all rows by
    default); under torch.no_grad() a small chunk bounds the fp32 copy to (chunk_size, T, V).
    The ratio of PPO/GRPO must use the sampling temperature here (logits / T), else old and new log-probs
    are taken under different distributions.
    """
    _check_temperature(temperature)
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, T, V) and tokens (B, T) must agree, got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    B = logits.shape[0]
    step = B if chunk_size is None else max(1, int(chunk_size))
    out = []
    for s in range(0, B, step):
        z = _scaled_fp32(logits[s : s + step], temperature)  # (b, T, V) fp32
        picked = z.gather(-1, tokens[s : s + step].long().unsqueeze(-1)).squeeze(-1)  # (b, T)
        out.append(picked - torch.logsumexp(z, dim=-1))  # (b, T)
    return torch.cat(out, dim=0) if len(out) > 1 else out[0]  # (B, T)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position, in nats, float32. (B, T, V) -> (B, T).

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, with z = logits / temperature.
    """
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got {tuple(logits.shape)}")
    B = logits.shape[0]
    step = B if chunk_size is None else max(1, int(chunk_size))
    out = []
    for s in range(0, B, step):
        z = _scaled_fp32(logits[s : s + step], temperature)  # (b, T, V)
        lse = torch.logsumexp(z, dim=-1)  # (b, T)
        p = torch.softmax(z, dim=-1)  # (b, T, V)
        out.append(lse - (p * z).sum(-1))  # (b, T)
    return torch.cat(out, dim=0) if len(out) > 1 else out[0]


def head_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                  temperature: float = 1.0, vocab_limit: int | None = None, chunk_tokens: int = 1024,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tokens) (B, T) fp32 from hidden states (B, T, D) through the output layer `head` (x -> logits), and
    optionally the entropy (B, T) fp32 (no gradient), `chunk_tokens` positions at a time (0: all at once).

    Never more than one chunk's logits (chunk, V), their fp32 copy and the softmax's temporaries exist: with
    autograd, each chunk runs under activation checkpointing (torch.utils.checkpoint), which keeps only the chunk's
    hidden states and recomputes its logits in the backward, one chunk at a time, at the price of one more head
    product per token. The values equal token_logprobs(head(hidden)) up to the rounding of the head's product on
    fewer rows; the gradients are the same sums taken chunk by chunk. vocab_limit: the softmax runs over the
    first vocab_limit logits only (see rl/rollout.completion_logprobs).
    """
    B, T, D = hidden.shape
    flat_h, flat_tok = hidden.reshape(B * T, D), tokens.reshape(B * T)
    step = min(chunk_tokens or B * T, B * T) or 1

    def chunk(h: torch.Tensor, tok: torch.Tensor):
        logits = head(h)[:, :vocab_limit]  # (c, V)
        logp = token_logprobs(logits[None], tok[None], temperature)[0]  # (c,)
        if not with_entropy:
            return logp, None
        with torch.no_grad():
            return logp, token_entropy(logits.detach()[None], temperature)[0]

    # one chunk keeps its logits for the backward as any forward does; several recompute theirs
    recompute = torch.is_grad_enabled() and step < B * T
    parts = [checkpoint(chunk, flat_h[s:s + step], flat_tok[s:s + step], use_reentrant=False) if recompute
             else chunk(flat_h[s:s + step], flat_tok[s:s + step]) for s in range(0, B * T, step)]
    logp = torch.cat([lp for lp, _ in parts]).view(B, T)
    ent = torch.cat([e for _, e in parts]).view(B, T) if with_entropy else None
    return logp, ent
