"""What GRPO optimises against: an environment hands out prompts and scores the completions sampled for them.

An `Episode` is one prompt of a step with its group of G samples; it is the record that flows through the step:
    env.episode(i)       -> Episode(prompt_ids, meta)              the prompt, and what scoring needs (a target)
    rollout              -> episode.completions                    G token lists, each up to and including EOS
    env.score(episodes)  -> episode.texts, .rewards, .failed        what the environment read, and its verdict
    group_advantages     -> episode.advantages                     (r - mean) / std within the group
    update               -> a Batch of every episode's rows (rl/rollout.py), the clipped loss
The environment owns the data and the reward; the trainer owns the model, the sampler and the update.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Episode:
    prompt_ids: list[int]
    meta: dict = field(default_factory=dict)
    completions: list[list[int]] = field(default_factory=list)  # G sampled token lists
    texts: list[str] = field(default_factory=list)  # G texts as the environment read them
    rewards: torch.Tensor | None = None  # (G,) float32
    failed: torch.Tensor | None = None  # (G,) bool: format failures
    advantages: torch.Tensor | None = None  # (G,) float32


class Env(Protocol):
    stop_texts: tuple[str, ...]  # texts that end a rollout besides EOS (the sampler's stop_texts)

    def num_prompts(self) -> int:
        """Size of the training prompt pool."""

    def episode(self, index: int) -> Episode:
        """The episode of pool index `index`, its completions not yet sampled."""

    def score(self, episodes: list[Episode], d) -> dict:
        """Fill each episode's texts, rewards and failed; return a dict of float metrics. Collective-safe: every
        rank calls it with the same number of rows and it runs the same number of forward passes on every rank
        (failed rows are scored too, then given the failure reward)."""

    def validate(self, policy, tokenizer, d) -> dict:
        """Validation metrics (greedy), the same on every rank."""


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

    def score(self, episodes: list[Episode], d=None) -> dict:
        for e in episodes:
            e.texts = [self.tokenizer.decode(c) for c in e.completions]
            e.rewards = torch.tensor([token_share(c, self.target) for c in e.completions], dtype=torch.float32)
            e.failed = torch.zeros(len(e.completions), dtype=torch.bool)
        return {}

    def validate(self, policy, tokenizer, d=None) -> dict:
        return {}


def token_share(ids: list[int], target: int) -> float:
    """The toy reward: the share of `target` among the completion's tokens (cheap, deterministic)."""
    return sum(t == target for t in ids) / max(1, len(ids))
