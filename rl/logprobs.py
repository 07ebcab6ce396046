"""Per-token log-probabilities, entropies and the masks that say which tokens are trained.

Everything here is a pure function of tensors. Conventions used across rl/:
  B = batch (sequences), T = sequence positions, V = vocabulary.
  A "mask" is a (B, T) float tensor of 0s and 1s: 1 where a token counts in the loss.

The causal-LM off-by-one, once and for all: the logits at position t are the model's distribution over the
token at position t + 1. So for a full sequence `input_ids` (B, T) run through the model, the log-prob of
token t + 1 is read from logits[:, t]; `shift_for_causal_lm` returns the (B, T - 1) targets and mask that
line up with logits[:, :-1].
"""

from __future__ import annotations

import torch


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
    position's logits predict, see shift_for_causal_lm). Returns (B, T) float32.

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


def completion_mask(tokens: torch.Tensor, eos_ids, pad_id: int | None = None) -> torch.Tensor:
    """Loss mask of generated completions, by POSITION: 1 up to and including the first EOS of each row, 0 after.

    tokens: (B, T) generated ids (no prompt). eos_ids: an int or an iterable of ints (any of them ends a row).
    A row without EOS (cut at the length limit) is all ones.
    Because it is by position, pad_id == eos_id works: the first EOS stays in the loss (the model learns to
    stop) and the padding after it does not. If pad_id is given and is NOT one of the EOS ids, pad positions
    are also set to 0 (padding of a row that never produced an EOS).
    Returns (B, T) float32.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got {tuple(tokens.shape)}")
    if isinstance(eos_ids, int):
        eos_ids = [eos_ids]
    eos_ids = [int(e) for e in eos_ids]
    if not eos_ids:
        raise ValueError("eos_ids must name at least one token id")
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).long()  # (B, T)
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # (B, T) number of EOS strictly before t
    mask = eos_before == 0  # (B, T) true up to and including the first EOS
    if pad_id is not None and int(pad_id) not in eos_ids:
        mask = mask & (tokens != int(pad_id))
    return mask.float()


def sequence_loss_mask(starts: torch.Tensor, ends: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) float mask with 1 at positions starts[b] <= t < ends[b] of a full (prompt + completion) sequence.

    For right-padded rows [prompt, completion (ending with its EOS), pad...]: starts = prompt lengths,
    ends = prompt length + completion length (EOS included). For a left-padded prompt block of width P
    followed by the completion: starts = P, ends = P + completion length.
    """
    starts = torch.as_tensor(starts).reshape(-1, 1)  # (B, 1)
    ends = torch.as_tensor(ends).reshape(-1, 1)  # (B, 1)
    if starts.shape != ends.shape:
        raise ValueError(f"starts and ends must have one entry per row, got {starts.shape[0]} and {ends.shape[0]}")
    if bool((starts < 0).any()) or bool((ends > T).any()) or bool((starts > ends).any()):
        raise ValueError(f"need 0 <= starts <= ends <= T={T}, got starts={starts.flatten().tolist()} ends={ends.flatten().tolist()}")
    pos = torch.arange(T, device=starts.device).unsqueeze(0)  # (1, T)
    return ((pos >= starts) & (pos < ends)).float()


def shift_for_causal_lm(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align full sequences with the logits of a causal LM.

    input_ids: (B, T) prompt + completion, right-padded. loss_mask: (B, T), 1 on the tokens to score
    (e.g. the completion and its EOS), indexed by the position OF THE TOKEN.
    Returns targets (B, T - 1) = input_ids[:, 1:] and mask (B, T - 1) = loss_mask[:, 1:], which line up with
    logits[:, :-1]: the logits at position t predict the token at t + 1. Use
        logp = token_logprobs(logits[:, :-1], targets) * mask
    The first token of a sequence is never scored (nothing predicts it).
    """
    if input_ids.shape != loss_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and loss_mask must both be (B, T), got {tuple(input_ids.shape)} and {tuple(loss_mask.shape)}")
    return input_ids[:, 1:], loss_mask[:, 1:].float()
