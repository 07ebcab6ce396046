"""Memory per GPU of each phase of a training run, from the model's config and the trainer's flags (rl/memory.py),
before any GPU is touched. Offline: the presets' models are known by name (model/known_configs.py).

    python scripts/plan_memory.py --preset duet-paper --gpus 8 --gpu-mem-gib 80
    python scripts/plan_memory.py --preset lettingo-paper --gpus 8 --gpu-mem-gib 80        # DPO (LettinGo)
    python scripts/plan_memory.py --preset duet-paper --gpus 8 --rollout-tokens 80000 --micro-batch-rows 4
    python scripts/plan_memory.py --preset duet-paper --model-config path/to/config.json --check

Every trainer flag is accepted (--trainer grpo | dpo picks the trainer when the preset does not: cpu-demo is
GRPO's unless told). Prints a table (GiB per phase and its largest parts) and one JSON line; --check exits with
status 2 and says which phase does not fit when a phase's estimate plus --reserve-gib exceeds --gpu-mem-gib.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.known_configs import model_config  # noqa: E402
from rl import dpo_trainer, grpo_trainer  # noqa: E402
from rl.config import parse_config  # noqa: E402
from rl.memory import GIB, dpo_plan, grpo_plan, model_shapes  # noqa: E402

TRAINERS = {"grpo": (grpo_trainer.GRPOConfig, grpo_trainer.PRESETS),
            "dpo": (dpo_trainer.DPOConfig, dpo_trainer.PRESETS)}
ADVICE = {"load": "more GPUs (each rank holds its shards of the policy and the frozen models)",
          "rollout": "a smaller --rollout-tokens (fewer prompts decoded at once)",
          "explore": "fewer --samples or a shorter --max-new-tokens",
          "log-probs": "a smaller --micro-batch-rows / --micro-batch-pairs or --logprob-chunk-tokens",
          "update": "--activation-checkpointing, a smaller --micro-batch-rows / --micro-batch-pairs or "
                    "--logprob-chunk-tokens"}


def own_flags(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--gpus", type=int, default=8, help="GPUs the run shards over (FSDP ranks)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    p.add_argument("--reserve-gib", type=float, default=3.0,
                   help="kept free for the CUDA context, NCCL and the allocator's fragmentation")
    p.add_argument("--trainer", choices=sorted(TRAINERS), default=None,
                   help="grpo | dpo; default: the trainer whose presets hold --preset (GRPO for cpu-demo)")
    p.add_argument("--model-config", default=None,
                   help="the policy's config: a known name (Qwen/Qwen3-8B, qwen3-0.6b, ...), a model directory or "
                        "a config.json; default: --model")
    p.add_argument("--check", action="store_true", help="exit 2 when a phase does not fit")
    p.add_argument("-h", "--help", action="store_true")
    return p, *p.parse_known_args(argv)


def trainer_of(args, rest) -> str:
    if args.trainer:
        return args.trainer
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    preset = pre.parse_known_args(rest)[0].preset
    if preset and preset not in grpo_trainer.PRESETS and preset in dpo_trainer.PRESETS:
        return "dpo"
    return "grpo"


def make_plan(args, rest):
    trainer = trainer_of(args, rest)
    cls, presets = TRAINERS[trainer]
    cfg, preset = parse_config(cls, presets, rest)
    c = 4 if cfg.dtype == "float32" else 2  # the trainers compute in bf16 on GPUs unless told
    shapes = model_shapes(model_config(args.model_config or cfg.model))
    recommender = None if cfg.recommender == "reference" else model_shapes(model_config(cfg.recommender))
    fsdp = True if cfg.fsdp else None  # --fsdp shards on one GPU too
    if trainer == "grpo":
        plan = grpo_plan(cfg, shapes, args.gpus, c, recommender, fsdp)
    else:
        explorers = [model_shapes(model_config(e)) for e in cfg.explorers]
        plan = dpo_plan(cfg, shapes, args.gpus, c, explorers, recommender, fsdp)
    plan.info.update(preset=preset, model=args.model_config or cfg.model)
    return plan


def table(plan, args) -> str:
    i = plan.info
    head = (f"{i.get('preset') or 'flags'} ({i['trainer']}): {i['model']}, {i['params'] / 1e9:.2f} B parameters "
            f"({i['trainable'] / 1e9:.2f} B trained), {args.gpus} GPU(s) x {args.gpu_mem_gib:g} GiB, "
            f"{'bf16' if i['compute_bytes'] == 2 else 'fp32'} compute")
    if i["trainer"] == "grpo":
        head += (f"\nper rank: {i['prompts_per_rank']} prompts x G={i['group_size']}, prompt {i['prompt_tokens']} + "
                 f"new {i['new_tokens']} tokens, rollout in {i['rollout_chunks']} chunk(s) of "
                 f"{i['rollout_chunk_prompts']} prompt(s); micro-batch {i['micro_batch_rows']} rows")
    else:
        head += (f"\nper rank: micro-batch {i['micro_batch_rows']} rows (chosen + rejected) of prompt "
                 f"{i['prompt_tokens']} + {i['new_tokens']} tokens")
    head += (f"; log-prob chunk {i['logprob_chunk_tokens'] or 'off'}; activation checkpointing "
             f"{'on' if i['activation_checkpointing'] else 'off'}")
    budget = args.gpu_mem_gib - args.reserve_gib
    lines = [head, "", f"{'phase':<34}{'GiB':>8}  fits ({budget:g} GiB after a {args.reserve_gib:g} GiB reserve)",
             "-" * 100]
    for name, parts in plan.phases.items():
        total = sum(parts.values()) / GIB
        lines.append(f"{name:<34}{total:>8.2f}  {'yes' if total <= budget else 'NO'}")
        for part, size in sorted(parts.items(), key=lambda kv: -kv[1]):
            if size / GIB >= 0.005:
                lines.append(f"    {part:<48}{size / GIB:>8.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser, args, rest = own_flags(argv)
    if args.help:
        parser.print_help()
        print("\nand every flag of the trainer (scripts/train_grpo.py --help, scripts/train_dpo.py --help)")
        return
    try:
        plan = make_plan(args, rest)
    except FileNotFoundError as e:
        print(f"error: {e} (pass --model-config NAME|DIR|config.json)", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # a flag that does not fit the number of GPUs, an unsupported config
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(plan, args))
    totals = {k: v / GIB for k, v in plan.totals().items()}
    budget = args.gpu_mem_gib - args.reserve_gib
    over = {k: v for k, v in totals.items() if v > budget}
    print(json.dumps({**plan.info, "gpu_mem_gib": args.gpu_mem_gib, "reserve_gib": args.reserve_gib,
                      "phases_gib": {k: round(v, 3) for k, v in totals.items()},
                      "parts_gib": {k: {p: round(b / GIB, 3) for p, b in parts.items()}
                                    for k, parts in plan.phases.items()},
                      "peak_phase": max(totals, key=totals.get), "peak_gib": round(max(totals.values()), 3),
                      "fits": not over}))
    if args.check and over:
        for name, gib in over.items():
            advice = next((a for k, a in ADVICE.items() if k in name), "")
            print(f"error: phase '{name}' needs {gib:.2f} GiB + {args.reserve_gib:g} GiB reserve > "
                  f"{args.gpu_mem_gib:g} GiB per GPU; try {advice}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
