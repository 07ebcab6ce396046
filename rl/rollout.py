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
    prompt_of: torch.Tensor  # (R,) long, the index of each row's prompt (rows of one prompt are adjacent)

    @property
    def completion_len(self) -> int:
        return self.completion.shape[1]

    def rows(self, idx) -> "Batch":
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.completion[idx], self.mask[idx],
                     self.prompt_of[idx])

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.completion, self.mask)),
                     self.prompt_of)


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
    return Batch(ids, attn, ids[:, P:].clone(), mask, torch.arange(R) // repeat)


def shares_prompts(batch: Batch) -> bool:
    """Whether completion_logprobs(share_prompts=True) runs the prompt once per group for this batch: some prompt
    has several rows. Under FSDP the two forwards are two collectives: every rank must decide alike, as GRPO's
    ranks do (same group layout)."""
    return batch.prompt_of.unique_consecutive().numel() != batch.prompt_of.numel()


def completion_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False,
                        vocab_limit: int | None = None, chunk_tokens: int = 0, share_prompts: bool = False):
    """log p(completion token) under softmax(logits / T) in fp32, (R, L); optionally the entropy (R, L).

    The logits at column t predict the token at t + 1, so the L completion tokens (columns P .. P+L-1) are scored
    by the logits at columns P-1 .. P+L-2: we keep the last L + 1 positions and drop the final one.
    vocab_limit: the softmax runs over ids below it only, as the sampler's does (pass the tokenizer's size: Qwen's
    embedding table is larger), so old log-probs from the sampler and recomputed ones share one distribution.
    chunk_tokens: the lm_head runs inside the model's forward on this many positions at a time, each chunk's
    logits recomputed in the backward (rl/logprobs.head_logprobs), so the (R, L, V) logit block and its fp32
    copy never exist; 0: the whole block at once (any model taking num_logits_to_keep).
    share_prompts: where rows share a prompt (GRPO's G samples, DPO's chosen and rejected), the prompt runs once
    per group, its keys and values (with their graph) copied to the group's rows, and only the completions run
    per row (see `shared_prompt_logprobs`); the same values up to float rounding, far fewer tokens when P >> L.
    """
    if share_prompts and shares_prompts(batch):
        return shared_prompt_logprobs(model, batch, temperature, with_entropy, vocab_limit, chunk_tokens)
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


def shared_prompt_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False,
                           vocab_limit: int | None = None, chunk_tokens: int = 0):
    """completion_logprobs with each distinct prompt run once: U prompts, R rows, rows of a prompt adjacent.

    1. The U prompts (U, P) run with a KV cache of P slots; the final hidden state at column P-1 (U, 1, D)
       predicts each row's first completion token.
    2. The cache is copied to the R rows (row r gets its prompt's keys/values, differentiably) and the
       completions (R, L) run on it: queries at columns P..P+L-1 over every key, the mask (R, P + L) as before.
    3. The hidden states at P-1 (from 1) and P..P+L-2 (from 2) go through the head as in completion_logprobs.
    The backward sends each row's gradient into its prompt's keys and values, summed over the group.
    Forward tokens: U * P + R * L instead of R * (P + L).
    """
    L = batch.completion_len
    P = batch.input_ids.shape[1] - L
    starts = torch.ones_like(batch.prompt_of, dtype=torch.bool)
    starts[1:] = batch.prompt_of[1:] != batch.prompt_of[:-1]
    first = starts.nonzero().squeeze(1)  # (U,) the first row of each prompt
    counts = torch.diff(torch.cat([first, first.new_tensor([len(starts)])]))  # (U,) rows per prompt
    ids, attn = batch.input_ids, batch.attention_mask
    cache = model.new_cache(len(first), P)
    last = model(ids[first, :P], attention_mask=attn[first, :P], kv_cache=cache, num_logits_to_keep=1,
                 return_hidden=True)  # (U, 1, D)
    rows_cache = cache.repeat_interleave(counts.to(ids.device), max_len=P + L)
    last = last.repeat_interleave(counts.to(last.device), dim=0)  # (R, 1, D)

    def head(hidden, lm_head):  # hidden (R, L, D): final-normed columns P .. P+L-1
        h = torch.cat([last.to(hidden.dtype), hidden[:, :-1]], dim=1)  # (R, L, D): columns P-1 .. P+L-2
        if chunk_tokens:
            return head_logprobs(h, lm_head, batch.completion, temperature, vocab_limit, chunk_tokens, with_entropy)
        logits = lm_head(h)[..., :vocab_limit]  # (R, L, V')
        logp = token_logprobs(logits, batch.completion, temperature)
        if not with_entropy:
            return logp, None
        with torch.no_grad():
            return logp, token_entropy(logits.detach(), temperature)

    return model(ids[:, P:], attention_mask=attn, kv_cache=rows_cache, head=head)


@torch.no_grad()
def batched_logprobs(model, batch: Batch, micro_rows: int, temperature: float = 1.0,
                     vocab_limit: int | None = None, chunk_tokens: int = 0, share_prompts: bool = False) -> torch.Tensor:
    """completion_logprobs without gradient, in micro-batches of rows. (R, L)"""
    out = []
    for s in range(0, batch.input_ids.shape[0], micro_rows):
        lp, _ = completion_logprobs(model, batch.rows(slice(s, s + micro_rows)), temperature, vocab_limit=vocab_limit,
                                    chunk_tokens=chunk_tokens, share_prompts=share_prompts)
        out.append(lp)
    return torch.cat(out, dim=0)
