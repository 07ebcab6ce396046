"""Rank-0 logging: tensorboard scalars and text, plus a JSON-lines copy of every scalar (for scripts and tests)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _defined(v) -> bool:
    return v is not None and math.isfinite(float(v))


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
        # a metric undefined at this step (NaN, e.g. the MAE of parsed rollouts when every rollout failed) is left
        # out: tensorboard shows a gap and metrics.jsonl stays strict JSON
        clean = {f"{prefix}{k}": float(v) for k, v in metrics.items() if _defined(v)}
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


def summary_line(final: dict) -> str:
    """The trainers' last line of output: one strict JSON object, floats rounded, undefined (NaN) values null."""
    def value(v):
        if isinstance(v, float):
            return round(v, 6) if math.isfinite(v) else None
        return v
    return json.dumps({k: value(v) for k, v in final.items()})
