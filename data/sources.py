"""Per-source record parsers: one raw line -> a review tuple or an item tuple.

Every source is reduced to
    review: (user_id: str, item_id: str, rating: int 1..5, timestamp: int seconds, text: str)
    item:   (item_id: str, title: str, description: str)
A parser raises BadRecord with a reason for an unusable line. Field names follow the official files:
- Amazon 2014: reviews JSON lines (reviewerID, asin, overall, unixReviewTime, reviewText);
  meta one Python dict literal a line (asin, title, categories [[...]], description) -> ast.literal_eval.
- Amazon 2018: reviews as 2014; meta JSON lines (asin, title, category [...], description [...]).
- Amazon 2023: reviews jsonl (user_id, parent_asin, rating, timestamp in ms, title, text);
  meta jsonl (parent_asin, title, main_category, categories, description [...], features [...]).
- Yelp: review JSON lines (user_id, business_id, stars, date "YYYY-MM-DD HH:MM:SS", text);
  business JSON lines (business_id, name, categories "a, b, c", city, state).
"""
import ast
import calendar
import json
import re
import time
from dataclasses import dataclass
from typing import Callable

from data.io import BadRecord


def _obj(line, python_literal=False):
    try:
        d = ast.literal_eval(line.strip()) if python_literal else json.loads(line)
    except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError) as e:
        raise BadRecord(f"malformed {'Python literal' if python_literal else 'JSON'} ({type(e).__name__})")
    if not isinstance(d, dict):
        raise BadRecord(f"expected an object, got {type(d).__name__}")
    return d


def _field(d, key):
    if key not in d or d[key] is None:
        raise BadRecord(f"missing field '{key}'")
    return d[key]


def _id(d, key):
    v = _field(d, key)
    if not isinstance(v, str) or not v.strip():
        raise BadRecord(f"field '{key}' must be a non-empty string")
    return v


def _rating(d, key):
    v = _field(d, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRecord(f"field '{key}' is not a number: {v!r:.40}")
    if v != v or v != int(v) or not 1 <= v <= 5:
        raise BadRecord(f"field '{key}' = {v!r} is not an integer rating in 1..5")
    return int(v)


def _int_time(d, key, divide=1):
    v = _field(d, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0:
        raise BadRecord(f"field '{key}' is not a non-negative numeric timestamp: {v!r:.40}")
    return int(v) // divide


def _text(d, *keys):
    parts = [d.get(k) for k in keys]
    return " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())


def _join(xs):
    """Flatten nested lists of strings, keep the first occurrence of each, join with ', '."""
    out, seen, stack = [], set(), [xs]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            x = x.strip()
            if x and x not in seen:
                seen.add(x)
                out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed(x))
    return ", ".join(out)


def _describe(categories, text):
    cats = _join(categories)
    text = _join(text) if not isinstance(text, str) else text.strip()
    return " ".join(s for s in ((f"Categories: {cats}." if cats else ""), text) if s)


# ---------------------------------------------------------------- reviews
def review_amazon2014(line):
    d = _obj(line)
    return (_id(d, "reviewerID"), _id(d, "asin"), _rating(d, "overall"), _int_time(d, "unixReviewTime"),
            _text(d, "reviewText"))


review_amazon2018 = review_amazon2014  # same review fields (2018 adds vote, verified, style, image)


def review_amazon2023(line):
    d = _obj(line)
    return (_id(d, "user_id"), _id(d, "parent_asin"), _rating(d, "rating"), _int_time(d, "timestamp", 1000),
            _text(d, "text"))


def yelp_date(s):
    """'YYYY-MM-DD HH:MM:SS' (UTC, as Yelp publishes it) -> integer seconds."""
    if not isinstance(s, str):
        raise BadRecord(f"field 'date' is not a string: {s!r:.40}")
    try:
        return calendar.timegm(time.strptime(s.strip(), "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        raise BadRecord(f"field 'date' = {s!r:.40} is not 'YYYY-MM-DD HH:MM:SS'")


def review_yelp(line):
    d = _obj(line)
    return (_id(d, "user_id"), _id(d, "business_id"), _rating(d, "stars"), yelp_date(_field(d, "date")),
            _text(d, "text"))


# ---------------------------------------------------------------- items
def item_amazon2014(line):
    d = _obj(line, python_literal=True)
    return _id(d, "asin"), _text(d, "title"), _describe(d.get("categories"), d.get("description") or "")


def item_amazon2018(line):
    d = _obj(line)
    return _id(d, "asin"), _text(d, "title"), _describe(d.get("category"), d.get("description") or "")


def item_amazon2023(line):
    d = _obj(line)
    cats = [d.get("main_category") or "", d.get("categories") or []]
    return _id(d, "parent_asin"), _text(d, "title"), _describe(cats, [d.get("description") or [],
                                                                     d.get("features") or []])


def item_yelp(line):
    d = _obj(line)
    where = ", ".join(x for x in (d.get("city"), d.get("state")) if isinstance(x, str) and x)
    cats = d.get("categories") if isinstance(d.get("categories"), str) else ""
    desc = " ".join(s for s in ((f"Categories: {cats}." if cats else ""), (f"Located in {where}." if where else "")) if s)
    return _id(d, "business_id"), _text(d, "name"), desc


@dataclass(frozen=True)
class Source:
    name: str
    parse_review: Callable
    parse_item: Callable
    item_key: re.Pattern  # finds the item id in a raw meta line without parsing it (skip unneeded items fast)
    meta_flag: str        # the prepare_data.py flag that names the item file


_PY = re.compile(r"""'asin':\s*'([^'\\]+)'""")
SOURCES = {
    "amazon2014": Source("amazon2014", review_amazon2014, item_amazon2014, _PY, "--meta"),
    "synthetic": Source("synthetic", review_amazon2014, item_amazon2014, _PY, "--meta"),
    "amazon2018": Source("amazon2018", review_amazon2018, item_amazon2018, re.compile(r'"asin":\s*"([^"\\]+)"'), "--meta"),
    "amazon2023": Source("amazon2023", review_amazon2023, item_amazon2023,
                         re.compile(r'"parent_asin":\s*"([^"\\]+)"'), "--meta"),
    "yelp": Source("yelp", review_yelp, item_yelp, re.compile(r'"business_id":\s*"([^"\\]+)"'), "--business"),
}
