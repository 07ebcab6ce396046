"""GRPO math: group-relative advantages, the clipped surrogate, the k3 KL, loss aggregation.

Pure functions; shapes in comments. B = sequences in the (micro-)batch, T = completion positions,
mask (B, T) of 0/1 with 1 on the completion tokens (first EOS included, see rl/rollout.make_batch).
Losses return (loss, metrics): metrics are 0-dim detached tensors (no device sync here), local to the
micro-batch given, so the training loop can average or sum them as it logs.

References (verl's names in brackets, to line this file up with verl/trainer/ppo/core_algos.py and the DUET
configuration):
- Shao et al. 2024, DeepSeekMath, arXiv 2402.03300: GRPO, advantages (r - mean) / std over the G samples of one
  prompt [adv_estimator=grpo, norm_adv_by_std_in_grpo=True];
- Liu et al. 2025, Dr. GRPO, arXiv 2503.20783: the same without the std [norm_adv_by_std_in_grpo=False];
- Schulman et al. 2017, PPO, arXiv 1707.06347: the clipped surrogate [policy_loss vanilla, clip_ratio];
- Ye et al. 2020, Dual-Clip PPO, arXiv 1912.09729: negative-advantage tokens lose at most c * |A| [clip_ratio_c=3];
- Yu et al. 2025, DAPO, arXiv 2503.14476: separate low/high clip ranges, token-mean [clip_ratio_low/high];
- Schulman 2020, "Approximating KL divergence" (blog): the k3 estimator [kl_loss_type=low_var_kl, clamped to
  [-10, 10] as verl does];
- loss aggregation by the global token / sequence count of the optimizer step [agg_loss, loss_agg_mode].
"""

from __future__ import annotations

import torch

Metrics = dict[str, torch.Tensor]


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True, unbiased_std: bool = True
) -> tuple[torch.Tensor, Metrics]:
    """Group-relative advantages A_i = (r_i - mean_g) / (std_g + eps) (GRPO) or r_i - mean_g (Dr. GRPO).

    rewards: (N * G,) with the G samples of each prompt contiguous. Returns adv (N * G,) float32.
    std is the sample std (Bessel, as torch.std and verl/TRL use) when unbiased_std and G > 1.
    A group whose rewards are all equal gets exactly 0 advantage (set explicitly, so float rounding of the
    mean never divides into a large number), and never NaN. The share of such groups is in the metrics
    ("zero_std_frac"): those prompts give no learning signal.
    """
    r = rewards.detach().float().reshape(-1)  # (N*G,)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}: a group of one has no baseline, so every "
                         f"advantage would be 0 and nothing would be learnt")
    if r.numel() % group_size != 0:
        raise ValueError(f"rewards of length {r.numel()} cannot be split into groups of {group_size}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN or inf")
    g = r.view(-1, group_size)  # (N, G)
    mean = g.mean(dim=1, keepdim=True)  # (N, 1)
    constant = (g.max(dim=1, keepdim=True).values == g.min(dim=1, keepdim=True).values)  # (N, 1) all rewards equal
    adv = g - mean  # (N, G)
    if scale_by_std:
        std = g.std(dim=1, keepdim=True, correction=1 if (unbiased_std and group_size > 1) else 0)  # (N, 1)
        adv = adv / (std + eps)
    adv = torch.where(constant, torch.zeros_like(adv), adv)  # (N, G)
    metrics = {
        "reward_mean": r.mean(),
        "reward_std": r.std(correction=0),
        "zero_std_frac": constant.float().mean(),
        "adv_abs_max": adv.abs().max(),
    }
    return adv.reshape(-1), metrics


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the masked tokens.

    'token-mean': sum(x * mask) / n_tokens, with n_tokens = global_tokens when given (the mask count over ALL
        micro-batches and ranks of the optimizer step), else this mask's count. With global_tokens, summing the
        micro-batch losses (gradient accumulation, DDP/FSDP gradient sum) gives exactly the full-batch
        token-mean; dividing by each micro-batch's own count would weight short micro-batches up.
    'seq-mean-token-mean': the token-mean inside each sequence, then the mean over sequences; the sequence
        count is global_seqs when given (same reasoning), else the number of rows with at least one token.
    Masked positions are excluded with torch.where, so NaN/inf there (e.g. log-probs of padding) never leak.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ")
    keep = mask > 0  # (B, T)
    x = torch.where(keep, per_token, torch.zeros_like(per_token))  # (B, T)
    if mode == "token-mean":
        n = keep.sum() if global_tokens is None else global_tokens
        return x.sum() / torch.clamp(torch.as_tensor(n, dtype=x.dtype, device=x.device), min=1.0)
    if mode == "seq-mean-token-mean":
        n_tok = keep.sum(dim=1)  # (B,)
        seq = x.sum(dim=1) / n_tok.clamp(min=1)  # (B,) empty rows give 0
        n = (n_tok > 0).sum() if global_seqs is None else global_seqs
        return seq.sum() / torch.clamp(torch.as_tensor(n, dtype=x.dtype, device=x.device), min=1.0)
    raise ValueError(f"unknown loss aggregation mode {mode!r}: use 'token-mean' or 'seq-mean-token-mean'")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask > 0
    return torch.where(keep, x, torch.zeros_like(x)).sum() / keep.sum().clamp(min=1)


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask > 0
    if not bool(keep.any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[keep].max()


def _per_token_adv(adv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, 1) for broadcasting; (B, T) passes through."""
    adv = adv.detach().to(like.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # (B, 1)
    if adv.shape[0] != like.shape[0]:
        raise ValueError(f"advantages for {adv.shape[0]} sequences, log-probs for {like.shape[0]}")
    return adv


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    log_ratio_clamp: float = 20.0,
    clip_ratio_c: float | None = 3.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp), with
    the dual clip: where A < 0 the loss is at most -A * clip_ratio_c (None or 0: no dual clip).

    logp, old_logp: (B, T) (old_logp has no grad); adv: (B,) per sequence or (B, T). The log-ratio is
    clamped to [-log_ratio_clamp, log_ratio_clamp] BEFORE exp, so r never overflows (and the clamped tokens
    carry no gradient). Returns per_token_loss (B, T), ratio (B, T) and the boolean (B, T) masks of the tokens
    where a clipped branch is active: "low" (A < 0 and r < 1 - clip_low), "high" (A > 0 and r > 1 + clip_high),
    "dual" (A < 0 and r > clip_ratio_c). On those tokens the loss is constant in logp: the gradient is zero.
    Example (verl's): A = -1, r = 5 gives loss 5 without the dual clip, 3 with clip_ratio_c = 3.
    """
    if clip_ratio_c and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or 0 for no dual clip), got {clip_ratio_c}")
    A = _per_token_adv(adv, logp)  # (B, 1) or (B, T)
    log_ratio = torch.clamp(logp - old_logp.detach(), -log_ratio_clamp, log_ratio_clamp)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -A * ratio  # (B, T)
    clipped = -A * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T) pessimistic bound
    r = ratio.detach()
    masks = {"low": (A < 0) & (r < 1.0 - clip_low), "high": (A > 0) & (r > 1.0 + clip_high)}  # (B, T) each
    if clip_ratio_c:
        bound = -A * clip_ratio_c  # (B, 1) or (B, T): the most a negative-advantage token may lose
        per_token = torch.where(A < 0, torch.minimum(per_token, bound), per_token)  # (B, T)
        masks["dual"] = (A < 0) & (r > clip_ratio_c)
    else:
        masks["dual"] = torch.zeros_like(r, dtype=torch.bool)
    return per_token, ratio, masks


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    log_ratio_clamp: float = 20.0,
    loss_agg_mode: str = "token-mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    clip_ratio_c: float | None = 3.0,
) -> tuple[torch.Tensor, Metrics]:
    """The clipped surrogate aggregated over masked tokens (see clipped_surrogate and aggregate).

    Metrics (over this micro-batch's masked tokens): clip_frac_low, clip_frac_high, clip_frac_dual (share of
    tokens where each clipped branch is active), ratio_mean, ratio_max, pg_loss (local token-mean).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask {tuple(mask.shape)} must match")
    # Outside the mask, old log-probs may be anything (padding from the sampler, -inf, NaN): use ratio 1 there.
    old_logp = torch.where(mask > 0, old_logp.detach(), logp.detach())  # (B, T)
    per_token, ratio, clipped = clipped_surrogate(logp, old_logp, adv, clip_low, clip_high, log_ratio_clamp,
                                                  clip_ratio_c)
    loss = aggregate(per_token, mask, loss_agg_mode, global_tokens, global_seqs)
    r = ratio.detach()
    metrics = {
        "pg_loss": _masked_mean(per_token.detach(), mask),
        **{f"clip_frac_{side}": _masked_mean(m.float(), mask) for side, m in clipped.items()},
        "ratio_mean": _masked_mean(r, mask),
        "ratio_max": _masked_max(r, mask),
    }
    return loss, metrics


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 20.0, max_kl: float | None = 10.0) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token [verl: low_var_kl]: exp(d) - d - 1 with d = ref_logp - logp.

    Unbiased for KL(pi || ref) under samples of pi, and >= 0 for every token (e^d >= 1 + d), unlike the plain
    difference logp - ref_logp. (B, T) -> (B, T). d is clamped to [-clamp, clamp] before exp (exp stays finite),
    then the estimate to [0, max_kl] as verl does (None or 0: no cap); a capped token carries no gradient.
    Example: d = 19 gives 1.8e8 uncapped, 10 capped.
    """
    d = torch.clamp(ref_logp.detach() - logp, -clamp, clamp)  # (B, T)
    k3 = torch.exp(d) - d - 1.0  # (B, T)
    return torch.clamp(k3, max=max_kl) if max_kl else k3


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    log_ratio_clamp: float = 20.0,
    loss_agg_mode: str = "token-mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    clip_ratio_c: float | None = 3.0,
    max_kl: float | None = 10.0,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO loss = agg(dual-clipped surrogate) + kl_coef * agg(k3 KL to the frozen reference, capped at max_kl).

    The KL is a loss term (as in GRPO and DUET's verl config), not a reward penalty; it is skipped when
    ref_logp is None or kl_coef == 0. Both terms use the same aggregation and global counts, so micro-batch
    losses sum to the full-batch loss. Metrics: those of policy_loss, plus kl (local masked token-mean of k3,
    also reported when kl_coef == 0 if ref_logp is given) and loss.
    """
    loss, metrics = policy_loss(
        logp, old_logp, adv, mask, clip_low, clip_high, log_ratio_clamp, loss_agg_mode, global_tokens, global_seqs,
        clip_ratio_c,
    )
    if ref_logp is not None:
        ref_logp = torch.where(mask > 0, ref_logp.detach(), logp.detach())  # (B, T) KL 0 outside the mask
        kl = kl_k3(logp, ref_logp, clamp=log_ratio_clamp, max_kl=max_kl)  # (B, T)
        metrics["kl"] = _masked_mean(kl.detach(), mask)
        if kl_coef != 0.0:
            loss = loss + kl_coef * aggregate(kl, mask, loss_agg_mode, global_tokens, global_seqs)
    metrics["loss"] = loss.detach()
    return loss, metrics
