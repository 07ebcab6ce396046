"""eval/baselines.py: the means against hand values; biased MF against a synthetic low-rank dataset."""

import math

import numpy as np
import pytest

from eval.baselines import BiasedMF, GlobalMean, ItemMean, UserMean

TRAIN = [("u1", "i1", 5.0), ("u1", "i2", 3.0), ("u2", "i1", 4.0), ("u3", "i3", 1.0)]


def test_means_hand_values_and_fallback():
    users, items = ["u1", "u2", "u3", "new"], ["i1", "i2", "i3", "new"]
    assert GlobalMean().fit(TRAIN).predict(users, items).tolist() == [3.25] * 4
    assert UserMean().fit(TRAIN).predict(users, items).tolist() == [4.0, 4.0, 1.0, 3.25]
    assert ItemMean().fit(TRAIN).predict(users, items).tolist() == [4.5, 3.0, 1.0, 3.25]


def test_bad_triples_name_the_row():
    with pytest.raises(ValueError, match=r"train_triples\[1\]"):
        GlobalMean().fit([("u", "i", 3.0), ("u", "i", "five")])
    with pytest.raises(ValueError, match=r"train_triples\[0\]"):
        UserMean().fit([("u", "i")])
    with pytest.raises(ValueError, match=r"valid_triples\[0\]"):
        BiasedMF().fit(TRAIN, [("u1", "i1", float("nan"))])


def _synthetic(seed=0, n_users=300, n_items=200, rank=3, per_user=30):
    """Ratings 1..5 from mu + b_u + b_i + p_u . q_i + noise, rounded and clipped; random 80/10/10 split."""
    rng = np.random.default_rng(seed)
    P = rng.normal(0, 1, (n_users, rank))
    Q = rng.normal(0, 1, (n_items, rank))
    bu, bi = rng.normal(0, 0.4, n_users), rng.normal(0, 0.4, n_items)
    triples = []
    for u in range(n_users):
        for i in rng.choice(n_items, per_user, replace=False):
            r = 3.2 + bu[u] + bi[i] + P[u] @ Q[i] / math.sqrt(rank) * 1.2 + rng.normal(0, 0.3)
            triples.append((f"u{u}", f"i{i}", float(np.clip(np.floor(r + 0.5), 1, 5))))
    order = rng.permutation(len(triples))
    n = len(triples)
    pick = lambda a, b: [triples[k] for k in order[int(a * n) : int(b * n)]]
    return pick(0, 0.8), pick(0.8, 0.9), pick(0.9, 1.0)


def _rmse(model, triples):
    pred = model.predict([t[0] for t in triples], [t[1] for t in triples])
    return float(np.sqrt(np.mean((pred - np.array([t[2] for t in triples])) ** 2)))


def test_mf_beats_means_on_low_rank_data_and_is_seeded():
    train, valid, test = _synthetic()
    mf = BiasedMF(factors=(3, 16), regs=(1.0, 5.0, 20.0), max_epochs=15, seed=0).fit(train, valid)
    scores = {name: _rmse(m.fit(train, valid), test) for name, m in
              (("global", GlobalMean()), ("user", UserMean()), ("item", ItemMean()))}
    mf_rmse = _rmse(mf, test)
    assert mf_rmse < 0.8 * scores["global"], (mf_rmse, scores)
    assert mf_rmse < 0.9 * min(scores.values()), (mf_rmse, scores)
    assert len(mf.grid_results) == 6 and 1 <= mf.best["epochs"] <= 15
    assert math.isclose(mf.best["valid_rmse"], min(g["valid_rmse"] for g in mf.grid_results))
    # same seed, same predictions; predictions stay on the scale; unknown ids fall back to mu (+ known bias)
    mf2 = BiasedMF(factors=(3, 16), regs=(1.0, 5.0, 20.0), max_epochs=15, seed=0).fit(train, valid)
    users, items = [t[0] for t in test], [t[1] for t in test]
    assert np.array_equal(mf.predict(users, items), mf2.predict(users, items))
    pred = mf.predict(users, items)
    assert pred.min() >= 1.0 and pred.max() <= 5.0
    assert math.isclose(float(mf.predict(["nobody"], ["nothing"])[0]), float(np.clip(mf.mu, 1, 5)))


def test_mf_without_valid_uses_first_grid_point():
    train, _, _ = _synthetic(seed=1, n_users=40, n_items=30, per_user=10)
    mf = BiasedMF(factors=(4, 8), regs=(2.0, 9.0), max_epochs=5).fit(train)
    assert mf.best["factors"] == 4 and mf.best["reg"] == 2.0 and mf.best["epochs"] == 5
    assert _rmse(mf, train) < _rmse(GlobalMean().fit(train), train)
