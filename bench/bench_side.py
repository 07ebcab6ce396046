"""Shared driver of bench_grpo.py and bench_dpo.py: run one side (ours or TRL) of a benchmark in a fresh process,
so that each side's peak memory and imports are its own."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys


def installed_version(package: str) -> str | None:
    """The installed version of an importable `package`, None when it cannot be imported (TRL is optional:
    requirements-bench.txt). Asked without importing it."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def run_side(script: str, side: str, args: list[str]) -> dict:
    """python SCRIPT --side SIDE ARGS...; echo its progress lines (starting "ours" or "trl ") live and return the
    JSON object on its last line. A failing child prints its last 80 lines and stops the benchmark."""
    cmd = [sys.executable, script, "--side", side, *args]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # the child's own progress lines, live; the rest kept for an error report
            lines.append(line.rstrip("\n"))
            if line.startswith(("ours", "trl ")):
                print("  " + line, end="", flush=True)
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        print("\n".join(lines[-80:]), file=sys.stderr)
        raise SystemExit(f"--side {side} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB. Our trainers reset the kernel's high-water mark to log each phase's peak
    (rl/memory.py), which ru_maxrss then forgets; rl.memory keeps the peak across resets."""
    import resource

    from rl.memory import process_peak_rss

    peak = process_peak_rss()
    return peak / 2**20 if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
