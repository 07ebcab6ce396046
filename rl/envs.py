"""Environments the trainers optimise against: prompts in, rewards for completions out.

An environment owns the data and the reward; the trainer owns the model, the sampler and the update.
    num_prompts()                      -> size of the training prompt pool
    episode(index)                     -> Episode(prompt_ids, meta) for pool index `index`
    score(episodes, ids, texts, d)     -> (rewards (R,), failed (R,) bool, info dict of floats); rows are the
                                          G samples of each episode in order. Collective-safe: every rank calls
                                          it with the same number of rows, and it runs the same number of
                                          forward passes on every rank (it scores failed rows too, then
                                          gives them the environment's failure reward).
    validate(policy, tokenizer, d)     -> dict of validation metrics (greedy), same on every rank
    stop_texts                         -> texts that end a rollout besides EOS (the sampler's stop_texts)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Episode:
    prompt_ids: list[int]
    meta: dict = field(default_factory=dict)


class TokenShareEnv:
    """A toy task for tests: reward = share of a target token among the completion's tokens.

    Prompts are short fixed token sequences. Nothing about recommendation: it checks that the training loop
    learns at all (the reward starts near 1/vocab and must rise far above it).
    """

    stop_texts = ()

    def __init__(self, tokenizer, target_token: int, n_prompts: int = 16, prompt_len: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        lo = 3  # keep special ids out of the prompts
        self.prompts = [torch.randint(lo, tokenizer.vocab_size, (prompt_len,), generator=g).tolist()
                        for _ in range(n_prompts)]
        self.tokenizer = tokenizer
        self.target = target_token

    def num_prompts(self) -> int:
        return len(self.prompts)

    def episode(self, index: int) -> Episode:
        return Episode(self.prompts[index], {"index": index})

    def reward_of(self, ids: list[int]) -> float:
        return sum(t == self.target for t in ids) / max(1, len(ids))

    def score(self, episodes, completions: list[list[int]], texts: list[str], d=None):
        rewards = torch.tensor([self.reward_of(c) for c in completions], dtype=torch.float32)
        return rewards, torch.zeros(len(completions), dtype=torch.bool), {}

    def validate(self, policy, tokenizer, d=None) -> dict:
        return {}
