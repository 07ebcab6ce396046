"""Raw files of any source -> the canonical directory.

    read reviews (stream; compact columns, review text spilled to a temp file)
    -> read item metadata for the reviewed items; drop reviews whose item is missing (counted, warned)
    -> optional time window (last N days) -> dedup (latest rating per user and item)
    -> iterative k-core -> global temporal split -> cold-start users/items removed from valid/test
    -> interactions.jsonl, items.jsonl, manifest.json (+ oracle_profiles.jsonl when given), written atomically.
"""
import json
import mmap
import sys
from array import array
from pathlib import Path

import numpy as np

from data.filters import cold_start_mask, dedup_latest, kcore_mask, temporal_split, window_mask
from data.io import BadRecord, DataError, LineReport, atomic_dir, check_file, iter_lines, sha256_file
from data.sources import SOURCES
from data.stats import SPLITS, compute_stats

FORMAT_VERSION = 1


def _log(msg):
    print(msg, file=sys.stderr)


def read_reviews(path, parse, spill, max_bad_frac=0.01, progress=False, log=_log):
    """Stream a review file into compact columns. Review texts go to the open binary file `spill`;
    each row keeps only (offset, length) into it. Returns (cols, user_ids, item_ids, report)."""
    uid, iid = {}, {}
    U, I, R, T, O, L = array("i"), array("i"), array("b"), array("q"), array("q"), array("i")
    rep = LineReport(path, max_bad_frac, log=log)
    off = 0
    for n, line in iter_lines(path, progress, desc="reviews"):
        try:
            user, item, rating, ts, text = parse(line)
        except BadRecord as e:
            rep.skip(n, str(e))
            continue
        rep.ok()
        U.append(uid.setdefault(user, len(uid)))
        I.append(iid.setdefault(item, len(iid)))
        R.append(rating)
        T.append(ts)
        b = text.encode("utf-8")
        spill.write(b)
        O.append(off)
        L.append(len(b))
        off += len(b)
    summary = rep.finish()
    cols = {k: np.frombuffer(v, dtype=d) if len(v) else np.zeros(0, dtype=d)
            for k, v, d in (("u", U, np.int32), ("i", I, np.int32), ("r", R, np.int8), ("t", T, np.int64),
                            ("off", O, np.int64), ("len", L, np.int32))}
    return cols, list(uid), list(iid), summary


def read_items(path, parse, key_re, wanted, max_bad_frac=0.01, progress=False, log=_log):
    """Stream an item file; keep (title, description) of the item ids in `wanted`. Lines whose id (found by
    `key_re` without parsing) is not wanted are skipped unparsed, so a multi-GB metadata file costs one scan.
    The first line of an id wins (Amazon 2018 metadata repeats some items)."""
    items, rep = {}, LineReport(path, max_bad_frac, log=log)
    for n, line in iter_lines(path, progress, desc="items"):
        m = key_re.search(line)
        if m is not None and m.group(1) not in wanted:
            rep.ok()
            continue
        try:
            item_id, title, desc = parse(line)
        except BadRecord as e:
            rep.skip(n, str(e))
            continue
        rep.ok()
        if item_id in wanted and item_id not in items:
            items[item_id] = (title, desc)
    return items, rep.finish()


def read_oracle(path, keep_users):
    """oracle_profiles.jsonl lines {user_id, profile, ...}; only users in `keep_users` are kept."""
    out = []
    for n, line in iter_lines(path):
        try:
            d = json.loads(line)
            uid, prof = d["user_id"], d["profile"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: bad oracle profile line ({type(e).__name__})")
        if uid in keep_users:
            out.append(d)
    return out


def prepare(source, reviews, out, meta=None, oracle=None, kcore=5, valid_frac=0.1, test_frac=0.1,
            last_days=None, max_bad_frac=0.01, overwrite=False, progress=False, log=_log):
    """Run the whole pipeline and write the canonical directory `out` atomically. Returns the manifest."""
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; choose from {sorted(SOURCES)}")
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise DataError(f"bad split fractions valid={valid_frac} test={test_frac}")
    src = SOURCES[source]
    check_file(reviews)
    for p in (meta, oracle):
        if p is not None:
            check_file(p)
    counts, inputs = {}, []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        spill_path = tmp / "reviews.spill"
        with open(spill_path, "wb") as spill:
            c, user_ids, item_ids, rev_rep = read_reviews(reviews, src.parse_review, spill, max_bad_frac, progress, log)
        counts["raw_reviews"] = len(c["u"])
        counts["bad_review_lines"] = rev_rep["bad"]
        inputs.append({"role": "reviews", "name": Path(reviews).name, "bytes": Path(reviews).stat().st_size,
                       "sha256": sha256_file(reviews)})
        keep = np.ones(len(c["u"]), dtype=bool)

        # item metadata; reviews of items missing from it are dropped (Yelp: business not in the business file)
        items = None
        if meta is not None:
            items, meta_rep = read_items(meta, src.parse_item, src.item_key, set(item_ids), max_bad_frac,
                                         progress, log)
            has = np.array([x in items for x in item_ids], dtype=bool)
            keep &= has[c["i"]] if len(c["i"]) else keep
            counts["bad_item_lines"] = meta_rep["bad"]
            counts["dropped_missing_item"] = int(len(keep) - keep.sum())
            if counts["dropped_missing_item"]:
                log(f"warning: dropped {counts['dropped_missing_item']} reviews whose item is missing from {meta}")
            inputs.append({"role": "items", "name": Path(meta).name, "bytes": Path(meta).stat().st_size,
                           "sha256": sha256_file(meta)})

        keep &= window_mask(c["t"], last_days)
        counts["after_window"] = int(keep.sum())
        rows = np.flatnonzero(keep)
        rows = rows[dedup_latest(c["u"][rows], c["i"][rows], c["t"][rows])]
        counts["duplicates_removed"] = counts["after_window"] - len(rows)
        rows = rows[kcore_mask(c["u"][rows], c["i"][rows], kcore, len(user_ids), len(item_ids))]
        u, i = c["u"][rows], c["i"][rows]
        counts["after_kcore"] = {"interactions": len(rows), "users": len(np.unique(u)), "items": len(np.unique(i))}
        if len(rows) == 0:
            raise DataError(f"{reviews}: no interaction left after the filters (k-core {kcore}, window {last_days})")

        # ranks of the id strings: the split's tie-break does not depend on line order
        urank = np.argsort(np.argsort(np.array(user_ids, dtype=object))).astype(np.int64)
        irank = np.argsort(np.argsort(np.array(item_ids, dtype=object))).astype(np.int64)
        order, split = temporal_split(c["t"][rows], urank[u], irank[i], valid_frac, test_frac)
        rows = rows[order]
        cold = cold_start_mask(c["u"][rows], c["i"][rows], split)
        counts["cold_start_removed"] = {SPLITS[s]: int(((split == s) & ~cold).sum()) for s in (1, 2)}
        rows, split = rows[cold], split[cold]

        u, i, r, t = c["u"][rows], c["i"][rows], c["r"][rows], c["t"][rows]
        stats = compute_stats(u, i, r, split)
        _write_interactions(tmp / "interactions.jsonl", spill_path, c, rows, split, user_ids, item_ids)
        spill_path.unlink()
        used = sorted({item_ids[x] for x in np.unique(i)})
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for x in used:
                title, desc = items[x] if items is not None else ("", "")
                f.write(json.dumps({"item_id": x, "title": title, "description": desc}, ensure_ascii=False) + "\n")
        if oracle is not None:
            kept_users = {user_ids[x] for x in np.unique(u)}
            with open(tmp / "oracle_profiles.jsonl", "w", encoding="utf-8") as f:
                for d in read_oracle(oracle, kept_users):
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            inputs.append({"role": "oracle", "name": Path(oracle).name, "bytes": Path(oracle).stat().st_size,
                           "sha256": sha256_file(oracle)})
        manifest = {
            "format_version": FORMAT_VERSION, "source": source,
            "options": {"kcore": kcore, "valid_frac": valid_frac, "test_frac": test_frac, "last_days": last_days,
                        "max_bad_frac": max_bad_frac, "dedup": "latest", "split": "global temporal",
                        "cold_start": "removed from valid/test"},
            "counts": {**counts, "train": stats["train"]["interactions"], "valid": stats["valid"]["interactions"],
                       "test": stats["test"]["interactions"], "users": stats["users"], "items": stats["items"]},
            "stats": stats, "inputs": inputs,
            "skipped_examples": rev_rep["examples"] + (meta_rep["examples"] if meta is not None else []),
        }
        with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return manifest


def _write_interactions(path, spill_path, c, rows, split, user_ids, item_ids):
    names = SPLITS
    with open(spill_path, "rb") as sf, open(path, "w", encoding="utf-8") as f:
        mm = mmap.mmap(sf.fileno(), 0, access=mmap.ACCESS_READ) if spill_path.stat().st_size else b""
        try:
            dumps = json.JSONEncoder(ensure_ascii=False).encode
            buf = []
            for row, s in zip(rows.tolist(), split.tolist()):
                o, n = int(c["off"][row]), int(c["len"][row])
                buf.append(dumps({"user_id": user_ids[c["u"][row]], "item_id": item_ids[c["i"][row]],
                                  "rating": int(c["r"][row]), "timestamp": int(c["t"][row]),
                                  "review": mm[o:o + n].decode("utf-8"), "split": names[s]}))
                if len(buf) >= 10000:
                    f.write("\n".join(buf) + "\n")
                    buf = []
            if buf:
                f.write("\n".join(buf) + "\n")
        finally:
            if isinstance(mm, mmap.mmap):
                mm.close()
