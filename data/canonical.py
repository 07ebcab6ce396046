"""The canonical dataset directory, the one format every tool reads:

    interactions.jsonl  {"user_id", "item_id", "rating" (1-5), "timestamp" (int seconds), "review", "split"}
                        one line per interaction, sorted by timestamp; split in train / valid / test
    items.jsonl         {"item_id", "title", "description"}
    manifest.json       source, options, counts, statistics, hashes of the inputs
    oracle_profiles.jsonl (optional; synthetic data) {"user_id", "profile", ...}: the hidden taste as text
"""
import json
from pathlib import Path
from typing import NamedTuple

from data.io import DataError, check_file

SPLIT_NAMES = ("train", "valid", "test")


class Interaction(NamedTuple):
    user_id: str
    item_id: str
    rating: int
    timestamp: int
    review: str
    split: str


class Item(NamedTuple):
    item_id: str
    title: str
    description: str


class Dataset:
    """Interactions sorted by timestamp, items by id, optional oracle profiles, and the manifest."""

    def __init__(self, interactions, items, oracle=None, manifest=None, oracle_taste=None):
        self.interactions = interactions
        self.items = items
        self.oracle = oracle or {}  # user_id -> hidden taste as text (synthetic data)
        self.oracle_taste = oracle_taste or {}  # user_id -> the whole oracle_profiles.jsonl record
        self.manifest = manifest or {}
        self._splits = {}

    def split(self, name):
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        if name not in self._splits:
            self._splits[name] = [x for x in self.interactions if x.split == name]
        return self._splits[name]

    def __len__(self):
        return len(self.interactions)

    def __repr__(self):
        return (f"Dataset({self.manifest.get('source', '?')}: {len(self.interactions)} interactions, "
                f"{len(self.items)} items, oracle={len(self.oracle)})")


def _records(path, fields):
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            yield tuple(d[k] for k in fields), d
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: bad line ({type(e).__name__}: {e})") from e


def load_dataset(dir):
    """Read a canonical directory written by scripts/prepare_data.py (or by anyone following the format)."""
    d = Path(dir)
    if not d.is_dir():
        raise DataError(f"{d}: no such dataset directory (run scripts/prepare_data.py --out {d})")
    manifest = json.loads(check_file(d / "manifest.json").read_text(encoding="utf-8"))
    items = {}
    for (iid, title, desc), _ in _records(check_file(d / "items.jsonl"), ("item_id", "title", "description")):
        items[iid] = Item(iid, title, desc)
    inter, last = [], None
    path = check_file(d / "interactions.jsonl")
    for n, (vals, _) in enumerate(_records(path, Interaction._fields), 1):
        x = Interaction(*vals)
        if not isinstance(x.rating, int) or not 1 <= x.rating <= 5 or x.split not in SPLIT_NAMES \
                or not isinstance(x.timestamp, int):
            raise DataError(f"{path}: interaction {n} has a bad rating, timestamp or split: {x[:4]} {x.split!r}")
        if last is not None and x.timestamp < last:
            raise DataError(f"{path}: interaction {n} is out of timestamp order")
        last = x.timestamp
        inter.append(x)
    oracle, taste = {}, {}
    op = d / "oracle_profiles.jsonl"
    if op.exists():
        for (uid, prof), rec in _records(op, ("user_id", "profile")):
            oracle[uid], taste[uid] = prof, rec
    return Dataset(inter, items, oracle, manifest, oracle_taste=taste)
