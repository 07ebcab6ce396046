"""What trained DUET writers state, against what a template teacher states for the same targets.

Reads the user profiles an evaluation wrote (`evaluate.py --out DIR`: DIR/predictions.jsonl), takes the first
"N/5" each states, and compares it with two teachers computed from the same history the writer was shown:
`average`, the user's rounded average rating before the target (scripts/make_sft_pairs.py's default teacher),
and `attributes`, the rating read off the last H shown ratings for albums sharing the target's mood and genre
(`make_sft_pairs.py --teacher attributes`, eval.baselines.attribute_estimate). One JSON line per folder:

    python scripts/profile_agreement.py results/duet-lora/s0/attr-sft results/duet-lora/s0/sft \
        --data out/data/synthetic-seed0 --profile-history 8
"""

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RATING = re.compile(r"\b([1-5])/5\b")


def stated_rating(profile):
    """The first "N/5" a profile states, or None."""
    m = RATING.search(profile or "")
    return int(m.group(1)) if m else None


def agreement(rows, ds, hx, split: str, history: int) -> dict:
    """rows: predictions.jsonl records (user_id, item_id, user_profile) of targets of `split`."""
    from eval.baselines import attribute_estimate
    from eval.profiles import item_title

    by_pair = {}
    for x in ds.split(split):
        by_pair.setdefault((x.user_id, x.item_id), []).append(x)
    stated, teachers = Counter(), {"average": Counter(), "attributes": Counter()}
    agree = {"average": 0, "attributes": 0}
    confusion = Counter()  # (attributes teacher's N, stated N)
    for line, r in enumerate(rows, 1):
        xs = by_pair.get((r["user_id"], r["item_id"]))
        if not xs or len(xs) > 1:
            raise SystemExit(f"predictions.jsonl line {line}: ({r['user_id']}, {r['item_id']}) matches "
                             f"{len(xs or [])} {split} interactions of the dataset, not one")
        x, s = xs[0], stated_rating(r.get("user_profile"))
        avg = hx.user_average(x.user_id, x.timestamp)
        est = attribute_estimate(hx.user_history(x.user_id, x.timestamp, history, review_chars=0),
                                 item_title(ds, x.item_id))
        want = {"average": None if avg is None else min(5, max(1, round(avg))),
                "attributes": None if est is None else min(5, max(1, round(est)))}
        stated[s] += 1
        confusion[(want["attributes"], s)] += 1
        for k, t in want.items():
            teachers[k][t] += 1
            agree[k] += s is not None and s == t
    key = lambda c: {str(k): v for k, v in sorted(c.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}
    return {"n": len(rows), "stated": key(stated), **{f"teacher_{k}": key(v) for k, v in teachers.items()},
            **{f"agree_{k}": v for k, v in agree.items()},
            "attributes_vs_stated": {f"{t}->{s}": c for (t, s), c in sorted(confusion.items(), key=str)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="evaluate.py output folders (predictions.jsonl)")
    p.add_argument("--data", required=True, help="the canonical dataset dir they were evaluated on")
    p.add_argument("--split", default="test", help="the split they were evaluated on")
    p.add_argument("--profile-history", type=int, default=8, help="user history the writer was shown")
    a = p.parse_args(argv)
    from data import load_dataset
    from data.history import HistoryIndex

    ds = load_dataset(a.data)
    hx = HistoryIndex(ds)
    for d in a.dirs:
        path = Path(d) / "predictions.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path}: not found (an evaluate.py --out folder of a profile method)")
        rows = []
        for n, t in enumerate(path.read_text().splitlines(), 1):
            try:
                r = json.loads(t) if t.strip() else None
                if r is not None and not all(k in r for k in ("user_id", "item_id")):
                    raise ValueError("no user_id / item_id")
            except ValueError as e:
                raise SystemExit(f"{path}:{n}: not a prediction record ({e})") from e
            rows += [r] if r is not None else []
        print(json.dumps({"dir": d, **agreement(rows, ds, hx, a.split, a.profile_history)}))


if __name__ == "__main__":
    main()
