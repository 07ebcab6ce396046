"""Peak memory of loading a checkpoint: our loader against transformers' from_pretrained, same model, same run.

    python bench/bench_load.py [--model smollm2-135m-instruct]

Each side runs in its own fresh process; the figure is the growth of peak RSS (ru_maxrss) during the load (every
weight read once, since safetensors pages lazily), after torch and transformers are imported, compared with the
size of one copy of the weights (fp32).
The last line is one JSON object.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_side(side: str, path: str):
    import torch
    import transformers  # noqa: F401  imported on both sides, so the baseline is the same

    import model as M

    base = rss_mb()
    t = time.perf_counter()
    if side == "ours":
        m = M.load_model(path, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # safetensors hands out lazily paged memory: read every weight once, so both sides hold them for real
    with torch.no_grad():
        for q in m.parameters():
            q.sum()
    seconds = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.parameters()}.values()) / 2**20
    print(json.dumps({"side": side, "peak_growth_mb": rss_mb() - base, "weights_mb": weights, "seconds": seconds}))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        return one_side(a.side, a.path)
    from model import resolve_model

    path = str(resolve_model(a.model))  # resolve (and import) once, outside the measurement
    res = {}
    for side in ("ours", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--side", side, "--path", path], capture_output=True,
                             text=True, check=True)
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[side]
        print(f"{side:>12}: peak RSS growth {r['peak_growth_mb']:.0f} MiB for {r['weights_mb']:.0f} MiB of weights "
              f"({r['peak_growth_mb'] / r['weights_mb']:.2f} copies), {r['seconds']:.2f} s")
    o, t = res["ours"], res["transformers"]
    ratio = t["peak_growth_mb"] / o["peak_growth_mb"] if o["peak_growth_mb"] else None  # a tiny model may add none
    print(json.dumps({"model": a.model, "weights_mb": round(o["weights_mb"], 1),
                      "ours_peak_mb": round(o["peak_growth_mb"], 1), "transformers_peak_mb": round(t["peak_growth_mb"], 1),
                      "ours_copies": round(o["peak_growth_mb"] / o["weights_mb"], 3),
                      "transformers_copies": round(t["peak_growth_mb"] / t["weights_mb"], 3),
                      "ratio": None if ratio is None else round(ratio, 3),
                      "ours_s": round(o["seconds"], 2), "transformers_s": round(t["seconds"], 2)}))


if __name__ == "__main__":
    main()
