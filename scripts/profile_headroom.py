"""How far can a user/item profile move the frozen recommender's MAE? Fixed template profiles on valid examples.

Before training a profile writer (GRPO, DPO) against a recommender, measure what the best simple profiles can buy:
the recommender scores each example with no profile (10H: the recent history only) and with template profiles that
state a rating (a constant, the user's average before the target, the item's average) or, as only a writer that
sees the target can (DUET), a per-target rating: the bias estimate u + i - mu from the two averages DUET's prompt
shows, and a biased MF's prediction (fit on train only). On the synthetic catalogue, whose titles name each album's
mood, genre and era, also what a writer could read off the user's own ratings: a per-target estimate from the items
sharing the target's mood and genre, over the ratings the writer is shown (--shown) or a longer history (--read),
and the same history as text (the dislikes it shows). If no template beats "none" by more than the noise, no
trained writer will show a lower validation MAE with that recommender either.

    python scripts/profile_headroom.py --examples 96            # SmolLM2-135M-Instruct on the synthetic default
    python scripts/profile_headroom.py --recommender DIR --data DIR --split valid --examples 256
    python scripts/profile_headroom.py --data DIR --split test --subset evaluate --examples 512 --review-chars 60 \
        --only "4/5,round(avg)/5,shown,MF"     # evaluate.py's `--limit 512` examples, four templates

The examples are the trainers' validation subset (the same seeded order, its first --examples), or with
`--subset evaluate` the ones `evaluate.py --split S --limit N` scores, so that a template pairs with its folders. Prints a table
and, last, one JSON line {name: MAE} with the user-mean baseline and the paired standard error of each template
against "none".
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def disliked_attributes(history, below: float = 3.0, min_count: int = 2):
    """Moods and genres whose items the user rated below `below` on average (at least `min_count` of them), in
    order of first appearance: the dislikes a writer could read off `history`."""
    from data.synthetic import title_attributes

    seen = {}
    for h in history:
        a = title_attributes(h.title)
        for word in (a["mood"], a["genre"]) if a else ():
            seen.setdefault(word, []).append(h.rating)
    return [w for w, rs in seen.items() if len(rs) >= min_count and sum(rs) / len(rs) < below]


def dislike_text(history):
    d = disliked_attributes(history)
    return f"Dislikes {' and '.join(d)} albums; rates them low." if d else "No strong dislikes."


def target_dislike_text(history, title):
    from data.synthetic import title_attributes

    a = title_attributes(title)
    hit = [w for w in disliked_attributes(history) if a and w in (a["mood"], a["genre"])]
    return f"This album is {' and '.join(hit)}, which the user dislikes." if hit else \
        "Nothing in this album is something the user dislikes."


def templates(hx, fill: float, mf, seen: int = 8, read: int = 50):
    """name -> (user profile or None, item profile or None) as functions of an example. `mf(x)`: a biased MF's
    prediction for the example (fit on train only); `seen`: how many of the user's ratings a writer's prompt shows;
    `read`: the longer history a writer could be given (the per-target attribute estimate)."""
    from eval.baselines import attribute_estimate

    ua = lambda x: hx.user_average(x.user_id, x.timestamp)  # noqa: E731
    shown = lambda x: [h.rating for h in hx.user_history(x.user_id, x.timestamp, seen, review_chars=0)]  # noqa: E731
    sa = lambda x: sum(shown(x)) / len(shown(x)) if shown(x) else None  # noqa: E731
    ia = lambda x: hx.item_average(x.item_id, x.timestamp)  # noqa: E731
    f = lambda v: fill if v is None else v  # noqa: E731  (no interaction before: the train mean)
    clip = lambda v: min(5, max(1, round(v)))  # noqa: E731
    title = lambda x: hx.ds.items[x.item_id].title if x.item_id in hx.ds.items else ""  # noqa: E731
    past = lambda x, k: hx.user_history(x.user_id, x.timestamp, k, review_chars=0)  # noqa: E731
    attr = lambda x, k: attribute_estimate(past(x, k), title(x))  # noqa: E731
    bias = lambda x: f(ua(x)) + f(ia(x)) - fill  # noqa: E731  (mu + b_u + b_i from the two averages DUET shows)
    return {
        "none (10H)": (lambda x: None, lambda x: None),
        "user: Usually rates 4/5.": (lambda x: "Usually rates 4/5.", lambda x: None),
        "user: Usually rates 5/5.": (lambda x: "Usually rates 5/5.", lambda x: None),
        "user: Usually rates round(avg)/5.": (lambda x: f"Usually rates {round(f(ua(x)))}/5.", lambda x: None),
        "user: Usually rates round(avg of the ratings shown)/5.": (lambda x: f"Usually rates {round(f(sa(x)))}/5.",
                                                                   lambda x: None),
        "user: Usually rates avg/5 (1 decimal)": (lambda x: f"Usually rates {f(ua(x)):.1f}/5.", lambda x: None),
        "item: Listeners rate it about avg/5": (lambda x: None, lambda x: f"Listeners rate it about {f(ia(x)):.1f}/5."),
        "user avg + item avg": (lambda x: f"Usually rates {f(ua(x)):.1f}/5.",
                                lambda x: f"Listeners rate it about {f(ia(x)):.1f}/5."),
        # per-target statements, as only a writer that sees the target (DUET) can make
        "user: Would rate this about round(u+i-mu)/5.": (lambda x: f"Would rate this album about {clip(bias(x))}/5.",
                                                         lambda x: None),
        "user: Would rate this about round(MF)/5.": (lambda x: f"Would rate this album about {clip(mf(x))}/5.",
                                                     lambda x: None),
        # per target, from the user's own ratings of items sharing the target's mood or genre
        "user: Would rate this about round(attributes, shown)/5.":
            (lambda x: f"Would rate this album about {clip(f(attr(x, seen)))}/5.", lambda x: None),
        "user: Would rate this about round(attributes, read)/5.":
            (lambda x: f"Would rate this album about {clip(f(attr(x, read)))}/5.", lambda x: None),
        # the same history as text: the dislikes it shows, in general and for this target
        "user: Dislikes (read)": (lambda x: dislike_text(past(x, read)), lambda x: None),
        "user: target disliked? (read)": (lambda x: target_dislike_text(past(x, read), title(x)), lambda x: None),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recommender", default="smollm2-135m-instruct")
    p.add_argument("--data", default="", help="canonical dataset dir; empty: the synthetic default")
    p.add_argument("--split", default="valid")
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", choices=("trainers", "evaluate"), default="trainers",
                   help="which --examples: the trainers' validation order, or evaluate.py's --limit subset")
    p.add_argument("--review-chars", type=int, default=200, help="review characters in the recommender's prompt")
    p.add_argument("--shown", type=int, default=8, help="ratings a writer's prompt shows (--user-history)")
    p.add_argument("--read", type=int, default=50, help="history items behind the 'attributes, read' template")
    p.add_argument("--only", default="", help="comma-separated substrings: run only the templates naming one")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)

    import torch

    from data import load_dataset
    from data.default import default_dataset_dir
    from data.history import HistoryIndex
    from eval.baselines import BiasedMF, attribute_estimate
    from eval.evaluate import build_examples
    from eval.metrics import paired_mae_difference
    from eval.recommender import Recommender
    from model import load_model, load_tokenizer
    from eval.profiles import rec_example
    from rl.loop import epoch_order

    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_dataset(a.data or default_dataset_dir())
    hx = HistoryIndex(ds)
    if a.subset == "evaluate":  # the examples `evaluate.py --split S --limit N` scores
        rows = build_examples(ds, a.split, a.examples, a.seed)
    else:
        rows = sorted(ds.split(a.split), key=lambda x: (x.timestamp, x.user_id))
        rows = [rows[i] for i in epoch_order(len(rows), 0, a.seed)[:a.examples]]
    if not rows:
        raise SystemExit(f"split {a.split!r} of {a.data or 'the default dataset'} is empty")
    rec = Recommender(load_model(a.recommender), load_tokenizer(a.recommender))
    y = [float(x.rating) for x in rows]
    train = ds.split("train")
    fill = sum(x.rating for x in train) / len(train)
    mf = BiasedMF().fit([(x.user_id, x.item_id, x.rating) for x in train])  # train only: no valid tuning
    mf_pred = mf.predict([x.user_id for x in rows], [x.item_id for x in rows]).tolist()
    mf_of = {(x.user_id, x.item_id, x.timestamp): v for x, v in zip(rows, mf_pred)}
    preds = {}
    only = [w for w in a.only.split(",") if w]
    for name, (uf, itf) in templates(hx, fill, lambda x: mf_of[(x.user_id, x.item_id, x.timestamp)],
                                     a.shown, a.read).items():
        if only and name != "none (10H)" and not any(w in name for w in only):
            continue
        ex = [rec_example(hx, ds, x, uf(x), itf(x), a.review_chars) for x in rows]
        preds[name] = rec.score(ex)[0].tolist()
        d = paired_mae_difference(y, preds["none (10H)"], preds[name])
        print(f"{name:40s} MAE {d['mae_b']:.4f}  vs none {d['diff']:+.4f} +- {d['se']:.4f}  "
              f"mean prediction {sum(preds[name]) / len(rows):.2f}", flush=True)
    um = [f if (f := hx.user_average(x.user_id, x.timestamp)) is not None else fill for x in rows]
    out = {"n": len(rows), "user_mean_baseline": sum(abs(u - t) for u, t in zip(um, y)) / len(rows)}
    for name, pr in preds.items():
        d = paired_mae_difference(y, preds["none (10H)"], pr)
        out[name] = {"mae": round(d["mae_b"], 4), "diff_vs_none": round(d["diff"], 4), "se": round(d["se"], 4)}
    att = [attribute_estimate(hx.user_history(x.user_id, x.timestamp, a.read, review_chars=0), ds.items[x.item_id].title)
           if x.item_id in ds.items else None for x in rows]
    out["attribute_baseline"] = sum(abs((fill if v is None else v) - t) for v, t in zip(att, y)) / len(rows)
    print(f"user-mean baseline (no LLM) MAE {out['user_mean_baseline']:.4f}")
    print(f"attribute estimate over {a.read} items (no LLM) MAE {out['attribute_baseline']:.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
