"""Benchmark: one million synthetic reviews in the Amazon 2014 format, end to end through the pipeline.

    python bench/bench_data.py [--reviews 1000000]

Generation runs in a child process (timed apart); the processing (read, filter, k-core, split, write)
runs in this process, so its peak RSS (ru_maxrss) is the pipeline's own. Target: <= 90 s, <= 2 GB.
The last line is a JSON object with the figures.
"""
import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from data.process import prepare  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reviews", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--dir", default=None, help="work folder (default: a temp dir, deleted)")
    a = p.parse_args()
    per_user = 67.5  # mean of the generator's 45..90 interactions per user
    users = max(1, math.ceil(1.01 * a.reviews / per_user))  # 1% spare so at least --reviews are written
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        raw, out = Path(d) / "raw", Path(d) / "canonical"
        t0 = time.perf_counter()
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
                f"from data.synthetic import generate; "
                f"print(generate({str(raw)!r}, seed=0, n_users={users}, n_items={a.items}, compresslevel=1)['n_reviews'])")
        n_raw = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
        gen_s = time.perf_counter() - t0
        gen_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB (Linux)
        size_mb = sum(f.stat().st_size for f in raw.iterdir()) / 2**20
        print(f"generated {n_raw:,} reviews ({size_mb:.0f} MiB gz) in {gen_s:.1f} s, peak RSS {gen_rss:.0f} MiB")

        t0 = time.perf_counter()
        man = prepare("synthetic", raw / "reviews_Synthetic.json.gz", out, meta=raw / "meta_Synthetic.json.gz",
                      oracle=raw / "oracle_profiles.jsonl", progress=False)
        proc_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out_mb = (out / "interactions.jsonl").stat().st_size / 2**20
        c = man["counts"]
        print(f"processed {c['raw_reviews']:,} reviews -> {c['train'] + c['valid'] + c['test']:,} interactions "
              f"({out_mb:.0f} MiB jsonl) in {proc_s:.1f} s, peak RSS {rss:.0f} MiB "
              f"(targets: <= 90 s, <= 2048 MiB)")
    print(json.dumps({"reviews": n_raw, "process_s": round(proc_s, 2), "peak_rss_mb": round(rss, 1),
                      "reviews_per_s": round(n_raw / proc_s), "generate_s": round(gen_s, 2),
                      "generate_peak_rss_mb": round(gen_rss, 1), "target_s": 90, "target_rss_mb": 2048,
                      "ok": proc_s <= 90 and rss <= 2048}))


if __name__ == "__main__":
    main()
