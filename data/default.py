"""The embedded default dataset: the synthetic catalogue (seed 0), generated and processed once into the user
cache (PROFILES_CACHE, as for models), then reused. Offline, deterministic, a few hundred users and items."""
from __future__ import annotations

from pathlib import Path


def default_dataset_dir(seed: int = 0, users: int = 300, items: int = 400) -> Path:
    from model.hub import cache_dir

    from .process import prepare
    from .synthetic import generate

    out = cache_dir() / "data" / f"synthetic-seed{seed}-u{users}-i{items}"
    if (out / "manifest.json").exists():  # the directory is renamed into place only when complete
        return out
    raw = out.parent / f"{out.name}_raw"
    files = generate(raw, seed=seed, n_users=users, n_items=items)
    prepare("synthetic", files["reviews"], out, meta=files["meta"], oracle=files["oracle"], overwrite=True)
    return out
