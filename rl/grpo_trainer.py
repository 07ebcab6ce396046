"""GRPO training loop (DUET): rollout -> score -> advantages -> clipped policy update with KL to a frozen reference.

One optimizer step of the loop, read top to bottom in `train`:
  1. take the step's global batch of prompts (a seeded permutation per epoch); each rank keeps its share
  2. rollout: G samples per prompt with the (gathered) policy, one shared prefill per prompt
  3. score: the environment parses each completion and the frozen recommender rates it -> rewards
  4. advantages: (r - mean_group) / (std_group + eps), from the rewards of the whole group
  5. old log-probs (policy before the update) and reference log-probs, one no-grad forward each
  6. PPO: for each epoch and mini-batch, micro-batches accumulate the token-mean loss over the GLOBAL token count
     of the mini-batch (all micro-batches, all ranks); clip the gradient; AdamW step
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from data.prompts import DUET_STOP
from model.sampler import generate, row_seed

from . import distributed as D
from . import loop as L
from .grpo import group_advantages, grpo_loss
from .rollout import batched_logprobs, completion_logprobs, make_batch
from .tracking import Tracker


@dataclass
class GRPOConfig(L.RunConfig):
    """GRPO for DUET profiles. Every field is a flag (--field-name); --preset picks the defaults (the run's
    own flags, shared with DPO, are in rl/loop.py::RunConfig)."""
    # what to train, on what
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "policy (and reference) model source"})
    recommender: str = field(default="reference", metadata={"help": "'reference' shares the frozen reference"})
    env: str = field(default="duet", metadata={"help": "duet | toy (token-share reward, for tests)"})
    data: str = field(default="", metadata={"help": "canonical dataset dir; empty: the synthetic default"})
    run_dir: str = "runs/grpo"
    # prompts
    user_history: int = 30
    item_history: int = 10
    review_chars: int = 200
    max_prompt_tokens: int = 1536
    response_prefix: str = field(default="", metadata={"help": "opens the answer, e.g. '<user_profile><cue>'"})
    stop_text: str = field(default=DUET_STOP, metadata={
        "help": "DUET: a rollout ends once it has written this (nothing may follow it); empty: only at EOS"})
    format_reward: str = field(default="constant", metadata={
        "help": "constant: format_failure_reward for any failure (DUET); graded: a failure earns "
                "format_failure_reward * (1 - share of the 8 tag pairs written), a signal for small models"})
    # rollout
    prompts_per_step: int = 4
    group_size: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    old_logprobs: str = field(default="recompute", metadata={"help": "recompute | sampler"})
    # update
    mini_batch_prompts: int = 4
    micro_batch_rows: int = 4
    ppo_epochs: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    adv_eps: float = 1e-6
    scale_adv_by_std: bool = True
    loss_agg: str = "token-mean"
    format_failure_reward: float = -1.0


PRESETS = {
    # synthetic catalogue, small batches and short histories: 2-4 minutes per step on a 2-core CPU
    "cpu-demo": dict(prompts_per_step=2, mini_batch_prompts=2, group_size=4, micro_batch_rows=4,
                     user_history=8, item_history=3, review_chars=60, max_new_tokens=160, temperature=0.8,
                     lr=1e-5, response_prefix="<user_profile><cue>", format_reward="graded",
                     old_logprobs="sampler", max_steps=10, save_every=5, val_every=5, val_examples=16),
    # hyper-parameters of DUET's public verl configuration (see DESIGN.md), Qwen3-8B on GPUs
    "duet-paper": dict(model="Qwen/Qwen3-8B", prompts_per_step=64, mini_batch_prompts=32, group_size=8,
                       micro_batch_rows=8, lr=1e-6, weight_decay=0.01, kl_coef=0.001, clip_low=0.2, clip_high=0.2,
                       max_prompt_tokens=4096, max_new_tokens=896, ppo_epochs=1, max_steps=10_000,
                       user_history=10, item_history=10, activation_checkpointing=True, save_every=50,
                       val_every=25, val_examples=256),
}


def check_sizes(cfg: GRPOConfig):
    if cfg.old_logprobs not in ("recompute", "sampler"):
        raise ValueError("old_logprobs must be 'recompute' or 'sampler'")


def make_env(cfg: GRPOConfig, models: L.Models, d: D.Dist):
    if cfg.env == "toy":
        from .envs import TokenShareEnv

        tok = models.tokenizer
        return TokenShareEnv(tok, target_token=int(tok.encode("the", add_special_tokens=False)[0]))
    if cfg.env == "duet":
        from .duet_env import DuetEnv

        return DuetEnv.from_config(cfg, models.tokenizer, models.rec_model, models.rec_tokenizer, d)
    raise ValueError(f"unknown env {cfg.env!r} (duet, toy)")


def train(cfg: GRPOConfig, preset: str | None = None, env=None) -> dict:
    d = D.setup(cfg.device or None)
    check_sizes(cfg)
    torch.manual_seed(cfg.seed)
    resume_from = L.resume_point(cfg)
    models = L.build_models(cfg.model, cfg.recommender, resume_from, cfg.activation_checkpointing, d,
                            cfg.dtype)
    env = env or make_env(cfg, models, d)
    updates_per_step = cfg.ppo_epochs * (cfg.prompts_per_step // cfg.mini_batch_prompts)

    def step_fn(step, optimizer, scheduler, tracker):
        return grpo_step(step, cfg, models, env, optimizer, scheduler, d, tracker)

    last = L.run(cfg, d, models, resume_from, updates_per_step, step_fn,
                 lambda: env.validate(models.policy, models.tokenizer, d),
                 {"reward_mean": "reward", "kl": "kl", "format_failure_rate": "fail"}, preset, desc="grpo")
    D.teardown()
    return last


def grpo_step(step, cfg: GRPOConfig, models: L.Models, env, optimizer, scheduler, d: D.Dist,
              tracker: Tracker) -> dict:
    policy, reference, tokenizer = models.policy, models.reference, models.tokenizer
    G = cfg.group_size
    t0 = time.perf_counter()
    # 1. this rank's prompts of the step's global batch
    global_idx = L.step_indices(step, cfg.prompts_per_step, env.num_prompts(), cfg.seed)
    mine = L.rank_share(cfg.prompts_per_step, cfg.mini_batch_prompts, d)
    episodes = [env.episode(global_idx[p]) for p in mine]
    prompts = [e.prompt_ids for e in episodes]

    # 2. rollout: G samples per prompt; each row's random stream is keyed by (seed, step, global position), so
    # the samples do not depend on how prompts are spread over ranks
    policy.eval()
    with torch.no_grad(), D.gathered(policy):
        out = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                       top_p=cfg.top_p, n=G, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_token_id,
                       vocab_limit=tokenizer.vocab_size, sync_ranks=d.enabled,
                       stop_texts=env.stop_texts, decode=tokenizer.decode,
                       seeds=[row_seed(cfg.seed * 1_000_003 + step, p, j) for p in mine for j in range(G)])
    lengths = out.lengths.tolist()
    completions = [out.tokens[r, :lengths[r]].tolist() for r in range(len(lengths))]
    texts = [tokenizer.decode(c) for c in completions]
    t1 = time.perf_counter()

    # 3. rewards; 4. advantages over each group (the whole group lives on one rank)
    rewards, failed, info = env.score(episodes, completions, texts, d)
    adv, adv_m = group_advantages(rewards, G, eps=cfg.adv_eps, scale_by_std=cfg.scale_adv_by_std)
    t2 = time.perf_counter()

    # 5. old and reference log-probs, before any update
    batch = make_batch(prompts, completions, tokenizer.pad_token_id, repeat=G).to(d.device)
    with torch.no_grad():
        if cfg.old_logprobs == "sampler":
            old = out.logprobs[:, :batch.completion_len].to(d.device)
        else:
            old = batched_logprobs(policy, batch, cfg.micro_batch_rows, cfg.temperature)
        ref = batched_logprobs(reference, batch, cfg.micro_batch_rows, cfg.temperature) if cfg.kl_coef else None

    # 6. PPO epochs over mini-batches; gradient accumulation over micro-batches
    policy.train()
    rows_per_mb = (cfg.mini_batch_prompts // d.world) * G
    sums = {k: 0.0 for k in ("loss", "pg_loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy")}
    ratio_max, grad_norms, n_tok_local = 0.0, [], 0.0
    for _ in range(cfg.ppo_epochs):
        for s in range(0, batch.input_ids.shape[0], rows_per_mb):
            mb = slice(s, s + rows_per_mb)
            mb_tokens = D.all_sum(batch.mask[mb].sum(), d)  # the global token count of this mini-batch
            for m in range(s, min(s + rows_per_mb, batch.input_ids.shape[0]), cfg.micro_batch_rows):
                mi = slice(m, min(m + cfg.micro_batch_rows, s + rows_per_mb))
                mbatch = batch.rows(mi)
                logp, ent = completion_logprobs(policy, mbatch, cfg.temperature, with_entropy=True)
                loss, lm = grpo_loss(logp, old[mi], None if ref is None else ref[mi], adv[mi].to(d.device),
                                     mbatch.mask, kl_coef=cfg.kl_coef, clip_low=cfg.clip_low,
                                     clip_high=cfg.clip_high, loss_agg_mode=cfg.loss_agg,
                                     global_tokens=mb_tokens)
                # FSDP averages gradients over ranks; the loss already sums over the global batch, so undo it
                (loss * d.world).backward()
                ntok = float(mbatch.mask.sum())
                n_tok_local += ntok
                for k in sums:
                    if k == "entropy":
                        sums[k] += float((ent * mbatch.mask).sum())
                    elif k in lm:
                        sums[k] += float(lm[k]) * ntok
                ratio_max = max(ratio_max, float(lm["ratio_max"]))
            gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            grad_norms.append(float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    t3 = time.perf_counter()

    # metrics: token-weighted over all ranks; rewards over the whole global batch
    tot = D.all_sum(torch.tensor([n_tok_local] + list(sums.values()), dtype=torch.float64), d)
    n_tok = max(1.0, float(tot[0]))
    metrics = {k: float(v) / n_tok for k, v in zip(sums, tot[1:])}
    r_all = D.all_sum(torch.tensor([rewards.sum(), (rewards ** 2).sum(), failed.float().sum(), len(rewards),
                                    float(out.lengths.float().sum()), adv_m["zero_std_frac"] * len(prompts)],
                                   dtype=torch.float64), d).tolist()
    n_rows = r_all[3]
    mean = r_all[0] / n_rows
    metrics.update(
        reward_mean=mean, reward_std=math.sqrt(max(0.0, r_all[1] / n_rows - mean ** 2)),
        format_failure_rate=r_all[2] / n_rows, response_length=r_all[4] / n_rows,
        zero_adv_group_frac=r_all[5] / (n_rows / G), ratio_max=float(D.all_max(torch.tensor(ratio_max), d)),
        grad_norm=sum(grad_norms) / len(grad_norms), lr=scheduler.get_last_lr()[0],
        time_rollout=t1 - t0, time_scoring=t2 - t1, time_update=t3 - t2,
        tokens_per_second=r_all[4] / max(1e-9, t1 - t0), **{f"env_{k}": v for k, v in info.items()})
    if cfg.log_text_every and (step % cfg.log_text_every == 0) and d.is_main:
        shown = [f"**reward {rewards[r]:.3f}**{' (format failure)' if failed[r] else ''}\n\n```\n{texts[r]}\n```"
                 for r in range(min(3, len(texts)))]
        tracker.text("rollouts", "\n\n---\n\n".join(shown), step + 1)
    return metrics
