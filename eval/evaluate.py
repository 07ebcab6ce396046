"""The evaluation pipeline: examples -> profiles -> frozen recommender -> metrics (paper Table 1 layout).

Used by scripts/evaluate.py and by the trainers' validation:

    examples = build_examples(ds, "valid", limit=200)
    metrics, preds = evaluate_method("duet", examples, ds, recommender=rec, generator=policy, gen_tok=tok)

Methods
- classic, no LLM: global-mean, user-mean, item-mean, mf (eval/baselines.py, fit on train, MF tuned on valid);
- 10h: the recommender with the user's ten most recent interactions only;
- kar, palr, rlmrec, lg: a zero-shot user profile written by the generator (paper appendix A.2) from the user's
  last `profile_history` interactions before the target, then the recommender with that profile;
- duet: one generation writes the user and the item profile for the (user, item) pair (data/prompts.py);
- oracle: the synthetic data's hidden taste applied to the target item, as the user profile (the upper bound
  of a profile written for the pair: data/synthetic.py::oracle_pair_profile).

A generation that fails its parser (DUET tags, RLMRec JSON, an empty answer) is a format failure: counted in
`format_failures`, written to predictions.jsonl with its reason, and left out of MAE/RMSE/Acc/F1.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Optional

import numpy as np

from data import prompts as P
from data.history import HistoryIndex
from eval.metrics import ranking_metrics, rating_metrics
from eval.profiles import ProfileCache, cached_generate, render_generation_prompt
from eval.recommender import RecExample, Recommender

CLASSIC = ("global-mean", "user-mean", "item-mean", "mf")
LLM_METHODS = ("10h", "kar", "palr", "rlmrec", "lg", "lg-rating", "duet", "oracle")
METHODS = CLASSIC + LLM_METHODS


class EvalExample(NamedTuple):
    user_id: str
    item_id: str
    rating: int
    timestamp: int
    item_title: str


def build_examples(ds, split: str, limit: Optional[int] = None, seed: int = 0) -> list[EvalExample]:
    """The split's interactions as examples, in timestamp order. With `limit`, a uniform random subset of that
    size (fixed by `seed`, kept in timestamp order) so that a small run still covers the whole period."""
    rows = ds.split(split)
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[j] for j in keep]
    out = []
    for x in rows:
        item = ds.items.get(x.item_id)
        out.append(EvalExample(x.user_id, x.item_id, x.rating, x.timestamp, item.title if item else x.item_id))
    return out


def negative_examples(ds, examples, n: int, seed: int = 0) -> list[EvalExample]:
    """For each example, n items its user never rated (in any split), drawn uniformly without replacement
    (seeded), as examples at the same timestamp with rating 0 (unknown): example j's negatives are
    out[j * n:(j + 1) * n]. Raises if a user has rated all but fewer than n items."""
    rated: dict[str, set] = {}
    for x in ds.interactions:
        rated.setdefault(x.user_id, set()).add(x.item_id)
    items = sorted(ds.items)
    rng = random.Random(seed)
    out = []
    for e in examples:
        pool = [i for i in items if i not in rated.get(e.user_id, ())]
        if len(pool) < n:
            raise ValueError(f"user {e.user_id} has only {len(pool)} unrated items, fewer than {n} negatives")
        out += [EvalExample(e.user_id, i, 0, e.timestamp, ds.items[i].title) for i in rng.sample(pool, n)]
    return out


def ranking_from_predictions(pos_rows: list[dict], neg_rows: list[dict], n: int, ks=(1, 5, 10)) -> dict:
    """Hit@k, NDCG@k and MRR of each positive against its n negatives, ranked by predicted rating (ties
    pessimistic: a tie ranks the positive below). A format failure (prediction None) on either side is scored
    below every scored item; examples whose own prediction failed are kept (they rank last, never skipped)."""
    low = -1e9  # below any rating
    pos = np.array([low if r["prediction"] is None else r["prediction"] for r in pos_rows], dtype=float)
    neg = np.array([low if r["prediction"] is None else r["prediction"] for r in neg_rows], dtype=float)
    out = ranking_metrics(pos, neg.reshape(len(pos_rows), n), ks=ks)
    out["ranking_negatives"] = n
    return out


# ------------------------------------------------------------------------------------------------ classic
def classic_predictions(method: str, ds, examples) -> np.ndarray:
    from eval import baselines as B

    cls = {"global-mean": B.GlobalMean, "user-mean": B.UserMean, "item-mean": B.ItemMean, "mf": B.BiasedMF}[method]
    train = [(x.user_id, x.item_id, x.rating) for x in ds.split("train")]
    valid = [(x.user_id, x.item_id, x.rating) for x in ds.split("valid")] if method == "mf" else None
    model = cls().fit(train, valid)
    return np.asarray(model.predict([e.user_id for e in examples], [e.item_id for e in examples]), dtype=float)


# ------------------------------------------------------------------------------------------------ profiles
def profile_prompt(method: str, ex: EvalExample, hist: HistoryIndex, profile_history: int = 30,
                   item_history: int = 10, review_chars: int = 200) -> list[dict]:
    """The generator's chat messages for one example (data/prompts.py), from data strictly before the target."""
    uh = hist.user_history(ex.user_id, ex.timestamp, profile_history, review_chars)
    if method == "duet":
        ih = hist.item_history(ex.item_id, ex.timestamp, item_history, exclude_user=ex.user_id,
                               review_chars=review_chars)
        return P.duet_messages(uh, ih, hist.user_average(ex.user_id, ex.timestamp),
                               hist.item_average(ex.item_id, ex.timestamp), ex.item_title)
    return P.PROFILE_PROMPTS[method](uh)  # the baselines, and lg-rating (LettinGo exploration style)


def llm_profiles(method: str, examples, hist: HistoryIndex, generator, gen_tok, cache: ProfileCache | None = None,
                 profile_history: int = 30, max_new_tokens: int = 256, batch_size: int = 8, progress=None,
                 review_chars: int = 200):
    """-> (user_profiles, item_profiles, reasons, raw texts), lists aligned with examples; a failed parse gives
    None profiles and its reason ("ok" otherwise). A style with a response prefix (lg-rating: "Usually rates ")
    has its answer opened with it, as in LettinGo's exploration and DPO validation; the prefix is part of the text."""
    prefix = P.RESPONSE_PREFIXES.get(method, "")
    prompts = [render_generation_prompt(gen_tok, profile_prompt(method, e, hist, profile_history,
                                                                      review_chars=review_chars)) + prefix
               for e in examples]
    key_item = (lambda e: e.item_id) if method == "duet" else (lambda e: "")  # baselines profile the user alone
    stop = (P.DUET_STOP,) if method == "duet" else ()  # as in GRPO's rollouts and validation
    raw = cached_generate([(e.user_id, key_item(e), p) for e, p in zip(examples, prompts)], generator, gen_tok,
                          cache, max_new_tokens, batch_size, progress, stop_texts=stop)
    raw = [prefix + P.cut_after(t, stop) for t in raw]  # answers cached before generation stopped there, too
    users, items, reasons = [], [], []
    for text in raw:
        if method == "duet":
            parsed, why = P.parse_duet(text)
            users.append(parsed.user_profile if parsed else None)
            items.append(parsed.item_profile if parsed else None)
        else:
            prof, why = P.PARSERS[method](text)
            users.append(prof)
            items.append(None)
        reasons.append(why)
    return users, items, reasons, raw


# ------------------------------------------------------------------------------------------------ the method
def evaluate_method(method: str, examples, ds, *, recommender: Recommender | None = None, generator=None,
                    gen_tok=None, cache: ProfileCache | None = None, hist: HistoryIndex | None = None,
                    rec_history: int = 10, profile_history: int = 30, max_new_tokens: int = 256,
                    gen_batch_size: int = 8, progress=None, with_metrics: bool = True,
                    review_chars: int = 200) -> tuple[dict, list[dict]]:
    """Score one method on the examples -> (metrics dict of eval/metrics.rating_metrics, prediction rows).
    with_metrics=False: predictions only, metrics None (ranking negatives, whose rating is unknown)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    y = np.array([e.rating for e in examples], dtype=float)
    if method in CLASSIC:
        pred = classic_predictions(method, ds, examples)
        rows = [{"user_id": e.user_id, "item_id": e.item_id, "rating": e.rating, "prediction": float(p),
                 "probs": None, "prompt": None} for e, p in zip(examples, pred)]
        return (rating_metrics(y, pred) if with_metrics else None), rows

    if recommender is None:
        raise ValueError(f"method {method} needs a recommender")
    hist = hist or HistoryIndex(ds)
    n = len(examples)
    users, items, reasons, raw = [None] * n, [None] * n, ["ok"] * n, [None] * n
    if method == "oracle":
        if not ds.oracle:
            raise ValueError("method oracle needs oracle_profiles.jsonl (synthetic data only)")
        missing = [e.user_id for e in examples if e.user_id not in ds.oracle]
        if missing:
            raise ValueError(f"no oracle profile for user {missing[0]} ({len(missing)} users missing)")
        from data.synthetic import oracle_pair_profile

        users = [oracle_pair_profile(ds.oracle_taste[e.user_id], e.item_title) for e in examples]
    elif method != "10h":
        if generator is None or gen_tok is None:
            raise ValueError(f"method {method} needs a generator model and its tokenizer")
        users, items, reasons, raw = llm_profiles(method, examples, hist, generator, gen_tok, cache, profile_history,
                                                  max_new_tokens, gen_batch_size, progress, review_chars)

    ok = [j for j in range(n) if reasons[j] == "ok"]
    rex = [RecExample(hist.user_history(examples[j].user_id, examples[j].timestamp, rec_history),
                      users[j], examples[j].item_title, items[j]) for j in ok]
    texts = [recommender.prompt(r) for r in rex]
    expected, probs = recommender.score_prompts(texts)
    rows = []
    at = {j: k for k, j in enumerate(ok)}
    for j, e in enumerate(examples):
        k = at.get(j)
        row = {"user_id": e.user_id, "item_id": e.item_id, "rating": e.rating,
               "prediction": None if k is None else float(expected[k]),
               "probs": None if k is None else [round(float(p), 6) for p in probs[k]],
               "prompt": None if k is None else texts[k]}
        if method not in ("10h", "oracle"):
            row.update(generated=raw[j], format=reasons[j], user_profile=users[j], item_profile=items[j])
        rows.append(row)
    if not with_metrics:
        return None, rows
    metrics = rating_metrics(y[ok], expected.numpy().astype(float), failures=n - len(ok))
    if method not in ("10h", "oracle"):
        metrics["mae_fallback"] = _mae_fallback(rows, examples, hist, recommender, rec_history)
    return metrics, rows


def _mae_fallback(rows, examples, hist, recommender, rec_history) -> float:
    """MAE over every example, a format failure predicted without profiles (the 10H prompt, history only): a
    figure that compares a generator that often fails with one that never does. Re-scores the failed rows only."""
    failed = [j for j, r in enumerate(rows) if r["prediction"] is None]
    pred = [r["prediction"] for r in rows]
    if failed:
        rex = [RecExample(hist.user_history(examples[j].user_id, examples[j].timestamp, rec_history), None,
                          examples[j].item_title, None) for j in failed]
        for j, v in zip(failed, recommender.score(rex)[0].tolist()):
            pred[j] = v
    return float(np.mean([abs(e.rating - p) for e, p in zip(examples, pred)])) if rows else float("nan")


# ------------------------------------------------------------------------------------------------ tables
HEADER = ("| Method | MAE | RMSE | Acc (%) | F1 macro-5 (%) | Format failures | Examples |\n"
          "|---|---|---|---|---|---|---|")


def table_row(name: str, m: dict) -> str:
    """One markdown row in the paper's Table 1 layout (Acc and F1 in percent; F1 is the macro average over the
    five classes, `f1_macro_5`); n counts the scored examples."""
    def f(x, scale=1.0, nd=4):
        return "n/a" if x is None or x != x else f"{x * scale:.{nd}f}"
    return (f"| {name} | {f(m['mae'])} | {f(m['rmse'])} | {f(m['acc'], 100, 2)} | {f(m['f1_macro_5'], 100, 2)} | "
            f"{m['format_failures']} | {m['n']} |")
