"""From sampled completions to training tensors, and per-token log-probs of those tensors under a model.

Shared by GRPO (rollouts) and DPO (chosen / rejected profiles). A sequence is laid out as
    [ left padding | prompt ][ completion | right padding ]
     <------- P ----------><---------- L ------------->
so every completion starts at column P. Position ids come from the attention mask (cumsum - 1), so the left
padding does not shift positions. The loss mask is built by POSITION from the completion lengths (which count
the first EOS), never from token ids: with pad == eos, masking by id would drop the real EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .logprobs import head_logprobs, token_entropy, token_logprobs


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, P + L)
    attention_mask: torch.Tensor  # (R, P + L) 1 on prompt and completion tokens (up to and including EOS)
    completion: torch.Tensor  # (R, L) the completion token ids
    mask: torch.Tensor  # (R, L) float, 1 on completion tokens up to and including the first EOS

    @property
    def completion_len(self) -> int:
        return self.completion.shape[1]

    def rows(self, idx) -> "Batch":
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.completion[idx], self.mask[idx])

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion, self.mask)))


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
               repeat: int = 1) -> Batch:
    """Left-pad prompts, right-pad completions. `repeat` = G: row b*G + j pairs prompt b with completion b*G + j.

    completions hold the tokens to score (up to and including EOS); anything after is not passed in.
    """
    R = len(completions)
    if len(prompts) * repeat != R:
        raise ValueError(f"{len(prompts)} prompts x {repeat} != {R} completions")
    P = max(len(p) for p in prompts)
    L = max(1, max(len(c) for c in completions))
    ids = torch.full((R, P + L), pad_id, dtype=torch.long)
    attn = torch.zeros((R, P + L), dtype=torch.long)
    for r, c in enumerate(completions):
        p = prompts[r // repeat]
        ids[r, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[r, P - len(p):P] = 1
        if c:
            ids[r, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[r, P:P + len(c)] = 1
    mask = attn[:, P:].float()  # (R, L) by position: the completion's own tokens, EOS included
    return Batch(ids, attn, ids[:, P:].clone(), mask)


def completion_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False,
                        vocab_limit: int | None = None, chunk_tokens: int = 0):
    """log p(completion token) under softmax(logits / T) in fp32, (R, L); optionally the entropy (R, L).

    The logits at column t predict the token at t + 1, so the L completion tokens (columns P .. P+L-1) are scored
    by the logits at columns P-1 .. P+L-2: we keep the last L + 1 positions and drop the final one.
    vocab_limit: the softmax runs over ids below it only, as the sampler's does (pass the tokenizer's size: Qwen's
    embedding table is larger), so old log-probs from the sampler and recomputed ones share one distribution.
    chunk_tokens: the lm_head runs inside the model's forward on this many positions at a time, each chunk's
    logits recomputed in the backward (rl/logprobs.head_logprobs), so the (R, L, V) logit block and its fp32
    copy never exist; 0: the whole block at once (any model taking num_logits_to_keep).
    """
    L = batch.completion_len
    if chunk_tokens:
        def head(hidden, lm_head):  # hidden (R, L + 1, D): the final-normed positions P-1 .. P+L-1
            return head_logprobs(hidden[:, :-1], lm_head, batch.completion, temperature, vocab_limit, chunk_tokens,
                                 with_entropy)

        return model(batch.input_ids, attention_mask=batch.attention_mask, num_logits_to_keep=L + 1, head=head)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, num_logits_to_keep=L + 1)[:, :-1]  # (R, L, V)
    logits = logits[..., :vocab_limit]  # (R, L, V') never an id the tokenizer cannot produce
    logp = token_logprobs(logits, batch.completion, temperature)  # (R, L) fp32
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = token_entropy(logits.detach(), temperature)
    return logp, ent


@torch.no_grad()
def batched_logprobs(model, batch: Batch, micro_rows: int, temperature: float = 1.0,
                     vocab_limit: int | None = None, chunk_tokens: int = 0) -> torch.Tensor:
    """completion_logprobs without gradient, in micro-batches of rows. (R, L)"""
    out = []
    for s in range(0, batch.input_ids.shape[0], micro_rows):
        lp, _ = completion_logprobs(model, batch.rows(slice(s, s + micro_rows)), temperature, vocab_limit=vocab_limit,
                                    chunk_tokens=chunk_tokens)
        out.append(lp)
    return torch.cat(out, dim=0)
