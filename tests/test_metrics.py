"""eval/metrics.py and eval/reward.py against hand-computed values and brute force."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from eval.metrics import macro_f1, ranking_metrics, rating_metrics, round_half_up
from eval.reward import rating_reward


def test_rating_metrics_hand_values_clipping_rounding_missing_class():
    y = [5, 4, 3, 1, 2, 4]
    p = [4.5, 3.49, 7.0, -1.0, 2.5, 4.0]
    # classes round_half_up(clip(p, 1, 5)) = [5, 3, 5, 1, 3, 4]; 2.5 -> 3 (numpy's round would say 2)
    m = rating_metrics(y, p, failures=2)
    assert m["n"] == 6 and m["format_failures"] == 2
    assert math.isclose(m["mae"], (0.5 + 0.51 + 4 + 2 + 0.5 + 0) / 6, rel_tol=1e-12)
    assert math.isclose(m["rmse"], math.sqrt((0.25 + 0.51**2 + 16 + 4 + 0.25 + 0) / 6), rel_tol=1e-12)
    assert m["acc"] == 3 / 6
    # per class F1 = 2tp / (2tp + fp + fn): 1: 1; 2: 0 (true, never predicted); 3: 0; 4: 2/3; 5: 2/3
    assert math.isclose(m["f1_macro_5"], (1 + 0 + 0 + 2 / 3 + 2 / 3) / 5, rel_tol=1e-12)
    assert m["f1_macro_present"] == m["f1_macro_5"]  # all five classes occur


def test_rating_metrics_f1_five_classes_and_present_differ():
    """Classes 3, 4, 5 in neither truth nor prediction: macro over five counts them as 0, present-only drops them."""
    m = rating_metrics([1, 1, 2], [1.0, 2.0, 2.0])
    assert math.isclose(m["f1_macro_present"], 2 / 3, rel_tol=1e-12)  # (2/3 + 2/3) / 2
    assert math.isclose(m["f1_macro_5"], 4 / 15, rel_tol=1e-12)  # (2/3 + 2/3 + 0 + 0 + 0) / 5


def test_macro_f1_over_labels_present_only():
    # classes 3, 4, 5 appear nowhere: averaged over {1, 2}, not over five classes (which would give 4/15)
    assert math.isclose(macro_f1([1, 1, 2], [1, 2, 2]), 2 / 3, rel_tol=1e-12)
    # predicted-but-never-true class counts with F1 0
    assert math.isclose(macro_f1([1, 1], [1, 5]), (2 / 3 + 0) / 2, rel_tol=1e-12)


def test_macro_f1_matches_sklearn_if_installed():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(1, 6, 15), rng.integers(1, 4, 15)
        assert math.isclose(macro_f1(a, b), sk.f1_score(a, b, average="macro", zero_division=0), rel_tol=1e-12)
        assert math.isclose(macro_f1(a, b, labels=range(1, 6)),
                            sk.f1_score(a, b, labels=[1, 2, 3, 4, 5], average="macro", zero_division=0), rel_tol=1e-12)


def test_round_half_up_and_errors():
    assert round_half_up([0.5, 1.5, 2.5, 3.4999, -0.5]).tolist() == [1, 2, 3, 3, 0]
    with pytest.raises(ValueError, match=r"y_true\[1\]"):
        rating_metrics([1, 3.5], [1, 2])
    with pytest.raises(ValueError, match=r"y_pred\[0\]"):
        rating_metrics([1], [float("nan")])
    with pytest.raises(ValueError):
        rating_metrics([1, 2], [1])
    empty = rating_metrics([], [], failures=3)
    assert empty["n"] == 0 and empty["format_failures"] == 3 and math.isnan(empty["mae"])


def test_ranking_hand_values_ties():
    pos, neg = [3.0], [[4.0, 3.0, 1.0, 2.0]]  # one above, one tied
    pe = ranking_metrics(pos, neg, ks=(1, 2, 5))  # rank 3
    assert pe["hit@1"] == 0 and pe["hit@2"] == 0 and pe["hit@5"] == 1
    assert math.isclose(pe["ndcg@5"], 1 / math.log2(4)) and math.isclose(pe["mrr"], 1 / 3)
    op = ranking_metrics(pos, neg, ks=(2,), ties="optimistic")  # rank 2
    assert op["hit@2"] == 1 and math.isclose(op["ndcg@2"], 1 / math.log2(3)) and math.isclose(op["mrr"], 0.5)
    ra = ranking_metrics(pos, neg, ks=(2,), ties="random")  # rank 2 or 3, each with probability 1/2
    assert math.isclose(ra["hit@2"], 0.5) and math.isclose(ra["mrr"], (1 / 2 + 1 / 3) / 2)
    assert math.isclose(ra["ndcg@2"], 0.5 / math.log2(3))
    # a strict winner
    assert ranking_metrics([9.0], [[1.0, 2.0]], ks=(1,))["ndcg@1"] == 1.0
    with pytest.raises(ValueError):
        ranking_metrics([1.0, 2.0], [[1.0]])


def _brute_force(pos, neg, ks):
    """Every ordering of the N + 1 items consistent with the scores (best first), equally likely."""
    items = [(pos, True)] + [(s, False) for s in neg]
    ranks = []
    for perm in itertools.permutations(items):
        if all(perm[j][0] >= perm[j + 1][0] for j in range(len(perm) - 1)):
            ranks.append(next(j for j, it in enumerate(perm) if it[1]) + 1)
    out = {}
    for policy, rs in (("pessimistic", [max(ranks)]), ("optimistic", [min(ranks)]), ("random", ranks)):
        d = {}
        for k in ks:
            d[f"hit@{k}"] = sum(r <= k for r in rs) / len(rs)
            d[f"ndcg@{k}"] = sum((r <= k) / math.log2(r + 1) for r in rs) / len(rs)
        d["mrr"] = sum(1 / r for r in rs) / len(rs)
        out[policy] = d
    return out


def test_ranking_matches_brute_force_over_permutations():
    rnd = random.Random(0)
    rows = [(float(rnd.randint(1, 3)), [float(rnd.randint(1, 3)) for _ in range(4)]) for _ in range(25)]
    ks = (1, 3, 5)
    brute = [_brute_force(p, n, ks) for p, n in rows]
    for policy in ("pessimistic", "optimistic", "random"):
        got = ranking_metrics([p for p, _ in rows], [n for _, n in rows], ks=ks, ties=policy)
        for key, val in got.items():
            want = sum(b[policy][key] for b in brute) / len(brute)
            assert math.isclose(val, want, rel_tol=1e-12, abs_tol=1e-12), (policy, key)


def test_rating_reward_hand_values():
    assert rating_reward(4.0, 3.5) == 1 - 0.5 / 4
    assert rating_reward(1.0, 5.0) == 0.0
    assert rating_reward(3.0, 3.0, failed=True) == -1.0
    r = rating_reward(np.array([5.0, 2.0, 3.0]), np.array([4.0, np.nan, 3.0]), failed=np.array([False, True, False]),
                      failure_reward=-0.5)
    assert r.tolist() == [0.75, -0.5, 1.0]
    t = rating_reward(torch.tensor([5.0, 2.0]), torch.tensor([2.0, float("nan")]), failed=torch.tensor([False, True]))
    assert t.dtype == torch.float32 and t.tolist() == [0.25, -1.0]
    assert rating_reward(10.0, 4.0, lo=0.0, hi=10.0) == 0.4
