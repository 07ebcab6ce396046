"""History windows on a hand-made dataset with equal timestamps (hand-computed expectations)."""
from data import Dataset, Interaction, Item
from data.history import HistoryIndex


def small():
    X = [("a", "i1", 5, 10, "a likes i1 a lot"), ("b", "i1", 1, 10, "b hates i1"), ("a", "i2", 3, 20, "meh"),
         ("c", "i1", 4, 20, "c on i1"), ("a", "i3", 4, 30, "a on i3"), ("b", "i2", 2, 30, "b on i2"),
         ("a", "i4", 2, 40, "a on i4"), ("c", "i2", 5, 50, "c on i2")]
    inter = [Interaction(*x, "train") for x in X]
    items = {i: Item(i, f"Title {i}", "") for i in ("i1", "i2", "i3", "i4")}
    return Dataset(inter, items)


def test_user_history_is_strictly_before_and_oldest_first():
    h = HistoryIndex(small())
    assert [(e.item_id, e.timestamp) for e in h.user_history("a", 30, 10)] == [("i1", 10), ("i2", 20)]
    assert [e.item_id for e in h.user_history("a", 41, 2)] == ["i3", "i4"]
    assert h.user_history("a", 10, 5) == []
    e = h.user_history("a", 11, 1, review_chars=7)[0]
    assert (e.title, e.rating, e.review, e.user_id) == ("Title i1", 5, "a likes", None)
    assert h.user_history("zzz", 100, 5) == [] and h.user_average("zzz", 100) is None


def test_item_history_excludes_user_and_the_present():
    h = HistoryIndex(small())
    # i1 at t=20: only the two reviews at t=10 (c's own review at 20 is not "before")
    assert [(e.user_id, e.rating) for e in h.item_history("i1", 20, 10)] == [("a", 5), ("b", 1)]
    assert [(e.user_id, e.rating) for e in h.item_history("i1", 21, 10, exclude_user="a")] == [("b", 1), ("c", 4)]
    assert [e.user_id for e in h.item_history("i1", 21, 1, exclude_user="c")] == ["b"]
    assert h.item_history("i2", 20, 3) == []


def test_averages_use_only_the_past():
    h = HistoryIndex(small())
    assert h.user_average("a", 10) is None
    assert h.user_average("a", 30) == (5 + 3) / 2
    assert h.user_average("a", 1000) == (5 + 3 + 4 + 2) / 4
    assert h.item_average("i1", 20) == (5 + 1) / 2
    assert h.item_average("i2", 50) == (3 + 2) / 2
