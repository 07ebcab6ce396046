"""GRPO training of DUET profile writers: rollout -> score -> advantages -> clipped update with KL to a frozen
reference. The loop is `train`, one step is `grpo_step`, the math is rl/grpo.py.

One step, top to bottom in `grpo_step`:
  1. the step's global batch of prompts (a seeded permutation per epoch); each rank keeps its share
  2. rollout: G samples per prompt with the (gathered) policy, one shared prefill per prompt
  3. score: the environment parses each completion and the frozen recommender rates it -> rewards
  4. advantages: (r - mean_group) / (std_group + eps), from the rewards of the whole group
  5. old log-probs (policy before the update) and reference log-probs, one no-grad forward each (each prompt
     runs once per micro-batch, its G completions on its keys/values: --share-prompt-forward)
  6. PPO: for each epoch and mini-batch, micro-batches accumulate the loss over the GLOBAL token (or sequence)
     count of the mini-batch (all micro-batches, all ranks); clip the gradient; AdamW step

How this departs from DUET's public (verl) code, each a flag:
  - recommender: the expected rating over the tokens '1'..'5' in one forward (Reason4Rec), not a generated and
    parsed "<rating>x.xx</rating>": no recommender failures, a continuous reward;
  - --format-reward graded: a format failure earns part of the way to 0 by the share of tags written (DUET: -1);
  - --response-prefix: the answer is opened for the writer (e.g. "<user_profile><cue>"), part of the parsed text;
  - --stop-text: a rollout ends at "</item_profile>" (decoded text), since the strict parser fails anything after;
  - --old-logprobs sampler: the sampler's own log-probs serve as the old ones (one forward less; exact when the
    sampler and the update see the same weights, as with one PPO epoch);
  - the writer reads --user-history items (30 by default, 10 in DUET's configuration; the paper's Table 3 tries
    30/50/70).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from model.sampler import generate, row_seed

from . import distributed as dist
from . import loop
from .memory import PhasePeaks
from .config import must, one_of
from .envs import Env, EnvConfig, Episode, make_env
from .grpo import group_advantages, grpo_loss
from .rollout import batched_logprobs, completion_logprobs, make_batch


@dataclass
class GRPOConfig(loop.RunConfig, EnvConfig):
    """GRPO for DUET profiles. Every field is a flag (--field-name); --preset picks the defaults (the run's
    own flags, shared with DPO, are in rl/loop.py::RunConfig; the task's, shared with SFT, in rl/envs.py::EnvConfig)."""
    run_dir: str = "runs/grpo"
    # rollout
    prompts_per_step: int = 4
    group_size: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    old_logprobs: str = field(default="recompute", metadata={"help": "recompute | sampler"})
    rollout_tokens: int = field(default=0, metadata={
        "help": "KV-cache budget of the rollout, in token slots: a rank's prompts are decoded in chunks of k prompts, "
                "k x group_size x (max_prompt_tokens + max_new_tokens) <= this, with the samples of one batch; "
                "0: all of a rank's prompts at once"})
    # update
    mini_batch_prompts: int = 4
    micro_batch_rows: int = 4
    ppo_epochs: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float = field(default=3.0, metadata={
        "help": "dual clip (verl's clip_ratio_c): a negative-advantage token loses at most c * |A|; 0: off"})
    kl_coef: float = 0.001
    kl_max: float = field(default=10.0, metadata={
        "help": "cap of the per-token k3 KL (verl clamps low_var_kl to [-10, 10]); 0: no cap"})
    adv_eps: float = 1e-6
    scale_adv_by_std: bool = True
    loss_agg: str = "token-mean"

    def check(self):
        loop.RunConfig.check(self)
        EnvConfig.check(self)
        must(self.group_size >= 2, "group_size", "must be >= 2 (a group of one has no baseline: every advantage "
             "would be 0)", self.group_size)
        for name in ("prompts_per_step", "mini_batch_prompts", "micro_batch_rows", "ppo_epochs"):
            must(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        must(self.prompts_per_step % self.mini_batch_prompts == 0, "prompts_per_step",
             f"must be a multiple of --mini-batch-prompts ({self.mini_batch_prompts})", self.prompts_per_step)
        must(self.top_k >= 0, "top_k", "must be >= 0", self.top_k)
        group_slots = self.group_size * (self.max_prompt_tokens + self.max_new_tokens)
        must(self.rollout_tokens == 0 or self.rollout_tokens >= group_slots, "rollout_tokens",
             f"must be 0 (no budget) or hold one prompt's group, group_size x (max_prompt_tokens + "
             f"max_new_tokens) = {group_slots}", self.rollout_tokens)
        must(self.temperature > 0, "temperature", "must be > 0 (rollouts sample)", self.temperature)
        must(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        must(0 <= self.clip_low < 1, "clip_low", "must be in [0, 1)", self.clip_low)
        must(self.clip_high >= 0, "clip_high", "must be >= 0", self.clip_high)
        must(self.clip_ratio_c == 0 or self.clip_ratio_c > 1, "clip_ratio_c", "must be > 1, or 0 for no dual clip",
             self.clip_ratio_c)
        must(self.kl_coef >= 0, "kl_coef", "must be >= 0", self.kl_coef)
        must(self.kl_max >= 0, "kl_max", "must be >= 0 (0: no cap)", self.kl_max)
        must(self.adv_eps > 0, "adv_eps", "must be > 0", self.adv_eps)
        one_of("loss_agg", self.loss_agg, ("token-mean", "seq-mean-token-mean"))
        one_of("old_logprobs", self.old_logprobs, ("recompute", "sampler"))


PRESETS = {
    # synthetic catalogue, small batches and short histories: 2-4 minutes per step on a 2-core CPU
    "cpu-demo": dict(prompts_per_step=2, mini_batch_prompts=2, group_size=4, micro_batch_rows=4,
                     user_history=8, item_history=3, review_chars=60, max_new_tokens=160, temperature=0.8,
                     lr=1e-5, response_prefix="<user_profile><cue>", format_reward="graded",
                     old_logprobs="sampler", max_steps=10, save_every=5, val_every=5, val_examples=16),
    # hyper-parameters of DUET's public verl configuration, Qwen3-8B on GPUs; the rollout decodes 4 of a rank's
    # 8 prompts at a time (a 22 GiB KV cache: the whole batch's 44 GiB would not fit beside the gathered policy
    # on an 80 GiB GPU, scripts/plan_memory.py)
    "duet-paper": dict(model="Qwen/Qwen3-8B", prompts_per_step=64, mini_batch_prompts=32, group_size=8,
                       micro_batch_rows=8, lr=1e-6, weight_decay=0.01, kl_coef=0.001, clip_low=0.2, clip_high=0.2,
                       max_prompt_tokens=4096, max_new_tokens=896, rollout_tokens=4 * 8 * (4096 + 896),
                       ppo_epochs=1, max_steps=10_000,
                       user_history=10, item_history=10, activation_checkpointing=True, save_every=50,
                       val_every=25, val_examples=256),
}


def train(cfg: GRPOConfig, preset: str | None = None, env: Env | None = None) -> dict:
    """The GRPO run: every step is rollout + update; validation and checkpoints every few steps."""
    d, resume_from, models = loop.begin(cfg, cfg.prompts_per_step, cfg.mini_batch_prompts)
    env = env or make_env(cfg, models, d)
    updates_per_step = cfg.ppo_epochs * (cfg.prompts_per_step // cfg.mini_batch_prompts)
    run = loop.start_run(cfg, d, models, resume_from, updates_per_step, preset)
    last: dict = {}
    if loop.validate_first(cfg, run):  # the start of the validation curve; --max-steps 0 only validates
        last = loop.log_validation(run, env.validate(models.policy, models.tokenizer, d), 0)
    bar = loop.progress_bar(run, cfg, d, "grpo")
    for step in bar:
        last = grpo_step(step, cfg, models, env, run, d)
        done = step + 1
        run.tracker.scalars(last, done, prefix="train/")
        loop.show(bar, last, {"reward_mean": "reward", "kl": "kl", "format_failure_rate": "fail"})
        if loop.validate_now(cfg, done):
            last.update(loop.log_validation(run, env.validate(models.policy, models.tokenizer, d), done))
        if loop.save_now(cfg, run, done):
            loop.save(cfg, run, models, done, d)
    run.tracker.close()
    dist.teardown()
    return last


def rollout_chunk_prompts(cfg: GRPOConfig, prompts_per_rank: int) -> int:
    """How many prompts the sampler decodes at once under --rollout-tokens: the most whose KV cache, prompts x G x
    (max_prompt_tokens + max_new_tokens) slots, fits the budget; all of a rank's prompts without one. A function
    of the config alone, never of the prompts' lengths: every rank runs the same number of chunks, each a
    collective sequence of decode steps under FSDP."""
    if not cfg.rollout_tokens:
        return prompts_per_rank
    group_slots = cfg.group_size * (cfg.max_prompt_tokens + cfg.max_new_tokens)
    return max(1, min(prompts_per_rank, cfg.rollout_tokens // group_slots))


def rollout(step: int, cfg: GRPOConfig, models: loop.Models, env: Env, d: dist.Dist) -> tuple[list[Episode], object]:
    """This rank's episodes of the step, each with its G samples; also the sampler's output (its log-probs).
    Each row's random stream is keyed by (seed, step, global position), so the samples do not depend on how the
    prompts are spread over ranks, nor on --rollout-tokens (the chunks keep every row's seed and the one
    batch's padding, see model/sampler.generate)."""
    pool = loop.step_indices(step, cfg.prompts_per_step, env.num_prompts(), cfg.seed)
    mine = loop.rank_share(cfg.prompts_per_step, cfg.mini_batch_prompts, d)
    episodes = [env.episode(pool[p]) for p in mine]
    G, tok = cfg.group_size, models.tokenizer
    chunk = rollout_chunk_prompts(cfg, len(mine))
    models.policy.eval()
    with torch.no_grad(), dist.gathered(models.policy):
        out = generate(models.policy, [e.prompt_ids for e in episodes], cfg.max_new_tokens,
                       temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, n=G, eos_ids=tok.eos_ids,
                       pad_id=tok.pad_token_id, vocab_limit=tok.vocab_size, sync_ranks=d.enabled,
                       stop_texts=env.stop_texts, decode=tok.decode, chunk_prompts=chunk,
                       seeds=[row_seed(cfg.seed * 1_000_003 + step, p, j) for p in mine for j in range(G)])
    completions = out.completions()
    for b, e in enumerate(episodes):
        e.completions = completions[b * G:(b + 1) * G]
    return episodes, out


class TokenMeans:
    """Token-weighted means of per-micro-batch metrics over every rank of the step, and a few sums."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.tokens = 0.0

    def add(self, metrics: dict, tokens: float):
        self.tokens += tokens
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * tokens

    def reduce(self, d: dist.Dist) -> dict:
        keys = sorted(self.sums)
        tot = dist.all_sum(torch.tensor([self.tokens] + [self.sums[k] for k in keys], dtype=torch.float64), d)
        return {k: float(v) / max(1.0, float(tot[0])) for k, v in zip(keys, tot[1:])}


def grpo_step(step: int, cfg: GRPOConfig, models: loop.Models, env: Env, run: loop.Run, d: dist.Dist) -> dict:
    policy, tok, G = models.policy, models.tokenizer, cfg.group_size
    peaks = PhasePeaks(d.device)  # each phase's peak (CUDA allocated; CPU resident), logged as mem_peak_gib_*
    t0 = time.perf_counter()
    # 1-2. this rank's prompts and their G samples each
    episodes, out = rollout(step, cfg, models, env, d)
    peaks.end("rollout")
    t1 = time.perf_counter()
    # 3. rewards; 4. advantages within each group (a whole group lives on one rank)
    info = env.score(episodes, d)
    rewards = torch.cat([e.rewards for e in episodes])  # (N * G,)
    adv, adv_m = group_advantages(rewards, G, eps=cfg.adv_eps, scale_by_std=cfg.scale_adv_by_std)
    for b, e in enumerate(episodes):
        e.advantages = adv[b * G:(b + 1) * G]
    peaks.end("score")
    t2 = time.perf_counter()
    # 5. old and reference log-probs, before any update (over the tokenizer's ids only, as the sampler's)
    V, chunk, share = tok.vocab_size, cfg.logprob_chunk_tokens, cfg.share_prompt_forward
    batch = make_batch([e.prompt_ids for e in episodes], [c for e in episodes for c in e.completions],
                       tok.pad_token_id, repeat=G).to(d.device)
    with torch.no_grad():
        if cfg.old_logprobs == "sampler":
            old = out.logprobs[:, :batch.completion_len].to(d.device)
        else:
            old = batched_logprobs(policy, batch, cfg.micro_batch_rows, cfg.temperature, V, chunk, share)
        ref = batched_logprobs(models.reference, batch, cfg.micro_batch_rows, cfg.temperature, V, chunk, share) \
            if cfg.kl_coef else None
    del out  # the sampler's KV cache and tensors are not needed for the update
    peaks.end("logprobs")
    # 6. PPO epochs over mini-batches, gradient accumulation over micro-batches. Every micro-batch loss is over
    # the mini-batch's GLOBAL token (or sequence) count, so the micro-batch losses of all ranks sum to the
    # mini-batch loss: that sum is what is back-propagated, and what train/loss logs.
    policy.train()
    rows = batch.input_ids.shape[0]
    rows_per_mb = (cfg.mini_batch_prompts // d.world) * G
    means, losses, grad_norms, ratio_max = TokenMeans(), [], [], 0.0
    for _ in range(cfg.ppo_epochs):
        for s in range(0, rows, rows_per_mb):
            mb_mask = batch.mask[s:s + rows_per_mb]
            mb_tokens = dist.all_sum(mb_mask.sum(), d)  # the global token count of this mini-batch
            mb_seqs = dist.all_sum((mb_mask.sum(1) > 0).sum().float(), d)  # and its global sequence count
            mb_loss = 0.0
            for m in range(s, min(s + rows_per_mb, rows), cfg.micro_batch_rows):
                mi = slice(m, min(m + cfg.micro_batch_rows, s + rows_per_mb))
                mbatch = batch.rows(mi)
                logp, ent = completion_logprobs(policy, mbatch, cfg.temperature, with_entropy=True, vocab_limit=V,
                                                chunk_tokens=chunk, share_prompts=share)
                loss, lm = grpo_loss(logp, old[mi], None if ref is None else ref[mi], adv[mi].to(d.device),
                                     mbatch.mask, kl_coef=cfg.kl_coef, clip_low=cfg.clip_low,
                                     clip_high=cfg.clip_high, loss_agg_mode=cfg.loss_agg, global_tokens=mb_tokens,
                                     global_seqs=mb_seqs, clip_ratio_c=cfg.clip_ratio_c, max_kl=cfg.kl_max)
                (loss * d.world).backward()  # FSDP averages gradients over ranks: the loss already sums over them
                mb_loss += float(loss.detach())
                ntok = float(mbatch.mask.sum())
                lm.pop("loss")
                lm["entropy"] = (ent * mbatch.mask).sum() / max(1.0, ntok)
                ratio_max = max(ratio_max, float(lm.pop("ratio_max")))
                means.add(lm, ntok)
            losses.append(mb_loss)
            gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            grad_norms.append(float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn))
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
    peaks.end("update")
    t3 = time.perf_counter()

    metrics = step_metrics(cfg, episodes, means, losses, grad_norms, ratio_max, adv_m, run, d)
    metrics.update(time_rollout=t1 - t0, time_scoring=t2 - t1, time_update=t3 - t2,
                   tokens_per_second=metrics["response_length"] * len(rewards) * d.world / max(1e-9, t1 - t0),
                   **{f"env_{k}": v for k, v in info.items()}, **peaks.metrics())
    if cfg.log_text_every and step % cfg.log_text_every == 0 and d.is_main:
        e = episodes[0]
        shown = [f"**reward {e.rewards[j]:.3f}**{' (format failure)' if e.failed[j] else ''}\n\n```\n{e.texts[j]}\n```"
                 for j in range(min(3, G))]
        run.tracker.text("rollouts", "\n\n---\n\n".join(shown), step + 1)
    return metrics


def step_metrics(cfg: GRPOConfig, episodes: list[Episode], means: TokenMeans, losses: list[float],
                 grad_norms: list[float], ratio_max: float, adv_m: dict, run: loop.Run, d: dist.Dist) -> dict:
    """The step's logged figures, the same on every rank: token-weighted means of the loss terms, the loss as
    back-propagated (summed over ranks), and the rewards and lengths of the whole global batch."""
    G = cfg.group_size
    metrics = means.reduce(d)
    metrics["loss"] = float(dist.all_sum(torch.tensor(losses, dtype=torch.float64), d).mean())
    rewards = torch.cat([e.rewards for e in episodes])  # (N * G,)
    failed = torch.cat([e.failed for e in episodes]).float()
    lengths = float(sum(len(c) for e in episodes for c in e.completions))
    spread = sum(float(e.rewards.std(correction=0)) for e in episodes)  # within each group: what GRPO compares
    tot = dist.all_sum(torch.tensor([rewards.sum(), (rewards ** 2).sum(), failed.sum(), len(rewards), lengths,
                                     adv_m["zero_std_frac"] * len(episodes), spread], dtype=torch.float64),
                       d).tolist()
    n_rows = tot[3]
    mean = tot[0] / n_rows
    metrics.update(
        reward_mean=mean, reward_std=math.sqrt(max(0.0, tot[1] / n_rows - mean ** 2)),
        reward_group_std=tot[6] / (n_rows / G),  # the mean within-group spread (std of a group's G rewards)
        format_failure_rate=tot[2] / n_rows, response_length=tot[4] / n_rows, zero_adv_group_frac=tot[5] / (n_rows / G),
        ratio_max=float(dist.all_max(torch.tensor(ratio_max), d)), grad_norm=sum(grad_norms) / len(grad_norms),
        lr=run.scheduler.get_last_lr()[0])
    return metrics
