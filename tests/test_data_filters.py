"""Filtering steps against brute force on random data, and the per-source parsers on hand-written lines."""
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pytest

from data.filters import cold_start_mask, dedup_latest, kcore_mask, temporal_split, window_mask
from data.io import BadRecord
from data.sources import (item_amazon2014, item_amazon2018, item_amazon2023, item_yelp, review_amazon2014,
                          review_amazon2023, review_yelp)


def brute_kcore(rows, k):
    rows = set(rows)
    while True:
        uc, ic = Counter(r[1] for r in rows), Counter(r[2] for r in rows)
        kept = {r for r in rows if uc[r[1]] >= k and ic[r[2]] >= k}
        if kept == rows:
            return kept
        rows = kept


@pytest.mark.parametrize("seed", range(5))
def test_kcore_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 400
    u, i = rng.integers(0, 40, n).astype(np.int32), rng.integers(0, 30, n).astype(np.int32)
    keep = kcore_mask(u, i, 4)
    assert {(j, u[j], i[j]) for j in np.flatnonzero(keep)} == brute_kcore({(j, u[j], i[j]) for j in range(n)}, 4)


def test_dedup_keeps_latest_then_last_line():
    u = np.array([0, 0, 0, 1, 1, 0])
    i = np.array([5, 5, 6, 5, 5, 5])
    t = np.array([10, 30, 20, 7, 7, 30])
    # (0,5): rows 0,1,5 -> latest t=30 is rows 1 and 5, the later line (5) wins; (1,5): rows 3,4 tie -> 4
    assert dedup_latest(u, i, t).tolist() == [2, 4, 5]


def test_window_keeps_last_days():
    t = np.array([0, 86400 * 5, 86400 * 9, 86400 * 10])
    assert window_mask(t, 2).tolist() == [False, False, True, True]
    assert window_mask(t, None).all()


def test_temporal_split_orders_by_time_then_ids():
    t = np.array([5, 1, 3, 3, 9, 7, 2, 8, 4, 6])
    urank = np.array([0, 1, 2, 1, 0, 1, 2, 0, 1, 2])
    irank = np.zeros(10, dtype=int)
    order, split = temporal_split(t, urank, irank, 0.2, 0.1)
    assert t[order].tolist() == sorted(t.tolist())
    assert order[2:4].tolist() == [3, 2]  # equal time 3: user rank 1 before user rank 2
    assert split.tolist() == [0] * 7 + [1, 1, 2]


def test_cold_start_mask():
    u = np.array([0, 1, 0, 2, 1])
    i = np.array([0, 1, 1, 0, 2])
    split = np.array([0, 0, 1, 1, 2])
    # row 2 (u0,i1): both in train; row 3: user 2 unseen; row 4: item 2 unseen
    assert cold_start_mask(u, i, split).tolist() == [True, True, True, False, False]


def test_parsers_on_hand_written_lines():
    a14 = '{"reviewerID": "A1", "asin": "B1", "overall": 4.0, "unixReviewTime": 1158019200, "reviewText": "ok"}'
    assert review_amazon2014(a14) == ("A1", "B1", 4, 1158019200, "ok")
    a23 = ('{"rating": 5.0, "title": "t", "text": "great", "asin": "X", "parent_asin": "P", "user_id": "U",'
           ' "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": true}')
    assert review_amazon2023(a23) == ("U", "P", 5, 1588687728, "great")
    y = '{"user_id": "U", "business_id": "B", "stars": 3.0, "text": "fine", "date": "2012-01-03 15:28:18"}'
    expect = int(datetime(2012, 1, 3, 15, 28, 18, tzinfo=timezone.utc).timestamp())
    assert review_yelp(y) == ("U", "B", 3, expect, "fine")
    m14 = "{'asin': 'B1', 'title': \"Don't\", 'categories': [['CDs & Vinyl', 'Rock'], ['Rock']], 'description': 'Loud.'}"
    assert item_amazon2014(m14) == ("B1", "Don't", "Categories: CDs & Vinyl, Rock. Loud.")
    m18 = '{"asin": "B2", "title": "T", "category": ["Music", "Jazz"], "description": ["Smooth", "sax"]}'
    assert item_amazon2018(m18) == ("B2", "T", "Categories: Music, Jazz. Smooth, sax")
    m23 = ('{"parent_asin": "P", "title": "T", "main_category": "Digital Music", "categories": [],'
           ' "description": ["d"], "features": []}')
    assert item_amazon2023(m23) == ("P", "T", "Categories: Digital Music. d")
    b = '{"business_id": "B", "name": "Cafe", "city": "Tucson", "state": "AZ", "categories": "Coffee, Bakery"}'
    assert item_yelp(b) == ("B", "Cafe", "Categories: Coffee, Bakery. Located in Tucson, AZ.")


@pytest.mark.parametrize("line,reason", [
    ('{"reviewerID": "A", "asin": "B", "overall": 5.0, "unixReviewTime": 1', "malformed JSON"),
    ('{"reviewerID": "A", "overall": 5.0, "unixReviewTime": 1}', "missing field 'asin'"),
    ('{"reviewerID": "A", "asin": "B", "overall": 0, "unixReviewTime": 1}', "not an integer rating in 1..5"),
    ('{"reviewerID": "A", "asin": "B", "overall": 7, "unixReviewTime": 1}', "not an integer rating in 1..5"),
    ('{"reviewerID": "A", "asin": "B", "overall": 4.5, "unixReviewTime": 1}', "not an integer rating in 1..5"),
    ('{"reviewerID": "A", "asin": "B", "overall": "5", "unixReviewTime": 1}', "is not a number"),
    ('{"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": "yesterday"}', "numeric timestamp"),
    ('{"reviewerID": "", "asin": "B", "overall": 5, "unixReviewTime": 1}', "non-empty string"),
    ('[1, 2]', "expected an object"),
])
def test_bad_review_lines_have_reasons(line, reason):
    with pytest.raises(BadRecord, match=reason):
        review_amazon2014(line)


def test_bad_meta_literal_is_not_evaluated():
    with pytest.raises(BadRecord, match="malformed Python literal"):
        item_amazon2014("{'asin': __import__('os').getcwd()}")
