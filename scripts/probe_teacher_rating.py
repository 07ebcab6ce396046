"""Has a writer learnt the rating its teacher states? A teacher-forced probe, no generation.

For teacher pairs (`make_sft_pairs.py`: {messages, completion}) the writer reads the prompt and the teacher's
completion up to the first rating it states ("...would rate this album " or "...usually rates "), and picks the
most likely of the digits 1-5 there. Reported per teacher rating: how often the pick equals it, over the pairs
`--skip` on (pairs an SFT run of S steps x B pairs never saw when --skip >= S x B). One JSON line per adapter
(`none`: the base model):

    python scripts/probe_teacher_rating.py --pairs runs/duet-lora-s0/teacher-attr.jsonl --skip 256 --pairs-n 256 \
        --adapter none runs/duet-lora-s0/attr-sft/checkpoints/step_24/adapter \
        runs/duet-lora-s0/attr-sft/checkpoints/step_32/adapter
"""

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIRST_RATING = re.compile(r"([1-5])/5")


def split_at_rating(completion: str):
    """(the completion before its first "N/5", N) or None."""
    m = FIRST_RATING.search(completion)
    return None if m is None else (completion[:m.start()], int(m.group(1)))


def digit_ids(tokenizer, before: str) -> list[int]:
    """The token ids of the digits 1..5 as they would follow `before` (one token each, or an error)."""
    base = tokenizer.encode(before, add_special_tokens=False)
    out = []
    for d in "12345":
        ids = tokenizer.encode(before + d, add_special_tokens=False)
        if ids[:len(base)] != base or len(ids) != len(base) + 1:
            raise SystemExit(f"the tokenizer does not end {before[-20:]!r} + {d!r} with one digit token")
        out.append(ids[-1])
    return out


@torch.no_grad()
def probe(model, tokenizer, rows, prefix: str, max_prompt_tokens: int = 4096) -> dict:
    """rows: (messages, completion) pairs. Per teacher rating N: pairs, and how many picks equal N."""
    from eval.profiles import encode_prompt

    seen, right, picked = Counter(), Counter(), Counter()
    for messages, completion in rows:
        cut = split_at_rating(completion)
        if cut is None:
            continue
        before, want = cut
        ids = encode_prompt(tokenizer, messages, max_prompt_tokens, prefix) + tokenizer.encode(
            before, add_special_tokens=False)
        logits = model(torch.tensor([ids]))[0, -1]  # (V,) the next token's
        pick = 1 + int(logits[digit_ids(tokenizer, before)].argmax())
        seen[want] += 1
        right[want] += pick == want
        picked[pick] += 1
    return {"n": sum(seen.values()), "right": sum(right.values()),
            "by_teacher_rating": {str(k): f"{right[k]}/{seen[k]}" for k in sorted(seen)},
            "picked": {str(k): picked[k] for k in sorted(picked)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="teacher pairs, JSONL of {messages, completion}")
    p.add_argument("--skip", type=int, default=0, help="pairs skipped first (those SFT trained on)")
    p.add_argument("--pairs-n", type=int, default=256, help="pairs probed after the skipped ones")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", nargs="+", default=["none"], help="LoRA adapter folders; none: the base model")
    p.add_argument("--response-prefix", default="<user_profile><cue>")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    from model import load_model, load_tokenizer, merge_lora

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for n, line in enumerate(Path(a.pairs).read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                rows.append((r["messages"], r["completion"]))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{a.pairs}:{n}: not a {{messages, completion}} pair ({e!r})") from e
    rows = rows[a.skip:a.skip + a.pairs_n]
    if not rows:
        raise SystemExit(f"{a.pairs}: no pairs after --skip {a.skip}")
    tok = load_tokenizer(a.model)
    for adapter in a.adapter:
        model = load_model(a.model, adapter=None if adapter == "none" else adapter)
        if adapter != "none":
            model = merge_lora(model)
        print(json.dumps({"adapter": adapter, "skip": a.skip, **probe(model.eval(), tok, rows, a.response_prefix)}))


if __name__ == "__main__":
    main()
