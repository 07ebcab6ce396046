"""Resolve a model into the local cache (and optionally copy it), then print where it is.

    python scripts/download_model.py                                  # the embedded default, smollm2-135m-instruct
    python scripts/download_model.py Qwen/Qwen3-0.6B --out models/qwen3-0.6b
    python scripts/download_model.py path/to/model.Q4_0.gguf          # converts a llama GGUF file to an HF directory
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.hub import DEFAULT_MODEL, resolve_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                    help="embedded model name, HF-format directory, .gguf file or Hugging Face repo id")
    ap.add_argument("--out", type=Path, help="also copy the HF-format directory here (must not exist)")
    args = ap.parse_args()
    path = resolve_model(args.name)
    if args.out is not None:
        if args.out.exists():
            sys.exit(f"{args.out}: already exists")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=args.out.parent))
        shutil.copytree(path, tmp / "m", ignore=shutil.ignore_patterns(".cache"))
        os.rename(tmp / "m", args.out)
        tmp.rmdir()
        path = args.out
    print(path)


if __name__ == "__main__":
    main()
