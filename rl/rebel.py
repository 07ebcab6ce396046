"""REBEL math: regress the difference of two samples' log-ratios onto the difference of their rewards.

Reference: Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards", arXiv 2404.16767,
as LangPTune (Gao, Zhou, Dai, Joachims, "End-to-end Training for Recommendation with Language-based User
Profiles") trains its profile writer. For a prompt x and two samples y, y' of the policy before the update:

    loss = ( (1/eta) * [ (log pi(y|x) - log pi_old(y|x)) - (log pi(y'|x) - log pi_old(y'|x)) ] - (r(y) - r(y')) )^2

mean over the prompts. log pi are sequence log-probs (summed over the completion's tokens). The rewards are
whitened over the batch first, and an optional KL-to-reference penalty is folded into them
(r <- r - kl_coef * (log pi_old - log pi_ref)), as in LangPTune's code. Pure functions; shapes in comments.
"""
from __future__ import annotations

import torch

Metrics = dict[str, torch.Tensor]


def whiten(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / (std + eps) over every element (population std); a constant batch gives zeros."""
    r = rewards.detach().float()
    std = r.std(correction=0)
    return torch.zeros_like(r) if float(std) == 0.0 else (r - r.mean()) / (std + eps)


def kl_penalised(rewards: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                 kl_coef: float) -> torch.Tensor:
    """r - kl_coef * (log pi_old - log pi_ref), per sequence: the KL to the reference folded into the reward."""
    return rewards - kl_coef * (old_logp.detach() - ref_logp.detach())


def rebel_loss(logp: torch.Tensor, old_logp: torch.Tensor, rewards: torch.Tensor, eta: float = 1.0,
               log_ratio_clamp: float = 20.0, global_pairs: float | torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Metrics]:
    """logp, old_logp, rewards: (P, 2) sequence log-probs and rewards of the two samples of P prompts (old_logp
    and rewards without grad). Each sample's log-ratio log pi - log pi_old is clamped to [-c, c] (a clamped
    sample carries no gradient). The loss is the mean over pairs; with global_pairs (the pair count over all
    micro-batches and ranks) it is sum / global_pairs, so micro-batch losses sum to the full-batch loss.
    Metrics (over these pairs, detached): loss, ratio_diff (mean |log-ratio difference| / eta), reward_diff
    (mean |r - r'|), residual (mean |prediction - target|)."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if logp.shape != old_logp.shape or logp.shape != rewards.shape or logp.dim() != 2 or logp.shape[1] != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and rewards "
                         f"{tuple(rewards.shape)} must all be (P, 2)")
    log_ratio = torch.clamp(logp - old_logp.detach(), -log_ratio_clamp, log_ratio_clamp)  # (P, 2)
    predicted = (log_ratio[:, 0] - log_ratio[:, 1]) / eta  # (P,)
    target = (rewards[:, 0] - rewards[:, 1]).detach().to(predicted.dtype)  # (P,)
    sq = (predicted - target) ** 2  # (P,)
    n = sq.numel() if global_pairs is None else global_pairs
    loss = sq.sum() / torch.clamp(torch.as_tensor(n, dtype=sq.dtype, device=sq.device), min=1.0)
    metrics = {"loss": loss.detach(), "ratio_diff": predicted.detach().abs().mean(),
               "reward_diff": target.abs().mean(), "residual": (predicted - target).detach().abs().mean()}
    return loss, metrics
