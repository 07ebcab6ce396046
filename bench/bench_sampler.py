"""Our sampler against transformers' generate, same model, same prompts, same number of new tokens.

    python bench/bench_sampler.py [--model smollm2-135m-instruct] [--threads 2] [--repeats 2] [--compile]
                                  [--compile-decode]

(a) batch 16 chat prompts of different lengths, 128 new tokens forced (EOS held back on both sides), greedy;
(b) 4 prompts of about 500 tokens (--prompt-tokens) x 8 samples, 128 new tokens forced, temperature 1.0 (no top-k /
    top-p on either side): our group sampling (one prefill per prompt) against num_return_sequences=8.
Each side is warmed up, runs alternate (ours, theirs, ours, ...) and the best of --repeats counts, since other
jobs share the machine. The roofline: a decode step reads every weight once, so tokens/s <= rows x memory
bandwidth / weight bytes; the bandwidth is measured here (sum over a 512 MiB tensor). The last line is JSON.
--compile: our side runs `torch.compile(model, dynamic=True)` (the sampler is unchanged; the compile happens in the
warm-up and its seconds are reported apart); transformers stays eager, as a user calls it by default.
--compile-decode: our side samples with generate(compile_decode=True) (the static-shape decode step compiled whole;
CUDA graphs on CUDA), the prefill eager; --compile-mode applies to it too when given.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch  # noqa: E402

from model import load_model, load_tokenizer  # noqa: E402
from model.sampler import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT.parent / "shared" / "data" / "amazon-digital-music-2014-sample" / "reviews_Digital_Music_5.sample.json.gz"
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis briefly.",
             "Give me three tips for learning to play the guitar.", "Hi!", "What is 17 times 23?",
             "Describe the taste of a ripe mango to someone who has never had one.", "Name a famous composer.",
             "Why is the sky blue?", "Summarise the plot of Romeo and Juliet in two sentences.",
             "Suggest a name for a black cat.", "How do I boil an egg?", "What rhymes with orange?",
             "Write a short motivational message for a student before an exam.", "Translate 'good morning' to "
             "Spanish.", "List the planets of the solar system in order from the sun."]


def model_path(name: str):
    from model import resolve_model

    return resolve_model(name)


def bandwidth_gbs() -> float:
    """Memory read bandwidth: the best of a few sums over 512 MiB (far larger than any cache)."""
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def long_prompts(tok, n: int, target: int) -> list[list[int]]:
    """n chat prompts of about `target` tokens: real music reviews (or a fixed text) to profile a user from."""
    if REVIEWS.exists():
        with gzip.open(REVIEWS, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["reviewText"] for _, line in zip(range(400), f)]
    else:
        texts = ["The band plays a warm, unhurried set of songs with a clear voice and a steady rhythm."] * 400
    out = []
    for b in range(n):
        body = tok.encode(" ".join(texts[b * 40:(b + 1) * 40]), add_special_tokens=False)
        head = "Here are reviews written by one user. Write a short profile of the user's musical taste.\n\n"
        overhead = len(tok.encode_chat([{"role": "user", "content": head}]))
        size = target + 8 * (b - n // 2) - overhead  # lengths differ a little: left padding is exercised
        if size < 1:  # body[:size] would then keep nearly all of it
            raise SystemExit(f"--prompt-tokens {target} is too short: the chat template and instruction alone take "
                             f"{overhead} tokens")
        content = head + tok.decode(body[:size])
        out.append(tok.encode_chat([{"role": "user", "content": content}]))
    return out


def hf_run(hf, prompts, pad_id, new, n=1, sample=False):
    P = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=True, temperature=1.0, top_k=None, top_p=None) if sample else dict(do_sample=False)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          num_return_sequences=n, pad_token_id=pad_id, **kw)
    return out[:, P:]


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def compare(name, ours, theirs, rows, new, repeats, warm_tokens=4):
    """Warm both up (a short run; ours of warm_tokens), then alternate; best wall time of each. -> figures, last
    outputs"""
    warm, _ = timed(lambda: ours(warm_tokens))
    theirs(4)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        dt, o = timed(lambda: ours(new))
        t_ours.append(dt)
        dt, h = timed(lambda: theirs(new))
        t_hf.append(dt)
        print(f"  {name}: ours {rows * new / t_ours[-1]:.1f} tok/s, transformers {rows * new / t_hf[-1]:.1f} "
              f"tok/s", flush=True)
    ours_tps, hf_tps = rows * new / min(t_ours), rows * new / min(t_hf)
    return dict(ours_tok_s=round(ours_tps, 1), hf_tok_s=round(hf_tps, 1), ratio=round(ours_tps / hf_tps, 2),
                round_ratios=[round(h / o, 2) for o, h in zip(t_ours, t_hf)],  # each round's pair, side by side
                ours_warmup_s=round(warm, 1)), o, h


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side (best counts)")
    ap.add_argument("--repeats-b", type=int, default=1, help="timed runs per side for case (b), which is long")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=500, help="case (b): about this many tokens per prompt")
    ap.add_argument("--cases", default="ab", help="which cases to run: a, b or ab")
    ap.add_argument("--compile", action="store_true", help="our side: torch.compile(model, dynamic=True)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--compile-decode", action="store_true", help="our side: generate(compile_decode=True)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = model_path(args.model)
    model, tok = load_model(path), load_tokenizer(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors counted once
    bw = bandwidth_gbs()
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}, memory bandwidth {bw:.1f} GB/s, "
          f"weights {weight_bytes / 1e6:.0f} MB", flush=True)
    result = dict(model=str(path), threads=args.threads, bandwidth_gb_s=round(bw, 2),
                  weight_mb=round(weight_bytes / 1e6, 1), load_avg=round(os.getloadavg()[0], 1),
                  compiled=args.compile_mode if args.compile else False, compile_decode=args.compile_decode)
    # generate's compile_decode: True picks the mode by device; an explicit --compile-mode is passed on
    args.decode_kw = dict(compile_decode=(args.compile_mode if args.compile_mode != "default" else True)
                          if args.compile_decode else False)
    args.warm_tokens = args.new_tokens if args.compile_decode else 4  # a compiled step is compiled for one length
    if args.compile:  # every attribute the sampler reads (config, new_cache, ...) passes through to `model`
        model = torch.compile(model, dynamic=True, mode=args.compile_mode)

    if "a" in args.cases:
        result["a_batch16_greedy"] = case_a(model, tok, hf, bw, weight_bytes, args)
    if "b" in args.cases:
        result["b_group8_sampled"] = case_b(model, tok, hf, bw, weight_bytes, args)
    print(json.dumps(result))


def case_a(model, tok, hf, bw, weight_bytes, args):
    """(a) batch 16, forced length, greedy"""
    pad, V, new = tok.pad_token_id, tok.vocab_size, args.new_tokens
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    a, o, h = compare("(a) batch 16 greedy", lambda k: generate(
        model, prompts, k, temperature=0, eos_ids=tok.eos_ids, pad_id=pad, vocab_limit=V, min_new_tokens=k,
        **args.decode_kw),
        lambda k: hf_run(hf, prompts, pad, k), len(prompts), new, args.repeats, args.warm_tokens)
    a["same_tokens"] = bool(torch.equal(o.tokens, h))  # greedy: both sides must agree token for token
    a["bound_tok_s"] = round(len(prompts) * bw * 1e9 / weight_bytes, 1)
    a["bound_share"] = round(a["ours_tok_s"] / a["bound_tok_s"], 3)
    print(f"(a) {a}", flush=True)
    return a


def case_b(model, tok, hf, bw, weight_bytes, args):
    """(b) 4 long prompts x 8 samples at temperature 1.0"""
    pad, V, new = tok.pad_token_id, tok.vocab_size, args.new_tokens
    long = long_prompts(tok, 4, args.prompt_tokens)
    rows = 4 * 8
    b, o, h = compare("(b) 4x500 tokens x 8 samples", lambda k: generate(
        model, long, k, temperature=1.0, n=8, eos_ids=tok.eos_ids, pad_id=pad, vocab_limit=V, min_new_tokens=k,
        seed=0, **args.decode_kw), lambda k: hf_run(hf, long, pad, k, n=8, sample=True), rows, new, args.repeats_b,
        args.warm_tokens)
    b["prompt_lens"] = [len(p) for p in long]
    b["bound_tok_s"] = round(rows * bw * 1e9 / weight_bytes, 1)  # decode only: prefill and KV reads left out
    b["bound_share"] = round(b["ours_tok_s"] / b["bound_tok_s"], 3)
    print(f"(b) {b}", flush=True)
    return b


if __name__ == "__main__":
    main()
