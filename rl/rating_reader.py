"""The expected-rating recommender (eval/recommender.py) as a trainable model, for LangPTune's alternation on
rating data: the same prompts and the same five digit logits, read with gradients, and a loss on them.

    rec = Recommender(model, tokenizer)                     # a model whose parameters require grad
    logits = digit_logits(rec, examples)                    # (B, 5) with the graph through rec.model
    loss, metrics = rating_loss(logits, y, kind="ce")       # y (B,) ratings 1..5
    loss.backward()

digit_logits runs one left-padded batch, full prompts (no shared-prefix cache, whose in-place buffers autograd
does not follow); the caller sizes the batch. Its softmax equals Recommender.score's probabilities.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from eval.recommender import RecExample, Recommender, expected_rating, left_pad

RATING_LOSSES = ("ce", "mse")


def digit_logits(recommender: Recommender, examples: Sequence[RecExample]) -> torch.Tensor:
    """Examples -> the recommender's logits of '1'..'5' (B, 5) on its device, with gradients through its model
    when autograd is on. The prompts are Recommender.prompt's."""
    model = recommender.model
    if torch.is_grad_enabled() and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the recommender's model has no trainable parameter (its requires_grad is off)")
    seqs = recommender.encode([recommender.prompt(ex) for ex in examples])
    ids, mask = left_pad(seqs, recommender.tok.pad_token_id)  # (B, T)
    return recommender.read_digits(ids.to(recommender.device), mask.to(recommender.device))


def rating_loss(digit_logits: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> tuple[torch.Tensor, dict]:
    """digit_logits (B, 5) of '1'..'5', y (B,) integer ratings 1..5 -> (loss, {"loss", "mae"}), mean over B.

    "ce": cross-entropy of the softmax over the five digits with class y - 1;
    "mse": (sum_k k * softmax(logits)_k - y)^2, the squared error of the expected rating the recommender reports.
    The metrics are 0-dim detached tensors; mae is |expected rating - y|, the evaluation's error.
    """
    if kind not in RATING_LOSSES:
        raise ValueError(f"unknown rating loss {kind!r}: use one of {', '.join(RATING_LOSSES)}")
    logits = digit_logits.float()
    y = y.to(logits.device)
    expected, _ = expected_rating(logits)  # (B,)
    if kind == "ce":
        loss = F.cross_entropy(logits, y.long() - 1)
    else:
        loss = ((expected - y.float()) ** 2).mean()
    return loss, {"loss": loss.detach(), "mae": (expected.detach() - y.float()).abs().mean()}
