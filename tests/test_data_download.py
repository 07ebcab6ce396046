"""The downloader against a local HTTP server that honours Range: resume, checksum, offline error."""
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from data.download import download, urls
from data.io import DataError

BODY = bytes(range(256)) * 400  # 102,400 bytes


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.server.ranges.append(start)
        if start >= len(BODY):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(BODY) - start))
        self.end_headers()
        self.wfile.write(BODY[start:])

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = HTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.ranges = []
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()


def test_resume_appends_only_the_missing_bytes(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_port}/f.json.gz"
    dest = tmp_path / "f.json.gz"
    (tmp_path / "f.json.gz.part").write_bytes(BODY[:30000])  # an interrupted earlier run
    download(url, dest, sha256=hashlib.sha256(BODY).hexdigest())
    assert dest.read_bytes() == BODY and server.ranges == [30000]
    assert not (tmp_path / "f.json.gz.part").exists()


def test_checksum_mismatch_is_an_error(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_port}/f.json.gz"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(url, tmp_path / "f.json.gz", sha256="0" * 64)
    assert not (tmp_path / "f.json.gz").exists()


def test_offline_error_says_where_to_put_the_file(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DataError, match=r"place it at .*reviews_Books_5.json.gz"):
        download(f"http://127.0.0.1:{port}/reviews_Books_5.json.gz", tmp_path / "reviews_Books_5.json.gz", timeout=5)


def test_urls_and_yelp_by_hand():
    r, m = urls("amazon2014", "Books")
    assert r.endswith("/categoryFiles/reviews_Books_5.json.gz") and m.endswith("/meta_Books.json.gz")
    assert urls("amazon2023", "Digital_Music")[0].endswith("review_categories/Digital_Music.jsonl.gz")
    with pytest.raises(DataError, match="by hand"):
        urls("yelp", "")
