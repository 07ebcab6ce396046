"""Supervised fine-tuning math: the negative log-likelihood of target completions, and best-of-N selection.

SFT is the warm start before GRPO, DPO or LangPTune. Its pairs come from a file (a teacher's profiles) or from the
writer itself: sample N completions per prompt, score them with the environment's reward, keep each prompt's best
if it is good enough, and fit those (rejection sampling: RAFT, Dong et al. 2023, arXiv:2304.06767; ReST's Grow +
Improve, Gulcehre et al. 2023, arXiv:2308.08998).
"""
from __future__ import annotations

import torch


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, global_tokens: torch.Tensor | float) -> torch.Tensor:
    """Token-mean NLL. logp, mask: (R, L) log p(target token) and 1 on the completion's tokens. Divided by the
    global token count of the optimizer step (every micro-batch, every rank), so the micro-batch losses sum to the
    step's mean over its tokens whatever the split."""
    return -(logp * mask).sum() / global_tokens


def best_of_n(rewards: torch.Tensor, min_reward: float, failed: torch.Tensor | None = None) -> list[int]:
    """rewards: (B, N) per prompt and sample -> for each prompt the index of its best sample with reward >=
    min_reward, or -1 when none has. failed (B, N), when given: format failures are never kept (without it a
    graded failure reward ranks the partial formats of a writer that cannot yet write the whole one). Ties go to
    the first sample."""
    bad = rewards < min_reward if failed is None else failed | (rewards < min_reward)
    score = torch.where(bad, torch.full_like(rewards, float("-inf")), rewards)
    best = score.argmax(dim=1)  # (B,)
    keep = torch.isfinite(score.gather(1, best[:, None]))[:, 0]
    return torch.where(keep, best, torch.full_like(best, -1)).tolist()
