"""SFT of a profile writer: the warm start before GRPO, DPO or LangPTune. The loop is `train`, one step is
`sft_step`, the math is rl/sft.py.

    pairs = the writer's own best of N samples by the environment's reward (--source best-of-n), or a teacher's
            (prompt, completion) pairs from a JSONL file (--source jsonl)
    for step in range(start, max_steps): a batch of pairs -> token-mean NLL -> AdamW; log, validate, save

The pairs are made once and written to RUN_DIR/sft_pairs.jsonl (prompt and completion token ids, the text and
its reward); a resumed run reads them back, so it fits the same pairs in the same order. The run directory,
checkpoints (`model/` or, with --lora-rank, `adapter/`), validation and logs are the GRPO trainer's: an SFT
checkpoint is what train_grpo.py takes as --model (full weights) or --init-adapter (LoRA).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.io import DataError, write_text_atomic
from eval.profiles import encode_prompt
from model.sampler import generate, row_seed

from . import distributed as dist
from . import loop
from .config import must, one_of
from .envs import Env, EnvConfig, make_env
from .rollout import completion_logprobs, make_batch
from .sft import best_of_n, sft_loss

PAIRS_FILE = "sft_pairs.jsonl"


@dataclass
class SFTConfig(loop.RunConfig, EnvConfig):
    """SFT warm start. Every field is a flag (--field-name); --preset picks the defaults."""
    run_dir: str = "runs/sft"
    source: str = field(default="best-of-n", metadata={"help": "best-of-n | jsonl"})
    pairs: str = field(default="", metadata={
        "help": "--source jsonl: one JSON object a line, {\"messages\": [chat turns] or \"prompt\": \"user text\", "
                "\"completion\": \"the answer after --response-prefix\"}"})
    prompts: int = field(default=64, metadata={"help": "best-of-n: training prompts sampled"})
    samples: int = field(default=8, metadata={"help": "best-of-n: samples per prompt (N)"})
    temperature: float = 1.0
    min_reward: float = field(default=0.0, metadata={
        "help": "best-of-n: a prompt's best sample is kept only if its reward is at least this"})
    keep_failed: bool = field(default=False, metadata={
        "help": "best-of-n: format failures may be kept too (with --format-reward graded, the most complete "
                "formats of a writer that cannot yet write the whole one)"})
    sample_chunk_prompts: int = field(default=8, metadata={"help": "best-of-n: prompts decoded at once"})
    batch_pairs: int = field(default=8, metadata={"help": "pairs per optimizer step, over all ranks"})
    micro_batch_rows: int = 4

    def check(self):
        loop.RunConfig.check(self)
        EnvConfig.check(self)
        one_of("source", self.source, ("best-of-n", "jsonl"))
        must(self.source != "jsonl" or bool(self.pairs), "pairs", "is needed with --source jsonl", self.pairs)
        for name in ("prompts", "samples", "sample_chunk_prompts", "batch_pairs", "micro_batch_rows"):
            must(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        must(self.temperature > 0, "temperature", "must be > 0 (best-of-n samples)", self.temperature)


PRESETS = {
    # the GRPO cpu-demo's task (synthetic data, short histories, the answer opened with "<user_profile><cue>"),
    # best of 8 samples on 48 prompts, then 24 steps of 8 pairs
    "cpu-demo": dict(user_history=8, item_history=3, review_chars=60, max_new_tokens=160,
                     response_prefix="<user_profile><cue>", format_reward="graded", prompts=48, samples=8,
                     lr=1e-5, max_steps=24, save_every=12, val_every=12, val_examples=16),
}


@dataclass
class Pair:
    prompt_ids: list[int]
    completion_ids: list[int]  # the target tokens, ending with EOS
    text: str = ""
    reward: float | None = None


def with_eos(ids: list[int], eos: int) -> list[int]:
    """The target ends with EOS, so the writer learns to stop (a rollout cut at a stop text has none)."""
    return list(ids) if ids and ids[-1] == eos else list(ids) + [eos]


def best_of_n_pairs(cfg: SFTConfig, models: loop.Models, env: Env, d: dist.Dist) -> tuple[list[Pair], dict]:
    """Sample N completions for each of the first --prompts training prompts (the seeded order of step 0), score
    them with the environment, keep each prompt's best with reward >= --min-reward (and that parsed, unless
    --keep-failed). Every rank samples its share of the prompts; the kept pairs are gathered in prompt order."""
    n_prompts = min(cfg.prompts, env.num_prompts())
    pool = loop.step_indices(0, n_prompts, env.num_prompts(), cfg.seed)
    mine = list(range(d.rank, n_prompts, d.world))
    mine += [mine[-1]] * (-(-n_prompts // d.world) - len(mine))  # equal shares: the same collectives per rank
    episodes = [env.episode(pool[p]) for p in mine]
    tok, N = models.tokenizer, cfg.samples
    models.policy.eval()
    with torch.no_grad(), dist.gathered(models.policy):
        out = generate(models.policy, [e.prompt_ids for e in episodes], cfg.max_new_tokens,
                       temperature=cfg.temperature, n=N, eos_ids=tok.eos_ids, pad_id=tok.pad_token_id,
                       vocab_limit=tok.vocab_size, sync_ranks=d.enabled, stop_texts=env.stop_texts,
                       decode=tok.decode, chunk_prompts=cfg.sample_chunk_prompts,
                       seeds=[row_seed(cfg.seed * 1_000_003 - 1, p, j) for p in mine for j in range(N)])
    completions = out.completions()
    for b, e in enumerate(episodes):
        e.completions = completions[b * N:(b + 1) * N]
    info = env.score(episodes, d)
    rewards = torch.stack([e.rewards for e in episodes])  # (B, N)
    failed = torch.stack([e.failed for e in episodes])
    best = best_of_n(rewards, cfg.min_reward, None if cfg.keep_failed else failed)
    eos = tok.eos_ids[0]
    kept = {p: Pair(e.prompt_ids, with_eos(e.completions[j], eos), e.texts[j], float(e.rewards[j]))
            for p, e, j in zip(mine, episodes, best) if j >= 0}
    local = {"rewards": rewards.sum().item(), "best": sum(float(rewards[b].max()) for b in range(len(mine))),
             "failed": failed.sum().item(), "rows": rewards.numel(), "prompts": len(mine)}
    pairs, stats = {}, {}
    for part in dist.all_gather_objects((kept, local), d):
        pairs.update(part[0])
        for k, v in part[1].items():
            stats[k] = stats.get(k, 0) + v
    summary = {"sample_reward_mean": stats["rewards"] / stats["rows"], "best_reward_mean": stats["best"] / stats["prompts"],
               "sample_failure_rate": stats["failed"] / stats["rows"], "kept_prompts": len(pairs),
               "sampled_prompts": n_prompts, **{f"env_{k}": v for k, v in info.items()}}
    return [pairs[p] for p in sorted(pairs)], summary


def jsonl_pairs(cfg: SFTConfig, tokenizer) -> list[Pair]:
    """A teacher's pairs: {"messages": [...] | "prompt": "...", "completion": "..."} a line; the prompt is encoded as
    the writer's prompts are (chat template, then --response-prefix), the completion follows the prefix."""
    path = Path(cfg.pairs)
    if not path.is_file():
        raise DataError(f"{path}: no such file (--pairs)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not JSON ({e})") from e
        messages = row.get("messages") if isinstance(row, dict) else None
        if messages is None and isinstance(row, dict) and isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "content" in m
                                                               for m in messages)):
            raise DataError(f"{path}:{n}: needs \"messages\" (a list of chat turns) or \"prompt\" (a string)")
        if not isinstance(row.get("completion"), str) or not row["completion"].strip():
            raise DataError(f"{path}:{n}: needs a non-empty string \"completion\"")
        ids = tokenizer.encode(row["completion"], add_special_tokens=False)[:cfg.max_new_tokens]
        out.append(Pair(encode_prompt(tokenizer, messages, cfg.max_prompt_tokens, cfg.response_prefix),
                        with_eos(ids, tokenizer.eos_ids[0]), row["completion"]))
    if not out:
        raise DataError(f"{path}: no pairs")
    return out


def save_pairs(path: Path, pairs: list[Pair]):
    write_text_atomic(path, "".join(json.dumps(p.__dict__) + "\n" for p in pairs))


def load_pairs(path: Path) -> list[Pair]:
    return [Pair(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def make_pairs(cfg: SFTConfig, models: loop.Models, env: Env | None, run: loop.Run, d: dist.Dist) -> list[Pair]:
    """The run's pairs: a resumed run reads back the ones it was started with; a run from step 0 makes them (and
    replaces any left in the run directory by an earlier run, which may have had other --pairs or settings)."""
    path = Path(cfg.run_dir) / PAIRS_FILE
    if run.start > 0:
        if not path.exists():
            raise DataError(f"{path}: missing; a resumed SFT run reads back the pairs it was started with")
        return load_pairs(path)
    if cfg.source == "jsonl":
        pairs, summary = jsonl_pairs(cfg, models.tokenizer), {}
    else:
        pairs, summary = best_of_n_pairs(cfg, models, env, d)
    if not pairs:
        raise DataError(f"best-of-n kept no pair: no prompt's best of {cfg.samples} samples {'' if cfg.keep_failed else 'parsed with '}"
                        f"reward >= {cfg.min_reward} (sample reward {summary.get('sample_reward_mean', float('nan')):.3f}, "
                        f"failures {summary.get('sample_failure_rate', float('nan')):.0%}; lower --min-reward, add "
                        f"--keep-failed, or raise --samples or --prompts)")
    summary["pairs"] = len(pairs)
    run.tracker.scalars(summary, 0, prefix="sft_data/")
    if d.is_main:
        save_pairs(path, pairs)
        print(json.dumps({"sft_pairs": str(path), **summary}))
    return pairs


def train(cfg: SFTConfig, preset: str | None = None, env: Env | None = None) -> dict:
    """The SFT run: make (or read back) the pairs, then fit them; validation and checkpoints every few steps."""
    d, resume_from, models = loop.begin(cfg, cfg.batch_pairs, cfg.batch_pairs)
    env = env or make_env(cfg, models, d)
    run = loop.start_run(cfg, d, models, resume_from, 1, preset)
    pairs = make_pairs(cfg, models, env, run, d)
    last: dict = {}
    if loop.validate_first(cfg, run):
        last = loop.log_validation(run, env.validate(models.policy, models.tokenizer, d), 0)
    bar = loop.progress_bar(run, cfg, d, "sft")
    for step in bar:
        last = sft_step(step, cfg, models, pairs, run, d)
        done = step + 1
        run.tracker.scalars(last, done, prefix="train/")
        loop.show(bar, last, {"loss": "nll"})
        if loop.validate_now(cfg, done):
            last.update(loop.log_validation(run, env.validate(models.policy, models.tokenizer, d), done))
        if loop.save_now(cfg, run, done):
            loop.save(cfg, run, models, done, d)
    run.tracker.close()
    dist.teardown()
    return last


def sft_step(step: int, cfg: SFTConfig, models: loop.Models, pairs: list[Pair], run: loop.Run, d: dist.Dist) -> dict:
    """One optimizer step on the step's batch of pairs (a seeded order per epoch, as GRPO's prompts); this rank
    fits its share in micro-batches, each loss over the batch's global token count."""
    order = loop.step_indices(step, cfg.batch_pairs, len(pairs), cfg.seed)
    mine = [pairs[order[p]] for p in loop.rank_share(cfg.batch_pairs, cfg.batch_pairs, d)]
    tok, policy = models.tokenizer, models.policy
    batch = make_batch([p.prompt_ids for p in mine], [p.completion_ids for p in mine], tok.pad_token_id).to(d.device)
    tokens = dist.all_sum(batch.mask.sum(), d)  # the global token count of the step
    policy.train()
    loss_sum = 0.0
    for s in range(0, len(mine), cfg.micro_batch_rows):
        mb = batch.rows(slice(s, s + cfg.micro_batch_rows))
        logp, _ = completion_logprobs(policy, mb, 1.0, vocab_limit=tok.vocab_size, chunk_tokens=cfg.logprob_chunk_tokens)
        loss = sft_loss(logp, mb.mask, tokens)
        (loss * d.world).backward()  # FSDP averages gradients over ranks: the loss already sums over them
        loss_sum += float(loss.detach())
    gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return {"loss": float(dist.all_sum(torch.tensor(loss_sum, dtype=torch.float64), d)),
            "grad_norm": float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn),
            "tokens": float(tokens), "lr": run.scheduler.get_last_lr()[0]}
