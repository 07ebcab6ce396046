"""Benchmark: one GRPO optimizer step, ours (rl/grpo_trainer.py) against TRL's GRPOTrainer, same model and sizes.

    python bench/bench_grpo.py [--steps 2] [--threads 2] [--old-logprobs sampler|recompute]

The step: SmolLM2-135M-Instruct in float32 on CPU, 4 chat prompts of about 500 tokens, G = 4 samples each at
temperature 1.0, exactly 128 new tokens per sample (EOS held back until then on both sides), rewards from the same
cheap toy function (share of the token " the"), group-relative advantages, one PPO epoch = one optimizer step over
the 16 rows in micro-batches of 4 rows, KL to the frozen reference on (coefficient 0.001, so both sides run the
reference forward), AdamW, gradient clipping.

Matching the two sides
- Rows: TRL counts rows, so per_device_train_batch_size = 4 rows per micro-batch and gradient_accumulation_steps =
  4 give one generation of 16 rows (4 prompts x 4) and one optimizer step per generation, as our prompts_per_step 4
  = mini_batch_prompts 4, micro_batch_rows 4.
- Length: TRL's generation_kwargs min_new_tokens = 128 (transformers suppresses EOS before that); ours passes
  min_new_tokens = max_new_tokens to the sampler (the trainer has no flag for it, so this script wraps the
  sampler's `generate` as the trainer imports it).
- Old log-probs: with one generation per optimizer step and one iteration, TRL skips the "old" forward pass and
  uses the detached current log-probs (the ratio is 1 by construction). `--old-logprobs sampler` (the default
  here) does the same work on our side: the sampler's own log-probs are the old ones, no extra forward.
  `--old-logprobs recompute` (our trainer's default) adds one no-grad forward over the 16 rows.
- Shared prompts: our trainer runs each prompt once per micro-batch and its G completions on the prompt's keys
  and values (--share-prompt-forward, on by default: 500 + 4 x 128 instead of 4 x 628 tokens per group in the
  reference forward and the update); TRL runs every row whole. Same log-probs and gradients either way
  (tests/test_rl_math.py); `--no-share-prompts` times ours without it.
- Activation checkpointing: TRL's GRPOConfig turns gradient checkpointing on by default, so both sides recompute
  each block in the backward (ours with the shared prompts' cached keys/values as the blocks' inputs);
  `--no-activation-checkpointing` turns it off on both.
- Each side runs in its own child process (this script re-invoked with --side ours / --side trl) so that the
  peak RSS of one does not include the other. Steps: one warm-up step, then --steps timed steps.

Phases. Ours, from grpo_step's metrics: rollout (sampling), scoring (rewards, advantages), update (old and
reference log-probs, PPO micro-batches, optimizer). TRL, from wrappers around its methods: rollout
(`_generate_single_turn`, i.e. model.generate), scoring (the rest of `_generate_and_score_completions`: rewards,
advantages and the reference forward), update (the rest of the step: forward/backward, optimizer). Note that the
reference forward is in TRL's scoring phase and in our update phase: compare the totals.

Variants (--variants lora:R top:N): our step with LoRA adapters of rank R on every attention and MLP projection
(the reference = the same weights with the adapters off) or with only the top N blocks trained, each as ratios to
our full fine-tuning; and for lora:R, TRL's GRPOTrainer with a PEFT LoraConfig of the same rank, alpha and targets
(TRL's reference is then also the base model with the adapter disabled), as ratios to ours.

The last line of output is one JSON object with the figures; "ratio" = TRL seconds per step / ours (target >= 2.5),
"rss_ratio" = our peak RSS / TRL's (target <= 0.6).
"trl" is TRL's version, or "not installed": then only our side runs, and TRL's figures, "ratio" and "ok" are null.
--model, --prompts, --prompt-tokens and --new-tokens shrink the run (the smoke test: a tiny model, a few tokens);
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
from rl.envs import token_share  # noqa: E402  (the toy reward, the same on both sides)

MODEL = "smollm2-135m-instruct"
N_PROMPTS, PROMPT_TOKENS, G, NEW_TOKENS, MICRO_ROWS, KL = 4, 500, 4, 128, 4, 0.001
WORDS = ("the a user item rating review liked disliked music album song sound vocals guitar lyrics band track "
         "great poor quality price delivery recommend again fan classic style mood energy slow fast long short "
         "bought gift stars listen favourite heavy soft jazz rock pop folk beat melody chorus production").split()


# ---- what both sides share --------------------------------------------------------------------------------------
def prompt_messages(tokenizer, tokens: int = PROMPT_TOKENS, n: int = N_PROMPTS, seed: int = 0) -> list[list[dict]]:
    """n single-turn chats whose rendered prompt (chat template + generation prompt) is about `tokens` tokens."""
    rng = random.Random(seed)
    overhead = len(tokenizer.encode_chat([{"role": "user", "content": ""}]))
    out = []
    for _ in range(n):
        lines = []
        for k in range(60):  # more than enough text, cut to length below
            words = " ".join(rng.choice(WORDS) for _ in range(18))
            lines.append(f"{k + 1}. Item: {words}. Rating: {rng.randint(1, 5)}")
        ids = tokenizer.encode("Write a profile of this user from the history.\n" + "\n".join(lines),
                               add_special_tokens=False)[:tokens - overhead]
        out.append([{"role": "user", "content": tokenizer.decode(ids)}])
    return out


def target_token(tokenizer) -> int:
    return int(tokenizer.encode(" the", add_special_tokens=False)[0])


def summary(times: list[float], phases: dict[str, list[float]]) -> dict:
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return {"s_per_step": round(mean(times), 3), "steps_s": [round(t, 3) for t in times],
            "phases": {k: round(mean(v), 3) for k, v in phases.items()}, "peak_rss_mb": round(peak_rss_mb(), 1)}


# ---- ours -------------------------------------------------------------------------------------------------------
def fixed_prompt_env(prompts: list[list[int]], target: int, tokenizer):
    """rl/envs.py's token-share environment over the benchmark's fixed chat prompts. Its rollouts end at EOS only
    (held back here until --new-tokens), as on TRL's side."""
    from rl.envs import TokenShareEnv

    env = TokenShareEnv(tokenizer, target, n_prompts=0)
    env.prompts = prompts
    return env


def run_ours(a) -> dict:
    import tempfile

    import torch

    import model.sampler as sampler
    import rl.grpo_trainer as grpo_trainer
    from rl import distributed as dist
    from rl.loop import Run, build_models
    from rl.optim import make_optimizer, make_scheduler
    from rl.tracking import Tracker

    torch.manual_seed(0)
    d = dist.setup("cpu")
    cfg = grpo_trainer.GRPOConfig(model=a.model, env="bench", prompts_per_step=a.prompts, group_size=G, temperature=1.0,
                        max_new_tokens=a.new_tokens, old_logprobs=a.old_logprobs, mini_batch_prompts=a.prompts,
                        micro_batch_rows=MICRO_ROWS, ppo_epochs=1, kl_coef=KL, lr=1e-6, log_text_every=0,
                        max_steps=a.steps + 1, device="cpu", lora_rank=a.lora_rank,
                        share_prompt_forward=not a.no_share_prompts,
                        activation_checkpointing=a.activation_checkpointing,
                        trainable_layers=a.trainable_layers)
    models = build_models(cfg, None, d)
    tok = models.tokenizer
    prompts = [tok.encode_chat(m) for m in prompt_messages(tok, a.prompt_tokens, a.prompts)]
    env = fixed_prompt_env(prompts, target_token(tok), tok)
    # exactly --new-tokens tokens per row, as TRL's min_new_tokens: EOS is held back until the last one
    def generate_full_length(model, prompts, max_new_tokens, **kw):
        return sampler.generate(model, prompts, max_new_tokens, min_new_tokens=max_new_tokens, **kw)

    grpo_trainer.generate = generate_full_length
    optimizer = make_optimizer(models.policy, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, 0, cfg.max_steps, "constant")
    run = Run(optimizer, scheduler, Tracker(tempfile.gettempdir(), enabled=False), 0, cfg.max_steps)
    times, phases = [], {"rollout": [], "scoring": [], "update": []}
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        m = grpo_trainer.grpo_step(step, cfg, models, env, run, d)
        dt = time.perf_counter() - t0
        mem = {k[len("mem_peak_gib_"):]: round(v * 1024) for k, v in m.items() if k.startswith("mem_peak_gib_")}
        print(f"ours step {step}{' (warm-up)' if step == 0 else ''}: {dt:.2f} s, rollout {m['time_rollout']:.2f} "
              f"scoring {m['time_scoring']:.2f} update {m['time_update']:.2f}, response length "
              f"{m['response_length']:.0f}, reward {m['reward_mean']:.4f}, kl {m['kl']:.2e}, peak RSS MiB by phase "
              f"{mem}", flush=True)
        if step == 0:
            continue
        times.append(dt)
        for k in phases:
            phases[k].append(m[f"time_{k}"])
    out = summary(times, phases)
    out.update(prompt_tokens=[len(p) for p in prompts], response_length=m["response_length"],
               old_logprobs=a.old_logprobs, peak_rss_mb_by_phase=mem)
    return out


# ---- TRL --------------------------------------------------------------------------------------------------------
def run_trl(a) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from model import load_tokenizer, resolve_model

    torch.manual_seed(0)
    path = str(resolve_model(a.model))
    tok = load_tokenizer(a.model)
    target = target_token(tok)
    messages = prompt_messages(tok, a.prompt_tokens, a.prompts)
    dataset = Dataset.from_list([{"prompt": m} for m in messages])

    def reward_token_share(prompts, completions, completion_ids, **kw):
        return [token_share([int(t) for t in c], target) for c in completion_ids]  # rl/envs.py's reward

    phases = {"rollout": 0.0, "scoring": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *args, **kw):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*args, **kw)
            phases["rollout"] += time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, *args, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kw)
            phases["scoring"] += time.perf_counter() - t0  # includes rollout: subtracted below
            return out

    times, per_phase, lengths = [], {"rollout": [], "scoring": [], "update": []}, []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            phases.update(rollout=0.0, scoring=0.0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            step = state.global_step - 1
            buf = trainer._buffered_inputs
            n = int(sum(b["completion_mask"].sum() for b in buf)) / sum(b["completion_mask"].shape[0] for b in buf)
            r, s = phases["rollout"], phases["scoring"] - phases["rollout"]
            print(f"trl  step {step}{' (warm-up)' if step == 0 else ''}: {dt:.2f} s, rollout {r:.2f} scoring {s:.2f} "
                  f"update {dt - r - s:.2f}, response length {n:.0f}", flush=True)
            if step > 0:
                times.append(dt)
                lengths.append(n)
                for k, v in (("rollout", r), ("scoring", s), ("update", dt - r - s)):
                    per_phase[k].append(v)

    peft_config = None
    if a.lora_rank:  # the same adapters as ours: every attention and MLP projection, our default alpha, no dropout
        from peft import LoraConfig

        from rl.loop import RunConfig

        peft_config = LoraConfig(r=a.lora_rank, lora_alpha=RunConfig.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(RunConfig().lora_targets), task_type="CAUSAL_LM")
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"), use_cpu=True, bf16=False, fp16=False,
        model_init_kwargs={"dtype": torch.float32}, num_generations=G, per_device_train_batch_size=MICRO_ROWS,
        gradient_accumulation_steps=a.prompts * G // MICRO_ROWS, max_completion_length=a.new_tokens,
        generation_kwargs={"min_new_tokens": a.new_tokens}, temperature=1.0, top_p=1.0, top_k=0, beta=KL,
        num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group", learning_rate=1e-6,
        weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, use_vllm=False,
        max_steps=a.steps + 1, report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
        log_completions=False, seed=0, dataloader_num_workers=0, gradient_checkpointing=a.activation_checkpointing)
    trainer = TimedGRPOTrainer(model=path, reward_funcs=reward_token_share, args=args, train_dataset=dataset,
                               callbacks=[StepTimer()], peft_config=peft_config)
    trainer.train()
    out = summary(times, per_phase)
    texts = [trainer.processing_class.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
             for m in messages]
    out.update(prompt_tokens=[len(trainer.processing_class(t, add_special_tokens=False)["input_ids"]) for t in texts],
               response_length=sum(lengths) / max(1, len(lengths)))
    return out


# ---- driver -----------------------------------------------------------------------------------------------------
def child(side: str, a, lora_rank: int = 0, trainable_layers: int = 0) -> dict:
    return run_side(__file__, side, ["--steps", str(a.steps), "--threads", str(a.threads),
                                     "--old-logprobs", a.old_logprobs, "--prompt-tokens", str(a.prompt_tokens),
                                     "--new-tokens", str(a.new_tokens), "--model", a.model,
                                     "--prompts", str(a.prompts), "--lora-rank", str(lora_rank),
                                     "--trainable-layers", str(trainable_layers)]
                    + (["--no-share-prompts"] if a.no_share_prompts else [])
                    + ([] if a.activation_checkpointing else ["--no-activation-checkpointing"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per side (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--old-logprobs", default="sampler", choices=["sampler", "recompute"],
                   help="ours: old log-probs from the sampler (no extra forward, as TRL here) or recomputed")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="prompt length (default 500)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens per sample (default 128)")
    p.add_argument("--model", default=MODEL, help="model name or HF directory (both sides)")
    p.add_argument("--prompts", type=int, default=N_PROMPTS,
                   help=f"prompts per step, {G} samples each, micro-batches of {MICRO_ROWS} rows (default 4)")
    p.add_argument("--no-share-prompts", action="store_true",
                   help="ours: run every row whole (prompt + completion), as TRL does")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="both sides recompute each block's activations in the backward (TRL's GRPOConfig default, "
                        "gradient_checkpointing=True); --no-activation-checkpointing: neither side")
    p.add_argument("--side", choices=["ours", "trl"], help="run one side in this process (used internally)")
    p.add_argument("--lora-rank", type=int, default=0, help="(one side) the policy with LoRA adapters of this rank")
    p.add_argument("--trainable-layers", type=int, default=0, help="(one side) train only our top N blocks")
    p.add_argument("--variants", nargs="*", default=[], metavar="lora:R | top:N",
                   help="also time our step with LoRA of rank R (the reference = the adapters off) or with only the "
                        "top N blocks trained, each against our full fine-tuning, and lora:R against TRL with a "
                        "PEFT LoRA of the same rank: e.g. --variants lora:16 top:4")
    a = p.parse_args()
    if a.prompts * G % MICRO_ROWS:
        p.error(f"--prompts x {G} samples must be a multiple of the {MICRO_ROWS}-row micro-batch")
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
    print(f"ours {ours['s_per_step']:.2f} s/step {ours['phases']}, peak RSS {ours['peak_rss_mb']:.0f} MiB")
    if trl:
        ratio = trl["s_per_step"] / ours["s_per_step"]
        print(f"trl  {trl['s_per_step']:.2f} s/step {trl['phases']}, peak RSS {trl['peak_rss_mb']:.0f} MiB")
        print(f"ratio trl/ours {ratio:.2f} (target >= 2.5), peak RSS ours/trl "
              f"{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f} (target <= 0.6), wall {time.perf_counter() - t0:.0f} s")
    else:
        ratio = None
        print(f"trl  not installed (pip install -r requirements-bench.txt): our side only, wall "
              f"{time.perf_counter() - t0:.0f} s")
    variants = {}
    for v in a.variants:  # our step with fewer trainable weights, as ratios to our full fine-tuning
        kind, _, n = v.partition(":")
        if kind not in ("lora", "top") or not n.isdigit():
            p.error(f"--variants {v!r}: expected lora:RANK or top:LAYERS")
        res = child("ours", a, lora_rank=int(n)) if kind == "lora" else child("ours", a, trainable_layers=int(n))
        variants[v] = {"s_per_step": res["s_per_step"], "peak_rss_mb": res["peak_rss_mb"],
                       "speedup_vs_full": round(ours["s_per_step"] / res["s_per_step"], 3),
                       "rss_vs_full": round(res["peak_rss_mb"] / ours["peak_rss_mb"], 3)}
        print(f"ours {v}: {res['s_per_step']:.2f} s/step, peak RSS {res['peak_rss_mb']:.0f} MiB")
        if kind == "lora" and trl_version:  # TRL's GRPOTrainer with a PEFT LoRA of the same rank and targets
            tr = child("trl", a, lora_rank=int(n))
            variants[v].update(trl_s_per_step=tr["s_per_step"], trl_peak_rss_mb=tr["peak_rss_mb"],
                               ratio=round(tr["s_per_step"] / res["s_per_step"], 3),
                               rss_vs_trl=round(res["peak_rss_mb"] / tr["peak_rss_mb"], 3))
            print(f"trl  {v} (PEFT): {tr['s_per_step']:.2f} s/step, peak RSS {tr['peak_rss_mb']:.0f} MiB, "
                  f"ratio trl/ours {variants[v]['ratio']:.2f}")
    t = (lambda k: trl[k]) if trl else (lambda k: None)  # noqa: E731  TRL's figure, or null without TRL
    print(json.dumps({"ours_s_per_step": ours["s_per_step"], "trl_s_per_step": t("s_per_step"),
                      "ratio": None if ratio is None else round(ratio, 3), "target_ratio": 2.5,
                      "rss_ratio": None if ratio is None else round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
                      "target_rss_ratio": 0.6,
                      "ok": None if ratio is None else ratio >= 2.5 and ours["peak_rss_mb"] <= 0.6 * trl["peak_rss_mb"],
                      "trl": trl_version or "not installed",
                      "ours_phases": ours["phases"], "trl_phases": t("phases"),
                      "ours_peak_rss_mb": ours["peak_rss_mb"],
                      "ours_peak_rss_mb_by_phase": ours.get("peak_rss_mb_by_phase"),
                      "trl_peak_rss_mb": t("peak_rss_mb"),
                      "ours_steps_s": ours["steps_s"], "trl_steps_s": t("steps_s"),
                      "prompt_tokens": ours["prompt_tokens"], "trl_prompt_tokens": t("prompt_tokens"),
                      "response_length": ours["response_length"], "trl_response_length": t("response_length"),
                      "share_prompts": not a.no_share_prompts, "activation_checkpointing": a.activation_checkpointing,
                      "old_logprobs": a.old_logprobs, "new_tokens": a.new_tokens, "steps": a.steps, "threads": a.threads,
                      "model": a.model, "prompts": a.prompts, "variants": variants}))


if __name__ == "__main__":
    main()
