"""A check of the GPU path on one GPU without internet: random weights of Qwen3-0.6B's shapes (model/known_configs.py)
and a byte-level tokenizer with Qwen3's chat template (its thinking switch included), no download. Stages:

    build    the checkpoint directory (model, tokenizer, chat template)
    kernels  bf16 against fp32 logits of the same weights; decode tokens/s against the HBM bandwidth bound; a
             training forward and backward's MFU and peak memory; chunked sampling against one batch on the device
    grpo     two GRPO steps of the trainer on the toy task (run under torchrun with --fsdp: process group, FSDP2,
             bf16 param_dtype, as on 8 GPUs), each phase's peak memory against rl/memory.py's plan
    dpo      two DPO steps on toy pairs over a small synthetic catalogue, likewise
    report   the stages' JSON parts (and the shell's status of each) as one JSON: $OUT/gpu_check.json, or stdout

scripts/gpu_check.sh runs them in order, each under a time limit. `--device cpu --tiny` runs the same code on a
tiny model of the same family in seconds (tests/test_gpu_check.py).

    python scripts/gpu_check.py build --out /tmp/gc/model
    python scripts/gpu_check.py kernels --model /tmp/gc/model --json /tmp/gc/kernels.json
    torchrun --nproc_per_node=1 scripts/gpu_check.py grpo --model /tmp/gc/model --work /tmp/gc --json /tmp/gc/grpo.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 1024 ** 3
# Qwen3's generation prompt and its thinking switch: with enable_thinking false the template closes an empty
# <think> block, so the answer starts at once (model/tokenizer.py renders prompts that way by default)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=320)


def sizes(tiny: bool) -> dict:
    """The shapes of each measurement: the real ones, or a few tokens on the tiny model."""
    if tiny:
        return dict(logit_rows=2, logit_len=16, decode_prompts=1, group=4, decode_prompt=16, decode_new=8,
                    train_rows=2, train_len=32, train_new=16, grpo_prompts=2, grpo_prompt=12, grpo_new=8,
                    dpo_prompt=1024, dpo_new=16, dpo_pairs=4, dpo_history=2, dpo_review_chars=20)
    return dict(logit_rows=4, logit_len=512, decode_prompts=8, group=8, decode_prompt=512, decode_new=128,
                train_rows=8, train_len=2048, train_new=512, grpo_prompts=8, grpo_prompt=512, grpo_new=256,
                dpo_prompt=4096, dpo_new=64, dpo_pairs=8, dpo_history=20, dpo_review_chars=200)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def need_device(device: str):
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {device} but CUDA is not available (torch {torch.__version__}, "
              f"torch.version.cuda {torch.version.cuda})", file=sys.stderr)
        sys.exit(3)


# ---- build ----------------------------------------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level BPE without merges (every byte a token) plus Qwen's special tokens, EOS <|im_end|>, and the chat
    template above: what our Tokenizer needs of a Qwen3 tokenizer, built offline."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw = RawTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build(out: Path, tiny: bool = False, seed: int = 0) -> dict:
    """A model directory loadable by load_model / load_tokenizer: Qwen3-0.6B's config (or a tiny one of the same
    family) with random weights (std 0.02) saved in bf16, and the byte-level tokenizer."""
    from model import Tokenizer, Transformer, save_model
    from model.config import ModelConfig
    from model.known_configs import known_config

    hf = byte_tokenizer()
    d = known_config("qwen3-0.6b")
    d.update(bos_token_id=hf.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=hf.eos_token_id)
    if tiny:
        d.update(TINY)
    cfg = ModelConfig.from_dict(d, source="gpu_check")
    t = time.perf_counter()
    model = Transformer(cfg).init_weights(seed=seed).to(torch.float32 if tiny else torch.bfloat16)
    save_model(model, Tokenizer(hf), out)
    return {"model_dir": str(out), "params": sum(p.numel() for p in model.parameters()),
            "tokenizer_size": len(hf), "seconds": time.perf_counter() - t}


# ---- kernels --------------------------------------------------------------------------------------------------------
def logits_bf16_vs_fp32(model_dir, device, z: dict) -> dict:
    """The same random weights in fp32 and in bf16, one forward each: the largest difference of the logits."""
    from model import load_model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (z["logit_rows"], z["logit_len"]), generator=g).to(device)
    with torch.no_grad():
        ref = load_model(model_dir, dtype=torch.float32, device=device)(ids).float()
        low = load_model(model_dir, dtype=torch.bfloat16, device=device)(ids).float()
    diff = (low - ref).abs()
    return {"logits_max_abs_diff_bf16_fp32": float(diff.max()), "logits_mean_abs_diff_bf16_fp32": float(diff.mean()),
            "logits_fp32_std": float(ref.std()), "logits_shape": list(ref.shape)}


def decode_speed(model, tok, device, z: dict, hbm: float) -> dict:
    """Sampling with every row running to max_new_tokens: decode tokens/s (the time of N steps less that of one)
    against the bound of reading the weights and the rows' KV cache from HBM at each step."""
    from model.sampler import generate

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (z["decode_prompt"],), generator=g).tolist() for _ in range(z["decode_prompts"])]
    n, N = z["group"], z["decode_new"]
    kw = dict(n=n, temperature=1.0, eos_ids=tok.eos_ids, pad_id=tok.pad_token_id, vocab_limit=tok.vocab_size)
    generate(model, prompts, 2, min_new_tokens=2, **kw)  # warm-up
    times = []
    for steps in (1, N):
        sync(device)
        t = time.perf_counter()
        generate(model, prompts, steps, min_new_tokens=steps, **kw)
        sync(device)
        times.append(time.perf_counter() - t)
    rows, decode_s = len(prompts) * n, max(1e-9, times[1] - times[0])
    c = model.compute_dtype().itemsize
    weights = c * sum(p.numel() for p in model.parameters())
    slot = model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * model.config.head_dim * c
    kv = rows * (z["decode_prompt"] + N / 2) * slot  # the cache read at an average step
    step_bound = (weights + kv) / hbm
    achieved = rows * (N - 1) / decode_s
    return {"decode_rows": rows, "decode_prompt_tokens": z["decode_prompt"], "decode_new_tokens": N,
            "prefill_and_first_step_s": times[0], "decode_s": decode_s, "decode_tokens_per_s": achieved,
            "decode_step_ms": 1e3 * decode_s / (N - 1), "decode_bound_step_ms": 1e3 * step_bound,
            "decode_bound_tokens_per_s": rows / step_bound, "decode_fraction_of_bound": achieved * step_bound / rows,
            "decode_bytes_per_step_weights": weights, "decode_bytes_per_step_kv_avg": kv}


def chunked_vs_one_batch(model, tok, z: dict) -> dict:
    """Sampling the same prompts in one batch and in chunks of half the prompts (the same seeds): how many rows
    come out identical on this device (all of them on one CPU thread; kernels picked for another batch size may
    round differently)."""
    from model.sampler import generate

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (z["decode_prompt"] - 3 * i,), generator=g).tolist()
               for i in range(max(2, z["decode_prompts"]))]
    kw = dict(n=z["group"], temperature=1.0, eos_ids=tok.eos_ids, pad_id=tok.pad_token_id,
              vocab_limit=tok.vocab_size, seed=3)
    one = generate(model, prompts, z["decode_new"], **kw)
    part = generate(model, prompts, z["decode_new"], chunk_prompts=len(prompts) // 2, **kw)
    L = min(one.tokens.shape[1], part.tokens.shape[1])
    same_rows = (one.tokens[:, :L] == part.tokens[:, :L]).all(1) & (one.lengths == part.lengths)
    return {"chunked_rows_identical": int(same_rows.sum()), "chunked_rows": int(same_rows.numel()),
            "chunked_logprob_max_abs_diff": float((one.logprobs[:, :L] - part.logprobs[:, :L]).abs().max())}


def train_speed(model_dir, device, z: dict, peak_flops: float, checkpointing: bool) -> dict:
    """Forward and backward of a micro-batch through our log-prob path (fp32 masters computing in bf16 under
    autocast, as one process trains): seconds per step, MFU = 6 x parameters x tokens / time / peak (attention's
    own FLOPs and the recomputation of checkpointing not counted), and the peak of allocated memory."""
    from model import load_model
    from rl.rollout import completion_logprobs, make_batch

    cuda = torch.device(device).type == "cuda"
    model = load_model(model_dir, dtype=torch.float32, device=device).train()
    if cuda:
        model.autocast_dtype = torch.bfloat16
    model.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(4)
    rows, T, L = z["train_rows"], z["train_len"], z["train_new"]
    prompts = [torch.randint(3, 256, (T - L,), generator=g).tolist() for _ in range(rows)]
    comps = [torch.randint(3, 256, (L,), generator=g).tolist() for _ in range(rows)]
    batch = make_batch(prompts, comps, pad_id=0).to(device)

    def step():
        logp, _ = completion_logprobs(model, batch, 1.0, with_entropy=True, vocab_limit=256, chunk_tokens=1024)
        logp.mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        step()
    sync(device)
    seconds = (time.perf_counter() - t) / repeats
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * rows * T
    tag = "ckpt" if checkpointing else "plain"
    out = {f"train_{tag}_tokens": rows * T, f"train_{tag}_step_s": seconds,
           f"train_{tag}_tokens_per_s": rows * T / seconds, f"train_{tag}_mfu": flops / seconds / peak_flops}
    if cuda:
        out[f"train_{tag}_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def attention_backends(device) -> dict:
    """Which fused SDPA kernels accept our padded (masked) grouped-query attention at Qwen3-0.6B's head shapes:
    without one, SDPA falls back to the math kernel, whose (rows, heads, T, T) scores dominate memory."""
    if torch.device(device).type != "cuda":
        return {}
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    q = torch.zeros(2, 16, 256, 128, device=device, dtype=torch.bfloat16)
    kv = torch.zeros(2, 8, 256, 128, device=device, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 256, 256, device=device, dtype=torch.bool)
    out = {}
    for name, m, causal in (("masked", mask, False), ("causal", None, True)):
        try:
            params = SDPAParams(q, kv, kv, m, 0.0, causal, True)
        except TypeError:  # versions whose SDPAParams lack enable_gqa
            params = SDPAParams(q, kv, kv, m, 0.0, causal)
        out[f"sdpa_{name}_gqa_flash"] = bool(can_use_flash_attention(params, False))
        out[f"sdpa_{name}_gqa_efficient"] = bool(can_use_efficient_attention(params, False))
        cudnn = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
        if cudnn is not None:
            out[f"sdpa_{name}_gqa_cudnn"] = bool(cudnn(params, False))
    return out


def kernels(model_dir: Path, device: str, tiny: bool, hbm: float, peak_flops: float, json_path: Path | None) -> dict:
    """Every measurement of this stage; one that fails leaves its error in the figures and the next one runs, and
    the figures so far are written after each (a stage stopped at its time limit keeps what it measured)."""
    from model import load_model, load_tokenizer

    z = sizes(tiny)
    tok = load_tokenizer(model_dir)
    out = {"device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
           "torch": torch.__version__, "hbm_bytes_per_s": hbm, "peak_flops": peak_flops}
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = None

    def sampling_model():
        nonlocal model
        if model is None:
            model = load_model(model_dir, dtype=dtype, device=device)
        return model

    steps = [("sdpa", lambda: attention_backends(device)),
             ("logits", lambda: logits_bf16_vs_fp32(model_dir, device, z)),
             ("decode", lambda: decode_speed(sampling_model(), tok, device, z, hbm)),
             ("chunked", lambda: chunked_vs_one_batch(sampling_model(), tok, z)),
             ("train_plain", lambda: train_speed(model_dir, device, z, peak_flops, False)),
             ("train_ckpt", lambda: train_speed(model_dir, device, z, peak_flops, True))]
    for name, measure in steps:
        if name.startswith("train"):
            model = None  # the sampling copy is not needed any more
        try:
            out.update(measure())
        except Exception as e:  # noqa: BLE001 (a failed measurement is a figure of the check)
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"
        if json_path is not None:
            json_path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return out


# ---- training steps under torchrun ----------------------------------------------------------------------------------
def compare_with_plan(metrics: dict, plan, names: dict) -> dict:
    """Measured peak per phase (the trainer's mem_peak_gib_*) against the plan's figure: GiB each and the ratio."""
    totals = plan.totals()
    out = {}
    for phase, key in names.items():
        measured = metrics.get(f"mem_peak_gib_{key}")
        planned = totals[phase] / GIB
        out[key] = {"measured_gib": measured, "planned_gib": planned,
                    "ratio": None if measured is None else measured / planned}
    return out


def grpo(model_dir: Path, work: Path, device: str, tiny: bool, fsdp: bool) -> dict:
    """Two GRPO steps on the toy task (the second has Adam's state, as every later step), the rollout in two
    chunks (--rollout-tokens), activation checkpointing, chunked log-probs: the flags of duet-paper at a small
    scale. Per-phase peaks against the plan for the same flags on this one device."""
    from model import load_tokenizer
    from model.known_configs import model_config
    from rl.config import parse_config
    from rl.envs import TokenShareEnv
    from rl.grpo_trainer import PRESETS, GRPOConfig, train
    from rl.memory import grpo_plan, model_shapes

    z = sizes(tiny)
    P, N, G, prompts = z["grpo_prompt"], z["grpo_new"], z["group"], z["grpo_prompts"]
    argv = ["--env", "toy", "--model", str(model_dir), "--device", device, "--prompts-per-step", str(prompts),
            "--mini-batch-prompts", str(prompts), "--group-size", str(G), "--micro-batch-rows", str(G),
            "--max-prompt-tokens", str(P), "--max-new-tokens", str(N), "--temperature", "1.0",
            "--rollout-tokens", str(prompts // 2 * G * (P + N)), "--activation-checkpointing",
            "--max-steps", "2", "--save-every", "0", "--val-every", "0", "--log-text-every", "0",
            "--run-dir", str(work / "grpo_run"), *(["--fsdp"] if fsdp else [])]
    cfg = parse_config(GRPOConfig, PRESETS, argv)[0]
    tok = load_tokenizer(model_dir)
    env = TokenShareEnv(tok, target_token=tok.encode("e", add_special_tokens=False)[0], n_prompts=4 * prompts,
                        prompt_len=P)
    t = time.perf_counter()
    last = train(cfg, env=env)
    seconds = time.perf_counter() - t
    c = 2 if torch.device(device).type == "cuda" else 4
    plan = grpo_plan(cfg, model_shapes(model_config(model_dir)), gpus=1, c=c, fsdp=fsdp)
    keep = ("time_rollout", "time_scoring", "time_update", "tokens_per_second", "response_length", "loss", "kl",
            "grad_norm", "entropy", "reward_mean")
    return {"seconds": seconds, "fsdp": fsdp, "argv": argv, **{k: last.get(k) for k in keep},
            "memory": compare_with_plan(last, plan, {"rollout": "rollout", "old/ref log-probs": "logprobs",
                                                     "update": "update"}),
            "plan_gib": {k: v / GIB for k, v in plan.totals().items()}}


def toy_dataset(dest: Path) -> Path:
    """A small synthetic catalogue in the canonical format (30 users, 50 items)."""
    from data.process import prepare
    from data.synthetic import generate

    if not (dest / "manifest.json").exists():
        files = generate(dest.parent / f"{dest.name}_raw", seed=0, n_users=30, n_items=50, min_per_user=20,
                         max_per_user=30)
        prepare("synthetic", files["reviews"], dest, meta=files["meta"], oracle=files["oracle"], overwrite=True)
    return dest


def toy_pairs(data_dir: Path, n: int) -> list[dict]:
    """n users, each with a fixed chosen and a fixed rejected profile."""
    from data import load_dataset

    ds = load_dataset(data_dir)
    train_rows = ds.split("train")
    users = sorted({x.user_id for x in train_rows})[:n]
    return [{"user_id": u, "t_cut": max(x.timestamp for x in train_rows if x.user_id == u),
             "chosen": "Likes calm jazz from the fifties; rates most albums 4 or 5.",
             "rejected": "Hates everything.", "chosen_score": 0.9, "rejected_score": 0.4, "chosen_from": "toy",
             "rejected_from": "toy"} for u in users]


def dpo(model_dir: Path, work: Path, device: str, tiny: bool, fsdp: bool) -> dict:
    """Two DPO steps on toy pairs (prompts of the lg style over the synthetic catalogue, byte tokens), with
    activation checkpointing and chunked log-probs; the update's peak against the plan."""
    from model.known_configs import model_config
    from rl import dpo_trainer
    from rl.config import parse_config
    from rl.lettingo import write_jsonl
    from rl.memory import dpo_plan, model_shapes

    z = sizes(tiny)
    run_dir = work / "dpo_run"
    run_dir.mkdir(parents=True, exist_ok=True)
    data = toy_dataset(work / "dpo_data")
    write_jsonl(run_dir / "pairs.jsonl", toy_pairs(data, z["dpo_pairs"]))
    argv = ["--model", str(model_dir), "--data", str(data), "--run-dir", str(run_dir), "--stage", "train",
            "--device", device, "--pairs-per-step", str(z["dpo_pairs"]), "--micro-batch-pairs", str(z["dpo_pairs"]),
            "--user-history", str(z["dpo_history"]), "--review-chars", str(z["dpo_review_chars"]),
            "--max-prompt-tokens", str(z["dpo_prompt"]),
            "--max-new-tokens", str(z["dpo_new"]), "--activation-checkpointing", "--max-steps", "2",
            "--save-every", "0", "--val-every", "0", "--log-text-every", "0", *(["--fsdp"] if fsdp else [])]
    cfg = parse_config(dpo_trainer.DPOConfig, dpo_trainer.PRESETS, argv)[0]
    t = time.perf_counter()
    last = dpo_trainer.train(cfg)
    seconds = time.perf_counter() - t
    c = 2 if torch.device(device).type == "cuda" else 4
    plan = dpo_plan(cfg, model_shapes(model_config(model_dir)), gpus=1, c=c, fsdp=fsdp)
    return {"seconds": seconds, "fsdp": fsdp, "argv": argv,
            **{k: last.get(k) for k in ("loss", "reward_accuracy", "reward_margin", "grad_norm")},
            "memory": compare_with_plan(last, plan, {"update": "update"}),
            "plan_gib": {k: v / GIB for k, v in plan.totals().items()}}


# ---- report ---------------------------------------------------------------------------------------------------------
def report(parts: list[Path], status: Path | None, out: Path | None) -> dict:
    """One JSON of every stage's figures, with the shell's exit status and seconds of each stage when given."""
    result = {"stages": {}}
    if status is not None and status.exists():
        for line in status.read_text().splitlines():
            name, rc, seconds = line.split()
            result["stages"][name] = {"ok": rc == "0", "exit_status": int(rc), "seconds": float(seconds)}
    for p in parts:
        if p.exists():
            result[p.stem] = json.loads(p.read_text())
    result["ok"] = bool(result["stages"]) and all(s["ok"] for s in result["stages"].values())
    text = json.dumps(result, indent=1, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    else:
        print(text)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=("build", "kernels", "grpo", "dpo", "report"))
    p.add_argument("--model", type=Path, help="the directory `build` wrote")
    p.add_argument("--out", type=Path, help="build: the model directory to write; report: the JSON file")
    p.add_argument("--work", type=Path, help="grpo, dpo: a scratch directory (run directories, toy data)")
    p.add_argument("--json", type=Path, help="write this stage's figures here (else stdout)")
    p.add_argument("--parts", type=Path, nargs="*", default=[], help="report: the stages' JSON files")
    p.add_argument("--status", type=Path, help="report: lines 'stage exit_status seconds' from the shell")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same family (CPU tests)")
    p.add_argument("--no-fsdp", action="store_true", help="grpo, dpo: one process without FSDP")
    p.add_argument("--hbm-bytes-per-s", type=float, default=4.8e12, help="H200: 4.8 TB/s")
    p.add_argument("--peak-flops", type=float, default=989e12, help="H200 bf16 dense: 989 TFLOP/s")
    args = p.parse_args(argv)
    if args.stage == "report":
        report(args.parts, args.status, args.out)
        return
    if args.stage == "build":  # on the CPU: no device needed
        result = build(args.out, args.tiny)
    elif need_device(args.device) or args.stage == "kernels":
        result = kernels(args.model, args.device, args.tiny, args.hbm_bytes_per_s, args.peak_flops, args.json)
    elif args.stage == "grpo":
        result = grpo(args.model, args.work, args.device, args.tiny, not args.no_fsdp)
    else:
        result = dpo(args.model, args.work, args.device, args.tiny, not args.no_fsdp)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
    from rl.distributed import exit_if_distributed

    exit_if_distributed()
