"""Image fetching under hostile hosts: the requests a sweep of the running service sent.

A real HTTP server on loopback plays the hosts (one that drips a byte at a time, one that
sends an endless chunked reply, one that redirects to the cloud-metadata address, one that
fails with 500), and a raw TCP port that accepts and never answers; every fetch goes
through ``labelstudio.images.fetch_images``, what ``/predict`` and the workers call.
Nothing is patched.
"""

from __future__ import annotations

import http.server
import io
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from labelstudio.config import parse_label_config
from labelstudio.images import FetchOptions, TaskError, fetch_images

CONFIG = parse_label_config(
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="x"/></RectangleLabels></View>'
)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


class _Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/ok.png":
            body = _png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/drip.png":  # one byte every 0.2 s, for ever
            self.send_response(200)
            self.send_header("Content-Length", str(10**6))
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                return
        elif self.path == "/chunked.png":  # no Content-Length, 64 KiB chunks until stopped
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\x00" * 65536
            try:
                for _ in range(800):  # 50 MiB at most
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                return
        elif self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/to-other-host":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/echo-auth")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/echo-auth":
            self.server.seen_auth.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    server.seen_auth = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def host():
    with _host() as server:
        yield server


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_port}{path}"


def _fetch(ref: str, **options) -> object:
    (got,) = fetch_images([{"id": 1, "data": {"image": ref}}], CONFIG, FetchOptions(**options))
    return got


def test_a_good_image_still_arrives(host):
    got = _fetch(_url(host, "/ok.png"))
    assert not isinstance(got, TaskError) and (got.width, got.height) == (8, 6)


def test_fetch_timeout_is_one_deadline_for_the_whole_image(host):
    t0 = time.monotonic()
    got = _fetch(_url(host, "/drip.png"), timeout=1.5)
    took = time.monotonic() - t0
    assert isinstance(got, TaskError) and got.kind == "fetch"
    assert "timed out after 1.5 s" in got.detail
    assert took < 4.0, took  # the drip sends a byte every 0.2 s: per-read timeouts never fire


def test_max_download_stops_reading_a_chunked_reply_at_the_limit(host):
    t0 = time.monotonic()
    got = _fetch(_url(host, "/chunked.png"), max_bytes=2 * 2**20, timeout=60)
    assert isinstance(got, TaskError) and "MAX_DOWNLOAD_MB" in got.detail
    assert "stopped reading at the limit" in got.detail
    assert time.monotonic() - t0 < 20


def test_link_local_and_metadata_addresses_are_refused_also_through_a_redirect(host):
    direct = _fetch("http://169.254.169.254/latest/meta-data/")
    assert isinstance(direct, TaskError) and "not an allowed destination" in direct.detail
    redirected = _fetch(_url(host, "/to-metadata"))
    assert isinstance(redirected, TaskError) and "not an allowed destination" in redirected.detail
    # an allow-list admits only what it names: loopback is refused when it is not listed
    only = _fetch(_url(host, "/ok.png"), allow_networks=("10.0.0.0/8",))
    assert isinstance(only, TaskError) and "not an allowed destination" in only.detail
    ok = _fetch(_url(host, "/ok.png"), allow_networks=("127.0.0.0/8",))
    assert not isinstance(ok, TaskError)


def test_closed_and_silent_ports_read_the_same():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP, never answers
    silent_port = silent.getsockname()[1]
    try:
        a = _fetch(f"http://127.0.0.1:{closed_port}/x.png", timeout=1.0)
        b = _fetch(f"http://127.0.0.1:{silent_port}/x.png", timeout=1.0)
    finally:
        silent.close()
    assert isinstance(a, TaskError) and isinstance(b, TaskError)
    assert a.detail.replace(str(closed_port), "P") == b.detail.replace(str(silent_port), "P")
    assert "no HTTP response from 127.0.0.1 within 1 s" in a.detail


def test_credentials_do_not_follow_a_redirect_to_another_host(host):
    got = _fetch(_url(host, "/to-other-host"), task_data_login="u", task_data_password="p")
    assert isinstance(got, TaskError) and "HTTP 404" in got.detail
    assert host.seen_auth == [None]


def test_an_image_host_error_says_what_failed(host):
    got = _fetch(_url(host, "/boom.png"))
    assert isinstance(got, TaskError) and "HTTP 500" in got.detail
    assert "server error" in got.detail


def test_credentials_in_an_image_url_are_not_echoed(host):
    url = f"http://alice:s3cret@127.0.0.1:{host.server_port}/boom.png"
    got = _fetch(url)
    assert isinstance(got, TaskError) and "s3cret" not in got.detail and "alice" not in got.detail


def test_a_symlink_out_of_the_local_files_root_is_refused_on_every_path(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png())
    (root / "inside.png").write_bytes(_png())
    os.symlink(secret, root / "link.png")
    for ref in ("link.png", "/data/local-files/?d=link.png"):
        got = _fetch(ref, local_files_root=root)
        assert isinstance(got, TaskError) and "outside LOCAL_FILES_DOCUMENT_ROOT" in got.detail
        assert str(root) not in got.detail  # the server's folder is not told
    ok = _fetch("/data/local-files/?d=inside.png", local_files_root=root)
    assert not isinstance(ok, TaskError)


def test_image_size_guards_name_their_setting(tmp_path):
    from nextchat_core.image_processing import load_image

    strip = tmp_path / "strip.png"
    Image.new("L", (40000, 40)).save(strip)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"aspect ratio of 1000:1.*NEXTCHAT_MAX_IMAGE_PIXELS"):
        load_image(strip)
    assert time.monotonic() - t0 < 2  # refused from the header, nothing decoded
    with pytest.raises(ValueError, match="at least 1x1"):
        from nextchat_core.image_processing import check_image_size

        check_image_size(0, 5)
    assert Path(strip).stat().st_size < 10_000
