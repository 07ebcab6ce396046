"""Profile prompts -> profiles -> recommender scores: the pieces the DUET env, LettinGo and validation share.

A "style" is how the profile writer is prompted and its answer parsed: "duet" (joint user/item profile with
cue and constructed prompt) or a baseline of the paper's appendix A.2 ("kar", "palr", "rlmrec", "lg").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from data.prompts import PARSERS, PROFILE_PROMPTS, RESPONSE_PREFIXES, cut_after, duet_messages, parse_duet
from eval.recommender import RecExample

from . import distributed as D

RECENT = 10  # the recommender sees the user's ten most recent interactions (DUET, paper 3.1)


@dataclass
class HistoryOptions:
    user_history: int = 30  # interactions shown to the profile writer
    item_history: int = 10
    review_chars: int = 200


def profile_messages(style: str, hx, user_id: str, item_id: str, t: int, opt: HistoryOptions, item_title: str):
    """Chat messages asking for the profile(s) of (user, item) at time t; only interactions before t are used."""
    uh = hx.user_history(user_id, t, opt.user_history, review_chars=opt.review_chars)
    if style == "duet":
        ih = hx.item_history(item_id, t, opt.item_history, exclude_user=user_id, review_chars=opt.review_chars)
        return duet_messages(uh, ih, hx.user_average(user_id, t), hx.item_average(item_id, t), item_title)
    if style not in PROFILE_PROMPTS:
        raise ValueError(f"unknown profile style {style!r}: duet, {', '.join(PROFILE_PROMPTS)}")
    return PROFILE_PROMPTS[style](uh)


def style_prefix(style: str) -> str:
    """The text a style's answer opens with (prompted, then read back as the start of the profile); usually ""."""
    return RESPONSE_PREFIXES.get(style, "")


def parse_profile(style: str, text: str):
    """-> ((user_profile, item_profile or None) | None, reason)."""
    if style == "duet":
        parsed, reason = parse_duet(text)
        return (None, reason) if parsed is None else ((parsed.user_profile, parsed.item_profile), reason)
    profile, reason = PARSERS[style](text)
    return (None, reason) if profile is None else ((profile, None), reason)


def rec_example(hx, ds, user_id, item_id, t, user_profile, item_profile, review_chars=200) -> RecExample:
    item = ds.items.get(item_id)
    return RecExample(hx.user_history(user_id, t, RECENT, review_chars=review_chars), user_profile,
                      item.title if item else item_id, item_profile)


def format_progress(text: str) -> float:
    """Share of the 8 DUET tag pairs that are opened and closed in the text (0..1), for the graded format reward:
    a small model that cannot yet write the whole structure still gets a gradient towards it."""
    found = 0
    for side in ("user_profile", "item_profile"):
        m = re.search(rf"<{side}>(.*?)</{side}>", text, re.S)
        block = m.group(1) if m else text.split(f"<{side}>", 1)[1] if f"<{side}>" in text else ""
        found += bool(m) + sum(bool(re.search(rf"<{t}>\s*\S.*?</{t}>", block, re.S))
                               for t in ("cue", "constructed_prompt", "profile"))
    return found / 8


def prompt_ids(tokenizer, messages, max_tokens: int, response_prefix: str = "") -> list[int]:
    """The rendered chat prompt; `response_prefix` opens the assistant's answer (e.g. "<user_profile><cue>" to
    start a small model on the DUET format); the parser then reads prefix + completion."""
    ids = tokenizer.encode_chat(messages)
    if response_prefix:
        ids = ids + tokenizer.encode(response_prefix, add_special_tokens=False)
    if len(ids) > max_tokens:
        raise ValueError(f"profile prompt of {len(ids)} tokens exceeds max_prompt_tokens={max_tokens}; "
                         "lower --user-history / --review-chars or raise the limit")
    return ids


def pad_to_world(items: list, d: D.Dist) -> tuple[list, int]:
    """This rank's equal-sized share of `items` (the last share padded by repeating the final element, so every
    rank runs the same number of forward passes), and how many of its entries are real."""
    per = -(-len(items) // d.world)
    mine = items[d.rank * per:(d.rank + 1) * per]
    real = len(mine)
    mine = mine + [items[-1]] * (per - real)
    return mine, real


@torch.no_grad()
def validate(policy, tokenizer, recommender, ds, hx, targets, style: str, opt: HistoryOptions, d: D.Dist,
             max_new_tokens: int, max_prompt_tokens: int, response_prefix: str = "", stop_texts=(),
             gen_batch: int = 32) -> dict:
    """Greedy profiles for a fixed list of (user, item, rating, t) targets -> MAE, RMSE, Acc, F1, reward.

    Format failures are counted apart (not in MAE); the reward counts them at -1, as DUET does; format_progress
    is the mean share of the DUET tag pairs written (1.0 for a well-formed answer), which moves before the
    failure rate does. `mae_fallback` is the MAE over every target, a failed row predicted without any profile
    (the 10H prompt: history only): defined from step 0 even when no profile parses yet, and it falls only if
    the written profiles predict better than the history alone. `mae_vs_none` is the paired difference, over
    the parsed rows, of the error with the profiles minus the error without any (negative: the profiles help),
    with its standard error `mae_vs_none_se`: the low-noise answer to "do these profiles help the recommender".
    `stop_texts` end the greedy answers as they end the rollouts; generation runs `gen_batch` prompts at a time
    (the KV cache of a whole validation set at once would not fit).
    """
    from eval.metrics import paired_mae_difference, rating_metrics
    from eval.reward import rating_reward
    from model.sampler import generate

    mine, real = pad_to_world(list(targets), d)
    prompts = [prompt_ids(tokenizer, profile_messages(style, hx, x.user_id, x.item_id, x.timestamp, opt,
                                                      _title(ds, x.item_id)), max_prompt_tokens, response_prefix)
               for x in mine]
    policy.eval()
    texts = []
    with D.gathered(policy):
        for s in range(0, len(prompts), gen_batch):  # every rank has the same number of prompts: same calls
            out = generate(policy, prompts[s:s + gen_batch], max_new_tokens, temperature=0.0,
                           eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_token_id,
                           vocab_limit=tokenizer.vocab_size, sync_ranks=d.enabled, stop_texts=stop_texts,
                           decode=tokenizer.decode)
            texts += [response_prefix + cut_after(tokenizer.decode(out.tokens[r, :out.lengths[r]].tolist()),
                                                  stop_texts) for r in range(out.tokens.shape[0])]
    parsed = [parse_profile(style, t)[0] for t in texts]
    examples = [rec_example(hx, ds, x.user_id, x.item_id, x.timestamp, *(p or (None, None)), opt.review_chars)
                for x, p in zip(mine, parsed)]
    y_hat, _ = recommender.score(examples)  # failed rows: no profile (10H), the fallback of mae_fallback
    # every row, not just the parsed ones: under FSDP each rank must run the same recommender forwards
    y_none, _ = recommender.score([e._replace(user_profile=None, item_profile=None) for e in examples])
    prog = [format_progress(t) if style == "duet" else float(p is not None) for t, p in zip(texts, parsed)]
    rows = [(x.rating, float(y), p is None, g, float(n)) for x, y, p, g, n in
            zip(mine[:real], y_hat[:real].tolist(), parsed[:real], prog[:real], y_none[:real].tolist())]
    rows = [r for part in D.all_gather_objects(rows, d) for r in part]
    ok = [(y, yh, yn) for y, yh, f, _, yn in rows if not f]
    failures = sum(r[2] for r in rows)
    m = rating_metrics([y for y, _, _ in ok], [yh for _, yh, _ in ok], failures=failures) if ok else \
        {"format_failures": failures, "n": 0}
    rewards = rating_reward(torch.tensor([r[0] for r in rows], dtype=torch.float32),
                            torch.tensor([r[1] for r in rows], dtype=torch.float32),
                            failed=torch.tensor([r[2] for r in rows]))
    m["reward"] = float(torch.as_tensor(rewards).mean())
    m["format_failure_rate"] = failures / max(1, len(rows))
    m["format_progress"] = sum(r[3] for r in rows) / max(1, len(rows))  # DUET: share of the 8 tag pairs written
    m["mae_fallback"] = sum(abs(r[0] - r[1]) for r in rows) / max(1, len(rows))
    m["mae_none"] = sum(abs(r[0] - r[4]) for r in rows) / max(1, len(rows))  # the 10H recommender on every row
    if len(ok) > 1:
        pd = paired_mae_difference([y for y, _, _ in ok], [yn for _, _, yn in ok], [yh for _, yh, _ in ok])
        m["mae_vs_none"], m["mae_vs_none_se"] = pd["diff"], pd["se"]
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}


def _title(ds, item_id):
    item = ds.items.get(item_id)
    return item.title if item else item_id
