"""Training curves of one or more runs in one PNG: training reward, validation MAE or NDCG@10, and KL, each against
the step (--x time: against the run's wall time in minutes), read from each run directory's metrics.jsonl.

    python scripts/plot_run.py runs/grpo --out runs/grpo/curves.png
    python scripts/plot_run.py runs/a runs/b --labels "lr 1e-6" "lr 7e-6" --x time --out curves.png

A panel draws, for each run, the first of its keys that the run logs; a panel no run logs is left out:
- training reward: train/reward_mean (GRPO), writer/reward_mean (LangPTune); DPO logs none (its train/rewards_*
  are the implicit DPO rewards, not the recommender's);
- validation MAE (over the parsed profiles): val/mae (GRPO, DPO), iteration/val_mae (LangPTune, --rec-kind rating);
- validation NDCG@10: iteration/val_ndcg@10 (LangPTune, --rec-kind retrieval);
- KL to the reference: train/kl (GRPO).
The wall time is time/elapsed_s (seconds, summed over resumes). LangPTune logs writer/ rows per writer step and
iteration/ rows per iteration: iteration i is drawn at writer step i x writer_steps (the run's config.json), so
its panels share one step axis. A step logged twice (a run resumed from an earlier checkpoint) keeps its last row.
A missing run directory or a bad metrics.jsonl line is one line on stderr naming the file (and line), exit 2.
"""
import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.io import DataError, write_bytes_atomic  # noqa: E402

ELAPSED = "time/elapsed_s"  # rl/tracking.py
PANELS = (  # (title, keys: the first a run logs is drawn)
    ("training reward", ("train/reward_mean", "writer/reward_mean")),
    ("validation MAE (lower is better)", ("val/mae", "iteration/val_mae")),
    ("validation NDCG@10", ("iteration/val_ndcg@10",)),
    ("KL to the reference", ("train/kl",)),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write (atomically)")
    p.add_argument("--x", choices=("step", "time"), default="step", help="x axis: step, or wall time in minutes")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the run directory's name)")
    return p.parse_args(argv)


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl; a line that is not a JSON object with a numeric step and numeric values
    is a DataError naming file:line."""
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no such file (not a run directory of the trainers)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"{path}:{n}: not a metrics row (a JSON object with a \"step\")")
        bad = [k for k, v in row.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise DataError(f"{path}:{n}: {bad[0]!r} is not a number")
        rows.append(row)
    return rows


def iteration_steps(run_dir: Path) -> int:
    """Writer steps per LangPTune iteration, from the run's config.json; 1 for the other trainers (or none)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return 1
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    return max(1, int(cfg.get("writer_steps", 1))) if isinstance(cfg, dict) else 1


def series(rows: list[dict], key: str, x: str, per_iteration: int = 1) -> tuple[list[float], list[float]]:
    """(xs, ys) of one key, by step, a step logged twice keeping its last row. xs: the step (an iteration/ key's
    times per_iteration), or with x == "time" the wall time in minutes (rows without it left out)."""
    last: dict[int, dict] = {}
    for row in rows:
        if key in row and (x == "step" or ELAPSED in row):
            last[row["step"]] = row
    scale = per_iteration if key.startswith("iteration/") else 1
    steps = sorted(last)
    xs = [s * scale if x == "step" else last[s][ELAPSED] / 60 for s in steps]
    return xs, [float(last[s][key]) for s in steps]


def panels(runs: list[tuple[list[dict], int]], x: str) -> list[tuple[str, str, list]]:
    """[(title, x label, [(run index, key, xs, ys)])] of the panels some run logs. runs: (rows, per_iteration)."""
    out = []
    for title, keys in PANELS:
        lines = []
        for i, (rows, per_iteration) in enumerate(runs):
            key = next((k for k in keys if any(k in r for r in rows)), None)
            if key is not None:
                lines.append((i, key, *series(rows, key, x, per_iteration)))
        if lines:
            out.append((title, "step" if x == "step" else "wall time (min)", lines))
    return out


def render(figure: list, labels: list[str]) -> bytes:
    """The PNG of the panels side by side, one colour per run throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(figure), figsize=(4.5 * len(figure), 3.6), squeeze=False)
    for ax, (title, xlabel, lines) in zip(axes[0], figure):
        for i, key, xs, ys in lines:
            ax.plot(xs, ys, color=f"C{i % 10}", marker="o" if len(xs) <= 30 else None, markersize=3,
                    label=labels[i])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def plot(run_dirs: list[str], out: str, x: str = "step", labels: list[str] | None = None):
    dirs = [Path(d) for d in run_dirs]
    if labels is not None and len(labels) != len(dirs):
        raise DataError(f"--labels: {len(labels)} labels for {len(dirs)} runs")
    runs = [(read_rows(d), iteration_steps(d)) for d in dirs]
    if x == "time":
        for d, (rows, _) in zip(dirs, runs):
            if rows and not any(ELAPSED in r for r in rows):
                raise DataError(f"{d / 'metrics.jsonl'}: no row has {ELAPSED} (a run logged before the trainers "
                                f"kept the wall time); plot it with --x step")
    figure = panels(runs, x)
    if not figure:
        keys = ", ".join(k for _, ks in PANELS for k in ks)
        raise DataError(f"no run logs any of {keys}")
    write_bytes_atomic(out, render(figure, labels or [d.resolve().name for d in dirs]))


def main(argv=None):
    a = parse_args(argv)
    try:
        plot(a.runs, a.out, a.x, a.labels)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(a.out)


if __name__ == "__main__":
    main()
