"""Rating and ranking metrics, in numpy.

Rating (DUET paper, Table 1): MAE and RMSE of the continuous prediction; Accuracy and macro-F1 over the
five classes of round(clip(y_hat, 1, 5)) against y. Format failures are counted apart and never enter
MAE/RMSE (DUET's own metric code keeps failed predictions inside MAE and compares floats exactly for
Accuracy; we do not).

Conventions, fixed here:
- Rounding is half-up: class = floor(clip(y_hat, lo, hi) + 0.5), so 3.5 -> 4 and 2.5 -> 3 (numpy's round
  would give 4 and 2: banker's rounding). y_true must already be an integer rating in lo..hi.
- Macro-F1, two ways, both reported: `f1_macro_5` averages the per-class F1 over all five classes lo..hi (a
  class in neither y_true nor y_pred has F1 = 0: sklearn's f1_score with labels=[1..5], zero_division=0), and
  `f1_macro_present` over the classes present in y_true OR y_pred only (sklearn's default, labels=None). A
  class that is predicted but never true (or true but never predicted) has F1 = 0 in both. The results tables
  show `f1_macro_5` ("macro over the five classes").
- Ranking: one positive against N negatives per row, a higher score ranks first. Ties between the positive
  and negatives are resolved by `ties`: 'pessimistic' (default: the positive ranks below every tied negative,
  so a constant predictor scores as badly as possible), 'optimistic', or 'random' (the exact expectation of
  each metric over a uniformly random order of the tied items).
"""

from __future__ import annotations

import math

import numpy as np


def round_half_up(x: np.ndarray) -> np.ndarray:
    """floor(x + 0.5): 3.5 -> 4, 2.5 -> 3, -0.5 -> 0."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels=None) -> float:
    """Macro-F1 of integer class arrays of equal length, over `labels` (default: the labels present in y_true
    or y_pred); a label in neither array has F1 = 0."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    f1s = []
    for c in (np.union1d(y_true, y_pred) if labels is None else labels):
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))  # F1 = 2PR/(P+R) = 2tp/(2tp+fp+fn)
    return float(np.mean(f1s)) if f1s else float("nan")


def rating_metrics(y_true, y_pred, failures: int = 0, lo: int = 1, hi: int = 5) -> dict:
    """dict(mae, rmse, acc, f1_macro_5, f1_macro_present, format_failures, n) over the n parsed predictions.

    y_true: (n,) integer ratings in lo..hi; y_pred: (n,) continuous predictions (failures already removed);
    failures: the number of examples whose output could not be parsed, reported apart.
    With n == 0 the four metrics are NaN.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} ratings but y_pred has {y_pred.size}")
    bad = np.flatnonzero(~np.isfinite(y_pred))
    if bad.size:
        raise ValueError(f"y_pred[{bad[0]}] = {y_pred[bad[0]]} is not finite: count it as a format failure instead")
    bad = np.flatnonzero((y_true != np.round(y_true)) | (y_true < lo) | (y_true > hi))
    if bad.size:
        raise ValueError(f"y_true[{bad[0]}] = {y_true[bad[0]]} is not an integer rating in {lo}..{hi}")
    n = int(y_true.size)
    out = {"mae": float("nan"), "rmse": float("nan"), "acc": float("nan"), "f1_macro_5": float("nan"),
           "f1_macro_present": float("nan"), "format_failures": int(failures), "n": n}
    if n == 0:
        return out
    err = y_pred - y_true
    cls_pred = round_half_up(np.clip(y_pred, lo, hi)).astype(np.int64)
    cls_true = y_true.astype(np.int64)
    out["mae"] = float(np.mean(np.abs(err)))
    out["rmse"] = float(math.sqrt(np.mean(err**2)))
    out["acc"] = float(np.mean(cls_pred == cls_true))
    out["f1_macro_5"] = macro_f1(cls_true, cls_pred, labels=range(lo, hi + 1))
    out["f1_macro_present"] = macro_f1(cls_true, cls_pred)
    return out


def paired_mae_difference(y_true, pred_a, pred_b) -> dict:
    """Two methods on the same n examples: d_j = |b_j - y_j| - |a_j - y_j| (negative: B errs less).

    -> dict(n, mae_a, mae_b, diff = mean d = mae_b - mae_a, se = std(d, ddof=1) / sqrt(n), b_better, a_better,
    ties: counts of d < 0, d > 0, d == 0). The paired standard error is far smaller than the two MAEs' own when
    the methods err on the same examples, which is what makes a small difference on a few hundred examples
    readable at all; |diff| within ~2 se is noise.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    a = np.asarray(pred_a, dtype=np.float64).reshape(-1)
    b = np.asarray(pred_b, dtype=np.float64).reshape(-1)
    if not (y.shape == a.shape == b.shape):
        raise ValueError(f"paired_mae_difference: {y.size} ratings, {a.size} and {b.size} predictions")
    d = np.abs(b - y) - np.abs(a - y)
    n = int(d.size)
    return {"n": n, "mae_a": float(np.abs(a - y).mean()) if n else float("nan"),
            "mae_b": float(np.abs(b - y).mean()) if n else float("nan"),
            "diff": float(d.mean()) if n else float("nan"),
            "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "b_better": int((d < 0).sum()), "a_better": int((d > 0).sum()), "ties": int((d == 0).sum())}


def ranking_metrics(scores_pos, scores_neg, ks=(1, 5, 10), ties: str = "pessimistic") -> dict:
    """Hit@k, NDCG@k and MRR of one positive per row against its N negatives.

    scores_pos: (M,), scores_neg: (M, N). With the 1-based rank of the positive among the N + 1 items:
    hit@k = [rank <= k], ndcg@k = [rank <= k] / log2(rank + 1) (one relevant item, so IDCG = 1),
    mrr = 1 / rank; each averaged over rows. Ties: see the module docstring.
    """
    pos = np.asarray(scores_pos, dtype=np.float64).reshape(-1)  # (M,)
    neg = np.asarray(scores_neg, dtype=np.float64)
    if neg.ndim != 2 or neg.shape[0] != pos.size:
        raise ValueError(f"scores_neg must be (M, N) with M = {pos.size} rows, got {neg.shape}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("ranking scores contain NaN or inf")
    M = pos.size
    above = np.sum(neg > pos[:, None], axis=1)  # (M,) negatives strictly above the positive
    tied = np.sum(neg == pos[:, None], axis=1)  # (M,)
    if ties == "pessimistic":
        lo_rank = hi_rank = above + tied + 1
    elif ties == "optimistic":
        lo_rank = hi_rank = above + 1
    elif ties == "random":
        lo_rank, hi_rank = above + 1, above + tied + 1  # every rank in [lo, hi] equally likely
    else:
        raise ValueError(f"unknown ties policy {ties!r}: use 'pessimistic', 'optimistic' or 'random'")
    # Expectation over the equally likely ranks r in [lo_rank, hi_rank] (a single rank unless ties='random').
    n_ranks = (hi_rank - lo_rank + 1).astype(np.float64)  # (M,)
    r_max = int(hi_rank.max()) if M else 1
    ranks = np.arange(1, r_max + 1)  # (R,)
    inside = (ranks[None, :] >= lo_rank[:, None]) & (ranks[None, :] <= hi_rank[:, None])  # (M, R)
    weight = inside / n_ranks[:, None]  # (M, R) probability of each rank
    out = {}
    for k in ks:
        hit = ranks <= k  # (R,)
        out[f"hit@{k}"] = float(np.mean(weight @ hit)) if M else float("nan")
        out[f"ndcg@{k}"] = float(np.mean(weight @ (hit / np.log2(ranks + 1)))) if M else float("nan")
    out["mrr"] = float(np.mean(weight @ (1.0 / ranks))) if M else float("nan")
    return out
