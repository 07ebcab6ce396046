"""Profile generation (greedy, batched through the sampler) and its on-disk cache.

The cache maps (method, generator weights' hash, user, item, prompt) to the generator's raw answer, so a rerun of
scripts/evaluate.py regenerates nothing, and a change of prompt or of weights regenerates everything. Raw answers
are stored (not parsed profiles): a parser change needs no regeneration.

File layout: CACHE_DIR/<method>-<weights hash[:16]>.jsonl, one JSON object a line
{"key", "user_id", "item_id", "prompt_sha256", "text"}. Each line is one os.write on an O_APPEND descriptor
followed by fsync, so concurrent or interrupted runs leave whole lines (a torn last line is skipped on load).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from data.prompts import cut_after

# ------------------------------------------------------------------------------------------------ weights hash
_CHUNK, _N_CHUNKS = 1 << 16, 16


def weights_hash(model_dir) -> str:
    """A cheap, stable fingerprint of a checkpoint directory: sha256 over config.json and, for every
    *.safetensors file, its name, size, header (tensor names, shapes, offsets) and 16 chunks of 64 KiB spread
    evenly over the file. Reads ~1 MiB per file instead of hashing gigabytes; a fine-tuned checkpoint changes
    every chunk, so two different weight sets do not share a hash in practice."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors files to hash")
    h = hashlib.sha256()
    if (d / "config.json").exists():
        h.update((d / "config.json").read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")  # safetensors: u64 header length, then the JSON header
            h.update(fh.read(min(n, 1 << 24)))
            for k in range(_N_CHUNKS):
                fh.seek(max(0, (size - _CHUNK) * k // max(1, _N_CHUNKS - 1)))
                h.update(fh.read(_CHUNK))
    return h.hexdigest()


def sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ cache
class ProfileCache:
    def __init__(self, cache_dir, method: str, generator_hash: str):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.method, self.generator_hash = method, generator_hash
        self.path = self.dir / f"{method}-{generator_hash[:16]}.jsonl"
        self.table: dict[str, str] = {}
        if self.path.exists():
            for n, line in enumerate(open(self.path, encoding="utf-8"), 1):
                try:
                    d = json.loads(line)
                    self.table[d["key"]] = d["text"]
                except (ValueError, KeyError, TypeError):
                    print(f"{self.path}:{n}: skipping a damaged cache line", file=sys.stderr)

    def key(self, user_id: str, item_id: str, prompt: str) -> str:
        parts = [self.method, self.generator_hash, str(user_id), str(item_id), sha256_text(prompt)]
        return sha256_text(json.dumps(parts))

    def get(self, user_id, item_id, prompt) -> str | None:
        return self.table.get(self.key(user_id, item_id, prompt))

    def put(self, user_id, item_id, prompt, text: str):
        k = self.key(user_id, item_id, prompt)
        line = json.dumps({"key": k, "user_id": user_id, "item_id": item_id, "prompt_sha256": sha256_text(prompt),
                           "text": text}, ensure_ascii=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.table[k] = text

    def __len__(self):
        return len(self.table)


# ------------------------------------------------------------------------------------------------ generation
def render_generation_prompt(tokenizer, messages: list[dict]) -> str:
    """The generator's prompt: chat template with the assistant turn opened (plain text for base models)."""
    if tokenizer.has_chat_template:
        return tokenizer.render_chat(messages, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 8,
                   seed: int = 0, progress=None, stop_texts=()) -> list[str]:
    """Greedy answers to rendered prompts, batched by length through model/sampler.generate; in input order.
    An answer also ends once it contains one of `stop_texts` (cut right after it)."""
    from model.sampler import generate

    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str] = [""] * len(ids)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        res = generate(model, [ids[i] for i in idx], max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, n=1,
                       eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_token_id, vocab_limit=tokenizer.vocab_size,
                       seed=seed, stop_texts=stop_texts, decode=tokenizer.decode)
        toks, lengths = res.tokens, res.lengths
        for b, i in enumerate(idx):
            row = toks[b, :int(lengths[b])].tolist()
            out[i] = cut_after(tokenizer.decode([t for t in row if t not in tokenizer.eos_ids]), stop_texts)
        if progress:
            progress(len(idx))
    return out


@torch.no_grad()  # not inference_mode: FSDP2 updates its gathered parameters in place
def cached_generate(requests: Sequence[tuple[str, str, str]], model, tokenizer, cache: ProfileCache | None,
                    max_new_tokens: int = 256, batch_size: int = 8, progress=None, stop_texts=()) -> list[str]:
    """requests: (user_id, item_id, rendered prompt). Generates each distinct prompt not in the cache once,
    appends it to the cache as soon as its batch is done, and returns the raw answers in request order."""
    known: dict[str, str] = {}  # prompt -> answer, from the cache (an identical prompt is never generated twice)
    for u, i, p in requests:
        text = cache.get(u, i, p) if cache is not None else None
        if text is not None:
            known[p] = text
    todo: dict[str, tuple[str, str]] = {}
    for u, i, p in requests:
        if p not in known and p not in todo:
            todo[p] = (u, i)
    prompts = list(todo)
    for s in range(0, len(prompts), batch_size * 4):  # write to the cache every few batches
        chunk = prompts[s:s + batch_size * 4]
        for p, text in zip(chunk, generate_texts(model, tokenizer, chunk, max_new_tokens, batch_size,
                                                 progress=progress, stop_texts=stop_texts)):
            known[p] = text
            if cache is not None:
                cache.put(*todo[p], p, text)
    out = []
    for u, i, p in requests:
        if cache is not None and cache.get(u, i, p) is None:  # the same prompt for another (user, item)
            cache.put(u, i, p, known[p])
        out.append(known[p])
    return out
