"""How much can a user profile help the retrieval recommender (eval/retrieval.py)? The oracle taste against none.

On the synthetic catalogue every user's hidden taste is known as text (ds.oracle). This trains the retrieval
recommender twice from the same weights, on the same (user, next liked item) pairs of the train split, with
InfoNCE and in-batch negatives: (a) the user text is the oracle taste, then the recent titles; (b) the recent
titles alone. Both then rank the whole catalogue for the same valid-split next items (the user's earlier items
excluded); the per-example difference (a) - (b) of NDCG@10 and MRR, with its paired standard error, is the room
a profile writer has with this recommender. A trained writer's profiles should land between the two.

Two references without a language model, on the same targets: "keywords" ranks items by the oracle taste's liked
attributes found in the item text, minus 4 x its disliked ones (ties broken at random): about what a perfect
reader of the oracle profile could reach; "random" ranks at random.

    python scripts/retrieval_headroom.py                     # SmolLM2-135M-Instruct, 200 steps: ~25 min on 2 cores
    python scripts/retrieval_headroom.py --data DIR --eval 0   # another catalogue, every valid next item ranked

Prints progress, then one JSON line with both conditions' metrics and the paired differences.
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONDITIONS = ("oracle", "none")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="", help="canonical dataset dir with oracle profiles; empty: the default")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--trainable-layers", type=int, default=4, help="train the top N blocks and the final norm; "
                   "-1: every weight")
    p.add_argument("--history", type=int, default=5, help="recent titles in the user text")
    p.add_argument("--item-text", choices=("full", "title"), default="title")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--min-rating", type=int, default=4, help="a next item is an interaction rated at least this")
    p.add_argument("--eval", type=int, default=512, help="valid-split next items ranked (a seeded sample); "
                   "0: all of them")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the catalogue's mean embedding before normalising (eval/retrieval.py, Centring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def profile_of(ds, condition: str, user_id: str):
    return ds.oracle.get(user_id) if condition == "oracle" else None


def texts_of(ds, targets, condition: str, history: int) -> list[str]:
    """The user text of each target, from its history before the target's time."""
    from eval.retrieval import history_titles, user_text

    return [user_text(profile_of(ds, condition, x.user_id), history_titles(ds, x.user_id, x.timestamp, history))
            for x in targets]


def load_embedder(a, catalogue: list[str]):
    """A fresh Embedder on the pretrained weights, its top `trainable_layers` blocks trainable, centred on the
    catalogue's texts (with --center)."""
    from eval.retrieval import Embedder
    from model import freeze_all_but_top, load_model, load_tokenizer

    model = load_model(a.model)
    if a.trainable_layers >= 0:
        freeze_all_but_top(model, min(a.trainable_layers, model.config.num_hidden_layers))
    emb = Embedder(model, load_tokenizer(a.model), max_tokens=a.max_tokens, batch_size=16)
    if a.center:
        emb.fit_center(catalogue)
    return emb


def cosine_spread(emb, texts: list[str]) -> dict:
    """Mean and std of the cosine between two different texts' embeddings, as pooled and after centring."""
    import torch
    import torch.nn.functional as F

    raw = emb.embed(texts, center=False, normalize=False)  # (N, D)
    off = ~torch.eye(len(texts), dtype=torch.bool)
    out = {}
    for name, x in (("pooled", raw), ("centred", raw - raw.mean(0))):
        cos = (F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T)[off]
        out[name] = {"mean": round(float(cos.mean()), 3), "std": round(float(cos.std()), 3)}
    return out


def train(emb, user_texts, item_texts, item_ids, a) -> list[float]:
    """a.steps Adam steps of InfoNCE over consecutive batches of the pairs -> the loss of each step."""
    import torch

    from eval.retrieval import info_nce

    params = [p for p in emb.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=a.lr)
    losses, t0 = [], time.time()
    for step in range(a.steps):
        s = slice(step * a.batch, (step + 1) * a.batch)
        loss, m = info_nce(emb.embed(user_texts[s], grad=True), emb.embed(item_texts[s], grad=True),
                           a.temperature, item_keys=item_ids[s])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(m["loss"].item())
        if step % 5 == 0 or step == a.steps - 1:
            print(f"  step {step}: loss {losses[-1]:.3f} accuracy {m['accuracy'].item():.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return losses


def summary(ranks, k: int) -> dict:
    """(M,) ranks -> {metric: per-example values}."""
    from eval.retrieval import mrr, ndcg_at_k, recall_at_k

    return {f"ndcg@{k}": ndcg_at_k(ranks, k).tolist(), "mrr": mrr(ranks).tolist(),
            f"recall@{k}": recall_at_k(ranks, k).tolist()}


def reference_ranks(ds, targets, index_ids, texts, seed: int):
    """{"keywords", "random"} -> (M,) ranks of the targets without a model (see the module docstring)."""
    import torch

    from eval.retrieval import history_items, target_ranks

    g = torch.Generator().manual_seed(seed)
    lower = [t.lower() for t in texts]
    rows = []
    for x in targets:
        taste = ds.oracle_taste.get(x.user_id, {})
        liked, disliked = taste.get("liked", []), taste.get("disliked", [])
        rows.append([sum(w in t for w in liked) - 4 * sum(w in t for w in disliked) for t in lower])
    keyword = torch.tensor(rows, dtype=torch.float32)  # (M, N)
    pos = {i: n for n, i in enumerate(index_ids)}
    targets_pos = torch.tensor([pos[x.item_id] for x in targets])
    exclude = torch.zeros(keyword.shape, dtype=torch.bool)
    for b, x in enumerate(targets):
        exclude[b, [pos[i] for i in history_items(ds, x.user_id, x.timestamp)]] = True
    jitter = 1e-3 * torch.rand(keyword.shape, generator=g)  # random order among equal keyword counts
    return {"keywords": target_ranks(keyword + jitter, targets_pos, exclude),
            "random": target_ranks(torch.rand(keyword.shape, generator=g), targets_pos, exclude)}


def paired(a: list[float], b: list[float]) -> dict:
    """Per-example d = a - b: means, mean difference and its standard error std(d, ddof=1) / sqrt(n)."""
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"a": round(sum(a) / n, 4), "b": round(sum(b) / n, 4), "diff": round(mean, 4), "se": round(se, 4)}


def main(argv=None):
    a = parse_args(argv)
    import torch

    from data import load_dataset
    from data.default import default_dataset_dir
    from eval.retrieval import ItemIndex, item_text, next_item_targets, retrieval_ranks

    torch.set_num_threads(a.threads)
    t0 = time.time()
    ds = load_dataset(a.data or default_dataset_dir())
    if not ds.oracle:
        raise SystemExit("the dataset has no oracle profiles (oracle_profiles.jsonl): use the synthetic data")
    rng = random.Random(a.seed)
    train_targets = rng.sample(next_item_targets(ds, "train", a.min_rating), a.steps * a.batch)
    valid = next_item_targets(ds, "valid", a.min_rating)
    n_eval = len(valid) if a.eval <= 0 else min(a.eval, len(valid))
    eval_targets = sorted(rng.sample(valid, n_eval), key=lambda x: x.timestamp)
    show = (lambda i: i.title) if a.item_text == "title" else item_text  # noqa: E731
    item_ids = [x.item_id for x in train_targets]
    item_texts = [show(ds.items[i]) for i in item_ids]
    out = {"model": a.model, "steps": a.steps, "batch": a.batch, "lr": a.lr, "temperature": a.temperature,
           "n_eval": len(eval_targets), "min_rating": a.min_rating, "trainable_layers": a.trainable_layers,
           "history": a.history, "item_text": a.item_text, "catalogue": len(ds.items), "center": a.center}
    ids = sorted(ds.items)
    metrics = {}
    for name, ranks in reference_ranks(ds, eval_targets, ids, [item_text(ds.items[i]) for i in ids], a.seed).items():
        metrics[name] = summary(ranks, a.k)
        out[name] = {m: round(sum(v) / len(v), 4) for m, v in metrics[name].items()}
    print(f"references: keywords {out['keywords']}, random {out['random']}", flush=True)
    for cond in CONDITIONS:
        print(f"{cond}: training {a.steps} steps of {a.batch} ({time.time() - t0:.0f} s)", flush=True)
        torch.manual_seed(a.seed)
        emb = load_embedder(a, [show(ds.items[i]) for i in ids])
        if "catalogue_cosine" not in out:  # the untrained model's item embeddings, before and after centring
            out["catalogue_cosine"] = cosine_spread(emb, [show(ds.items[i]) for i in ids])
            print(f"cosine between two items: {out['catalogue_cosine']}", flush=True)
        losses = train(emb, texts_of(ds, train_targets, cond, a.history), item_texts, item_ids, a)
        print(f"{cond}: ranking {len(ds.items)} items for {len(eval_targets)} targets ({time.time() - t0:.0f} s)",
              flush=True)
        index = ItemIndex(emb, ids, [show(ds.items[i]) for i in ids], center=a.center)
        ranks = retrieval_ranks(emb, index, ds, eval_targets, texts_of(ds, eval_targets, cond, a.history))
        metrics[cond] = summary(ranks, a.k)
        out[cond] = {name: round(sum(v) / len(v), 4) for name, v in metrics[cond].items()}
        out[cond]["first_loss"] = round(sum(losses[:5]) / max(1, len(losses[:5])), 4)
        out[cond]["last_loss"] = round(sum(losses[-5:]) / max(1, len(losses[-5:])), 4)
        print(f"{cond}: {out[cond]}", flush=True)
    for name in metrics["oracle"]:
        out[f"oracle_minus_none_{name}"] = paired(metrics["oracle"][name], metrics["none"][name])
    out["seconds"] = round(time.time() - t0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
