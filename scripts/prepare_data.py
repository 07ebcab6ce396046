"""Raw reviews -> canonical dataset directory (interactions.jsonl, items.jsonl, manifest.json).

    python scripts/prepare_data.py --source synthetic --out data_out/synthetic
    python scripts/prepare_data.py --source amazon2014 --reviews R.json.gz --meta M.json.gz --out DIR
    python scripts/prepare_data.py --source amazon2014 --category Digital_Music --download --raw raw/ --out DIR
    python scripts/prepare_data.py --source yelp --reviews review.json --business business.json --last-days 182 --out DIR
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.download import download, urls  # noqa: E402
from data.io import DataError  # noqa: E402
from data.process import prepare  # noqa: E402
from data.sources import SOURCES  # noqa: E402
from data.stats import format_stats  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--reviews", help="review file (.json / .jsonl, gzipped or not)")
    p.add_argument("--meta", help="item metadata file (Amazon)")
    p.add_argument("--business", help="business file (Yelp)")
    p.add_argument("--oracle", help="oracle_profiles.jsonl to copy (synthetic writes its own)")
    p.add_argument("--out", required=True, help="canonical output directory (written atomically)")
    p.add_argument("--raw", help="folder for raw files (downloads, synthetic); default OUT/../<out name>_raw")
    p.add_argument("--kcore", type=int, default=5)
    p.add_argument("--valid-frac", type=float, default=0.1)
    p.add_argument("--test-frac", type=float, default=0.1)
    p.add_argument("--last-days", type=float, default=None,
                   help="keep only the last N days of the data (paper: Books ~61, Yelp ~183)")
    p.add_argument("--max-bad-frac", type=float, default=0.01, help="fail when a larger share of lines is bad")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--download", action="store_true", help="fetch the public Amazon files into --raw first")
    p.add_argument("--category", default="Digital_Music", help="Amazon category for --download")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    p.add_argument("--users", type=int, default=300, help="synthetic: number of users")
    p.add_argument("--items", type=int, default=400, help="synthetic: number of items")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    raw = Path(a.raw) if a.raw else out.parent / f"{out.name}_raw"
    meta = a.business if a.source == "yelp" else a.meta
    oracle = a.oracle
    if a.source == "yelp" and a.meta:
        raise DataError("yelp takes --business, not --meta")
    if a.source == "synthetic" and not a.reviews:
        from data.synthetic import generate
        files = generate(raw, seed=a.seed, n_users=a.users, n_items=a.items,
                         eval_frac=a.valid_frac + a.test_frac)
        print(f"synthetic: {files['n_reviews']:,} reviews written to {raw}", file=sys.stderr)
        a.reviews, meta, oracle = files["reviews"], files["meta"], oracle or files["oracle"]
    elif a.download:
        r_url, m_url = urls(a.source, a.category)
        a.reviews = a.reviews or str(download(r_url, raw / r_url.rsplit("/", 1)[1], progress=not a.no_progress))
        meta = meta or str(download(m_url, raw / m_url.rsplit("/", 1)[1], progress=not a.no_progress))
    if not a.reviews:
        raise DataError(f"--reviews is required for source {a.source} (or --download for Amazon)")
    man = prepare(a.source, a.reviews, out, meta=meta, oracle=oracle, kcore=a.kcore, valid_frac=a.valid_frac,
                  test_frac=a.test_frac, last_days=a.last_days, max_bad_frac=a.max_bad_frac,
                  overwrite=a.overwrite, progress=not a.no_progress)
    c = man["counts"]
    print(f"read {c['raw_reviews']:,} reviews ({c['bad_review_lines']} bad lines), "
          f"dropped {c.get('dropped_missing_item', 0):,} with no item metadata, {c['duplicates_removed']:,} duplicates; "
          f"after {a.kcore}-core: {c['after_kcore']['interactions']:,} interactions, {c['after_kcore']['users']:,} "
          f"users, {c['after_kcore']['items']:,} items; cold-start removed {c['cold_start_removed']}")
    print(format_stats(man["stats"], a.source))
    print(f"wrote {out}")
    return man


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
