"""LettinGo: explore -> score -> pairs -> DPO training of the profile writer.

Stages (each alone with --stage, or all in order with --stage all, which skips a stage whose file exists):
  explore  run_dir/candidates.jsonl  K candidate profiles per training user from each explorer model, prompt
                                     style and temperature, with their provenance
  score    run_dir/scores.jsonl      each candidate's mean reward on the user's held-out window (recommender)
  pairs    run_dir/pairs.jsonl       (chosen, rejected) profiles with their scores
  train    run_dir/checkpoints/...   DPO on the pairs; prompt = the `train_style` profile prompt of the user
Exploration and scoring are inference only: under torchrun each rank takes a share of the users with a full
copy of the model, and rank 0 gathers the rows. Training shares the GRPO machinery (rl/loop.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data import load_dataset
from data.history import HistoryIndex
from model import load_model, load_tokenizer

from . import distributed as D
from . import lettingo as LG
from . import loop as L
from . import profiles as P
from .dpo import dpo_loss, sequence_logprob
from .rollout import completion_logprobs, make_batch

STAGES = ("explore", "score", "pairs", "train")


@dataclass
class DPOConfig(L.RunConfig):
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
    pairs_per_step: int = 8
    micro_batch_pairs: int = 2
    lr: float = 5e-6
    weight_decay: float = 0.0
    log_text_every: int = 10


PRESETS = {
    # small enough for a 2-core CPU: 24 users x 2 styles (lg, and lg-rating whose candidates differ in the rating
    # they state) x 2 temperatures x 2 samples; every pair 0.05 apart in mean reward
    "cpu-demo": dict(users=24, styles=["lg", "lg-rating"], temperatures=[0.7, 1.0], samples=2, pair_mode="all",
                     pair_margin=0.05, max_steps=20, pairs_per_step=4, micro_batch_pairs=2, lr=1e-5,
                     user_history=12, review_chars=80, max_new_tokens=96, save_every=10, val_every=10,
                     val_examples=32),
    # LettinGo-scale exploration on GPUs (several explorer LLMs; see shared/papers/lettingo-code-readme.txt)
    "lettingo-paper": dict(model="Qwen/Qwen3-8B", explorers=["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"],
                           users=100_000, heldout=5, samples=4, temperatures=[0.6, 1.0, 1.3],
                           styles=["lg", "kar", "palr"], user_history=50, review_chars=200, max_new_tokens=512,
                           max_prompt_tokens=4096, pairs_per_step=64, micro_batch_pairs=4, lr=5e-7, beta=0.1,
                           max_steps=2000, activation_checkpointing=True, save_every=100, val_every=100,
                           val_examples=512),
}


def _files(cfg):
    r = Path(cfg.run_dir)
    return {"explore": r / "candidates.jsonl", "score": r / "scores.jsonl", "pairs": r / "pairs.jsonl"}


def _dataset(cfg):
    from data.default import default_dataset_dir

    ds = load_dataset(cfg.data or default_dataset_dir())
    return ds, HistoryIndex(ds)


def _opt(cfg) -> P.HistoryOptions:
    return P.HistoryOptions(cfg.user_history, 0, cfg.review_chars)


def stage_explore(cfg, d: D.Dist, ds, hx):
    users = LG.user_windows(ds, cfg.heldout, cfg.min_history, cfg.users)
    mine = users[d.rank::d.world]
    rows = []
    for k, src in enumerate(cfg.explorers):
        model, tok = load_model(src, L.resolve_dtype(cfg.dtype, d.device), d.device), load_tokenizer(src)
        rows += LG.explore(mine, ds, hx, src, model, tok, cfg.styles, [float(t) for t in cfg.temperatures],
                           cfg.samples, _opt(cfg), cfg.max_new_tokens, cfg.max_prompt_tokens,
                           seed=cfg.seed + 7919 * k + 104729 * d.rank, progress=d.is_main)
        del model
    rows = [r for part in D.all_gather_objects(rows, d) for r in part]
    if d.is_main:
        LG.write_jsonl_atomic(_files(cfg)["explore"], rows)
        ok = sum(r["profile"] is not None for r in rows)
        print(f"explore: {len(rows)} candidates for {len(users)} users, {ok} parsed -> {_files(cfg)['explore']}")


def stage_score(cfg, d: D.Dist, ds, hx):
    from eval.recommender import Recommender

    cands = LG.read_jsonl(_files(cfg)["explore"], "explore")
    users = LG.user_windows(ds, cfg.heldout, cfg.min_history, cfg.users)
    src = cfg.model if cfg.recommender == "reference" else cfg.recommender
    rec = Recommender(load_model(src, L.resolve_dtype(cfg.dtype, d.device), d.device), load_tokenizer(src),
                      device=d.device)
    for c, cand in enumerate(cands):
        cand["candidate"] = c
    mine = cands[d.rank::d.world]
    scored = LG.score_candidates(mine, users, ds, hx, rec, cfg.review_chars, progress=d.is_main)
    for s in scored:  # score_candidates numbers within its input: restore the global candidate id
        s["candidate"] = mine[s["candidate"]]["candidate"]
        s["neg_mae"] = -s["mae"]
    rows = sorted((r for part in D.all_gather_objects(scored, d) for r in part), key=lambda r: r["candidate"])
    if d.is_main:
        LG.write_jsonl_atomic(_files(cfg)["score"], rows)
        print(f"score: {len(rows)} candidates scored -> {_files(cfg)['score']}")


def stage_pairs(cfg, d: D.Dist, ds, hx):
    if not d.is_main:
        return
    scored = LG.read_jsonl(_files(cfg)["score"], "score")
    users = {u["user_id"]: u for u in LG.user_windows(ds, cfg.heldout, cfg.min_history, cfg.users)}
    pairs = LG.select_pairs(scored, cfg.pair_mode, cfg.pair_margin, key=cfg.pair_metric)
    for p in pairs:
        p["t_cut"] = users[p["user_id"]]["t_cut"]
    LG.write_jsonl_atomic(_files(cfg)["pairs"], pairs)
    print(f"pairs: {len(pairs)} pairs ({cfg.pair_mode}, margin {cfg.pair_margin}) -> {_files(cfg)['pairs']}")


# ---- training ---------------------------------------------------------------------------------------------------

def encode_pairs(pairs, tokenizer, hx, cfg):
    """Token ids of (prompt, chosen, rejected); each profile ends with EOS so the model learns to stop.

    A train style with a response prefix (lg-rating: "Usually rates ") ends the prompt with it, as exploration and
    validation do, and the two completions are what follows it: the policy is trained on the tokens it chose, not
    on a shared opener it never wrote (the opener's log-prob would cancel in pi_c - pi_r anyway)."""
    eos = tokenizer.eos_token_id
    prefix = P.style_prefix(cfg.train_style)
    out = []
    for n, p in enumerate(pairs, 1):
        msgs = P.profile_messages(cfg.train_style, hx, p["user_id"], "", p["t_cut"], _opt(cfg), "")
        prompt = P.prompt_ids(tokenizer, msgs, cfg.max_prompt_tokens, prefix)
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


def pair_logprobs(model, encoded, idx, temperature=1.0):
    """Summed log-probs of chosen and rejected for pairs `idx`: one batch, chosen rows then rejected rows."""
    prompts = [encoded[i][0] for i in idx] * 2
    comps = [encoded[i][1] for i in idx] + [encoded[i][2] for i in idx]
    batch = make_batch(prompts, comps, pad_id=0).to(next(model.parameters()).device)
    logp, _ = completion_logprobs(model, batch, temperature)
    seq = sequence_logprob(logp, batch.mask)  # (2P,)
    return seq[:len(idx)], seq[len(idx):]


@torch.no_grad()
def reference_logprobs(reference, encoded, micro: int, d: D.Dist, path: Path) -> torch.Tensor:
    """(N, 2) reference log-probs of (chosen, rejected) for every pair, computed once and stored in `path`."""
    if path.exists():
        saved = torch.tensor(json.loads(path.read_text()))
        if saved.shape == (len(encoded), 2):
            return saved
    idx, real = P.pad_to_world(list(range(len(encoded))), d)
    rows = []
    for s in range(0, len(idx), micro):
        c, r = pair_logprobs(reference, encoded, idx[s:s + micro])
        rows += list(zip(idx[s:s + micro], c.tolist(), r.tolist()))
    rows = {i: (c, r) for part in D.all_gather_objects(rows[:real], d) for i, c, r in part}
    ref = torch.tensor([rows[i] for i in range(len(encoded))], dtype=torch.float32)
    if d.is_main:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ref.tolist()))
        tmp.replace(path)
    return ref


def stage_train(cfg, d: D.Dist, ds, hx, preset=None) -> dict:
    pairs = LG.read_jsonl(_files(cfg)["pairs"], "pairs")
    if not pairs:
        raise ValueError(f"{_files(cfg)['pairs']} holds no pairs: explore more candidates or lower --pair-margin")
    resume_from = L.resume_point(cfg)
    models = L.build_models(cfg.model, cfg.recommender, resume_from, cfg.activation_checkpointing, d,
                            cfg.dtype)
    encoded = encode_pairs(pairs, models.tokenizer, hx, cfg)
    ref = reference_logprobs(models.reference, encoded, cfg.micro_batch_pairs, d, Path(cfg.run_dir) / "ref_logps.json")

    def step_fn(step, optimizer, scheduler, tracker):
        return dpo_step(step, cfg, models, encoded, pairs, ref, optimizer, scheduler, d, tracker)

    from eval.recommender import Recommender

    rec = Recommender(models.rec_model, models.rec_tokenizer, batch_size=cfg.micro_batch_pairs * 2, device=d.device)
    valid = sorted(ds.split("valid"), key=lambda x: (x.timestamp, x.user_id))
    valid = [valid[i] for i in L.epoch_order(len(valid), 0, cfg.seed)[:cfg.val_examples]] if valid else []

    def validate_fn():
        return P.validate(models.policy, models.tokenizer, rec, ds, hx, valid, cfg.train_style, _opt(cfg), d,
                          cfg.max_new_tokens, cfg.max_prompt_tokens, P.style_prefix(cfg.train_style))

    return L.run(cfg, d, models, resume_from, 1, step_fn, validate_fn,
                 {"loss": "loss", "reward_accuracy": "acc", "reward_margin": "margin"}, preset, desc="dpo")


def dpo_step(step, cfg, models: L.Models, encoded, pairs, ref, optimizer, scheduler, d: D.Dist, tracker) -> dict:
    policy = models.policy
    global_idx = L.step_indices(step, cfg.pairs_per_step, len(encoded), cfg.seed)
    mine = [global_idx[p] for p in L.rank_share(cfg.pairs_per_step, cfg.pairs_per_step, d)]
    policy.train()
    keys = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
            "logps_rejected")
    sums = torch.zeros(len(keys), dtype=torch.float64)
    for s in range(0, len(mine), cfg.micro_batch_pairs):
        idx = mine[s:s + cfg.micro_batch_pairs]
        pc, pr = pair_logprobs(policy, encoded, idx)
        rc, rr = ref[idx, 0].to(pc.device), ref[idx, 1].to(pc.device)
        loss, m = dpo_loss(pc, pr, rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                           loss_type=cfg.loss_type, global_pairs=cfg.pairs_per_step)
        (loss * d.world).backward()  # FSDP averages gradients over ranks; the loss already sums over them
        sums += torch.tensor([float(loss.detach()) if k == "loss" else float(m[k]) * len(idx) for k in keys],
                             dtype=torch.float64)
    gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    tot = D.all_sum(sums, d)
    metrics = {k: float(v) if k == "loss" else float(v) / cfg.pairs_per_step for k, v in zip(keys, tot)}
    metrics["grad_norm"] = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
    metrics["lr"] = scheduler.get_last_lr()[0]
    if cfg.log_text_every and step % cfg.log_text_every == 0 and d.is_main:
        p = pairs[global_idx[0]]
        tracker.text("pairs", f"**chosen** ({p['chosen_score']:.3f}, {p['chosen_from']})\n\n{p['chosen']}\n\n"
                              f"**rejected** ({p['rejected_score']:.3f}, {p['rejected_from']})\n\n{p['rejected']}",
                     step + 1)
    return metrics


def main(cfg: DPOConfig, preset: str | None = None) -> dict:
    if cfg.stage not in STAGES + ("all",):
        raise ValueError(f"unknown stage {cfg.stage!r}: {', '.join(STAGES)}, all")
    d = D.setup(cfg.device or None)
    torch.manual_seed(cfg.seed)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    ds, hx = _dataset(cfg)
    files = _files(cfg)
    todo = STAGES if cfg.stage == "all" else (cfg.stage,)
    result = {}
    for stage in todo:
        if cfg.stage == "all" and stage in files and files[stage].exists():
            if d.is_main:
                print(f"{stage}: {files[stage]} exists, skipped (delete it or run --stage {stage} to redo)")
            continue
        if stage == "train":
            result = stage_train(cfg, d, ds, hx, preset)
        else:
            {"explore": stage_explore, "score": stage_score, "pairs": stage_pairs}[stage](cfg, d, ds, hx)
        if d.enabled:
            torch.distributed.barrier()
    D.teardown()
    return result
