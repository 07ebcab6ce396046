"""Benchmark: one DPO optimizer step, ours (rl/dpo_trainer.py) against TRL's DPOTrainer, same model and sizes.

    python bench/bench_dpo.py [--steps 2] [--threads 2]

The step: SmolLM2-135M-Instruct in float32 on CPU, 16 preference pairs, each a chat prompt of about 450 tokens with
a chosen and a rejected profile of about 100 tokens (EOS included), sigmoid DPO loss with beta 0.1, one optimizer
step per 16 pairs in micro-batches of 2 pairs (4 sequences per forward: 2 chosen, 2 rejected), AdamW, gradient
clipping.

Matching the two sides
- Reference log-probs are computed once before training on both sides and are NOT in the timed step: ours with
  `reference_logprobs` (as our trainer does), TRL with precompute_ref_log_probs=True. The timed step is the
  policy's forward and backward over the 32 sequences plus the optimizer step.
- Micro-batches: ours micro_batch_pairs = 2 and pairs_per_step = 16; TRL per_device_train_batch_size = 2 pairs
  (it concatenates chosen and rejected into one batch of 4 rows) and gradient_accumulation_steps = 8.
- The same texts on both sides: the prompt is the rendered chat template (text) and each profile is text; TRL
  tokenizes prompt + profile + EOS text, ours the prompt and the profile apart and appends the EOS id. The token
  counts of both sides are printed and reported.
- Shared prompts: ours runs each pair's prompt once for its chosen and rejected profiles, their tokens on the
  prompt's keys and values (--share-prompt-forward, on by default: ~450 + 2 x 100 instead of 2 x 550 tokens a
  pair); TRL runs both sequences whole. Same log-probs and gradients (tests/test_rl_math.py).
- Each side runs in its own child process (this script re-invoked with --side ours / --side trl) so that the
  peak RSS (ru_maxrss) of one does not include the other. Steps: one warm-up step, then --steps timed steps.

The last line of output is one JSON object with the figures; "ratio" = TRL seconds per step / ours (target >= 2).
"trl" is TRL's version, or "not installed": then only our side runs, and TRL's figures, "ratio" and "ok" are null.
--model, --pairs, --prompt-tokens and --profile-tokens shrink the run (the smoke test: a tiny model, a few tokens);
their defaults are the sizes above.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from bench.bench_side import installed_version, peak_rss_mb, run_side  # noqa: E402

MODEL = "smollm2-135m-instruct"
PAIRS, PROMPT_TOKENS, PROFILE_TOKENS, MICRO_PAIRS, BETA = 16, 450, 100, 2, 0.1
WORDS = ("the a user item rating review liked disliked music album song sound vocals guitar lyrics band track "
         "great poor quality price delivery recommend again fan classic style mood energy slow fast long short "
         "bought gift stars listen favourite heavy soft jazz rock pop folk beat melody chorus production").split()


# ---- what both sides share --------------------------------------------------------------------------------------
def cut_text(tokenizer, rng: random.Random, n_tokens: int, head: str = "") -> str:
    """Text of about n_tokens tokens: random words from WORDS, cut by tokens and decoded."""
    words = head + " ".join(rng.choice(WORDS) for _ in range(2 * n_tokens))
    return tokenizer.decode(tokenizer.encode(words, add_special_tokens=False)[:n_tokens])


def make_pairs(tokenizer, prompt_tokens: int = PROMPT_TOKENS, profile_tokens: int = PROFILE_TOKENS, n: int = PAIRS,
               seed: int = 0) -> list[dict]:
    """n {prompt, chosen, rejected} texts; prompt = the chat template rendered with the generation prompt."""
    rng = random.Random(seed)
    overhead = len(tokenizer.encode_chat([{"role": "user", "content": ""}]))
    out = []
    for _ in range(n):
        content = cut_text(tokenizer, rng, prompt_tokens - overhead, "Write a profile of this user. History: ")
        prompt = tokenizer.render_chat([{"role": "user", "content": content}])
        # profile_tokens - 1 tokens of text, then EOS
        chosen = cut_text(tokenizer, rng, profile_tokens - 1, "Profile: ")
        rejected = cut_text(tokenizer, rng, profile_tokens - 1, "Profile: ")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def summary(times: list[float]) -> dict:
    return {"s_per_step": round(sum(times) / max(1, len(times)), 3), "steps_s": [round(t, 3) for t in times],
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def mean_len(xs) -> float:
    xs = list(xs)
    return round(sum(len(x) for x in xs) / max(1, len(xs)), 1)


# ---- ours -------------------------------------------------------------------------------------------------------
def run_ours(a) -> dict:
    import tempfile

    import torch

    from rl import distributed as dist
    from rl.dpo_trainer import DPOConfig, dpo_step, reference_logprobs
    from rl.loop import Run, build_models
    from rl.optim import make_optimizer, make_scheduler
    from rl.tracking import Tracker

    torch.manual_seed(0)
    d = dist.setup("cpu")
    cfg = DPOConfig(model=a.model, pairs_per_step=a.pairs, micro_batch_pairs=MICRO_PAIRS, beta=BETA, lr=5e-6,
                    max_steps=a.steps + 1, log_text_every=0, device="cpu")
    models = build_models(cfg, None, d)
    tok = models.tokenizer
    pairs = make_pairs(tok, a.prompt_tokens, a.profile_tokens, a.pairs)
    eos = tok.eos_token_id
    # (prompt, chosen, rejected) ids, as rl.dpo_trainer.encode_pairs lays them out: each profile ends with EOS
    encoded = [(tok.encode(p["prompt"], add_special_tokens=False),
                tok.encode(p["chosen"], add_special_tokens=False) + [eos],
                tok.encode(p["rejected"], add_special_tokens=False) + [eos]) for p in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ref = reference_logprobs(models.reference, encoded, cfg.micro_batch_pairs, d, Path(tmp) / "ref_logps.json",
                                 {"bench": a.model}, tok.vocab_size, share_prompts=cfg.share_prompt_forward)
        print(f"ours reference log-probs (once, not timed in the step): {time.perf_counter() - t0:.2f} s", flush=True)
    optimizer = make_optimizer(models.policy, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, 0, cfg.max_steps, "constant")
    run = Run(optimizer, scheduler, Tracker(tempfile.gettempdir(), enabled=False), 0, cfg.max_steps)
    times = []
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        m = dpo_step(step, cfg, models, encoded, pairs, ref, run, d)
        dt = time.perf_counter() - t0
        print(f"ours step {step}{' (warm-up)' if step == 0 else ''}: {dt:.2f} s, loss {m['loss']:.4f}, "
              f"accuracy {m['reward_accuracy']:.2f}", flush=True)
        if step > 0:
            times.append(dt)
    out = summary(times)
    out.update(prompt_tokens=mean_len(e[0] for e in encoded), chosen_tokens=mean_len(e[1] for e in encoded),
               rejected_tokens=mean_len(e[2] for e in encoded))
    return out


# ---- TRL --------------------------------------------------------------------------------------------------------
def run_trl(a) -> dict:
    import os
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from model import load_tokenizer, resolve_model

    torch.manual_seed(0)
    path = str(resolve_model(a.model))
    pairs = make_pairs(load_tokenizer(a.model), a.prompt_tokens, a.profile_tokens, a.pairs)
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            step = state.global_step - 1
            print(f"trl  step {step}{' (warm-up)' if step == 0 else ''}: {dt:.2f} s", flush=True)
            if step > 0:
                times.append(dt)

    out_dir = tempfile.mkdtemp(prefix="bench_dpo_trl_")
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(out_dir, "datasets"))
    args = DPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=MICRO_PAIRS, gradient_accumulation_steps=a.pairs // MICRO_PAIRS,
        precompute_ref_log_probs=True, precompute_ref_batch_size=MICRO_PAIRS, max_length=None, beta=BETA,
        loss_type=["sigmoid"], learning_rate=5e-6, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, max_steps=a.steps + 1, report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=path, args=args, train_dataset=Dataset.from_list(pairs), callbacks=[StepTimer()])
    print(f"trl  init with reference log-probs (once, not timed in the step): {time.perf_counter() - t0:.2f} s",
          flush=True)
    ds = trainer.train_dataset
    trainer.train()
    out = summary(times)
    out.update(prompt_tokens=mean_len(ds["prompt_ids"]), chosen_tokens=mean_len(ds["chosen_ids"]),
               rejected_tokens=mean_len(ds["rejected_ids"]))
    return out


# ---- driver -----------------------------------------------------------------------------------------------------
def child(side: str, a) -> dict:
    return run_side(__file__, side, ["--steps", str(a.steps), "--threads", str(a.threads),
                                     "--prompt-tokens", str(a.prompt_tokens), "--profile-tokens", str(a.profile_tokens),
                                     "--model", a.model, "--pairs", str(a.pairs)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per side (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="prompt length (default 450)")
    p.add_argument("--profile-tokens", type=int, default=PROFILE_TOKENS, help="profile length (default 100)")
    p.add_argument("--model", default=MODEL, help="model name or HF directory (both sides)")
    p.add_argument("--pairs", type=int, default=PAIRS,
                   help=f"preference pairs per optimizer step, a multiple of {MICRO_PAIRS} (default 16)")
    p.add_argument("--side", choices=["ours", "trl"], help="run one side in this process (used internally)")
    a = p.parse_args()
    if a.pairs < MICRO_PAIRS or a.pairs % MICRO_PAIRS:
        p.error(f"--pairs must be a multiple of the {MICRO_PAIRS}-pair micro-batch")
    if a.side:
        import torch

        torch.set_num_threads(a.threads)
        res = run_ours(a) if a.side == "ours" else run_trl(a)
        print(json.dumps(res))
        return
    t0 = time.perf_counter()
    trl_version = installed_version("trl")
    trl = child("trl", a) if trl_version else None  # TRL first: a failure in it shows early
    ours = child("ours", a)
    print(f"ours {ours['s_per_step']:.2f} s/step, peak RSS {ours['peak_rss_mb']:.0f} MiB, tokens "
          f"{ours['prompt_tokens']} + {ours['chosen_tokens']} / {ours['rejected_tokens']}")
    if trl:
        ratio = trl["s_per_step"] / ours["s_per_step"]
        print(f"trl  {trl['s_per_step']:.2f} s/step, peak RSS {trl['peak_rss_mb']:.0f} MiB, tokens "
              f"{trl['prompt_tokens']} + {trl['chosen_tokens']} / {trl['rejected_tokens']}")
        print(f"ratio trl/ours {ratio:.2f} (target >= 2), wall {time.perf_counter() - t0:.0f} s")
    else:
        ratio = None
        print(f"trl  not installed (pip install -r requirements-bench.txt): our side only, wall "
              f"{time.perf_counter() - t0:.0f} s")
    t = (lambda k: trl[k]) if trl else (lambda k: None)  # noqa: E731  TRL's figure, or null without TRL
    print(json.dumps({"ours_s_per_step": ours["s_per_step"], "trl_s_per_step": t("s_per_step"),
                      "ratio": None if ratio is None else round(ratio, 3), "target_ratio": 2.0,
                      "ok": None if ratio is None else ratio >= 2.0, "trl": trl_version or "not installed",
                      "ours_peak_rss_mb": ours["peak_rss_mb"], "trl_peak_rss_mb": t("peak_rss_mb"),
                      "ours_steps_s": ours["steps_s"], "trl_steps_s": t("steps_s"),
                      "tokens_ours": [ours["prompt_tokens"], ours["chosen_tokens"], ours["rejected_tokens"]],
                      "tokens_trl": trl and [trl["prompt_tokens"], trl["chosen_tokens"], trl["rejected_tokens"]],
                      "reference_in_step": False, "pairs": a.pairs, "micro_batch_pairs": MICRO_PAIRS,
                      "steps": a.steps, "threads": a.threads, "model": a.model}))


if __name__ == "__main__":
    main()
