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

from data.prompts import DUET_STOP

from .config import must, one_of


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


@dataclass
class EnvConfig:
    """The task's flags, shared by every trainer that samples from an environment (GRPO, SFT on best-of-N): who
    writes, who rates, on what data, from which prompt."""
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "policy (and reference) model source"})
    recommender: str = field(default="reference", metadata={"help": "'reference' shares the frozen reference"})
    env: str = field(default="duet", metadata={"help": "duet | toy (token-share reward, for tests)"})
    data: str = field(default="", metadata={"help": "canonical dataset dir; empty: the synthetic default"})
    # prompts
    user_history: int = 30
    item_history: int = 10
    review_chars: int = 200
    max_prompt_tokens: int = 1536
    max_new_tokens: int = 128
    response_prefix: str = field(default="", metadata={"help": "opens the answer, e.g. '<user_profile><cue>'"})
    stop_text: str = field(default=DUET_STOP, metadata={
        "help": "DUET: a rollout ends once it has written this (nothing may follow it); empty: only at EOS"})
    format_reward: str = field(default="constant", metadata={
        "help": "constant: format_failure_reward for any failure (DUET); graded: a failure earns "
                "format_failure_reward * (1 - share of the 8 tag pairs written), a signal for small models"})
    format_failure_reward: float = -1.0

    def check(self):
        for name in ("user_history", "item_history", "review_chars"):
            must(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        for name in ("max_new_tokens", "max_prompt_tokens"):
            must(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        one_of("env", self.env, ("duet", "toy"))
        one_of("format_reward", self.format_reward, ("constant", "graded"))


def make_env(cfg, models, d) -> Env:
    """The environment a config names: DUET on the dataset, or the toy token-share task."""
    if cfg.env == "toy":
        tok = models.tokenizer
        return TokenShareEnv(tok, target_token=int(tok.encode("the", add_special_tokens=False)[0]))
    from .duet_env import DuetEnv

    return DuetEnv.from_config(cfg, models.tokenizer, models.rec_model, models.rec_tokenizer, d)


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
