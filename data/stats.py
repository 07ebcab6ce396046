"""Dataset statistics in the shape of the DUET paper's Table 4 (train/valid/test sizes, users, items),
plus the rating distribution."""
import numpy as np

SPLITS = ("train", "valid", "test")


def compute_stats(u, i, r, split):
    """u, i: int codes (N,); r: ratings 1..5 (N,); split: 0/1/2 for train/valid/test (N,)."""
    u, i, r, split = (np.asarray(x) for x in (u, i, r, split))
    n = len(u)
    n_users, n_items = len(np.unique(u)), len(np.unique(i))
    counts = np.bincount(r.astype(np.int64), minlength=6)[1:6] if n else np.zeros(5, dtype=np.int64)
    out = {
        "interactions": n, "users": n_users, "items": n_items,
        "density": n / (n_users * n_items) if n else 0.0,
        "rating_counts": {str(k): int(c) for k, c in zip(range(1, 6), counts)},
        "rating_mean": float(r.mean()) if n else None,
    }
    for s, name in enumerate(SPLITS):
        m = split == s
        out[name] = {"interactions": int(m.sum()), "users": len(np.unique(u[m])), "items": len(np.unique(i[m]))}
    return out


def dataset_stats(ds):
    """Statistics of a loaded canonical Dataset."""
    uid, iid = {}, {}
    u = [uid.setdefault(x.user_id, len(uid)) for x in ds.interactions]
    i = [iid.setdefault(x.item_id, len(iid)) for x in ds.interactions]
    r = [x.rating for x in ds.interactions]
    s = [SPLITS.index(x.split) for x in ds.interactions]
    return compute_stats(u, i, r, s)


def format_stats(st, name=""):
    lines = [f"{'dataset':<12}{'#train':>9}{'#valid':>9}{'#test':>9}{'#users':>9}{'#items':>9}{'density':>10}",
             f"{name[:12]:<12}{st['train']['interactions']:>9,}{st['valid']['interactions']:>9,}"
             f"{st['test']['interactions']:>9,}{st['users']:>9,}{st['items']:>9,}{st['density']:>10.4f}"]
    n = max(st["interactions"], 1)
    lines.append("ratings: " + "  ".join(f"{k}: {c:,} ({c / n:.1%})" for k, c in st["rating_counts"].items())
                 + (f"  mean {st['rating_mean']:.3f}" if st["rating_mean"] is not None else ""))
    for name_ in SPLITS:
        s = st[name_]
        lines.append(f"{name_:<6} {s['interactions']:>9,} interactions {s['users']:>7,} users {s['items']:>7,} items")
    return "\n".join(lines)
