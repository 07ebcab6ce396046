"""DPO training of the profile writer on LettinGo's preference pairs (the stages that make them are rl/lettingo.py;
scripts/train_dpo.py runs explore -> score -> pairs -> train). The loop is `train`, one step is `dpo_step`, the
math is rl/dpo.py. The prompt of a pair is the `train_style` profile prompt of its user, written from what came
before the user's held-out window; the reference log-probs are computed once and stored beside the pairs.

How this departs from LettinGo's description, each a flag:
  - the score of a candidate is the frozen recommender's mean reward 1 - |y - y_hat| / 4 (expected rating over
    '1'..'5') on the user's held-out window (--pair-metric neg_mae: minus the MAE);
  - --styles lg-rating: an exploration style whose answer is opened by "Usually rates ", so candidates differ in
    the rating they state; with it as --train-style the opener ends the prompt and DPO learns what follows;
  - --pair-mode all: every pair of a user's candidates at least --pair-margin apart, not only best against worst.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.io import write_text_atomic
from eval.profiles import PROFILE_PROMPTS, encode_prompt, profile_messages, style_prefix

from . import distributed as dist
from . import lettingo
from . import loop
from .config import must, one_of
from .dpo import dpo_loss, sequence_logprob
from .memory import PhasePeaks
from .rollout import completion_logprobs, make_batch
from .validation import validate

STAGES = ("explore", "score", "pairs", "train")


@dataclass
class DPOConfig(loop.RunConfig):
    """LettinGo / DPO. Every field is a flag (--field-name); --preset picks the defaults."""
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "policy (and reference) model"})
    explorers: list = field(default_factory=lambda: ["smollm2-135m-instruct"],
                            metadata={"help": "model sources that write candidate profiles"})
    recommender: str = field(default="reference", metadata={"help": "'reference' shares the frozen reference"})
    data: str = field(default="", metadata={"help": "canonical dataset dir; empty: the synthetic default"})
    run_dir: str = "runs/dpo"
    stage: str = field(default="all", metadata={"help": "explore | score | pairs | train | all"})
    # exploration
    users: int = 48
    heldout: int = 4
    min_history: int = 10
    styles: list = field(default_factory=lambda: ["lg", "kar"])
    temperatures: list = field(default_factory=lambda: [0.7, 1.2])
    samples: int = 2
    user_history: int = 20
    review_chars: int = 120
    max_prompt_tokens: int = 1536
    max_new_tokens: int = 96
    # pairs
    pair_mode: str = field(default="best-worst", metadata={"help": "best-worst | all"})
    pair_margin: float = 0.02
    pair_metric: str = field(default="reward", metadata={"help": "reward (mean fractional reward) | neg_mae"})
    # training
    train_style: str = "lg"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) | ipo"})
    ipo_average: bool = field(default=True, metadata={
        "help": "ipo: per-token average log-probs of each profile (as TRL); false: summed, as DPO"})
    pairs_per_step: int = 8
    micro_batch_pairs: int = 2
    lr: float = 5e-6
    weight_decay: float = 0.0
    log_text_every: int = 10

    def check(self):
        super().check()
        one_of("stage", self.stage, STAGES + ("all",))
        for name in ("users", "heldout", "samples", "pairs_per_step", "micro_batch_pairs", "max_prompt_tokens"):
            must(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("min_history", "user_history", "review_chars"):
            must(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        must(self.max_new_tokens >= 2, "max_new_tokens", "must be >= 2 (a profile token and EOS)", self.max_new_tokens)
        must(len(self.explorers) >= 1, "explorers", "must name at least one model", self.explorers)
        must(len(self.temperatures) >= 1 and all(float(t) >= 0 for t in self.temperatures), "temperatures",
             "must be one or more numbers >= 0 (0: greedy)", self.temperatures)
        known = tuple(PROFILE_PROMPTS)  # the single-profile styles LettinGo explores
        for style in self.styles:
            one_of("styles", style, known)
        must(len(self.styles) >= 1, "styles", "must name at least one style", self.styles)
        one_of("train_style", self.train_style, known)
        one_of("pair_mode", self.pair_mode, ("best-worst", "all"))
        one_of("pair_metric", self.pair_metric, ("reward", "neg_mae"))
        must(self.pair_margin >= 0, "pair_margin", "must be >= 0", self.pair_margin)
        must(self.beta > 0, "beta", "must be > 0", self.beta)
        must(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)", self.label_smoothing)
        one_of("loss_type", self.loss_type, ("sigmoid", "ipo"))


PRESETS = {
    # small enough for a 2-core CPU: 24 users x 2 styles (lg, and lg-rating whose candidates differ in the rating
    # they state) x 2 temperatures x 2 samples; every pair 0.05 apart in mean reward
    "cpu-demo": dict(users=24, styles=["lg", "lg-rating"], temperatures=[0.7, 1.0], samples=2, pair_mode="all",
                     pair_margin=0.05, max_steps=20, pairs_per_step=4, micro_batch_pairs=2, lr=1e-5,
                     user_history=12, review_chars=80, max_new_tokens=96, save_every=10, val_every=10,
                     val_examples=32),
    # LettinGo-scale exploration on GPUs (several explorer LLMs)
    "lettingo-paper": dict(model="Qwen/Qwen3-8B", explorers=["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"],
                           users=100_000, heldout=5, samples=4, temperatures=[0.6, 1.0, 1.3],
                           styles=["lg", "kar", "palr"], user_history=50, review_chars=200, max_new_tokens=512,
                           max_prompt_tokens=4096, pairs_per_step=64, micro_batch_pairs=4, lr=5e-7, beta=0.1,
                           max_steps=2000, activation_checkpointing=True, save_every=100, val_every=100,
                           val_examples=512),
}


def encode_pairs(pairs, tokenizer, ds, hx, cfg):
    """Token ids of (prompt, chosen, rejected); each profile ends with EOS so the model learns to stop.

    A train style with a response prefix (lg-rating: "Usually rates ") ends the prompt with it, as exploration and
    validation do, and the two completions are what follows it: the policy is trained on the tokens it chose, not
    on a shared opener it never wrote (the opener's log-prob would cancel in pi_c - pi_r anyway)."""
    eos = tokenizer.eos_token_id
    prefix = style_prefix(cfg.train_style)
    out = []
    for n, p in enumerate(pairs, 1):
        msgs = profile_messages(cfg.train_style, hx, ds, lettingo.Target(p["user_id"], "", p["t_cut"]),
                                lettingo.history_options(cfg))
        prompt = encode_prompt(tokenizer, msgs, cfg.max_prompt_tokens, prefix)
        ids = []
        for side in ("chosen", "rejected"):
            text = p[side]
            if prefix:  # keep what the explorer wrote after the prefix (a profile is stripped: "" if nothing)
                if text.startswith(prefix) or text == prefix.rstrip():
                    text = text[len(prefix):]
                else:
                    raise ValueError(f"pairs.jsonl, pair {n}: the {side} profile does not open with the "
                                     f"--train-style {cfg.train_style} prefix {prefix!r}: explore with that style")
            ids.append(tokenizer.encode(text, add_special_tokens=False)[:cfg.max_new_tokens - 1] + [eos])
        out.append((prompt, ids[0], ids[1]))
    return out


def average_logps(cfg) -> bool:
    """IPO compares per-token average log-probs by default (TRL); DPO summed ones."""
    return cfg.loss_type == "ipo" and cfg.ipo_average


def pair_logprobs(model, encoded, idx, vocab_limit: int | None = None, average: bool = False, chunk_tokens: int = 0,
                  share_prompts: bool = False):
    """Log-probs (summed, or per-token averages) of chosen and rejected for pairs `idx`: one batch, each pair's
    chosen and rejected rows adjacent (share_prompts: their prompt runs once), over the tokenizer's ids below
    vocab_limit; the head chunk_tokens positions at a time (rl/rollout.completion_logprobs)."""
    prompts = [encoded[i][0] for i in idx]
    comps = [c for i in idx for c in (encoded[i][1], encoded[i][2])]  # row 2p: chosen, row 2p + 1: rejected
    batch = make_batch(prompts, comps, pad_id=0, repeat=2).to(next(model.parameters()).device)
    logp, _ = completion_logprobs(model, batch, vocab_limit=vocab_limit, chunk_tokens=chunk_tokens,
                                  share_prompts=share_prompts)
    seq = sequence_logprob(logp, batch.mask, average)  # (2P,)
    return seq[0::2], seq[1::2]


def model_identity(src: str) -> str:
    """What names a model's weights: a known name or hub id as given; a local directory or file by its resolved
    path with the size and modification time of its config and weight files (a re-written checkpoint differs)."""
    p = Path(src)
    if not p.exists():
        return src
    files = sorted(p.glob("*.safetensors")) + [p / "config.json"] if p.is_dir() else [p]
    return f"{p.resolve()}|" + "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                         for f in files if f.exists())


def reference_key(cfg) -> dict:
    """Everything the stored reference log-probs depend on: the model, the pairs, how they become tokens."""
    pairs = lettingo.files(cfg)["pairs"]
    return {"model": model_identity(cfg.model), "pairs_sha256": hashlib.sha256(pairs.read_bytes()).hexdigest(),
            "train_style": cfg.train_style, "max_new_tokens": cfg.max_new_tokens,
            "max_prompt_tokens": cfg.max_prompt_tokens, "user_history": cfg.user_history,
            "review_chars": cfg.review_chars, "average": average_logps(cfg)}


@torch.no_grad()
def reference_logprobs(reference, encoded, micro: int, d: dist.Dist, path: Path, key: dict,
                       vocab_limit: int | None = None, average: bool = False, chunk_tokens: int = 0,
                       share_prompts: bool = False) -> torch.Tensor:
    """(N, 2) reference log-probs of (chosen, rejected) for every pair, computed once and stored in `path` with
    the `key` they were computed for; a file whose key differs (another model, pairs, style, token limits) is
    recomputed, and the run says why."""
    if path.exists():
        saved = json.loads(path.read_text())
        old_key = saved.get("key", {}) if isinstance(saved, dict) else {}
        if old_key == key and len(saved["logps"]) == len(encoded):
            return torch.tensor(saved["logps"], dtype=torch.float32)
        if d.is_main:
            changed = sorted(k for k in key.keys() | old_key.keys() if key.get(k) != old_key.get(k)) or ["pairs"]
            print(f"{path}: computed for another {', '.join(changed)}; recomputing the reference log-probs")
    idx, real = dist.pad_to_world(list(range(len(encoded))), d)
    rows = []
    for s in range(0, len(idx), micro):
        c, r = pair_logprobs(reference, encoded, idx[s:s + micro], vocab_limit, average, chunk_tokens, share_prompts)
        rows += list(zip(idx[s:s + micro], c.tolist(), r.tolist()))
    rows = {i: (c, r) for part in dist.all_gather_objects(rows[:real], d) for i, c, r in part}
    ref = torch.tensor([rows[i] for i in range(len(encoded))], dtype=torch.float32)
    if d.is_main:
        write_text_atomic(path, json.dumps({"key": key, "logps": ref.tolist()}))
    return ref


def train(cfg: DPOConfig, preset: str | None = None) -> dict:
    """DPO on the pairs of run_dir/pairs.jsonl: every step is one update; validation and checkpoints every few."""
    d, resume_from, models = loop.begin(cfg, cfg.pairs_per_step, cfg.pairs_per_step)  # the pairs split over ranks
    ds, hx = lettingo.dataset(cfg)
    pairs = lettingo.read_jsonl(lettingo.files(cfg)["pairs"], "pairs")
    if not pairs:
        raise ValueError(f"{lettingo.files(cfg)['pairs']} holds no pairs: explore more candidates or lower "
                         f"--pair-margin")
    encoded = encode_pairs(pairs, models.tokenizer, ds, hx, cfg)
    ref = reference_logprobs(models.reference, encoded, cfg.micro_batch_pairs, d, Path(cfg.run_dir) / "ref_logps.json",
                             reference_key(cfg), models.tokenizer.vocab_size, average_logps(cfg),
                             cfg.logprob_chunk_tokens, cfg.share_prompt_forward)

    from eval.recommender import Recommender

    rec = Recommender(models.rec_model, models.rec_tokenizer, batch_size=cfg.micro_batch_pairs * 2, device=d.device)
    valid = sorted(ds.split("valid"), key=lambda x: (x.timestamp, x.user_id))
    valid = [valid[i] for i in loop.epoch_order(len(valid), 0, cfg.seed)[:cfg.val_examples]] if valid else []

    def validation() -> dict:
        return validate(models.policy, models.tokenizer, rec, ds, hx, valid, cfg.train_style,
                        lettingo.history_options(cfg), d, cfg.max_new_tokens, cfg.max_prompt_tokens,
                        style_prefix(cfg.train_style))

    run = loop.start_run(cfg, d, models, resume_from, 1, preset)
    last: dict = {}
    if loop.validate_first(cfg, run):  # the start of the validation curve; --max-steps 0 only validates
        last = loop.log_validation(run, validation(), 0)
    bar = loop.progress_bar(run, cfg, d, "dpo")
    for step in bar:
        last = dpo_step(step, cfg, models, encoded, pairs, ref, run, d)
        done = step + 1
        run.tracker.scalars(last, done, prefix="train/")
        loop.show(bar, last, {"loss": "loss", "reward_accuracy": "acc", "reward_margin": "margin"})
        if loop.validate_now(cfg, done):
            last.update(loop.log_validation(run, validation(), done))
        if loop.save_now(cfg, run, done):
            loop.save(cfg, run, models, done, d)
    run.tracker.close()
    dist.teardown()
    return last


def dpo_step(step, cfg: DPOConfig, models: loop.Models, encoded, pairs, ref, run: loop.Run, d: dist.Dist) -> dict:
    policy = models.policy
    peaks = PhasePeaks(d.device)  # the step's peak (CUDA allocated; CPU resident), logged as mem_peak_gib_update
    global_idx = loop.step_indices(step, cfg.pairs_per_step, len(encoded), cfg.seed)
    mine = [global_idx[p] for p in loop.rank_share(cfg.pairs_per_step, cfg.pairs_per_step, d)]
    policy.train()
    keys = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
            "logps_rejected")
    sums = torch.zeros(len(keys), dtype=torch.float64)
    for s in range(0, len(mine), cfg.micro_batch_pairs):
        idx = mine[s:s + cfg.micro_batch_pairs]
        pc, pr = pair_logprobs(policy, encoded, idx, models.tokenizer.vocab_size, average_logps(cfg),
                               cfg.logprob_chunk_tokens, cfg.share_prompt_forward)
        rc, rr = ref[idx, 0].to(pc.device), ref[idx, 1].to(pc.device)
        loss, m = dpo_loss(pc, pr, rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                           loss_type=cfg.loss_type, global_pairs=cfg.pairs_per_step)
        (loss * d.world).backward()  # FSDP averages gradients over ranks; the loss already sums over them
        sums += torch.tensor([float(loss.detach()) if k == "loss" else float(m[k]) * len(idx) for k in keys],
                             dtype=torch.float64)
    gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    peaks.end("update")
    tot = dist.all_sum(sums, d)
    metrics = {k: float(v) if k == "loss" else float(v) / cfg.pairs_per_step for k, v in zip(keys, tot)}
    metrics["grad_norm"] = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
    metrics["lr"] = run.scheduler.get_last_lr()[0]
    metrics.update(peaks.metrics())
    if cfg.log_text_every and step % cfg.log_text_every == 0 and d.is_main:
        p = pairs[global_idx[0]]
        run.tracker.text("pairs", f"**chosen** ({p['chosen_score']:.3f}, {p['chosen_from']})\n\n{p['chosen']}\n\n"
                                  f"**rejected** ({p['rejected_score']:.3f}, {p['rejected_from']})\n\n"
                                  f"{p['rejected']}", step + 1)
    return metrics
