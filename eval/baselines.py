"""Classic rating baselines without any LLM: global mean, user mean, item mean, biased matrix factorisation, and
on the synthetic catalogue the attribute estimate a reader of the user's own rated titles can compute.

Each is a class with fit(train_triples, valid_triples=None) and predict(user_ids, item_ids) -> np.ndarray,
where a triple is (user_id: str, item_id: str, rating: float). Unknown users/items fall back to the global
mean (means) or to zero bias and factors (MF).

Biased MF (Koren, Bell, Volinsky 2009, "Matrix factorization techniques for recommender systems"):
    r_hat(u, i) = mu + b_u + b_i + p_u . q_i
minimising sum (r - r_hat)^2 + reg * (sum_u b_u^2 + |p_u|^2 + sum_i b_i^2 + |q_i|^2), mu = the train mean.
Trained by alternating least squares: with the item side fixed, each user's (b_u, p_u) is a ridge regression
of r - mu - b_i on the features (1, q_i), solved exactly; then the same for items. ALS has no learning rate;
the epochs (ALS sweeps) are chosen by the best valid RMSE seen, and factors and reg from a small grid.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch


def _check_triples(triples, what: str = "train_triples") -> tuple[list[str], list[str], np.ndarray]:
    users, items, ratings = [], [], []
    for k, t in enumerate(triples):
        if len(t) != 3:
            raise ValueError(f"{what}[{k}] must be (user_id, item_id, rating), got {t!r}")
        u, i, r = t
        try:
            r = float(r)
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{k}]: rating {r!r} is not a number") from None
        if not math.isfinite(r):
            raise ValueError(f"{what}[{k}]: rating {r!r} is not finite")
        users.append(str(u))
        items.append(str(i))
        ratings.append(r)
    if not ratings:
        raise ValueError(f"{what} is empty")
    return users, items, np.asarray(ratings, dtype=np.float64)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


class GlobalMean:
    """Predicts the mean train rating for everyone."""

    def fit(self, train_triples, valid_triples=None):
        _, _, r = _check_triples(train_triples)
        self.mu = float(r.mean())
        return self

    def predict(self, user_ids, item_ids) -> np.ndarray:
        if len(user_ids) != len(item_ids):
            raise ValueError(f"{len(user_ids)} user ids but {len(item_ids)} item ids")
        return np.full(len(user_ids), self.mu, dtype=np.float64)


class _KeyMean(GlobalMean):
    """Mean train rating per key (user or item), the global mean for keys not seen in train."""

    by_user = True

    def fit(self, train_triples, valid_triples=None):
        users, items, r = _check_triples(train_triples)
        self.mu = float(r.mean())
        sums, counts = defaultdict(float), defaultdict(int)
        for key, rating in zip(users if self.by_user else items, r):
            sums[key] += rating
            counts[key] += 1
        self.means = {k: sums[k] / counts[k] for k in sums}
        return self

    def predict(self, user_ids, item_ids) -> np.ndarray:
        if len(user_ids) != len(item_ids):
            raise ValueError(f"{len(user_ids)} user ids but {len(item_ids)} item ids")
        keys = user_ids if self.by_user else item_ids
        return np.array([self.means.get(str(k), self.mu) for k in keys], dtype=np.float64)


class UserMean(_KeyMean):
    by_user = True


class ItemMean(_KeyMean):
    by_user = False


def _ridge_side(rows, cols, n_rows, col_feats, target, reg):
    """Solve, for every row r, (X_r^T X_r + reg I) w_r = X_r^T y_r, where X_r stacks col_feats[c] over the
    ratings (r, c) of that row and y_r their targets.

    rows, cols (n,) int64 rating coordinates; col_feats (C, d); target (n,). Returns w (n_rows, d); a row
    without ratings gets w = 0. X_r^T X_r = sum_c S[r, c] f_c f_c^T is one sparse (R, C) x (C, d*d) product,
    so no (n, d, d) tensor of per-rating outer products is ever built.
    """
    C, d = col_feats.shape
    idx = torch.stack([rows, cols])  # (2, n)
    count = torch.sparse_coo_tensor(idx, torch.ones_like(target), (n_rows, C), check_invariants=False).coalesce()  # (R, C)
    weighted = torch.sparse_coo_tensor(idx, target, (n_rows, C), check_invariants=False).coalesce()  # (R, C)
    outer = (col_feats[:, :, None] * col_feats[:, None, :]).reshape(C, d * d)  # (C, d*d)
    A = torch.sparse.mm(count, outer).view(n_rows, d, d) + reg * torch.eye(d, dtype=col_feats.dtype)  # (R, d, d)
    b = torch.sparse.mm(weighted, col_feats)  # (R, d)
    return torch.linalg.solve(A, b)  # (R, d)


class BiasedMF:
    """r_hat = mu + b_u + b_i + p_u . q_i, trained by ALS, tuned on valid over factors x reg, seeded.

    With valid_triples, each (factors, reg) runs up to max_epochs ALS sweeps, stopping after `patience` sweeps
    without a better valid RMSE, and keeps its best sweep. Without valid_triples, the first grid point is
    used with max_epochs sweeps. Predictions are clipped to [lo, hi]. After fit, `best` holds the chosen
    (factors, reg, epochs) and its valid RMSE, `grid_results` every configuration tried.
    """

    def __init__(self, factors=(8, 32), regs=(1.0, 3.0, 10.0, 30.0), max_epochs: int = 25, patience: int = 3,
                 seed: int = 0, init_std: float = 0.1, lo: float = 1.0, hi: float = 5.0):
        self.factors, self.regs, self.max_epochs = tuple(factors), tuple(regs), int(max_epochs)
        self.patience = int(patience)
        self.seed, self.init_std, self.lo, self.hi = int(seed), float(init_std), float(lo), float(hi)

    # -- indexing
    def _index(self, users, items):
        u = torch.tensor([self.user_index.get(x, -1) for x in users], dtype=torch.long)
        i = torch.tensor([self.item_index.get(x, -1) for x in items], dtype=torch.long)
        return u, i

    def _predict_idx(self, u, i, bu, bi, P, Q) -> torch.Tensor:
        ku, ki = u >= 0, i >= 0  # unknown ids -> zero bias and factors
        uu, ii = u.clamp(min=0), i.clamp(min=0)
        pred = self.mu + torch.where(ku, bu[uu], 0.0) + torch.where(ki, bi[ii], 0.0)
        pred = pred + torch.where(ku & ki, (P[uu] * Q[ii]).sum(-1), 0.0)
        return pred.clamp(self.lo, self.hi)

    def _train(self, u, i, r, k, reg, epochs, valid=None):
        """ALS from a seeded init. Returns (valid RMSE, epoch, (bu, bi, P, Q)) at the best valid sweep (the last
        sweep, with RMSE NaN, when there is no valid set)."""
        g = torch.Generator().manual_seed(self.seed)
        nU, nI = len(self.user_index), len(self.item_index)
        P = torch.randn(nU, k, generator=g, dtype=torch.float64) * self.init_std  # (U, k)
        Q = torch.randn(nI, k, generator=g, dtype=torch.float64) * self.init_std  # (I, k)
        bu = torch.zeros(nU, dtype=torch.float64)
        bi = torch.zeros(nI, dtype=torch.float64)
        ones_u = torch.ones(nU, 1, dtype=torch.float64)
        ones_i = torch.ones(nI, 1, dtype=torch.float64)
        best = (math.inf, 0, (bu, bi, P, Q))
        for epoch in range(1, epochs + 1):
            w = _ridge_side(u, i, nU, torch.cat([ones_i, Q], 1), r - self.mu - bi[i], reg)  # (U, 1+k)
            bu, P = w[:, 0].contiguous(), w[:, 1:].contiguous()
            w = _ridge_side(i, u, nI, torch.cat([ones_u, P], 1), r - self.mu - bu[u], reg)  # (I, 1+k)
            bi, Q = w[:, 0].contiguous(), w[:, 1:].contiguous()
            if valid is not None:
                vu, vi, vr = valid
                score = _rmse(self._predict_idx(vu, vi, bu, bi, P, Q).numpy(), vr)
                if score < best[0]:
                    best = (score, epoch, (bu, bi, P, Q))
                elif epoch - best[1] >= self.patience:
                    break  # no valid improvement for `patience` sweeps
            else:
                best = (math.nan, epoch, (bu, bi, P, Q))
        return best

    def fit(self, train_triples, valid_triples=None):
        # Many small solves: one thread is several times faster than two fighting over a busy CPU.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(train_triples, valid_triples)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, train_triples, valid_triples):
        users, items, r = _check_triples(train_triples)
        self.mu = float(r.mean())
        self.user_index = {x: n for n, x in enumerate(dict.fromkeys(users))}
        self.item_index = {x: n for n, x in enumerate(dict.fromkeys(items))}
        u, i = self._index(users, items)
        r = torch.from_numpy(r)
        valid = None
        if valid_triples is not None:
            vu, vi, vr = _check_triples(valid_triples, "valid_triples")
            valid = (*self._index(vu, vi), vr)
        self.grid_results = []
        best = None
        grid = [(k, reg) for k in self.factors for reg in self.regs] if valid is not None else [(self.factors[0], self.regs[0])]
        for k, reg in grid:
            score, epoch, params = self._train(u, i, r, k, reg, self.max_epochs, valid)
            self.grid_results.append({"factors": k, "reg": reg, "epochs": epoch, "valid_rmse": score})
            if best is None or score < best[0]:
                best = (score, (k, reg, epoch), params)
        score, (k, reg, epoch), (self.bu, self.bi, self.P, self.Q) = best
        self.best = {"factors": k, "reg": reg, "epochs": epoch, "valid_rmse": score}
        return self

    def predict(self, user_ids, item_ids) -> np.ndarray:
        if len(user_ids) != len(item_ids):
            raise ValueError(f"{len(user_ids)} user ids but {len(item_ids)} item ids")
        u, i = self._index([str(x) for x in user_ids], [str(x) for x in item_ids])
        return self._predict_idx(u, i, self.bu, self.bi, self.P, self.Q).numpy()


def attribute_estimate(history, title: str):
    """A per-target rating from the user's rated items alone (synthetic titles name mood, genre and era): their
    mean, plus how far the items sharing the target's mood, and those sharing its genre, fall from that mean (0 for
    an attribute not met). history: entries with .title and .rating (data.history.HistoryEntry). None when the
    title names no attributes or the history is empty. What a profile writer shown `history` could compute."""
    from data.synthetic import title_attributes

    target = title_attributes(title)
    if target is None or not history:
        return None
    rated = [(title_attributes(h.title), h.rating) for h in history]
    base = sum(r for _, r in rated) / len(rated)
    est = base
    for key in ("mood", "genre"):
        same = [r for a, r in rated if a is not None and a[key] == target[key]]
        est += sum(same) / len(same) - base if same else 0.0
    return est
