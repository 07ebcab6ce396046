"""Scored examples per second of eval.recommender.Recommender against the same computation with transformers.

Same rendered prompts (10H prompts of a dataset's test split, or synthetic histories), same length-sorted,
left-padded batches; the reference runs transformers' forward with the attention mask and position ids
cumsum(mask) - 1, takes the last position's logits of the five digits and the expectation. Each batch size of
--batch-sizes is timed for ours, the fastest is kept, and the reference is timed at that batch size
interleaved with ours (one run, alternating, so that the load of the machine hits both alike). Ours computes
the prompts' shared prefix (chat header and instruction) once per call (eval/recommender.py); its time without
that is printed too (ours_no_prefix_ex_per_s), so the two sources of the ratio can be told apart.

    python bench/bench_recommender.py --model smollm2-135m-instruct --data out/data/synthetic --n 48
Last line: JSON {"ours_ex_per_s", "hf_ex_per_s", "ratio", "batch_size", ...}.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch  # noqa: E402

from eval.recommender import (RecExample, Recommender, expected_rating, left_pad,  # noqa: E402
                              length_batches)
from model import load_model, load_tokenizer  # noqa: E402


def hf_score(hf, seqs, pad_id, digit_ids, batch_size):
    """The reference: transformers' forward on the same batches -> (expected (N,), probs (N, 5))."""
    out = torch.empty(len(seqs), 5)
    digit = torch.tensor(digit_ids)
    with torch.inference_mode():
        for idx in length_batches([len(s) for s in seqs], batch_size):
            ids, mask = left_pad([seqs[i] for i in idx], pad_id)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = hf(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits  # (B, 1, V)
            out[idx] = logits[:, -1].index_select(-1, digit).float()
    return expected_rating(out)


def prompts_from(rec, data, n):
    from data import load_dataset
    from data.history import HistoryIndex

    ds = load_dataset(data)
    h = HistoryIndex(ds)
    rows = ds.split("test")[:n]
    return [rec.prompt(RecExample(h.user_history(x.user_id, x.timestamp, 10), None, ds.items[x.item_id].title))
            for x in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: smollm2-135m-instruct")
    p.add_argument("--data", help="canonical dataset dir (default: prompts built from made-up histories)")
    p.add_argument("--n", type=int, default=48, help="examples per timing")
    p.add_argument("--batch-sizes", default="4,8,16")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    name = a.model or "smollm2-135m-instruct"
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name)
    rec = Recommender(load_model(name), tok)
    hf = AutoModelForCausalLM.from_pretrained(str(rec.model.source), dtype=torch.float32).eval()
    if a.data:
        texts = prompts_from(rec, a.data, a.n)
    else:
        from data.history import HistoryEntry
        texts = [rec.prompt(RecExample([HistoryEntry(str(j), f"Album {j} ({'rock jazz folk'.split()[j % 3]})",
                                                     1 + (j * 7 + k) % 5, "", j) for j in range(k % 10 + 1)],
                                       None, f"Target {k}")) for k in range(a.n)]
    seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    print(f"{len(texts)} prompts, {sum(map(len, seqs)) / len(seqs):.0f} tokens on average, "
          f"{torch.get_num_threads()} threads", flush=True)

    def time_ours(bs):
        rec.batch_size = bs
        t0 = time.perf_counter()
        e, _ = rec.score_prompts(texts)
        return time.perf_counter() - t0, e

    def time_hf(bs):
        t0 = time.perf_counter()
        e, _ = hf_score(hf, seqs, tok.pad_token_id, rec.digit_ids, bs)
        return time.perf_counter() - t0, e

    time_ours(min(int(b) for b in a.batch_sizes.split(",")))  # warm-up
    per_bs = {}
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        per_bs[bs] = min(time_ours(bs)[0] for _ in range(a.repeats))
        print(f"ours batch {bs:3d}: {len(texts) / per_bs[bs]:.1f} examples/s", flush=True)
    best = min(per_bs, key=per_bs.get)
    ours, ref, diff = [], [], 0.0
    for _ in range(a.repeats):  # interleaved at the chosen batch size
        t, e1 = time_ours(best)
        ours.append(t)
        t, e2 = time_hf(best)
        ref.append(t)
        diff = max(diff, float((e1 - e2).abs().max()))
    o, r = len(texts) / min(ours), len(texts) / min(ref)
    rec.share_prefix = False
    no_prefix = len(texts) / min(time_ours(best)[0] for _ in range(a.repeats))
    rec.share_prefix = True
    print(f"batch {best}: ours {o:.1f} examples/s ({no_prefix:.1f} without prefix sharing), transformers {r:.1f} "
          f"examples/s, max |diff| {diff:.2e}")
    print(json.dumps({"ours_ex_per_s": round(o, 2), "hf_ex_per_s": round(r, 2), "ratio": round(o / r, 3),
                      "ours_no_prefix_ex_per_s": round(no_prefix, 2),
                      "shared_prefix_tokens": rec.shared_prefix_len(seqs),
                      "batch_size": best, "n": len(texts), "max_abs_diff": diff,
                      "per_batch_size_ex_per_s": {b: round(len(texts) / t, 2) for b, t in per_bs.items()}}))


if __name__ == "__main__":
    main()
