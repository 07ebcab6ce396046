"""Resumable downloads of the public Amazon review files (Yelp must be downloaded by hand: its terms).

A partial download lives in `<file>.part`; a rerun asks the server for the remaining bytes (HTTP Range) and
appends. The finished file is checked against a known SHA-256 when there is one, then renamed into place.
Offline, the error says which URL to fetch and where to put the file.
"""
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from data.io import DataError

AMAZON2014 = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
AMAZON2018 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
AMAZON2023 = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/"

# SHA-256 of published files, filled in as they are verified (no official checksums are published).
KNOWN_SHA256 = {}


def urls(source, category):
    """(reviews URL, metadata URL) of an Amazon category, e.g. category 'Digital_Music' or 'Books'."""
    if source == "amazon2014":
        return AMAZON2014 + f"reviews_{category}_5.json.gz", AMAZON2014 + f"meta_{category}.json.gz"
    if source == "amazon2018":
        return (AMAZON2018 + f"categoryFilesSmall/{category}_5.json.gz",
                AMAZON2018 + f"metaFiles2/meta_{category}.json.gz")
    if source == "amazon2023":
        return (AMAZON2023 + f"review_categories/{category}.jsonl.gz",
                AMAZON2023 + f"meta_categories/meta_{category}.jsonl.gz")
    if source == "yelp":
        raise DataError("the Yelp Open dataset must be downloaded by hand after accepting Yelp's terms "
                        "(https://www.yelp.com/dataset): pass yelp_academic_dataset_review.json with --reviews and "
                        "yelp_academic_dataset_business.json with --business")
    raise DataError(f"no download for source {source!r}")


def download(url, dest, sha256=None, timeout=60, chunk=1 << 20, progress=False):
    """Fetch `url` to `dest`, resuming a previous partial download. Returns dest."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            resp = None
        else:
            raise DataError(f"download of {url} failed (HTTP {e.code}); place the file by hand at {dest}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot download {url} ({e}); when offline, fetch it elsewhere and place it at {dest}") from e
    if resp is not None:
        with resp:
            if have and resp.status != 206:  # server ignored Range: start again
                have = 0
            total = resp.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr)
            try:
                with open(part, "ab" if have else "wb") as f:
                    while True:
                        try:
                            b = resp.read(chunk)
                        except OSError as e:
                            raise DataError(f"download of {url} interrupted ({e}); rerun to resume from "
                                            f"{part} ({part.stat().st_size} bytes)") from e
                        if not b:
                            break
                        f.write(b)
                        if bar is not None:
                            bar.update(len(b))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and part.stat().st_size < total:
                raise DataError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; "
                                f"rerun to resume from {part}")
    sha256 = sha256 or KNOWN_SHA256.get(url)
    if sha256:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for b in iter(lambda: f.read(chunk), b""):
                h.update(b)
        if h.hexdigest() != sha256:
            part.unlink()
            raise DataError(f"{url}: checksum mismatch (got {h.hexdigest()}, expected {sha256}); deleted {part}")
    os.replace(part, dest)
    return dest
