"""The on-disk cache of written profiles, for scripts/evaluate.py.

The cache maps (method, generator weights' hash, user, item, prompt token ids) to the generator's raw answer, so a
rerun regenerates nothing, and a change of prompt or of weights regenerates everything. Raw answers are stored
(not parsed profiles): a parser change needs no regeneration.

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


def prompt_key(ids) -> str:
    """A prompt's token ids as the text the cache hashes."""
    return " ".join(map(str, ids))


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
