"""History windows for a target (user, item, time t), the inputs of every profile and rating prompt.

Nothing at or after t, from any split, may enter: every lookup is a bisect_left on a timestamp-sorted list
(positions < j are exactly the timestamps < t), and averages are prefix sums up to j.
DUET's defaults: k = 10 interactions, reviews cut to 200 characters, averages shown with one decimal.
"""
from bisect import bisect_left
from typing import NamedTuple, Optional


class HistoryEntry(NamedTuple):
    item_id: str
    title: str
    rating: int
    review: str
    timestamp: int
    user_id: Optional[str] = None  # set for item histories (who wrote the review)


class _Track:
    """One user's or item's interactions in time order: timestamps, interaction indices, rating prefix sums."""
    __slots__ = ("ts", "idx", "csum")

    def __init__(self):
        self.ts, self.idx, self.csum = [], [], [0]


class HistoryIndex:
    def __init__(self, dataset):
        self.ds = dataset
        self.inter = dataset.interactions
        self.users, self.items = {}, {}
        order = sorted(range(len(self.inter)), key=lambda j: self.inter[j].timestamp)  # stable; usually a no-op
        for j in order:
            x = self.inter[j]
            for key, table in ((x.user_id, self.users), (x.item_id, self.items)):
                tr = table.get(key)
                if tr is None:
                    tr = table[key] = _Track()
                tr.ts.append(x.timestamp)
                tr.idx.append(j)
                tr.csum.append(tr.csum[-1] + x.rating)

    def _entry(self, j, review_chars, with_user):
        x = self.inter[j]
        item = self.ds.items.get(x.item_id)
        return HistoryEntry(x.item_id, item.title if item else "", x.rating, x.review[:review_chars], x.timestamp,
                            x.user_id if with_user else None)

    def user_history(self, user_id, t, k, review_chars=200):
        """The user's last k interactions with timestamp < t, oldest first."""
        tr = self.users.get(user_id)
        if tr is None or k <= 0:
            return []
        j = bisect_left(tr.ts, t)
        return [self._entry(x, review_chars, False) for x in tr.idx[max(0, j - k):j]]

    def user_item_ids(self, user_id, t):
        """Ids of every item the user interacted with at a timestamp < t (all splits), oldest first."""
        tr = self.users.get(user_id)
        if tr is None:
            return []
        return [self.inter[j].item_id for j in tr.idx[:bisect_left(tr.ts, t)]]

    def item_history(self, item_id, t, k, exclude_user=None, review_chars=200):
        """The item's last k reviews with timestamp < t by users other than `exclude_user`, oldest first."""
        tr = self.items.get(item_id)
        if tr is None or k <= 0:
            return []
        out = []
        for p in range(bisect_left(tr.ts, t) - 1, -1, -1):
            j = tr.idx[p]
            if exclude_user is not None and self.inter[j].user_id == exclude_user:
                continue
            out.append(j)
            if len(out) == k:
                break
        return [self._entry(j, review_chars, True) for j in reversed(out)]

    @staticmethod
    def _average(tr, t):
        if tr is None:
            return None
        j = bisect_left(tr.ts, t)
        return tr.csum[j] / j if j else None

    def user_average(self, user_id, t):
        """Mean rating of the user's interactions with timestamp < t (all splits); None when there is none."""
        return self._average(self.users.get(user_id), t)

    def item_average(self, item_id, t):
        """Mean rating the item received with timestamp < t (all splits, all users); None when there is none."""
        return self._average(self.items.get(item_id), t)
