"""Pure filtering steps over compact numpy columns (one row per review).

u, i: int32 codes of user and item; t: int64 seconds. Each function returns indices or a boolean mask,
never copies of the review text, so a million rows cost a few tens of MB.
"""
import numpy as np


def window_mask(t, last_days):
    """Keep the last `last_days` days of the data (the paper: last 2 months of Books, last 6 of Yelp):
    rows with t > max(t) - last_days * 86400."""
    if not last_days or len(t) == 0:
        return np.ones(len(t), dtype=bool)
    return t > t.max() - int(last_days * 86400)


def dedup_latest(u, i, t):
    """One rating per (user, item): keep the latest; on equal timestamps the later line of the file.
    Returns the sorted row indices kept."""
    n = len(u)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), t, i, u))  # by user, item, time, row
    uo, io = u[order], i[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = (uo[1:] != uo[:-1]) | (io[1:] != io[:-1])  # last row of each (user, item) group
    return np.sort(order[last])


def kcore_mask(u, i, k, n_users=None, n_items=None):
    """Iterative k-core: repeatedly drop rows whose user or item has fewer than k rows, until stable."""
    keep = np.ones(len(u), dtype=bool)
    if k <= 1:
        return keep
    n_users = int(u.max()) + 1 if n_users is None and len(u) else (n_users or 0)
    n_items = int(i.max()) + 1 if n_items is None and len(i) else (n_items or 0)
    while True:
        uc = np.bincount(u[keep], minlength=n_users)
        ic = np.bincount(i[keep], minlength=n_items)
        new = keep & (uc[u] >= k) & (ic[i] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def temporal_split(t, user_rank, item_rank, valid_frac, test_frac):
    """Global temporal split. Rows are ordered by (timestamp, user id, item id) (ids by their string order,
    so the result does not depend on the file's line order); the first share is train, then valid, then test.
    Returns (order, split) with split[j] in {0 train, 1 valid, 2 test} for the row order[j].
    Every valid/test timestamp is therefore >= every train timestamp."""
    n = len(t)
    order = np.lexsort((item_rank, user_rank, t))
    n_valid, n_test = int(round(n * valid_frac)), int(round(n * test_frac))
    split = np.zeros(n, dtype=np.int8)
    split[n - n_valid - n_test:n - n_test] = 1
    split[n - n_test:] = 2
    return order, split


def cold_start_mask(u, i, split):
    """Valid/test rows are kept only when their user and their item appear in train."""
    train = split == 0
    tu = np.zeros(int(u.max()) + 1 if len(u) else 0, dtype=bool)
    ti = np.zeros(int(i.max()) + 1 if len(i) else 0, dtype=bool)
    tu[u[train]] = True
    ti[i[train]] = True
    return train | (tu[u] & ti[i])
