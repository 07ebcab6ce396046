"""Bad input through the whole pipeline: counted skips with file:line, the bad-share threshold, clear errors,
and no half-written output directory after a failure or an interruption."""
import gzip
import json

import pytest

import data.process as process
from data import load_dataset
from data.io import DataError
from data.process import prepare


def good_lines(n_users=6, n_items=6):
    """A complete bipartite block: every user rates every item, so a 5-core keeps all of it."""
    out = []
    for u in range(n_users):
        for i in range(n_items):
            out.append(json.dumps({"reviewerID": f"U{u}", "asin": f"I{i}", "overall": float(1 + (u + i) % 5),
                                   "unixReviewTime": 1000 + 10 * (u * n_items + i), "reviewText": f"r{u}-{i}"}))
    return out


def write(path, lines, gz=False):
    data = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(data)
    else:
        path.write_text(data)
    return path


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


BAD = ['{"reviewerID": "U0", "asin": "I0", "overall": 5.0',                       # malformed
       '{"reviewerID": "U0", "overall": 5.0, "unixReviewTime": 1}',               # missing asin
       '{"reviewerID": "U0", "asin": "I0", "overall": 0, "unixReviewTime": 1}',   # rating 0
       '{"reviewerID": "U0", "asin": "I0", "overall": 7, "unixReviewTime": 1}',   # rating 7
       '{"reviewerID": "U0", "asin": "I0", "overall": 3, "unixReviewTime": "x"}']  # non-numeric time


def test_bad_lines_are_counted_with_file_and_line(tmp_path):
    lines = good_lines()
    for k, b in enumerate(BAD):
        lines.insert(3 + 4 * k, b)
    src = write(tmp_path / "r.json.gz", lines, gz=True)
    logs = []
    man = prepare("amazon2014", src, tmp_path / "out", max_bad_frac=0.2, log=logs.append)
    assert man["counts"]["bad_review_lines"] == len(BAD)
    assert man["counts"]["raw_reviews"] == 36
    bad_line_numbers = [lines.index(b) + 1 for b in BAD]
    assert [e.split(":")[1] for e in man["skipped_examples"]] == [str(n) for n in bad_line_numbers]
    assert all(e.startswith(str(src)) for e in man["skipped_examples"])
    assert any("skipped 5 of 41 lines" in m for m in logs)
    # valid = rows 28..31 (U4 I4, U4 I5, U5 I0, U5 I1), test = rows 32..35 (U5): user U5 never is in train
    assert man["counts"]["cold_start_removed"] == {"valid": 2, "test": 4}
    assert len(load_dataset(tmp_path / "out").interactions) == 30


def test_too_many_bad_lines_fail_and_leave_nothing(tmp_path):
    src = write(tmp_path / "r.json", good_lines() + BAD)  # 5 of 41 bad = 12% > 1%
    with pytest.raises(DataError, match=r"r.json: 5 of 41 lines are bad"):
        prepare("amazon2014", src, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_empty_file_and_wrong_path(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.json: empty file"):
        prepare("amazon2014", empty, tmp_path / "out")
    blank = write(tmp_path / "blank.json", ["", "   "])
    with pytest.raises(DataError, match="blank.json: empty file"):
        prepare("amazon2014", blank, tmp_path / "out", log=lambda m: None)
    with pytest.raises(DataError, match="nope.json.gz: no such file"):
        prepare("amazon2014", tmp_path / "nope.json.gz", tmp_path / "out")
    with pytest.raises(DataError, match="meta.json: no such file"):
        prepare("amazon2014", write(tmp_path / "r.json", good_lines()), tmp_path / "out", meta=tmp_path / "meta.json")
    assert not (tmp_path / "out").exists()


def test_truncated_gzip_is_a_clear_error(tmp_path):
    src = write(tmp_path / "r.json.gz", good_lines() * 50, gz=True)
    src.write_bytes(src.read_bytes()[:-200])
    with pytest.raises(DataError, match="r.json.gz: cannot read"):
        prepare("amazon2014", src, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupted_run_keeps_the_old_output(tmp_path, monkeypatch):
    src = write(tmp_path / "r.json", good_lines())
    prepare("amazon2014", src, tmp_path / "out", log=lambda m: None)
    before = (tmp_path / "out" / "interactions.jsonl").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(process, "_write_interactions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare("amazon2014", src, tmp_path / "out", overwrite=True, log=lambda m: None)
    assert (tmp_path / "out" / "interactions.jsonl").read_bytes() == before
    assert leftovers(tmp_path) == []
    with pytest.raises(DataError, match="exists and is not empty"):
        prepare("amazon2014", src, tmp_path / "out", log=lambda m: None)


def test_items_missing_from_metadata_are_dropped_and_counted(tmp_path):
    src = write(tmp_path / "r.json", good_lines(6, 7))
    meta = write(tmp_path / "m.json", [repr({"asin": f"I{i}", "title": f"T{i}", "categories": [["Rock"]]})
                                       for i in range(6)] + ["{'asin': 'I3', 'title': 'dup'}"])
    logs = []
    man = prepare("amazon2014", src, tmp_path / "out", meta=meta, log=logs.append)
    assert man["counts"]["dropped_missing_item"] == 6  # item I6 rated by 6 users
    assert any("dropped 6 reviews" in m for m in logs)
    ds = load_dataset(tmp_path / "out")
    assert sorted(ds.items) == [f"I{i}" for i in range(6)]
    assert ds.items["I3"].title == "T3"  # first line of an id wins


def test_canonical_reader_names_the_bad_line(tmp_path):
    src = write(tmp_path / "r.json", good_lines())
    prepare("amazon2014", src, tmp_path / "out", log=lambda m: None)
    p = tmp_path / "out" / "interactions.jsonl"
    lines = p.read_text().splitlines()
    lines[4] = lines[4].replace('"rating": ', '"stars": ')
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"interactions.jsonl:5: bad line"):
        load_dataset(tmp_path / "out")
    with pytest.raises(DataError, match="no such dataset directory"):
        load_dataset(tmp_path / "missing")
