"""Validation of a profile writer during training (GRPO and DPO): greedy profiles for a fixed list of targets,
rated by the frozen recommender, through the same pipeline as scripts/evaluate.py (eval/profiles.py), so the
two give the same numbers on the same examples. Under FSDP each rank takes an equal share of the targets."""
from __future__ import annotations

import torch

from eval.profiles import (HistoryOptions, encode_prompt, format_progress, parse_profile, profile_messages,
                           profile_metrics, rec_example, write_profiles)
from eval.reward import rating_reward

from . import distributed as dist


@torch.no_grad()
def validate(policy, tokenizer, recommender, ds, hx, targets, style: str, hist: HistoryOptions, d: dist.Dist,
             max_new_tokens: int, max_prompt_tokens: int, prefix: str = "", stop_texts=(),
             gen_batch: int = 32) -> dict:
    """-> the metrics of eval/profiles.profile_metrics (MAE, RMSE, Acc, F1 over the parsed rows, mae_fallback,
    mae_none, mae_vs_none +- se), the reward (format failures at -1, as DUET does), the format failure rate, and
    format_progress (the mean share of the DUET tag pairs written; 1.0 for a well-formed answer), which moves
    before the failure rate does. Generation runs `gen_batch` prompts at a time (the KV cache of a whole
    validation set at once would not fit)."""
    mine, real = dist.pad_to_world(list(targets), d)
    prompts = [encode_prompt(tokenizer, profile_messages(style, hx, ds, x, hist), max_prompt_tokens, prefix)
               for x in mine]
    policy.eval()
    with dist.gathered(policy):
        texts = write_profiles(policy, tokenizer, prompts, max_new_tokens, prefix, stop_texts, gen_batch,
                               sync_ranks=d.enabled)
    parsed = [parse_profile(style, t)[0] for t in texts]
    examples = [rec_example(hx, ds, x, *(p or (None, None)), hist.review_chars) for x, p in zip(mine, parsed)]
    y_hat, _ = recommender.score(examples)  # failed rows: no profile (10H), their fallback
    # every row, not just the parsed ones: under FSDP each rank must run the same recommender forwards
    y_none, _ = recommender.score([e._replace(user_profile=None, item_profile=None) for e in examples])
    progress = [format_progress(t) if style == "duet" else float(p is not None) for t, p in zip(texts, parsed)]
    rows = list(zip([x.rating for x in mine], y_hat.tolist(), [p is None for p in parsed], progress,
                    y_none.tolist()))[:real]
    y, y_hat, failed, progress, y_none = zip(*[r for part in dist.all_gather_objects(rows, d) for r in part])
    m = profile_metrics(y, y_hat, failed, y_none)
    rewards = rating_reward(torch.tensor(y), torch.tensor(y_hat), failed=torch.tensor(failed))
    m["reward"] = float(torch.as_tensor(rewards).mean())
    m["format_failure_rate"] = sum(failed) / len(failed)
    m["format_progress"] = sum(progress) / len(progress)
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
