"""The profile pipeline: one path from a target to a rated profile, used by GRPO's rollouts and validation,
LettinGo's exploration, scoring and DPO, and scripts/evaluate.py, so that a profile is built, encoded, parsed
and scored on the same tokens everywhere.

    messages = profile_messages(style, hx, ds, target, hist)   # the writer's chat, from data before the target
    ids = encode_prompt(tokenizer, messages, max_tokens, prefix)  # chat template, then the answer's opener
    texts = write_profiles(model, tokenizer, prompts, max_new_tokens, prefix, stop_texts)   # greedy
    (user_profile, item_profile), reason = parse_profile(style, text)   # (None, reason) on a format failure
    example = rec_example(hx, ds, target, user_profile, item_profile, hist)   # what the recommender reads
    metrics = profile_metrics(y, y_hat, failed, y_none)   # MAE... over the parsed rows, + fallback and paired

A target is anything with user_id, item_id and timestamp (a dataset interaction, an evaluation example).
A "style" is how the writer is prompted and its answer parsed: "duet" (joint user/item profile with cue and
constructed prompt), "duet-profile" (the joint profiles alone, DUET's "+Profile" ablation), a single user profile
of the DUET paper's appendix A.2 ("kar", "palr", "rlmrec", "lg"), or LettinGo's "lg-rating", whose answer opens
with "Usually rates ".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from data.prompts import (DUET_STOP, PAIR_PROMPTS, PARSERS, PROFILE_PROMPTS, RESPONSE_PREFIXES, cut_after,
                          parse_duet, parse_duet_profile)
from eval.metrics import paired_mae_difference, rating_metrics
from eval.recommender import RecExample

RECENT = 10  # the recommender sees the user's ten most recent interactions (DUET, paper section 3.1)
PAIR_STYLES = tuple(PAIR_PROMPTS)  # a user and an item profile for the (user, item) pair, in one answer
STYLES = PAIR_STYLES + tuple(PROFILE_PROMPTS)


@dataclass
class HistoryOptions:
    """What the profile writer reads: its window of the user's (and, for DUET, the item's) past reviews."""
    user_history: int = 30
    item_history: int = 10
    review_chars: int = 200


def item_title(ds, item_id: str) -> str:
    item = ds.items.get(item_id)
    return item.title if item else item_id


def profile_messages(style: str, hx, ds, target, hist: HistoryOptions) -> list[dict]:
    """The writer's chat messages for a target; only interactions strictly before target.timestamp are used."""
    uh = hx.user_history(target.user_id, target.timestamp, hist.user_history, review_chars=hist.review_chars)
    if style in PAIR_STYLES:
        ih = hx.item_history(target.item_id, target.timestamp, hist.item_history, exclude_user=target.user_id,
                             review_chars=hist.review_chars)
        return PAIR_PROMPTS[style](uh, ih, hx.user_average(target.user_id, target.timestamp),
                                   hx.item_average(target.item_id, target.timestamp), item_title(ds, target.item_id))
    if style not in PROFILE_PROMPTS:
        raise ValueError(f"unknown profile style {style!r}: {', '.join(STYLES)}")
    return PROFILE_PROMPTS[style](uh)


def style_prefix(style: str) -> str:
    """The text a style's answer opens with (prompted, then read back as the start of the profile); usually ""."""
    return RESPONSE_PREFIXES.get(style, "")


def style_stop_texts(style: str) -> tuple[str, ...]:
    """A pair style's answer (DUET, +Profile) ends at </item_profile>: the strict parser fails any text after it."""
    return (DUET_STOP,) if style in PAIR_STYLES else ()


def encode_prompt(tokenizer, messages: list[dict], max_tokens: int, prefix: str = "") -> list[int]:
    """The writer's prompt ids: the chat template with the assistant turn opened (plain text for a base model),
    then `prefix` encoded apart (e.g. "<user_profile><cue>" to start a small model on the DUET format); the
    parser reads prefix + completion."""
    if tokenizer.has_chat_template:
        ids = tokenizer.encode_chat(messages)
    else:
        ids = tokenizer.encode("\n\n".join(m["content"] for m in messages) + "\n", add_special_tokens=False)
    if prefix:
        ids = ids + tokenizer.encode(prefix, add_special_tokens=False)
    if len(ids) > max_tokens:
        raise ValueError(f"profile prompt of {len(ids)} tokens exceeds max_prompt_tokens={max_tokens}; "
                         "lower --user-history / --review-chars or raise the limit")
    return ids


def completion_text(tokenizer, ids: list[int], prefix: str = "", stop_texts=()) -> str:
    """What the parser reads: the prefix, then the decoded completion without EOS, cut right after a stop text."""
    eos = set(tokenizer.eos_ids)
    return prefix + cut_after(tokenizer.decode([t for t in ids if t not in eos]), stop_texts)


def write_profiles(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, prefix: str = "",
                   stop_texts=(), batch_size: int = 32, sync_ranks: bool = False, progress=None) -> list[str]:
    """Greedy answers to prompt ids, `batch_size` prompts at a time in input order (under FSDP every rank must
    pass the same number of prompts: the same sampler calls), each read back by completion_text."""
    import torch

    from model.sampler import generate

    texts = []
    with torch.no_grad():  # not inference_mode: FSDP2 updates its gathered parameters in place
        for s in range(0, len(prompts), batch_size):
            out = generate(model, prompts[s:s + batch_size], max_new_tokens, temperature=0.0,
                           eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_token_id,
                           vocab_limit=tokenizer.vocab_size, sync_ranks=sync_ranks, stop_texts=stop_texts,
                           decode=tokenizer.decode)
            texts += [completion_text(tokenizer, c, prefix, stop_texts) for c in out.completions()]
            if progress:
                progress(len(prompts[s:s + batch_size]))
    return texts


def parse_profile(style: str, text: str):
    """-> ((user_profile, item_profile or None) | None, reason): reason is "ok" or why the format failed."""
    if style == "duet":
        parsed, reason = parse_duet(text)
        return (None, reason) if parsed is None else ((parsed.user_profile, parsed.item_profile), reason)
    if style == "duet-profile":
        return parse_duet_profile(text)
    profile, reason = PARSERS[style](text)
    return (None, reason) if profile is None else ((profile, None), reason)


def rec_example(hx, ds, target, user_profile, item_profile, review_chars: int = 200,
                recent: int = RECENT) -> RecExample:
    """The recommender's input: the user's `recent` interactions before the target, the profiles, the item."""
    return RecExample(hx.user_history(target.user_id, target.timestamp, recent, review_chars=review_chars),
                      user_profile, item_title(ds, target.item_id), item_profile)


def profile_metrics(y, y_hat, failed, y_none=None) -> dict:
    """Rating metrics of written profiles, one definition for validation and evaluation.

    y (n,) true ratings; y_hat (n,) the recommender's prediction with each row's profiles, a failed row scored
    without any (its fallback); failed (n,) bools; y_none (n,) optional, every row scored without profiles.
    MAE, RMSE, Acc, F1 over the parsed rows, format failures apart (eval/metrics.rating_metrics); mae_fallback:
    the MAE over every row, failed rows at their fallback, which compares a writer that often fails with one
    that never does; with y_none: mae_none (no profiles, every row) and the paired difference over the parsed
    rows mae_vs_none (negative: the profiles help) with its standard error mae_vs_none_se.
    """
    y, y_hat, failed = [float(v) for v in y], [float(v) for v in y_hat], [bool(f) for f in failed]
    ok = [j for j, f in enumerate(failed) if not f]
    m = rating_metrics([y[j] for j in ok], [y_hat[j] for j in ok], failures=len(y) - len(ok))
    m["mae_fallback"] = sum(abs(a - b) for a, b in zip(y, y_hat)) / len(y) if y else float("nan")
    if y_none is not None:
        y_none = [float(v) for v in y_none]
        m["mae_none"] = sum(abs(a - b) for a, b in zip(y, y_none)) / len(y) if y else float("nan")
        if len(ok) > 1:
            pd = paired_mae_difference([y[j] for j in ok], [y_none[j] for j in ok], [y_hat[j] for j in ok])
            m["mae_vs_none"], m["mae_vs_none_se"] = pd["diff"], pd["se"]
    return m


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
