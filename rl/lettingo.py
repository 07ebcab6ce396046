"""LettinGo's data stages: explore candidate profiles, score them by recommendation error, build preference pairs.
(The fourth stage, DPO on the pairs, is rl/dpo_trainer.py; scripts/train_dpo.py runs them in order.)

  explore  run_dir/candidates.jsonl  K candidate profiles per training user from each explorer model, prompt
                                     style and temperature, with their provenance
  score    run_dir/scores.jsonl      each candidate's mean reward on the user's held-out window (recommender)
  pairs    run_dir/pairs.jsonl       (chosen, rejected) profiles with their scores

For a training user, the last `heldout` train interactions form the evaluation window; the profile writer only
sees interactions strictly before the window's first timestamp. A candidate's score is the recommender's mean
reward 1 - |y - y_hat| / 4 over the window (or -MAE): the profile that best predicts the user's own ratings wins.
Each stage writes one JSON-lines file atomically; the next stage reads it. Exploration and scoring are inference
only: under torchrun each rank takes a share of the users (scoring: of the candidates) with a full copy of the
model, and rank 0 gathers. The gather is the stages' only collective: the shares may differ by one, or be empty.
"""
from __future__ import annotations

import json
import zlib
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from data import load_dataset
from data.history import HistoryIndex
from data.io import write_text_atomic
from eval.profiles import (HistoryOptions, completion_text, encode_prompt, parse_profile, profile_messages,
                           rec_example, style_prefix)
from eval.reward import rating_reward
from model import load_model, load_tokenizer

from . import distributed as dist
from . import loop


def write_jsonl(path: Path, rows: list[dict]):
    """One JSON object a line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path, stage_hint: str) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage '{stage_hint}' first")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    return rows


class Target(NamedTuple):
    """Where a profile is written or scored: a user at a time (item_id "" for a user-only profile)."""
    user_id: str
    item_id: str
    timestamp: int


def window_target(user: dict) -> Target:
    """A user's profile is written from what came strictly before the first held-out interaction."""
    return Target(user["user_id"], "", user["t_cut"])


def user_windows(ds, heldout: int, min_history: int, limit: int | None = None) -> list[dict]:
    """Training users with their evaluation window: [{user_id, t_cut, heldout: [(item_id, rating, t)]}]."""
    by_user: dict[str, list] = {}
    for x in ds.split("train"):
        by_user.setdefault(x.user_id, []).append(x)
    out = []
    for u in sorted(by_user):
        xs = sorted(by_user[u], key=lambda x: x.timestamp)
        if len(xs) < heldout + min_history:
            continue
        window = xs[-heldout:]
        out.append({"user_id": u, "t_cut": window[0].timestamp,
                    "heldout": [(x.item_id, x.rating, x.timestamp) for x in window]})
    return out[:limit] if limit else out


def candidate_stream(seed: int, user_id: str, style: str, temperature: float, sample: int) -> int:
    """The random stream of one candidate: its own for every (user, style, temperature, sample), whatever the
    batch, the rank or the order of the jobs, so that candidates at two temperatures never share their draws."""
    from model.sampler import row_seed

    return row_seed(seed, zlib.crc32(f"{user_id}\x00{style}\x00{float(temperature)!r}".encode()), sample)


def explore(users, ds, hx, explorer: str, model, tokenizer, styles, temperatures, samples: int,
            hist: HistoryOptions, max_new_tokens: int, max_prompt_tokens: int, seed: int = 0,
            batch_prompts: int = 8, progress: bool = True) -> list[dict]:
    """Candidate profiles of every user from one explorer model, for each prompt style and temperature."""
    from model.sampler import generate

    rows = []
    jobs = [(s, t) for s in styles for t in temperatures]
    bar = tqdm(total=len(jobs) * len(users), desc=f"explore {Path(explorer).name}", disable=not progress)
    for style, temp in jobs:
        n = 1 if temp == 0 else samples
        prefix = style_prefix(style)  # e.g. "Usually rates " for lg-rating: the explorer writes the rest
        for b in range(0, len(users), batch_prompts):
            chunk = users[b:b + batch_prompts]
            prompts = [encode_prompt(tokenizer, profile_messages(style, hx, ds, window_target(u), hist),
                                     max_prompt_tokens, prefix) for u in chunk]
            seeds = [candidate_stream(seed, u["user_id"], style, temp, j) for u in chunk for j in range(n)]
            # sync_ranks off: each rank holds a full copy of the explorer, and ranks with shares of different
            # sizes run different numbers of chunks and decode steps, which no collective may pair up
            out = generate(model, prompts, max_new_tokens, temperature=temp, n=n, eos_ids=tokenizer.eos_ids,
                           pad_id=tokenizer.pad_token_id, vocab_limit=tokenizer.vocab_size, seeds=seeds,
                           sync_ranks=False)
            for r in range(len(chunk) * n):
                u = chunk[r // n]
                text = completion_text(tokenizer, out.tokens[r, :out.lengths[r]].tolist(), prefix)
                parsed, reason = parse_profile(style, text)
                rows.append({"user_id": u["user_id"], "explorer": explorer, "style": style, "temperature": temp,
                             "sample": r % n, "text": text, "profile": parsed[0] if parsed else None,
                             "parse": reason})
            bar.update(len(chunk))
    bar.close()
    return rows


def score_candidates(candidates, users, ds, hx, recommender, review_chars: int = 200,
                     progress: bool = True) -> list[dict]:
    """Each parsed candidate scored on its user's evaluation window: mean reward and MAE."""
    window = {u["user_id"]: u for u in users}
    examples, owner = [], []
    for c, cand in enumerate(candidates):
        if cand["profile"] is None:
            continue
        for item_id, rating, t in window[cand["user_id"]]["heldout"]:
            examples.append(rec_example(hx, ds, Target(cand["user_id"], item_id, t), cand["profile"], None,
                                        review_chars))
            owner.append((c, rating))
    y_hat, _ = recommender.score(examples) if examples else (torch.zeros(0), None)
    y = torch.tensor([float(r) for _, r in owner])
    rewards = rating_reward(y, y_hat.float()) if examples else torch.zeros(0)  # eval/reward.py: 1 - |y - y_hat| / 4
    per: dict[int, list[tuple[float, float]]] = {}
    for (c, _), err, r in zip(owner, (y - y_hat.float()).abs().tolist(), rewards.tolist()):
        per.setdefault(c, []).append((err, r))
    out = []
    for c, cand in enumerate(candidates):
        if c in per:
            errs, rs = zip(*per[c])
            out.append({**cand, "candidate": c, "mae": sum(errs) / len(errs), "reward": sum(rs) / len(rs),
                        "n_heldout": len(errs)})
    return out


def select_pairs(scored: list[dict], mode: str = "best-worst", margin: float = 0.0,
                 key: str = "reward") -> list[dict]:
    """Preference pairs per user. best-worst: the best against the worst candidate when they differ by at least
    `margin`; all: every pair whose scores differ by at least `margin` (and by more than 0)."""
    by_user: dict[str, list[dict]] = {}
    for s in scored:
        by_user.setdefault(s["user_id"], []).append(s)
    pairs = []
    for u in sorted(by_user):
        cands = sorted(by_user[u], key=lambda s: (-s[key], s["candidate"]))
        if len(cands) < 2:
            continue
        if mode == "best-worst":
            options = [(cands[0], cands[-1])]
        elif mode == "all":
            options = list(combinations(cands, 2))
        else:
            raise ValueError(f"unknown pair mode {mode!r} (best-worst, all)")
        for hi, lo in options:
            gap = hi[key] - lo[key]
            if gap > 0 and gap >= margin:
                pairs.append({"user_id": u, "chosen": hi["profile"], "rejected": lo["profile"],
                              "chosen_score": hi[key], "rejected_score": lo[key],
                              "chosen_from": f"{hi['explorer']}|{hi['style']}|T={hi['temperature']}",
                              "rejected_from": f"{lo['explorer']}|{lo['style']}|T={lo['temperature']}"})
    return pairs


# ---- the stages (each reads the previous one's file, writes its own) ------------------------------------------
def files(cfg):
    r = Path(cfg.run_dir)
    return {"explore": r / "candidates.jsonl", "score": r / "scores.jsonl", "pairs": r / "pairs.jsonl"}


def dataset(cfg):
    """The run's dataset (--data, or the synthetic default) and its history index."""
    from data.default import default_dataset_dir

    ds = load_dataset(cfg.data or default_dataset_dir())
    return ds, HistoryIndex(ds)


def history_options(cfg) -> HistoryOptions:
    return HistoryOptions(cfg.user_history, 0, cfg.review_chars)


def stage_explore(cfg, d: dist.Dist, ds, hx):
    users = user_windows(ds, cfg.heldout, cfg.min_history, cfg.users)
    mine = users[d.rank::d.world]
    rows = []
    for k, src in enumerate(cfg.explorers):
        model, tok = load_model(src, loop.resolve_dtype(cfg.dtype, d.device), d.device), load_tokenizer(src)
        rows += explore(mine, ds, hx, src, model, tok, cfg.styles, [float(t) for t in cfg.temperatures],
                           cfg.samples, history_options(cfg), cfg.max_new_tokens, cfg.max_prompt_tokens,
                           seed=cfg.seed + 7919 * k, progress=d.is_main)  # streams keyed by user, not rank
        del model
    rows = [r for part in dist.all_gather_objects(rows, d) for r in part]
    if d.is_main:
        write_jsonl(files(cfg)["explore"], rows)
        ok = sum(r["profile"] is not None for r in rows)
        print(f"explore: {len(rows)} candidates for {len(users)} users, {ok} parsed -> {files(cfg)['explore']}")


def stage_score(cfg, d: dist.Dist, ds, hx):
    from eval.recommender import Recommender

    cands = read_jsonl(files(cfg)["explore"], "explore")
    users = user_windows(ds, cfg.heldout, cfg.min_history, cfg.users)
    src = cfg.model if cfg.recommender == "reference" else cfg.recommender
    rec = Recommender(load_model(src, loop.resolve_dtype(cfg.dtype, d.device), d.device), load_tokenizer(src),
                      device=d.device)
    for c, cand in enumerate(cands):
        cand["candidate"] = c
    mine = cands[d.rank::d.world]
    scored = score_candidates(mine, users, ds, hx, rec, cfg.review_chars, progress=d.is_main)
    for s in scored:  # score_candidates numbers within its input: restore the global candidate id
        s["candidate"] = mine[s["candidate"]]["candidate"]
        s["neg_mae"] = -s["mae"]
    rows = sorted((r for part in dist.all_gather_objects(scored, d) for r in part), key=lambda r: r["candidate"])
    if d.is_main:
        write_jsonl(files(cfg)["score"], rows)
        print(f"score: {len(rows)} candidates scored -> {files(cfg)['score']}")


def stage_pairs(cfg, d: dist.Dist, ds, hx):
    if not d.is_main:
        return
    scored = read_jsonl(files(cfg)["score"], "score")
    users = {u["user_id"]: u for u in user_windows(ds, cfg.heldout, cfg.min_history, cfg.users)}
    pairs = select_pairs(scored, cfg.pair_mode, cfg.pair_margin, key=cfg.pair_metric)
    for p in pairs:
        p["t_cut"] = users[p["user_id"]]["t_cut"]
    write_jsonl(files(cfg)["pairs"], pairs)
    print(f"pairs: {len(pairs)} pairs ({cfg.pair_mode}, margin {cfg.pair_margin}) -> {files(cfg)['pairs']}")


