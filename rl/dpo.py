"""DPO math: sequence log-probs and the preference loss with its variants.

References (TRL's `DPOTrainer` loss_type names in brackets):
- Rafailov et al. 2023, DPO, arXiv 2305.18290: -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))) [sigmoid];
- Mitchell 2023, "A note on DPO with noisy preferences": conservative DPO, label smoothing eps,
  -(1 - eps) log sigmoid(x) - eps log sigmoid(-x) [sigmoid with label_smoothing];
- Azar et al. 2023, IPO, arXiv 2310.12036: (h - 1/(2 beta))^2 [ipo], on per-token AVERAGE log-probs as TRL
  computes them for IPO (sequence_logprob(..., average=True)); summed log-probs remain an option.
The reported implicit rewards beta * (log pi - log ref) are those of the DPO paper (section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def sequence_logprob(token_logp: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-prob of the masked tokens of each sequence, summed (DPO) or averaged per token (IPO as in TRL):
    (B, T), (B, T) -> (B,).

    Masked-out positions are excluded with torch.where (padding may hold anything).
    """
    if token_logp.shape != mask.shape:
        raise ValueError(f"token_logp {tuple(token_logp.shape)} and mask {tuple(mask.shape)} differ")
    keep = mask > 0
    total = torch.where(keep, token_logp, torch.zeros_like(token_logp)).sum(dim=-1)  # (B,)
    return total / keep.sum(dim=-1).clamp(min=1) if average else total


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    global_pairs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DPO loss over P pairs; each argument is (P,) sequence log-probs (reference ones without grad): summed for
    DPO, per-token averages for IPO (see sequence_logprob).

    h = (pi_c - pi_r) - (ref_c - ref_r)            (P,) the log-ratio difference
    sigmoid: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   (ls = label_smoothing, 0 = plain DPO)
    ipo:     (h - 1 / (2 beta))^2                   (label_smoothing unused)
    The loss is the mean over pairs; with global_pairs (the pair count over all micro-batches and ranks) it is
    sum / global_pairs, so summing micro-batch losses gives the full-batch mean.
    Metrics (means over these pairs, detached): rewards_chosen, rewards_rejected (beta * (pi - ref)),
    reward_accuracy (share of pairs with chosen reward > rejected reward, ties count as wrong),
    reward_margin (chosen - rejected reward), logps_chosen, logps_rejected, loss.
    """
    if not (beta > 0):
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (0.0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shapes = {t.shape for t in (pi_chosen, pi_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or pi_chosen.dim() != 1:
        raise ValueError(f"the four log-prob tensors must all be (P,), got {sorted(tuple(s) for s in shapes)}")
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)  # (P,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")
    n = losses.numel() if global_pairs is None else global_pairs
    loss = losses.sum() / torch.clamp(torch.as_tensor(n, dtype=losses.dtype, device=losses.device), min=1.0)

    r_c = beta * (pi_chosen - ref_chosen).detach()  # (P,)
    r_r = beta * (pi_rejected - ref_rejected).detach()  # (P,)
    metrics = {
        "rewards_chosen": r_c.mean(),
        "rewards_rejected": r_r.mean(),
        "reward_accuracy": (r_c > r_r).float().mean(),
        "reward_margin": (r_c - r_r).mean(),
        "logps_chosen": pi_chosen.detach().mean(),
        "logps_rejected": pi_rejected.detach().mean(),
        "loss": loss.detach(),
    }
    return loss, metrics
