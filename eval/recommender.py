"""The frozen, in-process recommender: expected rating from one forward pass.

For a prompt that ends right before the rating digit (the chat template with the assistant turn opened by an
answer prefix such as `11. "Title" - rated `, data/prompts.py), the recommender reads the next-token logits of '1'..'5', renormalises them with a softmax over those
five tokens only, and returns the expectation  y_hat = sum_k k * p(k),  k = 1..5  (Reason4Rec's scoring).
No generation, hence no parsing failures, and a continuous score for the reward 1 - |y - y_hat| / 4.

    rec = Recommender(model, tokenizer, batch_size=8)
    expected, probs = rec.score(examples)        # (N,), (N, 5)
    expected, probs = rec.score_prompts(texts)   # prompts already rendered (e.g. by the GRPO trainer)

Shared prefix: every prompt starts with the same chat-template header and instruction (63 of ~380 tokens for
SmolLM2 and 10H). Its keys and values are computed once per call, with batch 1, and copied into each batch's
KV cache; the batches then run only their own suffixes (left-padded after the prefix, positions from the mask).
The scores equal those of full forwards up to float rounding (tests/test_recommender.py).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from data.prompts import recommender_prompt
from model import is_sharded

DIGITS = ("1", "2", "3", "4", "5")


class RecExample(NamedTuple):
    """What the recommender sees for one (user, item): the user's recent history (HistoryEntry list, oldest first),
    the user profile (None for 10H), the target item's title and the item profile (None when there is none)."""
    history: list
    user_profile: Optional[str]
    item_title: str
    item_profile: Optional[str] = None


def render_prompt(tokenizer, messages: list[dict], answer_prefix: str) -> str:
    """Chat template with the assistant turn opened, then the answer prefix. Models without a chat template
    (base models) get the user text followed by the prefix on its own line."""
    if tokenizer.has_chat_template:
        return tokenizer.render_chat(messages, add_generation_prompt=True) + answer_prefix
    return "\n\n".join(m["content"] for m in messages) + "\n" + answer_prefix


def digit_token_ids(tokenizer, prompt: str) -> list[int]:
    """Ids of '1'..'5' as the tokenizer writes them right after `prompt`. Checks that prompt + digit tokenizes as
    the prompt's ids followed by exactly one id (otherwise the single forward pass would not score the digit)."""
    base = tokenizer.encode(prompt, add_special_tokens=False)
    ids = []
    for d in DIGITS:
        full = tokenizer.encode(prompt + d, add_special_tokens=False)
        if full[:len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"the digit {d!r} after the prompt suffix {prompt[-20:]!r} is not one token "
                             f"(prompt ids end {base[-3:]}, with digit {full[-4:]}); change the answer prefix")
        ids.append(full[-1])
    return ids


def expected_rating(digit_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 5) logits of '1'..'5' -> (expected (N,), probs (N, 5)); softmax over the five tokens only, in fp32."""
    probs = torch.softmax(digit_logits.float(), dim=-1)  # (N, 5)
    ks = torch.arange(1, 6, dtype=probs.dtype, device=probs.device)
    return probs @ ks, probs


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (ids (B, T), attention mask (B, T)), padded on the left so every prompt ends at T-1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (longest first, so a memory problem shows at once), cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class Recommender:
    def __init__(self, model, tokenizer, batch_size: int = 8, with_reviews: bool = False, device=None,
                 share_prefix: bool = True):
        model.eval()  # scoring runs under no_grad: no graph, whatever requires_grad says
        self.model = model  # (a module, or a view such as model.lora.AdaptersOff: kept as given)
        self.tok = tokenizer
        self.batch_size = batch_size
        self.with_reviews = with_reviews
        self.share_prefix = share_prefix
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.digit_ids = digit_token_ids(tokenizer, render_prompt(tokenizer, *recommender_prompt([], "x")))

    def prompt(self, ex: RecExample) -> str:
        msgs, prefix = recommender_prompt(ex.history, ex.item_title, ex.user_profile, ex.item_profile,
                                          self.with_reviews)
        return render_prompt(self.tok, msgs, prefix)

    def score(self, examples: Sequence[RecExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples -> (expected ratings (N,), probabilities of 1..5 (N, 5)), on the CPU, in input order."""
        return self.score_prompts([self.prompt(ex) for ex in examples])

    @torch.no_grad()  # not inference_mode: FSDP2 updates its gathered parameters in place
    def score_prompts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rendered prompts (each ending right before the digit) -> (expected (N,), probs (N, 5)).
        With a sharded model every rank must pass the same number of prompts (the same forward calls)."""
        if not texts:
            return torch.zeros(0), torch.zeros(0, 5)
        seqs = self.encode(texts)
        P = self.shared_prefix_len(seqs) if self.share_prefix else 0
        prefix = None
        if P:  # the common prefix once: its keys and values, batch 1
            prefix = self.model.new_cache(1, P)
            self.model(torch.tensor([seqs[0][:P]], device=self.device), kv_cache=prefix, num_logits_to_keep=1)
        out = torch.empty(len(seqs), 5)
        for idx in length_batches([len(s) for s in seqs], self.batch_size):
            ids, mask = left_pad([seqs[i][P:] for i in idx], self.tok.pad_token_id)  # (B, T) suffixes
            ids, mask, cache = ids.to(self.device), mask.to(self.device), None
            if prefix is not None:  # key slots: [prefix P][padding][suffix]; positions = cumsum(mask) - 1
                cache = prefix.repeat_interleave(len(idx), max_len=P + ids.shape[1])
                mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, P), mask], dim=1)  # (B, P + T)
            out[idx] = self.read_digits(ids, mask, cache).float().cpu()  # (B, 5)
        return expected_rating(out)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Rendered prompts -> their token ids (the chat template already wrote any special token)."""
        return [self.tok.encode(t, add_special_tokens=False) for t in texts]

    def read_digits(self, ids: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """One forward of left-padded prompts, ids and mask (B, T) on the device (mask over the cache's keys too
        when there is one) -> the logits of '1'..'5' at the last position (B, 5), in the model's dtype, with
        gradients when autograd is on (rl/rating_reader.py)."""
        logits = self.model(ids, attention_mask=mask, kv_cache=cache, num_logits_to_keep=1)  # (B, 1, V)
        return logits[:, -1, :].index_select(-1, torch.tensor(self.digit_ids, device=logits.device))

    def shared_prefix_len(self, seqs: Sequence[Sequence[int]]) -> int:
        """Tokens every prompt starts with, short of the shortest prompt (each keeps >= 1 token of its own).
        With a sharded model (FSDP) the minimum over ranks, so every rank runs the same forward calls; a full copy
        on each rank decides alone (its ranks may score different numbers of prompts, or none)."""
        P = max(0, min(len(os.path.commonprefix([list(s) for s in seqs])), min(map(len, seqs)) - 1))
        if is_sharded(self.model):
            t = torch.tensor(P, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            P = int(t)
        return P
