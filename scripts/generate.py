"""Sample completions for a JSONL file of prompts.

    python scripts/generate.py --model smollm2-135m-instruct --input prompts.jsonl --output out.jsonl \
        --max-new-tokens 128 --temperature 0.7 --top-p 0.9 --n 4 --seed 0 [--stop "</item_profile>"]

Each input line is {"prompt": "raw text"} or {"messages": [{"role": ..., "content": ...}, ...]} (rendered with
the model's chat template); other keys are copied through. Each output line adds "text" and "token_ids" (lists of
one entry per sample when --n > 1). Temperature 0 is greedy. Prompts are batched by length; sample j of line i
always draws from the stream row_seed(seed, i, j), so the output does not depend on --batch-size. A sample ends
at the tokenizer's EOS or once its text contains a --stop text (kept in the text, as the EOS is in the ids).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import load_model, load_tokenizer, merge_lora  # noqa: E402
from model.sampler import encode_prompts, generate, row_seed  # noqa: E402


def read_prompts(path: Path) -> list[dict]:
    """JSONL lines -> dicts with a "prompt" string or a "messages" list; errors name the file and line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            if isinstance(obj.get("prompt"), str):
                pass
            elif isinstance(obj.get("messages"), list) and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in obj["messages"]) and obj["messages"]:
                pass
            else:
                raise ValueError(f'{path}:{i}: needs "prompt" (a string) or "messages" (a non-empty list of '
                                 f'{{"role", "content"}} strings)')
            items.append(obj)
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model name, directory, .gguf file or repo id")
    ap.add_argument("--adapter", help="a LoRA adapter directory (PEFT's layout, e.g. a LoRA run's checkpoint "
                                      "step_N/adapter) applied to --model")
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, required=True, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="a text that ends a sample (repeatable)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = ap.parse_args(argv)

    items = read_prompts(args.input)
    model = load_model(args.model, dtype=args.dtype and getattr(torch, args.dtype), device=args.device,
                       adapter=args.adapter)
    if args.adapter:  # folded in: decoding runs plain matmuls
        model = merge_lora(model)
    tok = load_tokenizer(args.model)
    prompts = encode_prompts(tok, [it["prompt"] if "prompt" in it else it["messages"] for it in items])

    results: list[dict | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    with tqdm(total=len(items), desc="generate", unit="prompt", disable=len(items) < 2 * args.batch_size) as bar:
        for s in range(0, len(order), args.batch_size):
            idx = order[s:s + args.batch_size]
            out = generate(model, [prompts[i] for i in idx], args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, n=args.n, eos_ids=tok.eos_ids,
                           pad_id=tok.pad_token_id, vocab_limit=tok.vocab_size, stop_texts=args.stop,
                           decode=tok.decode, seeds=[row_seed(args.seed, i, j) for i in idx for j in range(args.n)])
            rows = out.completions()
            for k, i in enumerate(idx):
                ids = rows[k * args.n:(k + 1) * args.n]
                texts = [tok.decode(r) for r in ids]
                res = dict(items[i])
                res["text"], res["token_ids"] = (texts[0], ids[0]) if args.n == 1 else (texts, ids)
                results[i] = res
            bar.update(len(idx))

    from data.io import write_text_atomic

    write_text_atomic(args.output, "".join(json.dumps(res, ensure_ascii=False) + "\n" for res in results))
    print(f"wrote {len(results)} lines to {args.output}")


if __name__ == "__main__":
    main()
