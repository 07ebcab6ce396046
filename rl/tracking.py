"""Rank-0 logging: tensorboard scalars and text, plus a JSON-lines copy of every scalar (for scripts and tests)."""
from __future__ import annotations

import json
from pathlib import Path


class Tracker:
    def __init__(self, run_dir: Path | str, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(run_dir)
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def scalars(self, metrics: dict, step: int, prefix: str = ""):
        if not self.enabled:
            return
        clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if v is not None}
        for k, v in clean.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def text(self, tag: str, text: str, step: int):
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self):
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def read_metrics(run_dir: Path | str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
