"""Rank-0 logging: tensorboard scalars and text, plus a JSON-lines copy of every scalar (for scripts and tests),
each row stamped with the run's wall time so far (`time/elapsed_s`, summed over resumes)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

ELAPSED = "time/elapsed_s"  # seconds of wall time since the run's logger first opened, resumes included


def _defined(v) -> bool:
    return v is not None and math.isfinite(float(v))


def last_elapsed(path: Path) -> float:
    """The last `time/elapsed_s` of a metrics.jsonl, 0.0 when none; a line that does not parse (a row torn by a
    killed process) is passed over: it must not stop the resume."""
    out = 0.0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out = float(json.loads(line).get(ELAPSED, out))
        except (ValueError, TypeError, AttributeError):
            continue
    return out


class Tracker:
    """resumed: the run continues from a checkpoint, and its clock from the last time metrics.jsonl logged."""

    def __init__(self, run_dir: Path | str, enabled: bool, resumed: bool = False):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(run_dir)
            self.offset = last_elapsed(run_dir / "metrics.jsonl") if resumed else 0.0
            self.t0 = time.monotonic()
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
        elapsed = round(self.offset + time.monotonic() - self.t0, 3)  # tensorboard keeps its own wall time
        self.jsonl.write(json.dumps({"step": step, ELAPSED: elapsed, **clean}) + "\n")
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
