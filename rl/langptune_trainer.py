"""LangPTune: the profile writer and the recommender that reads its profiles, trained in alternation.

Gao, Zhou, Dai, Joachims, "End-to-end Training for Recommendation with Language-based User Profiles". The loop is
`train`; one iteration, top to bottom:
  1. profiles: the writer (greedy) writes the profile of every training target's user, from what came before it
  2. recommender: --rec-steps updates on those profiles. retrieval: an embedding model (our transformer,
     mean-pooled) trained with InfoNCE, the next item as positive and in-batch negatives (eval/retrieval.py);
     rating: the expected-rating reader trained on (profile, history, item, rating) (rl/rating_reader.py)
  3. the item embeddings are recomputed with the updated recommender
  4. writer: --writer-steps updates of REBEL (rl/rebel.py; or GRPO): two samples per target, rewarded by the
     recommender (NDCG@k or MRR of the target among the whole catalogue, the user's history masked; or
     1 - |y - y_hat| / 4), rewards whitened, the KL to the reference folded in
  5. validation: greedy profiles of the valid targets, ranked by the recommender: NDCG@k, MRR, Recall, Precision
     (rating: MAE, RMSE, Acc, F1)
A target is a user's interaction rated >= --min-rating (the next item the user liked). Every phase starts a fresh
AdamW. A checkpoint per iteration holds the writer (model or LoRA adapter) and the recommender.

How this departs from LangPTune's public code, each a flag or a size:
  - the embedding model is our own transformer (SmolLM2 by default, mxbai-embed-large there), mean-pooled;
  - the cpu-demo preset is tiny (48 targets, 64-token profiles); langptune-paper has the public sizes;
  - --writer-loss grpo trains the writer with the GRPO loss on the same two-sample groups instead of REBEL.
Under torchrun the writer is sharded (FSDP2) and its samples are split over the ranks; the recommender is a whole
copy on every rank, each computing the same batches (see recommender_model).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data.io import write_text_atomic
from eval.profiles import HistoryOptions, encode_prompt, item_title, parse_profile, profile_messages, write_profiles
from model import load_model, load_tokenizer
from model.sampler import generate, row_seed

from . import checkpoints
from . import distributed as dist
from . import loop
from .config import ConfigError, must, one_of, save_config
from .grpo import group_advantages, grpo_loss
from .optim import make_optimizer
from .rebel import kl_penalised, rebel_loss, whiten
from .rollout import batched_logprobs, completion_logprobs, make_batch
from .tracking import Tracker


@dataclass
class LangPTuneConfig(loop.RunConfig):
    """LangPTune. Every field is a flag (--field-name); --preset picks the defaults. --lr is the writer's."""
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "profile writer (and its reference)"})
    rec_model: str = field(default="", metadata={"help": "the recommender's model; empty: the writer's model"})
    rec_kind: str = field(default="retrieval", metadata={"help": "retrieval (InfoNCE) | rating (expected rating)"})
    recommender: str = field(default="reference", metadata={
        "help": "unused here (the trained recommender is --rec-model); kept for the shared model builder"})
    data: str = field(default="", metadata={"help": "canonical dataset dir; empty: the synthetic default"})
    run_dir: str = "runs/langptune"
    iterations: int = field(default=1, metadata={"help": "alternations of profiles -> recommender -> writer"})
    rec_steps: int = field(default=40, metadata={"help": "recommender updates per iteration"})
    writer_steps: int = field(default=10, metadata={"help": "writer updates per iteration (--max-steps is unused)"})
    # targets and profiles
    targets: int = field(default=48, metadata={"help": "training targets (one per user, its last liked item)"})
    min_rating: int = 4
    min_history: int = 5
    style: str = field(default="lg", metadata={"help": "the writer's prompt (eval/profiles.py styles)"})
    user_history: int = 20
    review_chars: int = 80
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 64
    rec_history: int = field(default=10, metadata={"help": "recent item titles the recommender reads"})
    # recommender
    rec_lr: float = 1e-5
    rec_batch: int = field(default=8, metadata={"help": "InfoNCE batch: positives and in-batch negatives"})
    rec_temperature: float = 0.1
    rec_rating_loss: str = field(default="ce", metadata={"help": "rating: ce (over '1'..'5') | mse"})
    embed_tokens: int = 192
    # writer
    writer_loss: str = field(default="rebel", metadata={"help": "rebel | grpo"})
    reward: str = field(default="ndcg", metadata={"help": "retrieval: ndcg | mrr"})
    reward_k: int = 10
    prompts_per_step: int = 4
    temperature: float = 1.0
    eta: float = 1.0
    kl_coef: float = 0.0
    micro_batch_rows: int = 4
    lr: float = 1e-5

    def check(self):
        super().check()
        one_of("rec_kind", self.rec_kind, ("retrieval", "rating"))
        one_of("writer_loss", self.writer_loss, ("rebel", "grpo"))
        one_of("reward", self.reward, ("ndcg", "mrr"))
        one_of("rec_rating_loss", self.rec_rating_loss, ("ce", "mse"))
        for name in ("iterations", "targets", "rec_batch", "prompts_per_step", "micro_batch_rows", "max_new_tokens",
                     "reward_k", "embed_tokens", "max_prompt_tokens"):
            must(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("rec_steps", "writer_steps", "min_history", "user_history", "rec_history", "review_chars"):
            must(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        must(1 <= self.min_rating <= 5, "min_rating", "must be in 1..5", self.min_rating)
        must(self.rec_batch >= 2 or self.rec_kind == "rating", "rec_batch", "must be >= 2 (in-batch negatives)",
             self.rec_batch)
        for name in ("rec_lr", "rec_temperature", "temperature", "eta"):
            must(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        must(self.kl_coef >= 0, "kl_coef", "must be >= 0", self.kl_coef)


PRESETS = {
    # offline, synthetic catalogue, SmolLM2-135M-Instruct as writer and embedding model, small enough to watch one
    # iteration on a CPU (prompts of a few hundred tokens, a handful of updates of each model)
    "cpu-demo": dict(iterations=1, targets=16, rec_steps=8, writer_steps=4, prompts_per_step=4, rec_batch=8,
                     embed_tokens=64, max_new_tokens=32, user_history=6, review_chars=40, lr=1e-5, rec_lr=1e-4,
                     val_examples=16, save_every=1, val_every=1),
    # the public code's hyper-parameters (Llama-3-8B with its top 4 blocks trained; mxbai-embed-large there)
    "langptune-paper": dict(model="meta-llama/Llama-3.1-8B-Instruct", iterations=5, rec_steps=2500,
                            writer_steps=500, lr=3e-7, rec_lr=3e-7, eta=1.0, kl_coef=0.0, max_new_tokens=512,
                            trainable_layers=4, targets=100_000, prompts_per_step=32, rec_batch=64,
                            user_history=50, review_chars=200, max_prompt_tokens=4096, val_examples=1000,
                            save_every=1, val_every=1, activation_checkpointing=True),
}


@dataclass
class Target:
    """A user's liked interaction: the writer profiles the user from what came before `timestamp`."""
    user_id: str
    item_id: str
    timestamp: int
    rating: int


def liked_targets(ds, hx, split: str, cfg: LangPTuneConfig, limit: int) -> list[Target]:
    """One target per user of the split (retrieval: the user's last interaction there rated >= min_rating;
    rating: the last interaction, whatever its rating), with at least min_history interactions before it;
    users in a seeded order, at most `limit`."""
    floor = cfg.min_rating if cfg.rec_kind == "retrieval" else 1
    last: dict[str, object] = {}
    for x in ds.split(split):
        if x.rating >= floor and len(hx.user_history(x.user_id, x.timestamp, cfg.min_history)) >= cfg.min_history:
            last[x.user_id] = x  # interactions are in time order: the last one wins
    users = sorted(last)
    order = loop.epoch_order(len(users), 0, cfg.seed)
    return [Target(u, last[u].item_id, last[u].timestamp, last[u].rating) for u in (users[i] for i in order)][:limit]


def recommender_model(cfg: LangPTuneConfig, source: str, d: dist.Dist):
    """The recommender's model (fp32 weights, computing in --dtype) and tokenizer, a whole copy on every rank.

    Under torchrun its updates are replicated, not data-parallel: every rank computes the whole batch (InfoNCE
    needs every pair of the batch as negatives) from the same weights, so every rank makes the same update and
    the copies stay equal without any communication (an embedding model is small beside the writer)."""
    compute = loop.resolve_dtype(cfg.dtype, d.device)
    model = load_model(source, dtype=torch.float32, device=d.device)
    if compute != torch.float32:
        model.autocast_dtype = compute
    return model, load_tokenizer(cfg.rec_model or cfg.model)


class RetrievalScorer:
    """The retrieval recommender (eval/retrieval.py) behind the loop's interface: fit on (profile, target) pairs,
    reward written profiles, and report ranking metrics over the whole catalogue."""

    def __init__(self, cfg: LangPTuneConfig, ds, hx, d: dist.Dist, source: str):
        from eval import retrieval as R

        self.cfg, self.ds, self.hx, self.R = cfg, ds, hx, R
        self.model, self.tok = recommender_model(cfg, source, d)
        self.embedder = R.Embedder(self.model, self.tok, max_tokens=cfg.embed_tokens, batch_size=16)
        items = sorted(ds.items)
        self.index = R.ItemIndex(self.embedder, items, [R.item_text(ds.items[i]) for i in items])  # sets the center

    def user_text(self, t: Target, profile: str | None) -> str:
        titles = [item_title(self.ds, h.item_id) for h in self.hx.user_history(t.user_id, t.timestamp,
                                                                              self.cfg.rec_history)]
        return self.R.user_text(profile, titles)

    def exclude(self, targets: list[Target]) -> torch.Tensor:
        """(B, N) True on the items each user interacted with before the target (never recommended again)."""
        mask = torch.zeros(len(targets), len(self.index.index_of), dtype=torch.bool)
        for b, t in enumerate(targets):
            for h in self.hx.user_history(t.user_id, t.timestamp, 10 ** 9):
                mask[b, self.index.index_of[h.item_id]] = True
        return mask

    def fit(self, targets: list[Target], profiles: dict[str, str | None], steps: int, seed: int) -> dict:
        """`steps` InfoNCE updates of a fresh AdamW on batches of (user text, next item text) pairs."""
        if steps == 0:
            return {}
        cfg, R = self.cfg, self.R
        self.model.train()
        opt = make_optimizer(self.model, cfg.rec_lr, 0.0)
        losses, accs = [], []
        for s in range(steps):
            idx = loop.step_indices(s, min(cfg.rec_batch, len(targets)), len(targets), seed)
            batch = [targets[i] for i in idx]
            texts = [self.user_text(t, profiles[t.user_id]) for t in batch] + \
                [R.item_text(self.ds.items[t.item_id]) for t in batch]
            users, items = self.embedder.embed(texts, grad=True).split(len(batch))  # one forward (FSDP: one pass)
            loss, m = R.info_nce(users, items, cfg.rec_temperature)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            accs.append(float(m["accuracy"]))
        self.model.eval()
        self.index.refresh()
        return {"rec_loss_first": losses[0], "rec_loss_last": sum(losses[-5:]) / len(losses[-5:]),
                "rec_accuracy": sum(accs[-5:]) / len(accs[-5:])}

    @torch.no_grad()
    def rank(self, targets: list[Target], profiles: list[str | None]) -> torch.Tensor:
        """(B,) 1-based rank of each target item among the catalogue, its user's history masked."""
        # users are embedded one text per forward: a user's embedding, and so a reward, never depends on the
        # batch it was computed in (one process and several ranks rank the same way; ties flip otherwise)
        users = self.embedder.embed([self.user_text(t, p) for t, p in zip(targets, profiles)], batch_size=1)
        targets_idx = torch.tensor([self.index.index_of[t.item_id] for t in targets])
        return self.R.target_ranks(self.index.scores(users), targets_idx, self.exclude(targets))

    def reward(self, targets: list[Target], profiles: list[str | None]) -> torch.Tensor:
        ranks = self.rank(targets, profiles)
        return self.R.ndcg_at_k(ranks, self.cfg.reward_k) if self.cfg.reward == "ndcg" else self.R.mrr(ranks)

    def metrics(self, targets: list[Target], profiles: list[str | None]) -> dict:
        """MRR and NDCG, Recall, Precision at 5, 10, 20 of each target item over the catalogue."""
        R, ranks = self.R, self.rank(targets, profiles)
        out = {"mrr": float(R.mrr(ranks).mean())}
        for k in (5, 10, 20):
            out[f"ndcg@{k}"] = float(R.ndcg_at_k(ranks, k).mean())
            out[f"recall@{k}"] = float(R.recall_at_k(ranks, k).mean())
            out[f"precision@{k}"] = float(R.precision_at_k(ranks, k).mean())
        return out


class RatingScorer:
    """The expected-rating recommender (eval/recommender.py) made trainable (rl/rating_reader.py): fit on
    (profile, recent history, item, rating), reward 1 - |y - y_hat| / 4, report MAE and the other rating metrics."""

    def __init__(self, cfg: LangPTuneConfig, ds, hx, d: dist.Dist, source: str):
        from eval.recommender import Recommender

        self.cfg, self.ds, self.hx = cfg, ds, hx
        self.model, self.tok = recommender_model(cfg, source, d)
        self.rec = Recommender(self.model, self.tok, batch_size=cfg.rec_batch, device=d.device)

    def examples(self, targets: list[Target], profiles: list[str | None]):
        from eval.profiles import rec_example

        return [rec_example(self.hx, self.ds, t, p, None, self.cfg.review_chars, self.cfg.rec_history)
                for t, p in zip(targets, profiles)]

    def fit(self, targets: list[Target], profiles: dict[str, str | None], steps: int, seed: int) -> dict:
        """`steps` updates of a fresh AdamW on the rating loss (--rec-rating-loss ce | mse) of batches of targets."""
        from .rating_reader import digit_logits, rating_loss

        if steps == 0:
            return {}
        self.model.train()
        opt = make_optimizer(self.model, self.cfg.rec_lr, 0.0)
        losses = []
        for s in range(steps):
            batch = [targets[i] for i in loop.step_indices(s, min(self.cfg.rec_batch, len(targets)), len(targets), seed)]
            logits = digit_logits(self.rec, self.examples(batch, [profiles[t.user_id] for t in batch]))
            loss, _ = rating_loss(logits, torch.tensor([t.rating for t in batch]), self.cfg.rec_rating_loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        self.model.eval()
        return {"rec_loss_first": losses[0], "rec_loss_last": sum(losses[-5:]) / len(losses[-5:])}

    def predict(self, targets: list[Target], profiles: list[str | None]) -> torch.Tensor:
        return self.rec.score(self.examples(targets, profiles))[0].float()  # (B,) expected ratings

    def reward(self, targets: list[Target], profiles: list[str | None]) -> torch.Tensor:
        y = torch.tensor([float(t.rating) for t in targets])
        return 1.0 - (y - self.predict(targets, profiles)).abs() / 4.0

    def metrics(self, targets: list[Target], profiles: list[str | None]) -> dict:
        from eval.metrics import rating_metrics

        m = rating_metrics([t.rating for t in targets], self.predict(targets, profiles).tolist())
        return {k: m[k] for k in ("mae", "rmse", "acc", "f1_macro_5")}


def write_greedy(models: loop.Models, cfg: LangPTuneConfig, ds, hx, targets: list[Target],
                 d: dist.Dist) -> list[str | None]:
    """The writer's greedy profile of each target's user (None when the answer does not parse), every rank
    writing an equal share; the whole list on every rank."""
    hist = HistoryOptions(cfg.user_history, 0, cfg.review_chars)
    mine, real = dist.pad_to_world(targets, d)
    prompts = [encode_prompt(models.tokenizer, profile_messages(cfg.style, hx, ds, t, hist), cfg.max_prompt_tokens)
               for t in mine]
    models.policy.eval()
    with dist.gathered(models.policy):
        texts = write_profiles(models.policy, models.tokenizer, prompts, cfg.max_new_tokens, sync_ranks=d.enabled)
    profiles = [p[0] if p else None for p in (parse_profile(cfg.style, t)[0] for t in texts)][:real]
    return [p for part in dist.all_gather_objects(profiles, d) for p in part]


def writer_step(step: int, cfg: LangPTuneConfig, models: loop.Models, scorer, ds, hx,
                targets: list[Target], optimizer, seed: int, d: dist.Dist) -> dict:
    """One writer update: two samples per target, rewarded by the recommender, REBEL (or GRPO) on the pairs.
    Under torchrun each rank samples its share of the step's targets; rewards are whitened over all of them."""
    tok, policy = models.tokenizer, models.policy
    hist = HistoryOptions(cfg.user_history, 0, cfg.review_chars)
    pool = loop.step_indices(step, cfg.prompts_per_step, len(targets), seed)
    mine = loop.rank_share(cfg.prompts_per_step, cfg.prompts_per_step, d)  # positions in the step's batch
    batch_targets = [targets[pool[p]] for p in mine]
    prompts = [encode_prompt(tok, profile_messages(cfg.style, hx, ds, t, hist), cfg.max_prompt_tokens)
               for t in batch_targets]
    policy.eval()
    with torch.no_grad(), dist.gathered(policy):
        out = generate(policy, prompts, cfg.max_new_tokens, temperature=cfg.temperature, n=2, eos_ids=tok.eos_ids,
                       pad_id=tok.pad_token_id, vocab_limit=tok.vocab_size, sync_ranks=d.enabled,
                       seeds=[row_seed(seed * 1_000_003 + step, p, j) for p in mine for j in (0, 1)])
    comps = out.completions()
    texts = [tok.decode([t for t in c if t not in tok.eos_ids]) for c in comps]
    parsed = [parse_profile(cfg.style, t)[0] for t in texts]
    rows = [t for t in batch_targets for _ in (0, 1)]
    rewards = scorer.reward(rows, [p[0] if p else None for p in parsed]).float()  # (2P,)
    batch = make_batch(prompts, comps, tok.pad_token_id, repeat=2)
    V = tok.vocab_size
    with torch.no_grad():  # pi_old: the policy before the update, recomputed on the update's own batch
        old_tok = batched_logprobs(policy, batch, len(comps), cfg.temperature, V, cfg.logprob_chunk_tokens,
                                   cfg.share_prompt_forward)
        old = (old_tok * batch.mask).sum(1)  # (2P,) sequence log-probs
        if cfg.kl_coef:
            ref = (batched_logprobs(models.reference, batch, cfg.micro_batch_rows, cfg.temperature, V,
                                    cfg.logprob_chunk_tokens, cfg.share_prompt_forward) * batch.mask).sum(1)
            shaped = kl_penalised(rewards, old, ref, cfg.kl_coef)
        else:
            shaped = rewards
    everyone = torch.tensor([r for part in dist.all_gather_objects(shaped.tolist(), d) for r in part])
    at = d.rank * len(shaped)
    shaped = whiten(everyone)[at:at + len(shaped)]  # whitened over the whole step, this rank's rows
    policy.train()
    logp_tok, _ = completion_logprobs(policy, batch, cfg.temperature, vocab_limit=V,
                                      chunk_tokens=cfg.logprob_chunk_tokens, share_prompts=cfg.share_prompt_forward)
    if cfg.writer_loss == "rebel":
        logp = (logp_tok * batch.mask).sum(1)
        loss, m = rebel_loss(logp.view(-1, 2), old.view(-1, 2), shaped.view(-1, 2), eta=cfg.eta,
                             global_pairs=cfg.prompts_per_step)
    else:
        adv, _ = group_advantages(shaped, 2)
        loss, m = grpo_loss(logp_tok, old_tok, None, adv, batch.mask,
                            global_tokens=dist.all_sum(batch.mask.sum(), d))
    (loss * d.world).backward()  # FSDP averages gradients over ranks; the loss already sums over them
    gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums = dist.all_sum(torch.tensor([float(loss.detach()), float(rewards.sum()), sum(p is None for p in parsed),
                                      float(batch.mask.sum()), len(parsed)], dtype=torch.float64), d).tolist()
    return {"writer_loss": sums[0], "reward_mean": sums[1] / sums[4], "format_failure_rate": sums[2] / sums[4],
            "response_length": sums[3] / sums[4], "grad_norm": float(gn.full_tensor() if hasattr(gn, "full_tensor")
                                                                      else gn)}


def train(cfg: LangPTuneConfig, preset: str | None = None) -> dict:
    """The alternation: for each iteration, profiles -> recommender -> item embeddings -> writer -> validation."""
    d, resume_from, models = loop.begin(cfg, cfg.prompts_per_step, cfg.prompts_per_step)  # the writer and its reference
    from .lettingo import dataset

    ds, hx = dataset(cfg)
    train_targets = liked_targets(ds, hx, "train", cfg, cfg.targets)
    valid_targets = liked_targets(ds, hx, "valid", cfg, cfg.val_examples)
    if not train_targets or not valid_targets:
        raise ConfigError(f"no training or validation target rated >= --min-rating {cfg.min_rating} with "
                          f"--min-history {cfg.min_history} items before it")
    rec_source = str(resume_from / "recommender") if resume_from else (cfg.rec_model or cfg.model)
    scorer = (RetrievalScorer if cfg.rec_kind == "retrieval" else RatingScorer)(cfg, ds, hx, d, rec_source)
    start = checkpoints.load_training_state(resume_from, models.policy, None, None, d)["step"] if resume_from else 0
    run_dir = Path(cfg.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    tracker = Tracker(run_dir, enabled=d.is_main, resumed=resume_from is not None)
    end = min(cfg.iterations, start + cfg.stop_after) if cfg.stop_after else cfg.iterations
    last: dict = {}
    for it in range(start, end):
        t0 = time.perf_counter()
        seed = cfg.seed * 1_000_003 + it
        # 1. profiles of the training targets, written by the current writer (cached per iteration)
        profiles = dict(zip([t.user_id for t in train_targets], write_greedy(models, cfg, ds, hx, train_targets, d)))
        if d.is_main:
            write_text_atomic(run_dir / "profiles" / f"iteration_{it}.json",
                              json.dumps(profiles, ensure_ascii=False, indent=1))
        # 2-3. the recommender on them, then the item embeddings
        t1 = time.perf_counter()
        rec_m = scorer.fit(train_targets, profiles, cfg.rec_steps, seed)
        if not cfg.rec_steps and cfg.rec_kind == "retrieval":
            scorer.index.refresh()
        t2 = time.perf_counter()
        # 4. the writer against the updated recommender
        writer_m = []
        optimizer = make_optimizer(models.policy, cfg.lr, cfg.weight_decay)
        for s in tqdm(range(cfg.writer_steps), desc=f"writer {it + 1}", disable=not d.is_main):
            writer_m.append(writer_step(s, cfg, models, scorer, ds, hx, train_targets, optimizer, seed, d))
            tracker.scalars(writer_m[-1], it * cfg.writer_steps + s + 1, prefix="writer/")
        # 5. validation: greedy profiles of the valid targets, ranked by the recommender
        t3 = time.perf_counter()
        val_profiles = write_greedy(models, cfg, ds, hx, valid_targets, d)
        val = scorer.metrics(valid_targets, val_profiles)
        val["format_failure_rate"] = sum(p is None for p in val_profiles) / len(val_profiles)
        t4 = time.perf_counter()
        last = {"iteration": it + 1, **rec_m, **{f"val_{k}": v for k, v in val.items()}, "seconds": t4 - t0,
                "time_profiles": t1 - t0, "time_recommender": t2 - t1, "time_writer": t3 - t2,
                "time_validation": t4 - t3}
        if writer_m:
            last.update({k: sum(m[k] for m in writer_m) / len(writer_m) for k in writer_m[0]})
        tracker.scalars(last, it + 1, prefix="iteration/")
        tracker.text("profiles", "\n\n---\n\n".join(f"**{t.user_id}**: {p}" for t, p in
                                                   zip(valid_targets[:3], val_profiles[:3])), it + 1)
        checkpoints.save(run_dir, it + 1, models.policy, models.tokenizer, None, None,
                         {"config": dataclasses.asdict(cfg)}, d, keep=cfg.keep_checkpoints,
                         extras={"recommender": (scorer.model, scorer.tok)})
    tracker.close()
    dist.teardown()
    return last
