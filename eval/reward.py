"""The rating reward of DUET: 1 - |y - y_hat| / (max - min), and a fixed value for a format failure.

The DUET paper's reward: r = 1 - |y - y_hat| / 4 on the 1..5 scale, and -1 when
the generator's output misses a tag. y_hat is used as given (not clipped): our recommender's expected rating
is always inside [lo, hi], so the reward is in [0, 1] for parsed outputs.
Works on python floats, numpy arrays and torch tensors (returns the same kind, float32 for tensors).
"""

from __future__ import annotations

import numpy as np
import torch


def rating_reward(y, y_hat, lo: float = 1.0, hi: float = 5.0, failure_reward: float = -1.0, failed=None):
    """1 - |y - y_hat| / (hi - lo), and failure_reward where `failed` is true (y_hat is ignored there).

    y, y_hat: scalars or same-shape arrays/tensors; failed: None (no failures) or a boolean of the same shape.
    """
    if not hi > lo:
        raise ValueError(f"need hi > lo, got lo={lo} hi={hi}")
    if isinstance(y, torch.Tensor) or isinstance(y_hat, torch.Tensor):
        ref = y_hat if isinstance(y_hat, torch.Tensor) else y
        y = torch.as_tensor(y, dtype=torch.float32, device=ref.device)
        y_hat = torch.as_tensor(y_hat, dtype=torch.float32, device=ref.device)
        if failed is None:
            failed = torch.zeros_like(y_hat, dtype=torch.bool)
        failed = torch.as_tensor(failed, dtype=torch.bool, device=ref.device)
        safe = torch.where(failed, y, y_hat)  # failed rows may hold NaN predictions
        r = 1.0 - (y - safe).abs() / (hi - lo)
        return torch.where(failed, torch.full_like(r, failure_reward), r)
    scalar = np.ndim(y) == 0 and np.ndim(y_hat) == 0 and np.ndim(failed) == 0
    y = np.asarray(y, dtype=np.float64)
    y_hat = np.asarray(y_hat, dtype=np.float64)
    failed = np.zeros(np.broadcast(y, y_hat).shape, dtype=bool) if failed is None else np.asarray(failed, dtype=bool)
    safe = np.where(failed, y, y_hat)
    r = np.where(failed, failure_reward, 1.0 - np.abs(y - safe) / (hi - lo))
    return float(r) if scalar else r
