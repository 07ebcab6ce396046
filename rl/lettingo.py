"""LettinGo's data stages: explore candidate profiles, score them by recommendation error, build preference pairs.

For a training user, the last `heldout` train interactions form the evaluation window; the profile writer only
sees interactions strictly before the window's first timestamp. A candidate's score is the recommender's mean
reward 1 - |y - y_hat| / 4 over the window (or -MAE): the profile that best predicts the user's own ratings wins.
Each stage writes one JSON-lines file atomically; the next stage reads it.
"""
from __future__ import annotations

import json
import os
import zlib
from itertools import combinations
from pathlib import Path

import torch
from tqdm import tqdm

from . import profiles as P


def write_jsonl_atomic(path: Path, rows: list[dict]):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            opt: P.HistoryOptions, max_new_tokens: int, max_prompt_tokens: int, seed: int = 0,
            batch_prompts: int = 8, progress: bool = True) -> list[dict]:
    """Candidate profiles of every user from one explorer model, for each prompt style and temperature."""
    from model.sampler import generate

    rows = []
    jobs = [(s, t) for s in styles for t in temperatures]
    bar = tqdm(total=len(jobs) * len(users), desc=f"explore {Path(explorer).name}", disable=not progress)
    for style, temp in jobs:
        n = 1 if temp == 0 else samples
        prefix = P.style_prefix(style)  # e.g. "Usually rates " for lg-rating: the explorer writes the rest
        for b in range(0, len(users), batch_prompts):
            chunk = users[b:b + batch_prompts]
            prompts = [P.prompt_ids(tokenizer, P.profile_messages(style, hx, u["user_id"], "", u["t_cut"], opt, ""),
                                    max_prompt_tokens, prefix) for u in chunk]
            seeds = [candidate_stream(seed, u["user_id"], style, temp, j) for u in chunk for j in range(n)]
            out = generate(model, prompts, max_new_tokens, temperature=temp, n=n, eos_ids=tokenizer.eos_ids,
                           pad_id=tokenizer.pad_token_id, vocab_limit=tokenizer.vocab_size, seeds=seeds)
            for r in range(len(chunk) * n):
                u = chunk[r // n]
                text = prefix + tokenizer.decode(out.tokens[r, :out.lengths[r]].tolist())
                parsed, reason = P.parse_profile(style, text)
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
            examples.append(P.rec_example(hx, ds, cand["user_id"], item_id, t, cand["profile"], None, review_chars))
            owner.append((c, rating))
    y_hat, _ = recommender.score(examples) if examples else (torch.zeros(0), None)
    errs: dict[int, list[float]] = {}
    for (c, y), yh in zip(owner, y_hat.tolist()):
        errs.setdefault(c, []).append(abs(y - yh))
    out = []
    for c, cand in enumerate(candidates):
        if c not in errs:
            continue
        e = errs[c]
        mae = sum(e) / len(e)
        out.append({**cand, "candidate": c, "mae": mae, "reward": 1 - mae / 4.0, "n_heldout": len(e)})
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
