"""The data-fetching layer against a local HTTP server (127.0.0.1 only) that misbehaves on demand.

The server supports Range requests and, per path, can drop the connection after N bytes, answer with an
error status (a number of times or always), serve an HTML "quota exceeded" page, announce a wrong
Content-Length or ignore Range. It records every request's path and headers.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from PIL import Image

from continual_bench.data import fetch
from continual_bench.data.fetch import (ChecksumLock, RateLimiter, download, download_many, fetch_manifest,
                                        resolve_manual, safe_extract, verify_image)
from continual_bench.data.manifests import load_manifest, parse_manifest
from continual_bench.utils import UserError

QUOTA_PAGE = b"<!DOCTYPE html><html><body>Quota exceeded for this file. Sign in.</body></html>"


# ------------------------------------------------------------------------------------------- server
@dataclass
class Behaviour:
    """How the server answers one path. Counters count down per request; ``None``/0 means "behave"."""

    status: int | None = None  # answer with this status ...
    status_times: int = 10**9  # ... this many times, then serve the file
    drop_after: int | None = None  # send this many body bytes, then close the connection ...
    drop_times: int = 10**9  # ... this many times
    html: bool = False  # 200 with an HTML quota page (Content-Type text/html)
    html_as_binary: bool = False  # the quota page labelled application/octet-stream
    extra_length: int = 0  # announce Content-Length + extra_length (and send only the real body)
    ignore_range: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def serve(self, path: str, data: bytes, **behaviour) -> str:
        self.files[path] = data
        self.behaviour[path] = Behaviour(**behaviour)
        return self.url(path)

    def seen(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, dict(self.headers)))
        if self.path not in srv.files:
            self.send_error(404)
            return
        data, b = srv.files[self.path], srv.behaviour[self.path]
        if b.status is not None and b.status_times > 0:
            b.status_times -= 1
            self.send_error(b.status)
            return
        if b.html or b.html_as_binary:
            self._send(200, QUOTA_PAGE, "text/html" if b.html else "application/octet-stream")
            return
        status, headers, body = 200, {}, data
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and not b.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self._send(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
                return
            status, body = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if b.drop_after is not None and b.drop_times > 0:
            b.drop_times -= 1
            self._send(status, body, headers=headers, length=len(body), cut=b.drop_after)
            return
        self._send(status, body, headers=headers, length=len(body) + b.extra_length)

    def _send(self, status, body, content_type="application/octet-stream", headers=None, length=None,
              cut=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def _server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server(_server, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # never send the test traffic to a proxy
    _server.files.clear()
    _server.behaviour.clear()
    _server.requests.clear()
    return _server


FAST = {"backoff": 0.0, "timeout": 5.0}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(n: int = 300_000) -> bytes:
    return bytes((i * 7919) % 251 for i in range(n))


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- download
def test_download_verifies_checksum(server, tmp_path):
    data = payload()
    url = server.serve("/a.bin", data)
    out = download(url, tmp_path / "a.bin", sha256=sha(data), md5=hashlib.md5(data).hexdigest(), **FAST)
    assert out.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert server.seen("/a.bin")[0]["Accept-Encoding"] == "identity"
    download(url, out, sha256=sha(data), **FAST)  # present and verified: no second request
    assert len(server.seen("/a.bin")) == 1


def test_resume_after_interrupted_transfer(server, tmp_path):
    data = payload()
    url = server.serve("/big.bin", data, drop_after=100_000, drop_times=1)
    with pytest.raises(UserError, match="run again to resume"):
        download(url, tmp_path / "big.bin", sha256=sha(data), retries=0, **FAST)
    part = tmp_path / "big.bin.part"
    kept = part.stat().st_size
    assert 0 < kept <= 100_000 and not (tmp_path / "big.bin").exists()
    out = download(url, tmp_path / "big.bin", sha256=sha(data), retries=0, **FAST)
    assert out.read_bytes() == data and not part.exists()
    first, second = server.seen("/big.bin")
    assert "Range" not in first and second["Range"] == f"bytes={kept}-"


def test_retry_resumes_within_one_call_and_after_5xx(server, tmp_path):
    data = payload()
    url = server.serve("/flaky.bin", data, drop_after=50_000, drop_times=1)
    assert download(url, tmp_path / "f.bin", sha256=sha(data), retries=1, **FAST).read_bytes() == data
    assert [("Range" in h) for h in server.seen("/flaky.bin")] == [False, True]
    url = server.serve("/busy.bin", data, status=503, status_times=2)
    assert download(url, tmp_path / "b.bin", sha256=sha(data), retries=2, **FAST).read_bytes() == data
    assert len(server.seen("/busy.bin")) == 3


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = payload()
    url = server.serve("/norange.bin", data, ignore_range=True)
    (tmp_path / "n.bin.part").write_bytes(b"stale bytes from another attempt")
    assert download(url, tmp_path / "n.bin", sha256=sha(data), retries=0, **FAST).read_bytes() == data
    assert "Range" in server.seen("/norange.bin")[0]


def test_404_is_not_retried(server, tmp_path):
    url = server.url("/missing.tar")
    with pytest.raises(UserError) as err:
        download(url, tmp_path / "missing.tar", retries=3, **FAST)
    assert url in str(err.value) and "404" in str(err.value) and "\n" not in str(err.value)
    assert len(server.seen("/missing.tar")) == 1


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url = server.serve("/c.bin", payload(1000))
    with pytest.raises(UserError) as err:
        download(url, tmp_path / "c.bin", sha256="0" * 64, **FAST)
    msg = str(err.value)
    assert "c.bin" in msg and "0" * 64 in msg and sha(payload(1000)) in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_html_page_is_refused(server, tmp_path):
    url = server.serve("/data.zip", b"PK", html=True)
    with pytest.raises(UserError, match=r"got an HTML page \(quota or login page\?\)"):
        download(url, tmp_path / "data.zip", **FAST)
    url = server.serve("/img.jpg", b"", html_as_binary=True)  # sniffed from the body
    with pytest.raises(UserError, match="HTML page"):
        download(url, tmp_path / "img.jpg", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_wrong_content_length_is_truncation(server, tmp_path):
    data = payload(5000)
    url = server.serve("/short.tar", data, extra_length=100)
    with pytest.raises(UserError, match="truncated transfer: got 5000 of 5100 bytes"):
        download(url, tmp_path / "short.tar", retries=0, **FAST)
    assert not (tmp_path / "short.tar").exists()
    # the retry asks for bytes=5000-; the server's 416 says the file has 5000 bytes: complete, verified
    assert download(url, tmp_path / "short.tar", sha256=sha(data), retries=0, **FAST).read_bytes() == data
    assert server.seen("/short.tar")[1]["Range"] == "bytes=5000-"


def test_size_mismatch(server, tmp_path):
    url = server.serve("/s.bin", payload(1000))
    with pytest.raises(UserError, match="size mismatch"):
        download(url, tmp_path / "s.bin", size=999, **FAST)


def test_rate_limiter_spaces_requests_per_host():
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait("a.org", 1.0)
    limiter.wait("b.org", 1.0)  # another host does not wait
    assert slept == [1.0, 1.0]


def test_download_many_skips_verified_files_and_reports_failures(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_RATE_LIMITER", RateLimiter())
    good, bad = png_bytes(), png_bytes()[:40]
    urls = {"w1/a.png": server.serve("/a.png", good), "w1/b.png": server.serve("/b.png", bad),
            "w2/c.png": server.url("/gone.png")}
    lock = ChecksumLock(tmp_path / "lock.json")
    t0 = time.monotonic()
    res = download_many(urls, tmp_path / "img", lock, min_interval=0.05, retries=0, backoff=0.0)
    assert time.monotonic() - t0 >= 0.1  # three requests, at least 2 intervals
    assert set(res.ok) == {"w1/a.png"} and set(res.failed) == {"w1/b.png", "w2/c.png"}
    assert "corrupt image" in res.failed["w1/b.png"] and "404" in res.failed["w2/c.png"]
    assert not (tmp_path / "img/w1/b.png").exists() and lock.get("w1/b.png") is None
    assert json.loads((tmp_path / "lock.json").read_text())["sha256"] == {"w1/a.png": sha(good)}
    n = len(server.requests)
    res = download_many({"w1/a.png": urls["w1/a.png"]}, tmp_path / "img", lock, min_interval=0.05)
    assert set(res.ok) == {"w1/a.png"} and len(server.requests) == n  # resumed: no request at all


def test_download_shows_a_byte_bar_and_logs_each_verified_file(server, tmp_path, monkeypatch, caplog, capsys):
    """A resumed transfer's bar counts every byte of the file (it resumes where the part stopped) and ends at 100%;
    a log line says the file arrived and what it was checked against; CONTINUAL_BENCH_NO_TQDM=1 hides the bar."""
    monkeypatch.delenv("CONTINUAL_BENCH_NO_TQDM", raising=False)
    caplog.set_level("INFO", logger="continual_bench")
    data = payload()
    url = server.serve("/progress.bin", data, drop_after=100_000, drop_times=1)
    dest = tmp_path / "progress.bin"
    download(url, dest, sha256=sha(data), size=len(data), retries=1, **FAST)
    err = capsys.readouterr().err
    assert "download progress.bin: 100%" in err and "293k/293k" in err  # 300,000 bytes in KiB
    assert f"downloaded {dest}: {len(data)} bytes, size and sha256 ok" in caplog.messages
    download(url, dest, sha256=sha(data), **FAST)
    assert f"{dest}: already here, sha256 ok" in caplog.messages
    monkeypatch.setenv("CONTINUAL_BENCH_NO_TQDM", "1")
    download(server.serve("/quiet.bin", data), tmp_path / "quiet.bin", sha256=sha(data), **FAST)
    assert "quiet.bin" not in capsys.readouterr().err


def test_download_many_counts_every_file_in_one_bar_and_logs_no_line_per_file(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fetch, "_RATE_LIMITER", RateLimiter())
    caplog.set_level("INFO", logger="continual_bench")

    class Bar:  # a crawl's shared bar: counts what it is told
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    urls = {"a.png": server.serve("/a.png", png_bytes()), "b.png": server.url("/gone.png")}
    res = download_many(urls, tmp_path, ChecksumLock(tmp_path / "lock.json"), min_interval=0, retries=0, bar=bar,
                        **FAST)
    assert set(res.ok) == {"a.png"} and bar.n == 2  # failures count too
    assert not [m for m in caplog.messages if m.startswith("downloaded ")]


# ------------------------------------------------------------------------------------------ archives
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def test_safe_extract_tar_and_zip(tmp_path):
    arch = _tar(tmp_path / "ok.tar.gz", [(_file("d/a.txt"), b"a"), (_file("b.txt"), b"bb")])
    out = safe_extract(arch, tmp_path / "ok")
    assert (out / "d/a.txt").read_bytes() == b"a" and (out / "b.txt").read_bytes() == b"bb"
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        zf.writestr("x/y.txt", "y")
    assert (safe_extract(tmp_path / "ok.zip", tmp_path / "z") / "x/y.txt").read_text() == "y"
    with pytest.raises(UserError, match="already exists"):
        safe_extract(arch, tmp_path / "ok")


def _symlink() -> tarfile.TarInfo:
    info = tarfile.TarInfo("link")
    info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    return info


def _fifo() -> tarfile.TarInfo:
    info = tarfile.TarInfo("pipe")
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize("member, reason", [
    ((_file("../evil"), b"x"), "'..'"),
    ((_file("/abs/evil"), b"x"), "absolute"),
    ((_symlink(), None), "link"),
    ((_fifo(), None), "special file"),
])
def test_safe_extract_refuses_unsafe_tar_members(tmp_path, member, reason):
    work = tmp_path / "work"
    work.mkdir()
    arch = _tar(tmp_path / "bad.tar", [(_file("fine.txt"), b"ok"), member])
    with pytest.raises(UserError, match=reason) as err:
        safe_extract(arch, work / "out")
    assert member[0].name in str(err.value)
    assert list(work.iterdir()) == []  # no output dir, no leftover temporary dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "work"]  # nothing written beside it


def _zip_member(name: str, mode: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.create_system = 3  # unix: the high 16 bits of external_attr are st_mode
        info.external_attr = mode << 16
    return info


@pytest.mark.parametrize("members, reason", [
    ([("../evil.txt", None)], r"'\.\./evil\.txt' \('\.\.'"),
    ([("/abs/evil.txt", None)], r"'/abs/evil\.txt' \(absolute"),
    ([("link", stat.S_IFLNK | 0o777)], r"'link' \(symbolic link"),
    ([("", None)], r"'' \(empty name"),
    ([("a", None), ("a/b.txt", None)], r"'a' \(a file, and 'a/b\.txt' needs a folder"),
    ([("a/b.txt", None), ("a", None)], r"'a' \(a file, and 'a/b\.txt' needs a folder"),
    ([("a/", None), ("a", None)], r"'a' \(a file, and 'a/' needs a folder"),
])
def test_safe_extract_refuses_unsafe_zip_members(tmp_path, members, reason):
    """Each refusal is a UserError naming the member, and nothing is written (no output, no temporary folder)."""
    work = tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("fine.txt", "ok")
        for name, mode in members:
            zf.writestr(_zip_member(name, mode), "../../etc/passwd" if mode else "x")
    with pytest.raises(UserError, match=reason) as err:
        safe_extract(tmp_path / "bad.zip", work / "out")
    assert "\n" not in str(err.value) and str(tmp_path / "bad.zip") in str(err.value)
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "work"]


def test_safe_extract_refuses_tar_file_where_a_folder_is_needed(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    arch = _tar(tmp_path / "bad.tar", [(_file("a"), b"x"), (_file("a/b.txt"), b"y")])
    with pytest.raises(UserError, match=r"'a' \(a file, and 'a/b\.txt' needs a folder"):
        safe_extract(arch, work / "out")
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("name", ["t.tar.gz", "t.tar", "t.zip"])
def test_truncated_archive(tmp_path, name):
    big = payload(200_000)
    if name.endswith(".zip"):
        with zipfile.ZipFile(tmp_path / name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("a.bin", big)
    else:
        _tar(tmp_path / name, [(_file("a.bin"), big), (_file("b.bin"), big)])
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt archive") as err:
        safe_extract(tmp_path / name, tmp_path / "out")
    assert name in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_verify_image(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    verify_image(good)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:300])
    (tmp_path / "text.jpg").write_bytes(QUOTA_PAGE)
    for name in ("cut.jpg", "text.jpg"):
        with pytest.raises(UserError, match="corrupt image") as err:
            verify_image(tmp_path / name)
        assert name in str(err.value)


# ----------------------------------------------------------------------------- locks, manual files
def test_checksum_lock_records_then_verifies(tmp_path):
    f = tmp_path / "f.csv"
    f.write_text("id,url\n")
    lock = ChecksumLock(tmp_path / "sub/lock.json")
    assert lock.verify_or_record("meta/f.csv", f) == sha("id,url\n".encode())
    reloaded = ChecksumLock(tmp_path / "sub/lock.json")  # persisted
    assert reloaded.get("meta/f.csv") == sha(b"id,url\n")
    f.write_text("id,url\nchanged\n")
    with pytest.raises(UserError, match="sha256 mismatch") as err:
        reloaded.verify_or_record("meta/f.csv", f)
    assert "meta/f.csv" in str(err.value) and sha(b"id,url\n") in str(err.value)
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(UserError, match="not a checksum lock file"):
        ChecksumLock(tmp_path / "broken.json")


def test_resolve_manual(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_manual(tmp_path, "identity_CelebA.txt", "ab" * 32, source="https://drive.example/x",
                       instructions="Download it\n   after accepting the terms.")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "identity_CelebA.txt") in msg and "ab" * 32 in msg
    assert "https://drive.example/x" in msg and "after accepting the terms" in msg
    with pytest.raises(UserError, match="first copy found is locked"):
        resolve_manual(None, "CelebAMask-HQ.zip")
    (tmp_path / "identity_CelebA.txt").write_bytes(b"000001.jpg 2880\n")
    assert resolve_manual(tmp_path, "identity_CelebA.txt", sha(b"000001.jpg 2880\n")).is_file()
    with pytest.raises(UserError, match="sha256 mismatch"):
        resolve_manual(tmp_path, "identity_CelebA.txt", "ab" * 32)


# ----------------------------------------------------------------------------------------- manifests
def _manifest(tmp_path: Path, raw: dict, name: str = "toyset") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _raw(**files_extra) -> dict:
    return {"name": "toyset", "title": "t", "homepage": "https://example.org", "license": "CC0",
            "files": [{"path": "a.bin", "url": "https://example.org/a.bin", "sha256": None, **files_extra}],
            "selection": {"rule": "all", "params": {"n": 1}}}


def test_shipped_manifests_load():
    for name in ("imagenet_r", "celeba_hq", "gldv2_waterfalls"):
        m = load_manifest(name)
        assert m.name == name and m.files and m.selection_rule and m.license
    splits = {f.path: f for f in load_manifest("imagenet_r").files}
    assert splits["splits/imagenet-r_train.yaml"].sha256.startswith("6bcaa14c")
    assert all(f.manual and f.instructions for f in load_manifest("celeba_hq").files)


@pytest.mark.parametrize("raw, message", [
    ({**_raw(), "licence": "x"}, "unknown key 'licence'"),
    (_raw(md5sum="x"), r"files\[0\] \(a.bin\): unknown key 'md5sum'"),
    (_raw(sha256="abc"), "'sha256' must be 64 hex digits"),
    ({**_raw(), "files": [{"path": "../a.bin", "url": "https://e.org/a"}]}, "relative path inside"),
    ({**_raw(), "files": [{"path": "a.bin", "manual": True}]}, "'instructions' must be"),
    ({**_raw(), "selection": {"rule": "r", "seed": 1}}, "selection: unknown key 'seed'"),
    ({**_raw(), "name": "other"}, "'name' is 'other'"),
    (_raw(provides=["x"]), "set 'extract' too"),
])
def test_manifest_validation(tmp_path, raw, message):
    path = _manifest(tmp_path, raw)
    with pytest.raises(UserError, match=message) as err:
        load_manifest(path)
    assert str(path) in str(err.value)


def test_manifest_duplicate_key(tmp_path):
    path = tmp_path / "toyset.yaml"
    path.write_text(yaml.safe_dump(_raw()) + "title: again\n")
    with pytest.raises(UserError, match="given twice"):
        load_manifest(path)


def test_fetch_manifest_end_to_end(server, tmp_path):
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w") as tf:
        info = tarfile.TarInfo("top/x.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    tar = blob.getvalue()
    raw = {"name": "toyset", "title": "t", "homepage": "https://example.org", "license": "CC0",
           "files": [{"path": "arch/t.tar", "url": server.serve("/t.tar", tar), "sha256": sha(tar),
                      "extract": "ex", "provides": ["top/x.txt"]},
                     {"path": "meta.csv", "url": server.serve("/meta.csv", b"a,b\n")},
                     {"path": "manual.txt", "manual": True, "instructions": "by hand"}],
           "selection": {"rule": "all"}}
    manifest = parse_manifest(raw, tmp_path / "toyset.yaml")
    manual = tmp_path / "manual"
    with pytest.raises(UserError, match="manual download required"):
        fetch_manifest(manifest, tmp_path / "out", manual_dir=manual, **FAST)
    manual.mkdir()
    (manual / "manual.txt").write_text("mine")
    files = fetch_manifest(manifest, tmp_path / "out", manual_dir=manual, **FAST)
    out = tmp_path / "out"
    assert (out / "ex/top/x.txt").read_text() == "x" and files["manual.txt"].read_text() == "mine"
    assert set(json.loads((out / "checksums.lock.json").read_text())["sha256"]) == {"meta.csv", "manual.txt"}
    n = len(server.requests)
    fetch_manifest(manifest, out, manual_dir=manual, **FAST)  # everything present and verified
    assert len(server.requests) == n
    (manual / "manual.txt").write_text("changed")
    with pytest.raises(UserError, match="sha256 mismatch"):
        fetch_manifest(manifest, out, manual_dir=manual, **FAST)
