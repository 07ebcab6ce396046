"""A synthetic music catalogue with known tastes: the embedded default dataset.

Written in the raw Amazon 2014 format (reviews: JSON lines, gz; metadata: Python dict literals, gz) so it goes
through the same pipeline as the real data, plus `oracle_profiles.jsonl` with each user's hidden taste as text.

Model (deterministic from the seed):
- item: one genre, one mood, one era, all named plainly in its title and description;
- user: 2 liked genres, 1 liked mood, 1 liked era, 1 disliked genre, 1 disliked mood, a rating bias;
- rating = round(BASE + bias + LIKE * #liked attributes - DISLIKE * #disliked attributes + noise), clipped
  to 1..5 (mean near 4.2, skewed to 5 as on Amazon);
- review: an opener matching the rating, sentences on the item's attributes that say in words whether the
  user likes or dislikes them (each attribute mentioned with probability MENTION), and filler.
- exposure bias, which makes the long history necessary: every user's timeline (45-90 interactions) spans
  the whole period; the COMFORT interactions just before the evaluation period (the last `eval_frac` share of
  all timestamps, matching the split) are drawn only from items without a disliked attribute, so a last-10
  window shows almost no dislike; the earlier ("exploration") and evaluation-period interactions are drawn
  broadly, dislikes included (about 20% of train and 25% of test interactions touch a disliked attribute).
"""
import gzip
import io
import json
import random
import re
import time
from pathlib import Path

import numpy as np

GENRES = ["rock", "jazz", "classical", "hip hop", "country", "electronic", "folk", "metal"]
MOODS = ["upbeat", "melancholy", "calm", "energetic", "dark", "romantic"]
ERAS = ["1960s", "1970s", "1980s", "1990s", "2000s"]
BASE, LIKE, DISLIKE, NOISE, MENTION, COMFORT = 4.4, 0.35, 1.6, 0.6, 0.7, 12
T0, T1 = 1325376000, 1404172800  # 2012-01-01 .. 2014-07-01, inside the Amazon 2014 range

_ADJ = ["Midnight", "Golden", "Silent", "Broken", "Electric", "Distant", "Velvet", "Crimson", "Hollow", "Bright",
        "Wild", "Quiet", "Burning", "Frozen", "Lonely", "Endless", "Paper", "Silver", "Restless", "Gentle"]
_NOUN = ["Harbor", "Highway", "Garden", "River", "Skyline", "Echoes", "Letters", "Horizon", "Lanterns", "Streets",
         "Waves", "Machines", "Mountains", "Dreams", "Shadows", "Winter", "Summer", "Radio", "Stars", "Rooms"]
_DESC = ["A {mood} {genre} album recorded in the {era}.", "{Genre} with a {mood} feel, straight out of the {era}.",
         "This {era} {genre} record is {mood} from start to finish.",
         "{Mood} {genre} songs in the style of the {era}."]
_EXTRA = ["Twelve tracks, remastered.", "Includes two bonus tracks.", "A debut that found a cult following.",
          "Produced by a small independent label.", "Recorded live in a single weekend.", "Features a long closing suite."]
_OPEN = {5: ["Absolutely love this one.", "One of my favourites.", "A masterpiece, five stars.", "I play it all the time."],
         4: ["Really good album.", "Very enjoyable overall.", "Solid record, I like it.", "Worth buying."],
         3: ["It's okay.", "Mixed feelings about this one.", "Some good moments, some dull ones.", "Average at best."],
         2: ["Not for me.", "Disappointing.", "I struggled to finish it.", "I expected more."],
         1: ["I really disliked this.", "Could not stand it.", "A waste of money.", "Painful to listen to."]}
_LIKED = ["I always enjoy {a} music.", "{A} is exactly my thing.", "I love anything {a}.",
          "The {a} side of it is what I look for."]
_DISLIKED = ["{A} just isn't for me.", "I never get along with {a} music.", "Too {a} for my taste.",
             "I can't stand the {a} style."]
_NEUTRAL = ["It has a {a} feel.", "The {a} style is fine.", "Clearly a {a} record."]
_FILLER = ["The production is clean.", "The vocals are strong.", "Good value for the price.", "Arrived quickly.",
           "The second half drags a little.", "The sound quality is excellent.", "Great for a long drive.",
           "The lyrics are thoughtful.", "The arrangements are simple.", "Nice artwork too."]


def _cap(s):
    return s[:1].upper() + s[1:]


def make_items(rng, n_items):
    """Item attribute codes and texts. Returns (genre, mood, era) int arrays (n_items,) and a list of metas."""
    g, m, e = rng.integers(len(GENRES), size=n_items), rng.integers(len(MOODS), size=n_items), \
        rng.integers(len(ERAS), size=n_items)
    metas = []
    for j in range(n_items):
        gen, mood, era = GENRES[g[j]], MOODS[m[j]], ERAS[e[j]]
        name = f"{_ADJ[rng.integers(len(_ADJ))]} {_NOUN[rng.integers(len(_NOUN))]}"
        fill = dict(genre=gen, Genre=_cap(gen), mood=mood, Mood=_cap(mood), era=era)
        desc = _DESC[rng.integers(len(_DESC))].format(**fill) + " " + _EXTRA[rng.integers(len(_EXTRA))]
        metas.append({"asin": f"S{j:07d}", "title": f"{name} ({mood} {gen}, {era})", "price": 9.99,
                      "salesRank": {"Music": int(rng.integers(1, 500000))},
                      "categories": [["CDs & Vinyl", _cap(gen)]], "description": desc})
    return (g, m, e), metas


def make_user(rng):
    """Hidden taste: liked / disliked attribute codes and a rating bias."""
    gs = rng.permutation(len(GENRES))
    ms = rng.permutation(len(MOODS))
    return {"like_g": gs[:2], "dis_g": gs[2], "like_m": ms[0], "dis_m": ms[1],
            "like_e": int(rng.integers(len(ERAS))), "bias": float(np.clip(rng.normal(0.0, 0.3), -0.8, 0.5))}


def oracle_text(u):
    lg = " and ".join(GENRES[x] for x in u["like_g"])
    b = u["bias"]
    tone = "rates generously" if b > 0.15 else "rates harshly" if b < -0.15 else "rates about average"
    return (f"Loves {lg} music, especially {MOODS[u['like_m']]} records and the {ERAS[u['like_e']]} sound. "
            f"Dislikes {GENRES[u['dis_g']]} and anything {MOODS[u['dis_m']]}; such albums get low ratings. "
            f"Otherwise {tone}.")


_TITLE_ATTRS = re.compile(r"\((?P<mood>[a-z]+) (?P<genre>[a-z ]+), (?P<era>\d{4}s)\)$")


def title_attributes(title: str):
    """"Quiet Stars (upbeat metal, 1990s)" -> {"mood": "upbeat", "genre": "metal", "era": "1990s"}; None for a
    title that does not end in "(mood genre, era)" (an item not from this generator)."""
    m = _TITLE_ATTRS.search(title)
    return m.groupdict() if m else None


def oracle_pair_profile(taste: dict, title: str) -> str:
    """The oracle profile of a (user, item) pair: the user's hidden taste applied to the item's attributes.

    taste: a line of oracle_profiles.jsonl ({"liked": [genre, genre, mood, era], "disliked": [genre, mood],
    "bias"}); title: the item's title, which names its attributes, e.g. "Quiet Stars (upbeat metal, 1990s)".
    The text states the rating the generator expects before noise, round(clip(BASE + bias + LIKE * #liked -
    DISLIKE * #disliked, 1, 5)): the best a profile written for this pair can say (DUET writes its profiles for a
    (user, item) pair). The realised rating adds noise (sd NOISE) and rounding, so the oracle is not exact.
    The user's taste alone, as text, did not move SmolLM2-135M's prediction at all (results/README.md).
    """
    m = title_attributes(title)
    if m is None:
        raise ValueError(f"not a synthetic title (expected '... (mood genre, era)'): {title!r}")
    mood, genre, era = m["mood"], m["genre"], m["era"]
    liked, disliked = taste["liked"], taste["disliked"]
    n_like = (genre in liked[:2]) + (mood == liked[2]) + (era == liked[3])
    n_dis = (genre == disliked[0]) + (mood == disliked[1])
    expected = float(np.clip(BASE + taste["bias"] + LIKE * n_like - DISLIKE * n_dis, 1, 5))
    return f"Would rate this {mood} {genre} album about {int(np.rint(expected))}/5."


def affinity(u, g, m, e):
    """Counts of liked and disliked attributes of items (arrays) for user u."""
    n_like = np.isin(g, u["like_g"]).astype(int) + (m == u["like_m"]) + (e == u["like_e"])
    n_dis = (g == u["dis_g"]).astype(int) + (m == u["dis_m"])
    return n_like, n_dis


def review_text(prng, rating, attrs, liked, disliked):
    """attrs: the item's attribute words; liked/disliked: which of them the user likes / dislikes."""
    out = [prng.choice(_OPEN[rating])]
    for a, lk, dk in zip(attrs, liked, disliked):
        if prng.random() < MENTION:
            pool = _LIKED if lk else _DISLIKED if dk else _NEUTRAL
            out.append(prng.choice(pool).format(a=a, A=_cap(a)))
    out.insert(prng.randrange(1, len(out) + 1), prng.choice(_FILLER))
    return " ".join(out)


def _gz_text(path, compresslevel):
    """gzip text writer with mtime 0 in the header, so the same seed gives byte-identical files."""
    return io.TextIOWrapper(gzip.GzipFile(path, "wb", compresslevel=compresslevel, mtime=0), encoding="utf-8")


def generate(raw_dir, seed=0, n_users=300, n_items=400, min_per_user=45, max_per_user=90, eval_frac=0.2,
             compresslevel=6):
    """Write reviews_Synthetic.json.gz, meta_Synthetic.json.gz and oracle_profiles.jsonl under raw_dir.
    Returns a dict of the three paths and the number of reviews."""
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    (g, m, e), metas = make_items(rng, n_items)
    users = [make_user(rng) for _ in range(n_users)]
    max_per_user = min(max_per_user, n_items)
    sizes = rng.integers(min_per_user, max_per_user + 1, size=n_users)
    times = [np.sort(rng.choice(T1 - T0, size=k, replace=False) + T0) for k in sizes]  # distinct seconds
    t_eval = np.quantile(np.concatenate(times), 1 - eval_frac)  # the evaluation period starts here

    paths = {"reviews": raw / "reviews_Synthetic.json.gz", "meta": raw / "meta_Synthetic.json.gz",
             "oracle": raw / "oracle_profiles.jsonl"}
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    n_written = 0
    with _gz_text(tmp["meta"], compresslevel) as f:
        for d in metas:
            f.write(repr(d) + "\n")
    with _gz_text(tmp["reviews"], compresslevel) as fr, \
            open(tmp["oracle"], "w", encoding="utf-8") as fo:
        for uidx, (u, ts) in enumerate(zip(users, times)):
            uid = f"U{uidx:06d}"
            n_like, n_dis = affinity(u, g, m, e)
            n_eval_start = int(np.searchsorted(ts, t_eval))  # first index in the evaluation period
            comfort = np.zeros(len(ts), dtype=bool)
            comfort[max(0, n_eval_start - COMFORT):n_eval_start] = True
            # comfort slots: items with no disliked attribute, preferring liked ones; the rest: broad exposure
            w = np.where(n_dis == 0, 1.0 + 2.0 * n_like, 0.0)
            picked = rng.choice(n_items, size=int(comfort.sum()), replace=False, p=w / w.sum())
            w2 = (1.0 + n_like).astype(float)
            w2[picked] = 0.0
            broad = rng.choice(n_items, size=int((~comfort).sum()), replace=False, p=w2 / w2.sum())
            seq = np.empty(len(ts), dtype=np.int64)
            seq[comfort], seq[~comfort] = picked, broad
            noise = rng.normal(0.0, NOISE, size=len(ts))
            score = BASE + u["bias"] + LIKE * n_like[seq] - DISLIKE * n_dis[seq] + noise
            ratings = np.clip(np.rint(score), 1, 5).astype(int)
            fo.write(json.dumps({"user_id": uid, "profile": oracle_text(u),
                                 "liked": [GENRES[x] for x in u["like_g"]] + [MOODS[u["like_m"]], ERAS[u["like_e"]]],
                                 "disliked": [GENRES[u["dis_g"]], MOODS[u["dis_m"]]],
                                 "bias": round(u["bias"], 3)}) + "\n")
            lines = []
            for it, t, r in zip(seq.tolist(), ts.tolist(), ratings.tolist()):
                gi, mi, ei = g[it], m[it], e[it]
                text = review_text(prng, r, (GENRES[gi], MOODS[mi], ERAS[ei]),
                                   (gi in u["like_g"], mi == u["like_m"], ei == u["like_e"]),
                                   (gi == u["dis_g"], mi == u["dis_m"], False))
                tm = time.gmtime(t)
                lines.append(json.dumps({"reviewerID": uid, "asin": metas[it]["asin"], "reviewerName": f"listener {uidx}",
                                         "helpful": [0, 0], "reviewText": text, "overall": float(r),
                                         "summary": text.split(".")[0], "unixReviewTime": t,
                                         "reviewTime": f"{tm.tm_mon:02d} {tm.tm_mday}, {tm.tm_year}"}))
            fr.write("\n".join(lines) + "\n")
            n_written += len(lines)
    for k in paths:
        tmp[k].replace(paths[k])
    return {**{k: str(p) for k, p in paths.items()}, "n_reviews": n_written}
