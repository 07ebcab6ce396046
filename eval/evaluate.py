"""The evaluation pipeline: examples -> profiles -> frozen recommender -> metrics (paper Table 1 layout).

Used by scripts/evaluate.py; the profiles are written and scored by eval/profiles.py, as in training:

    examples = build_examples(ds, "valid", limit=200)
    metrics, preds = evaluate_method("duet", examples, ds, recommender=rec, generator=policy, gen_tok=tok)

Methods
- classic, no LLM: global-mean, user-mean, item-mean, mf (eval/baselines.py, fit on train, MF tuned on valid);
- 10h: the recommender with the user's ten most recent interactions only;
- kar, palr, rlmrec, lg: a zero-shot user profile written by the generator (paper appendix A.2) from the user's
  last `profile_history` interactions before the target, then the recommender with that profile;
- duet: one generation writes the user and the item profile for the (user, item) pair (data/prompts.py);
- duet-profile: the same without cue and constructed prompt, the two profiles alone (DUET's "+Profile" ablation);
- oracle: the synthetic data's hidden taste applied to the target item, as the user profile (the upper bound
  of a profile written for the pair: data/synthetic.py::oracle_pair_profile).

A generation that fails its parser (DUET or +Profile tags, RLMRec JSON, an empty answer) is a format failure: counted in
`format_failures`, written to predictions.jsonl with its reason, and left out of MAE/RMSE/Acc/F1.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Optional

import numpy as np

from data.history import HistoryIndex
from data.prompts import cut_after
from eval.metrics import ranking_metrics, rating_metrics
from eval.profile_cache import ProfileCache, prompt_key
from eval.profiles import (PAIR_STYLES, RECENT, HistoryOptions, encode_prompt, parse_profile, profile_messages,
                           profile_metrics, rec_example, style_prefix, style_stop_texts, write_profiles)
from eval.recommender import Recommender

CLASSIC = ("global-mean", "user-mean", "item-mean", "mf")
LLM_METHODS = ("10h", "kar", "palr", "rlmrec", "lg", "lg-rating", "duet", "duet-profile", "oracle")
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
    from eval import baselines

    cls = {"global-mean": baselines.GlobalMean, "user-mean": baselines.UserMean, "item-mean": baselines.ItemMean,
           "mf": baselines.BiasedMF}[method]
    train = [(x.user_id, x.item_id, x.rating) for x in ds.split("train")]
    valid = [(x.user_id, x.item_id, x.rating) for x in ds.split("valid")] if method == "mf" else None
    model = cls().fit(train, valid)
    return np.asarray(model.predict([e.user_id for e in examples], [e.item_id for e in examples]), dtype=float)


# ------------------------------------------------------------------------------------------------ profiles
def cached_profiles(method: str, examples, ds, hist: HistoryIndex, generator, gen_tok, cache: ProfileCache | None,
                    opts: HistoryOptions, max_new_tokens: int, max_prompt_tokens: int, batch_size: int = 8,
                    prefix: str | None = None, progress=None) -> list[str]:
    """The writer's answers (what the parser reads) for every example, through eval/profiles.py as training and
    validation write them: each distinct prompt is generated once, longest first, and stored in the cache as soon
    as its batch is done; a rerun takes them from the cache. `prefix` opens each answer (default: the style's,
    "Usually rates " for lg-rating; pass the --response-prefix a GRPO writer was trained with)."""
    prefix = style_prefix(method) if prefix is None else prefix
    stop = style_stop_texts(method)
    prompts = [encode_prompt(gen_tok, profile_messages(method, hist, ds, e, opts), max_prompt_tokens, prefix)
               for e in examples]
    item_of = (lambda e: e.item_id) if method in PAIR_STYLES else (lambda e: "")  # baselines profile the user alone
    keys = [prompt_key(p) for p in prompts]
    known = {k: cache.get(e.user_id, item_of(e), k) for e, k in zip(examples, keys)} if cache else {}
    todo = sorted({k: p for k, p in zip(keys, prompts) if known.get(k) is None}.items(), key=lambda kp: -len(kp[1]))
    owner = {k: e for e, k in zip(examples, keys)}
    for s in range(0, len(todo), batch_size * 4):  # into the cache every few batches
        chunk = todo[s:s + batch_size * 4]
        texts = write_profiles(generator, gen_tok, [p for _, p in chunk], max_new_tokens, prefix="",
                               stop_texts=stop, batch_size=batch_size, progress=progress)
        for (k, _), text in zip(chunk, texts):
            known[k] = text
            if cache is not None:
                cache.put(owner[k].user_id, item_of(owner[k]), k, text)
    # answers are stored without the prefix; cut again at the stop text (an answer cached before it stopped there)
    return [prefix + cut_after(known[k], stop) for k in keys]


# ------------------------------------------------------------------------------------------------ the method
def evaluate_method(method: str, examples, ds, *, recommender: Recommender | None = None, generator=None,
                    gen_tok=None, cache: ProfileCache | None = None, hist: HistoryIndex | None = None,
                    rec_history: int = RECENT, profile_history: int = 30, item_history: int = 10,
                    max_new_tokens: int = 256, max_prompt_tokens: int = 100_000, gen_batch_size: int = 8,
                    progress=None, with_metrics: bool = True, review_chars: int = 200,
                    prefix: str | None = None) -> tuple[dict, list[dict]]:
    """Score one method on the examples -> (metrics dict, prediction rows).

    Profile methods: metrics of eval/profiles.profile_metrics (format failures apart, mae_fallback: a failure
    predicted without profiles, as 10H). with_metrics=False: predictions only, metrics None (ranking negatives,
    whose rating is unknown)."""
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
    opts = HistoryOptions(profile_history, item_history, review_chars)
    n = len(examples)
    parsed, reasons, raw = [(None, None)] * n, ["ok"] * n, [None] * n  # 10h: no profile, nothing to fail
    if method == "oracle":
        if not ds.oracle:
            raise ValueError("method oracle needs oracle_profiles.jsonl (synthetic data only)")
        missing = [e.user_id for e in examples if e.user_id not in ds.oracle]
        if missing:
            raise ValueError(f"no oracle profile for user {missing[0]} ({len(missing)} users missing)")
        from data.synthetic import oracle_pair_profile

        parsed = [(oracle_pair_profile(ds.oracle_taste[e.user_id], e.item_title), None) for e in examples]
    elif method != "10h":
        if generator is None or gen_tok is None:
            raise ValueError(f"method {method} needs a generator model and its tokenizer")
        raw = cached_profiles(method, examples, ds, hist, generator, gen_tok, cache, opts, max_new_tokens,
                              max_prompt_tokens, gen_batch_size, prefix, progress)
        parsed, reasons = zip(*[parse_profile(method, t) for t in raw])
    rex = [rec_example(hist, ds, e, *(p or (None, None)), review_chars, rec_history) for e, p in zip(examples, parsed)]
    texts = [recommender.prompt(r) for r in rex]
    expected, probs = recommender.score_prompts(texts)  # a failed row without profiles: its fallback (10H)
    failed = [p is None for p in parsed]
    rows = []
    for j, e in enumerate(examples):
        row = {"user_id": e.user_id, "item_id": e.item_id, "rating": e.rating,
               "prediction": None if failed[j] else float(expected[j]),
               "probs": None if failed[j] else [round(float(p), 6) for p in probs[j]],
               "prompt": None if failed[j] else texts[j]}
        if method not in ("10h", "oracle"):  # prediction_fallback: a failed row at its 10H prediction
            row.update(generated=raw[j], format=reasons[j], user_profile=parsed[j] and parsed[j][0],
                       item_profile=parsed[j] and parsed[j][1], prediction_fallback=float(expected[j]))
        rows.append(row)
    if not with_metrics:
        return None, rows
    metrics = profile_metrics(y, expected.tolist(), failed)
    if method in ("10h", "oracle"):
        del metrics["mae_fallback"]  # nothing can fail
    return metrics, rows


# ------------------------------------------------------------------------------------------------ tables
HEADER = ("| Method | MAE | RMSE | Acc (%) | F1 macro-5 (%) | Format failures | Examples |\n"
          "|---|---|---|---|---|---|---|")


def table_row(name: str, m: dict) -> str:
    """One markdown row in the paper's Table 1 layout (Acc and F1 in percent; F1 is the macro average over the
    five classes, `f1_macro_5`); n counts the scored examples."""
    def f(x, scale=1.0, nd=4):
        return "n/a" if x is None or x != x else f"{x * scale:.{nd}f}"
    return (f"| {name} | {f(m['mae'])} | {f(m['rmse'])} | {f(m['acc'], 100, 2)} | {f(m.get('f1_macro_5'), 100, 2)} | "
            f"{m['format_failures']} | {m['n']} |")
