"""Evaluate one method on a dataset split and print its row of the paper's Table 1; or compare result folders.

    python scripts/evaluate.py --method 10h --recommender smollm2-135m-instruct --data DIR --split test --limit 100 \
        --out results/music/10h
    python scripts/evaluate.py --method duet --generator smollm2-135m-instruct --recommender smollm2-135m-instruct \
        --data DIR --split test --out results/music/duet
    python scripts/evaluate.py --compare results/music/*      # one markdown table, a row per folder

--out DIR receives metrics.json (mae, rmse, acc, f1_macro_5, f1_macro_present, format_failures, n and the run's settings) and
predictions.jsonl (user_id, item_id, rating, prediction, probs of 1..5, the exact recommender prompt; for
profile methods also the generated text, its format verdict and the parsed profiles). Generated profiles are
cached under --cache (key: method, generator weights' hash, user, item, prompt), so a rerun regenerates nothing.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.evaluate import (CLASSIC, HEADER, METHODS, build_examples, evaluate_method,  # noqa: E402
                           negative_examples, ranking_from_predictions, table_row)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--generator", help="profile writer: model name, directory or .gguf (kar, palr, rlmrec, lg, "
                                       "lg-rating, duet, duet-profile)")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT's layout) applied to --generator, e.g. "
                                     "a LoRA run's checkpoints/step_N/adapter")
    p.add_argument("--recommender", help="frozen recommender model (every LLM method)")
    p.add_argument("--data", help="canonical dataset directory (scripts/prepare_data.py)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--limit", type=int, help="evaluate a fixed random subset of this many examples (seed 0)")
    p.add_argument("--profile-history", type=int, default=30,
                   help="user interactions shown to the profile writer (paper Table 3: 30, 50, 70)")
    p.add_argument("--item-history", type=int, default=10,
                   help="other users' reviews of the item shown to a DUET writer (the trainers' --item-history)")
    p.add_argument("--review-chars", type=int, default=200,
                   help="characters of each review shown to the profile writer (the trainers' --review-chars)")
    p.add_argument("--rec-history", type=int, default=10, help="recent interactions shown to the recommender")
    p.add_argument("--max-new-tokens", type=int, default=320, help="profile length limit")
    p.add_argument("--response-prefix", default=None,
                   help="text that opens the writer's answer (default: the method's own, 'Usually rates ' for "
                        "lg-rating, none otherwise); give a GRPO writer the --response-prefix it was trained with")
    p.add_argument("--batch-size", type=int, default=8, help="recommender batch size")
    p.add_argument("--gen-batch-size", type=int, default=8, help="generator batch size")
    p.add_argument("--cache", default="out/profile_cache", help="profile cache folder")
    p.add_argument("--out", help="result folder: metrics.json + predictions.jsonl (written atomically)")
    p.add_argument("--name", help="row label (default: the method)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype of the writer and the recommender (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--negatives", type=int, default=0,
                   help="ranking: score each example's item against this many items its user never rated and "
                        "add hit@k, ndcg@k, mrr (k = 1, 5, 10) to metrics.json; 0 = rating metrics only")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="print one table of these result folders and exit")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"),
                   help="paired MAE difference B - A over the examples both result folders predicted (format "
                        "failures left out and counted in only_a / only_b), with its standard error; prints one "
                        "JSON line and exits")
    p.add_argument("--fallback", action="store_true",
                   help="with --paired: a format failure counts at its fallback prediction (the history alone, as "
                        "10H; mae_fallback), so every example is compared")
    return p.parse_args(argv)


def compare(dirs) -> str:
    lines = [HEADER]
    for d in dirs:
        f = Path(d) / "metrics.json"
        if not f.exists():
            raise SystemExit(f"{f}: no such file (not a result folder of scripts/evaluate.py --out)")
        m = json.loads(f.read_text())
        lines.append(table_row(m.get("name") or Path(d).name, m))
    return "\n".join(lines)


def paired(dir_a, dir_b, fallback: bool = False) -> dict:
    """Paired MAE difference of two result folders over their shared (user, item, rating) examples with a
    prediction in both; with `fallback`, a format failure counts at its fallback (10H) prediction."""
    from eval.metrics import paired_mae_difference

    def rows(d):
        f = Path(d) / "predictions.jsonl"
        if not f.exists():
            raise SystemExit(f"{f}: no such file (not a result folder of scripts/evaluate.py --out)")
        out = {}
        for n, line in enumerate(f.read_text().splitlines(), 1):
            try:
                r = json.loads(line)
                key = (r["user_id"], r["item_id"], r["rating"])
                pred = r.get("prediction_fallback", r["prediction"]) if fallback else r["prediction"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SystemExit(f"{f}, line {n}: not a prediction row ({e})") from None
            if pred is not None:
                out[key] = float(pred)
        return out

    ra, rb = rows(dir_a), rows(dir_b)
    keys = sorted(set(ra) & set(rb))
    res = paired_mae_difference([k[2] for k in keys], [ra[k] for k in keys], [rb[k] for k in keys])
    return {"a": str(dir_a), "b": str(dir_b), "only_a": len(ra) - len(keys), "only_b": len(rb) - len(keys), **res}


def write_results(out: Path, metrics: dict, rows: list[dict]):
    """metrics.json and predictions.jsonl into `out`, each written to a temp file in that folder then renamed."""
    from data.io import write_text_atomic

    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv=None):
    a = parse_args(argv)
    if a.compare:
        print(compare(a.compare))
        return
    if a.paired:
        print(json.dumps(paired(*a.paired, fallback=a.fallback)))
        return
    if not a.method or not a.data:
        raise SystemExit("--method and --data are required (or --compare DIR... / --paired A B)")
    import torch

    from data import load_dataset
    from data.history import HistoryIndex
    from eval.profile_cache import ProfileCache, sha256_text, weights_hash
    from eval.recommender import Recommender
    from model import load_model, load_tokenizer, merge_lora

    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_dataset(a.data)
    examples = build_examples(ds, a.split, a.limit)
    t0 = time.time()
    models = {}

    def get(name, adapter=None):  # load each distinct model once (generator and recommender are often the same)
        if (name, adapter) not in models:
            model = load_model(name, dtype=a.dtype and getattr(torch, a.dtype), adapter=adapter)
            if adapter:  # only the writer carries one: fold it in, so decoding runs plain matmuls
                model = merge_lora(model)
            models[name, adapter] = model, load_tokenizer(name)
        return models[name, adapter]

    rec = gen = gen_tok = cache = None
    if a.method not in CLASSIC:
        if not a.recommender:
            raise SystemExit(f"--recommender is required for method {a.method}")
        rec = Recommender(*get(a.recommender), batch_size=a.batch_size)
    if a.method not in CLASSIC + ("10h", "oracle"):  # the methods whose profiles an LLM writes
        if not a.generator:
            raise SystemExit(f"--generator is required for method {a.method}")
        gen, gen_tok = get(a.generator, a.adapter)
        weights = weights_hash(gen.source)
        if a.adapter:  # the base weights and the adapter's
            weights = sha256_text(weights + weights_hash(a.adapter))
        if a.dtype:  # another compute dtype writes other profiles
            weights = sha256_text(weights + a.dtype)
        cache = ProfileCache(a.cache, a.method, weights)
    kw = dict(recommender=rec, generator=gen, gen_tok=gen_tok, cache=cache, hist=HistoryIndex(ds),
              rec_history=a.rec_history, profile_history=a.profile_history, item_history=a.item_history,
              max_new_tokens=a.max_new_tokens, review_chars=a.review_chars, gen_batch_size=a.gen_batch_size, prefix=a.response_prefix)
    metrics, rows = evaluate_method(a.method, examples, ds, **kw)
    if a.negatives:
        _, neg_rows = evaluate_method(a.method, negative_examples(ds, examples, a.negatives), ds,
                                      with_metrics=False, **kw)
        metrics.update(ranking_from_predictions(rows, neg_rows, a.negatives))
    name = a.name or a.method
    metrics.update(name=name, method=a.method, data=str(a.data), split=a.split, limit=a.limit,
                   generator=a.generator, recommender=a.recommender, profile_history=a.profile_history,
                   item_history=a.item_history, adapter=a.adapter, review_chars=a.review_chars, rec_history=a.rec_history, max_new_tokens=a.max_new_tokens,
                   seconds=round(time.time() - t0, 1))
    if a.out:
        write_results(Path(a.out), metrics, rows)
    print(HEADER)
    print(table_row(name, metrics))
    keys = ["mae", "rmse", "acc", "f1_macro_5", "f1_macro_present", "format_failures", "n", "seconds"]
    if a.negatives:
        ranking = ["hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10", "mrr"]
        keys += ranking
        print(f"ranking against {a.negatives} negatives: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in ranking))
    if "mae_fallback" in metrics:  # profile methods: failures predicted from the history alone
        keys.insert(1, "mae_fallback")
    print(json.dumps({k: metrics[k] for k in keys}))


if __name__ == "__main__":
    main()
