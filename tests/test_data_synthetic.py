"""The synthetic catalogue: deterministic, in the raw Amazon 2014 format, realistic ratings, and a taste that
the long history reveals and the recent one does not."""
import ast
import gzip
import hashlib
import json
import re

import numpy as np
import pytest

from data import load_dataset
from data.history import HistoryIndex
from data.synthetic import ERAS, GENRES, MOODS, generate
from scripts.prepare_data import main as prepare_main


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    prepare_main(["--source", "synthetic", "--out", str(d / "canonical"), "--no-progress"])
    return d, load_dataset(d / "canonical")


def test_deterministic_and_raw_format(tmp_path):
    a, b, c = (generate(tmp_path / n, seed=s, n_users=20, n_items=60) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    digest = lambda f: hashlib.sha256(open(f, "rb").read()).hexdigest()  # noqa: E731
    assert digest(a["reviews"]) == digest(b["reviews"]) and digest(a["meta"]) == digest(b["meta"])
    assert digest(a["reviews"]) != digest(c["reviews"])
    for line in gzip.open(a["meta"], "rt"):
        d = ast.literal_eval(line)  # a Python dict literal, not JSON
        assert set(d) >= {"asin", "title", "categories", "description"}
    for line in gzip.open(a["reviews"], "rt"):
        d = json.loads(line)
        assert d["overall"] in (1.0, 2.0, 3.0, 4.0, 5.0) and isinstance(d["unixReviewTime"], int)


def test_defaults_give_realistic_ratings_and_long_histories(syn):
    d, ds = syn
    users = {x.user_id for x in ds.interactions}
    assert 250 <= len(users) <= 400 and 300 <= len(ds.items) <= 500
    mean = np.mean([x.rating for x in ds.interactions])
    assert 4.0 <= mean <= 4.4
    assert len(ds.oracle) == len(users) and all("Dislikes" in p for p in ds.oracle.values())
    h = HistoryIndex(ds)
    for x in ds.split("valid") + ds.split("test"):
        assert len(h.user_history(x.user_id, x.timestamp, 30)) == 30  # the profile writer's window is full
    for it in ds.items.values():  # attributes are named plainly in the title
        assert sum(w in it.title for w in GENRES) >= 1 and any(w in it.title for w in ERAS)


def dislike_recall(ds, k):
    """A simple attribute-counting estimator reading only titles and ratings: per family (genre, mood), the
    attribute with the lowest mean rating, if below 3.5, is guessed as disliked. Recall of the true dislikes."""
    tastes = {json.loads(l)["user_id"]: json.loads(l)["disliked"]
              for l in open(ds.manifest["_dir"] + "/oracle_profiles.jsonl")}
    h = HistoryIndex(ds)
    first = {}
    for x in ds.split("valid"):
        first.setdefault(x.user_id, x.timestamp)
    hits = []
    for u, t in first.items():
        hist = h.user_history(u, t, k)
        guess = []
        for family in (GENRES, MOODS):
            means = {}
            for a in family:
                rs = [e.rating for e in hist if re.search(rf"\({a} | {a},", e.title)]
                if rs:
                    means[a] = np.mean(rs)
            if means and min(means.values()) < 3.5:
                guess.append(min(means, key=means.get))
        hits += [x in guess for x in tastes[u]]
    return float(np.mean(hits))


def test_long_history_reveals_dislikes_recent_does_not(syn):
    d, ds = syn
    ds.manifest["_dir"] = str(d / "canonical")
    r10, r50 = dislike_recall(ds, 10), dislike_recall(ds, 50)
    assert r50 >= 0.75 and r10 <= 0.15 and r50 - r10 >= 0.6, (r10, r50)


def test_reviews_state_likes_and_dislikes_in_words(syn):
    _, ds = syn
    text = " ".join(x.review for x in ds.interactions[:3000]).lower()
    assert "isn't for me" in text or "can't stand" in text
    assert "exactly my thing" in text or "i love anything" in text


def test_oracle_pair_profile_states_the_expected_rating(syn):
    """The pair oracle applies the hidden taste to the item's title: its stated rating follows the realised
    ratings (noise aside) far better than the mean rating, and a bad title is a clear error."""
    from data.synthetic import oracle_pair_profile

    _, ds = syn
    xs = ds.split("test")
    said = np.array([int(re.search(r"about (\d)/5", oracle_pair_profile(ds.oracle_taste[x.user_id],
                                                                        ds.items[x.item_id].title))[1]) for x in xs])
    y = np.array([x.rating for x in xs])
    assert set(said) >= {2, 3, 5}  # dislikes and likes both show
    assert np.abs(said - y).mean() < 0.7 * np.abs(y.mean() - y).mean()
    text = oracle_pair_profile({"liked": ["rock", "jazz", "calm", "1990s"], "disliked": ["metal", "dark"],
                                "bias": 0.0}, "Broken Rooms (dark metal, 1980s)")
    assert text == "Would rate this dark metal album about 1/5."  # 4.4 - 2 * 1.6 = 1.2
    with pytest.raises(ValueError, match="not a synthetic title"):
        oracle_pair_profile(ds.oracle_taste[xs[0].user_id], "Kind of Blue")
