"""The DUET environment: a (user, item, rating) target from train -> the joint profile prompt; the completion is
parsed into a user and an item profile; the frozen recommender rates the item from them and the user's ten most
recent interactions; reward = 1 - |y - y_hat| / 4, or the format-failure reward when a tag is missing.

Rollouts stop at `stop_text` ("</item_profile>"): the strict parser fails any text after it, which a small model
otherwise writes in many of its late rollouts (chat-like "Product: 4.5 ...")."""
from __future__ import annotations

import random
import re
from collections import Counter

import torch

from data import load_dataset
from data.history import HistoryIndex
from eval.profiles import (HistoryOptions, completion_text, encode_prompt, format_progress, parse_profile,
                           profile_messages, rec_example)
from eval.recommender import Recommender
from eval.reward import rating_reward

from .envs import Episode
from .validation import validate


class DuetEnv:
    def __init__(self, ds, tokenizer, recommender: Recommender, hist: HistoryOptions, max_prompt_tokens: int,
                 max_new_tokens: int, val_examples: int, seed: int = 0, min_user_history: int = 5,
                 response_prefix: str = "", format_reward: str = "constant", failure_reward: float = -1.0,
                 stop_text: str = ""):
        if format_reward not in ("constant", "graded"):
            raise ValueError(f"format_reward must be 'constant' or 'graded', not {format_reward!r}")
        self.prefix, self.format_reward, self.failure_reward = response_prefix, format_reward, failure_reward
        self.stop_texts = (stop_text,) if stop_text else ()
        self.ds, self.hx, self.tok, self.rec, self.hist = ds, HistoryIndex(ds), tokenizer, recommender, hist
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        # targets with enough history for a profile to say something
        self.train = [x for x in ds.split("train")
                      if len(self.hx.user_history(x.user_id, x.timestamp, min_user_history)) >= min_user_history]
        if not self.train:
            raise ValueError("no training target has enough user history; is the dataset empty?")
        valid = list(ds.split("valid"))
        random.Random(seed).shuffle(valid)
        self.valid = valid[:val_examples]
        self._ids: dict[int, list[int]] = {}

    @classmethod
    def from_config(cls, cfg, tokenizer, rec_model, rec_tokenizer, d):
        from data.default import default_dataset_dir

        ds = load_dataset(cfg.data or default_dataset_dir())
        rec = Recommender(rec_model, rec_tokenizer, batch_size=cfg.micro_batch_rows, device=d.device)
        hist = HistoryOptions(cfg.user_history, cfg.item_history, cfg.review_chars)
        return cls(ds, tokenizer, rec, hist, cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.val_examples, cfg.seed,
                   response_prefix=cfg.response_prefix, format_reward=cfg.format_reward,
                   failure_reward=cfg.format_failure_reward, stop_text=cfg.stop_text)

    def num_prompts(self) -> int:
        return len(self.train)

    def episode(self, index: int) -> Episode:
        x = self.train[index]
        if index not in self._ids:
            msgs = profile_messages("duet", self.hx, self.ds, x, self.hist)
            self._ids[index] = encode_prompt(self.tok, msgs, self.max_prompt_tokens, self.prefix)
        return Episode(self._ids[index], {"target": x})

    def score(self, episodes: list[Episode], d=None) -> dict:
        rows = [(e.meta["target"], c) for e in episodes for c in e.completions]  # (target, completion) per sample
        texts = [completion_text(self.tok, c, self.prefix, self.stop_texts) for _, c in rows]
        parsed = [parse_profile("duet", t) for t in texts]
        examples = [rec_example(self.hx, self.ds, x, *(p or ("", "")), self.hist.review_chars)
                    for (x, _), (p, _) in zip(rows, parsed)]
        y_hat, _ = self.rec.score(examples)  # every row, failed ones too: the same forwards on every rank
        y = torch.tensor([x.rating for x, _ in rows], dtype=torch.float32)
        failed = torch.tensor([p is None for p, _ in parsed])
        rewards = torch.as_tensor(rating_reward(y, y_hat.float().cpu()), dtype=torch.float32)
        if self.format_reward == "graded":  # a failure earns part of the way from failure_reward to 0
            fail_r = torch.tensor([self.failure_reward * (1 - format_progress(t)) for t in texts])
        else:
            fail_r = torch.full_like(rewards, self.failure_reward)
        rewards = torch.where(failed, fail_r, rewards)
        at = 0
        for e in episodes:  # back into each episode's group
            n = len(e.completions)
            e.texts, e.rewards, e.failed = texts[at:at + n], rewards[at:at + n], failed[at:at + n]
            at += n
        ok = ~failed
        reasons = Counter(re.sub(r"[^a-z]+", "_", reason.split("(")[0].split(":")[0].lower()).strip("_")
                          for p, reason in parsed if p is None)
        info = {"pred_mae": float((y - y_hat.cpu())[ok].abs().mean()) if ok.any() else float("nan"),
                "format_progress": sum(format_progress(t) for t in texts) / len(texts)}
        info.update({f"fail_{k[:40]}": v / len(texts) for k, v in reasons.most_common(3)})
        return info

    def validate(self, policy, tokenizer, d) -> dict:
        return validate(policy, tokenizer, self.rec, self.ds, self.hx, self.valid, "duet", self.hist, d,
                        self.max_new_tokens, self.max_prompt_tokens, self.prefix, self.stop_texts)
