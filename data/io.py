"""Low-level file helpers shared by every reader: gzip-or-plain line streaming, the bad-line policy,
input hashing and atomic output directories.

Bad-input policy (docs/data.md):
- a wrong path or an empty file is an immediate DataError naming the file;
- a bad line (malformed JSON / Python literal, missing field, rating outside 1..5, non-numeric timestamp,
  empty id) is skipped and counted; the first few are printed with file and line number;
- after a file is read, the run fails (DataError) when the share of bad lines exceeds `max_bad_frac`.
"""
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


class DataError(Exception):
    """Bad or missing input: the message names the file (and the line or field when there is one)."""


class BadRecord(Exception):
    """One unusable line; the reader counts it and moves on."""


def check_file(path, hint=""):
    """Fail early and clearly on a wrong path or an empty file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file{'; ' + hint if hint else ''}")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: empty file")
    return p


def iter_lines(path, progress=False, desc=None):
    """Yield (line_number, text) for every non-blank line of a .gz or plain text file, streaming."""
    p = check_file(path)
    with open(p, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"  # gzip magic, whatever the file is called
    raw = gzip.open(p, "rb") if gz else open(p, "rb")
    bar, last, n = None, 0, 0
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc=desc or p.name, unit=" lines", unit_scale=True, mininterval=1.0, file=sys.stderr)
    try:
        for n, b in enumerate(raw, 1):
            if bar is not None and n % 10000 == 0:
                bar.update(10000)
                last = n
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                s = b.decode("utf-8", errors="replace")
            if s.strip():
                yield n, s
    except (OSError, EOFError) as e:  # truncated or corrupt gzip
        raise DataError(f"{p}: cannot read ({e})") from e
    finally:
        raw.close()
        if bar is not None:
            bar.update(n - last)
            bar.close()


class LineReport:
    """Counts good and bad lines of one input file and enforces the bad-share threshold."""

    def __init__(self, path, max_bad_frac=0.01, show=5, log=None):
        self.path, self.max_bad_frac, self.show = str(path), max_bad_frac, show
        self.total = self.bad = 0
        self.examples = []  # "file:line: reason" for the first `show` bad lines
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr))

    def ok(self):
        self.total += 1

    def skip(self, lineno, reason):
        self.total += 1
        self.bad += 1
        if len(self.examples) < self.show:
            msg = f"{self.path}:{lineno}: {reason}"
            self.examples.append(msg)
            self.log(f"warning: skipped {msg}")

    def finish(self):
        """Raise if the file held no usable line or too many bad ones; return a summary dict."""
        if self.total == 0:
            raise DataError(f"{self.path}: empty file (no non-blank line)")
        frac = self.bad / self.total
        if self.bad:
            self.log(f"warning: {self.path}: skipped {self.bad} of {self.total} lines ({frac:.2%})")
        if frac > self.max_bad_frac:
            raise DataError(
                f"{self.path}: {self.bad} of {self.total} lines are bad ({frac:.2%} > max {self.max_bad_frac:.2%}); "
                f"first: {'; '.join(self.examples)}")
        return {"file": self.path, "lines": self.total, "bad": self.bad, "examples": list(self.examples)}


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@contextmanager
def atomic_dir(out, overwrite=False):
    """Yield a temp dir next to `out`; on success rename it to `out`, on any failure (or Ctrl-C) delete it.
    A reader of `out` therefore sees either the old complete directory or the new complete one."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: output directory exists and is not empty (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path, text: str):
    """Write `text` (UTF-8) atomically, as write_bytes_atomic."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path, data: bytes):
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`: a reader sees
    the old file or the new one, never half of one. The one file writer of the project's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
