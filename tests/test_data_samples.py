"""The pipeline on the REAL Digital Music and Yelp samples, checked against a direct computation."""
import ast
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data import load_dataset
from data.history import HistoryIndex
from data.process import prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MUSIC = SHARED / "amazon-digital-music-2014-sample"
YELP = SHARED / "yelp-sample"
need_music = pytest.mark.skipif(not MUSIC.is_dir(), reason=f"shared sample absent: {MUSIC}")
need_yelp = pytest.mark.skipif(not YELP.is_dir(), reason=f"shared sample absent: {YELP}")


def direct_kcore(pairs, k):
    """Brute force: iterate plain Counters until every user and item has >= k pairs."""
    while True:
        uc, ic = Counter(u for u, _ in pairs), Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if uc[u] >= k and ic[i] >= k}
        if kept == pairs:
            return pairs
        pairs = kept


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    out = tmp_path_factory.mktemp("music") / "canonical"
    man = prepare("amazon2014", MUSIC / "reviews_Digital_Music_5.sample.json.gz", out,
                  meta=MUSIC / "meta_Digital_Music.sample.json.gz", kcore=5, log=lambda m: None)
    return man, load_dataset(out)


@need_music
def test_music_counts_match_direct_computation(music):
    man, ds = music
    latest = {}
    for line in gzip.open(MUSIC / "reviews_Digital_Music_5.sample.json.gz", "rt"):
        d = json.loads(line)
        key = (d["reviewerID"], d["asin"])
        if key not in latest or d["unixReviewTime"] >= latest[key]:
            latest[key] = d["unixReviewTime"]
    core = direct_kcore(set(latest), 5)
    users, items = {u for u, _ in core}, {i for _, i in core}
    assert (len(core), len(users), len(items)) == (2480, 268, 206)  # the sample's documented 5-core figures
    assert man["counts"]["after_kcore"] == {"interactions": len(core), "users": len(users), "items": len(items)}
    # what survives the cold-start filter is a subset of the core, and train is all of the core's train share
    got = {(x.user_id, x.item_id) for x in ds.interactions}
    assert got <= core
    assert len(ds.split("train")) == len(core) - round(0.1 * len(core)) * 2
    # items.jsonl holds the titles of the metadata file (parsed here independently)
    meta = {}
    for line in gzip.open(MUSIC / "meta_Digital_Music.sample.json.gz", "rt"):
        d = ast.literal_eval(line)
        meta[d["asin"]] = d.get("title", "")
    assert set(ds.items) == {x.item_id for x in ds.interactions}
    assert all(ds.items[i].title == meta[i] for i in ds.items)


@need_music
def test_music_split_is_temporal_and_has_no_cold_start(music):
    _, ds = music
    train = ds.split("train")
    later = ds.split("valid") + ds.split("test")
    assert len(later) > 0
    assert min(x.timestamp for x in later) >= max(x.timestamp for x in train)
    assert min(x.timestamp for x in ds.split("test")) >= max(x.timestamp for x in ds.split("valid"))
    tu, ti = {x.user_id for x in train}, {x.item_id for x in train}
    assert all(x.user_id in tu and x.item_id in ti for x in later)
    assert [x.timestamp for x in ds.interactions] == sorted(x.timestamp for x in ds.interactions)
    assert all(isinstance(x.rating, int) and 1 <= x.rating <= 5 for x in ds.interactions)


@need_music
def test_music_histories_never_leak(music):
    """Property over every target: histories and averages equal a brute-force scan of what is strictly earlier."""
    _, ds = music
    h = HistoryIndex(ds)
    U = np.array([x.user_id for x in ds.interactions])
    I = np.array([x.item_id for x in ds.interactions])
    T = np.array([x.timestamp for x in ds.interactions])
    R = np.array([x.rating for x in ds.interactions], dtype=float)
    for x in ds.interactions:
        before = T < x.timestamp
        uh = h.user_history(x.user_id, x.timestamp, 10)
        mu = np.flatnonzero(before & (U == x.user_id))
        assert [(e.item_id, e.timestamp) for e in uh] == [(I[j], T[j]) for j in mu[-10:]]
        assert all(e.timestamp < x.timestamp and e.item_id != x.item_id for e in uh)
        ih = h.item_history(x.item_id, x.timestamp, 10, exclude_user=x.user_id)
        mi = np.flatnonzero(before & (I == x.item_id) & (U != x.user_id))
        assert [(e.user_id, e.timestamp) for e in ih] == [(U[j], T[j]) for j in mi[-10:]]
        ua, ia = h.user_average(x.user_id, x.timestamp), h.item_average(x.item_id, x.timestamp)
        mu_all, mi_all = before & (U == x.user_id), before & (I == x.item_id)
        assert (ua is None) == (not mu_all.any()) and (ia is None) == (not mi_all.any())
        if ua is not None:
            assert ua == pytest.approx(R[mu_all].mean())
        if ia is not None:
            assert ia == pytest.approx(R[mi_all].mean())


@need_yelp
def test_yelp_sample_parses_and_drops_missing_business(tmp_path):
    reviews = YELP / "yelp_academic_dataset_review.sample.json"
    business = YELP / "yelp_academic_dataset_business.sample.json"
    known = {json.loads(l)["business_id"] for l in open(business)}
    rows = [json.loads(l) for l in open(reviews)]
    missing = sum(r["business_id"] not in known for r in rows)
    assert missing == len(rows) - 433  # README: only 433 reviews have their business in the file
    logs = []
    man = prepare("yelp", reviews, tmp_path / "yelp", meta=business, kcore=1, log=logs.append)
    assert man["counts"]["raw_reviews"] == len(rows)
    assert man["counts"]["dropped_missing_item"] == missing
    assert any(f"dropped {missing} reviews" in m for m in logs)
    ds = load_dataset(tmp_path / "yelp")
    assert len(ds.split("train")) == man["counts"]["train"] > 0
    assert all(i in known for i in ds.items)
    biz = {json.loads(l)["business_id"]: json.loads(l)["name"] for l in open(business)}
    assert all(ds.items[i].title == biz[i] for i in ds.items)
