"""Fetching the paper profile's real datasets: verified downloads, safe extraction, checksum locks.

Everything here fails loudly with a one-line :class:`~continual_bench.utils.UserError` naming the file or
URL, because the problems users of continual-learning codebases report most are dead links, quota pages
saved as ``.zip`` files, half-downloaded archives and silently different data.

Design
------
* :func:`download` streams into ``<dest>.part`` and renames it onto ``dest`` only after the size and
  checksum were verified, so ``dest`` existing means "complete and verified". An interrupted transfer is
  resumed with an HTTP ``Range`` request (restarting cleanly when the server ignores it), retried with
  exponential backoff on connection errors, 429 and 5xx, and never retried on other 4xx answers.
  The retry/resume loop is written here on top of ``requests``: pooch's ``HTTPDownloader`` restarts from
  zero instead of resuming, and urllib3's ``Retry`` only covers getting a response, not a body cut off
  mid-stream (the common failure for multi-GB archives). One loop handles both. Bytes are read raw
  (``decode_content=False``, ``Accept-Encoding: identity``) so offsets, lengths and hashes refer to the
  bytes on the server, even when a server wrongly labels a ``.tar.gz`` with ``Content-Encoding: gzip``.
* An HTML page where a data file was expected (a login, quota or "virus scan" page) is refused, by its
  ``Content-Type`` or by its first bytes. None of the files this project fetches is HTML.
* Sources that publish no checksums are pinned on first use with a :class:`ChecksumLock` (sha256 per
  relative path in a JSON file): the first download records, later ones must match.
* Files that cannot be fetched automatically (Celeb-A HQ lives behind Google Drive) are placed by the
  user in a ``manual_dir`` (as in TFDS); :func:`resolve_manual` verifies them or says exactly what to put
  where.
* :func:`safe_extract` checks every archive member itself (no absolute paths, no ``..``, no links, no
  devices) before extracting into a temporary directory beside ``dest`` and renaming it into place.
* :func:`download_many` fetches many small files (GLDv2 images) politely: a minimum interval between
  requests to one host, files already present and verified are skipped (so a rerun resumes), and a dead
  link or corrupt image is reported per file instead of stopping the batch.
* :func:`fetch_manifest` runs all of the above for one :class:`~continual_bench.data.manifests.Manifest`;
  with ``offline`` it only verifies the files already present and names the first missing one; with
  ``base_url`` every URL is fetched from a mirror laid out as ``<base_url>/<host>/<path>``
  (:func:`mirror_url`; the tests serve such a mirror from 127.0.0.1).
* Hugging Face downloads carry ``Authorization: Bearer $HF_TOKEN`` when that variable is set (gated
  repositories such as Stable Diffusion v1.4 need it); requests drops the header on the redirect to the
  content host.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import requests
import urllib3
from PIL import Image, UnidentifiedImageError

from .. import __version__
from ..utils import UserError, atomic_write_json, progress
from .manifests import Manifest

log = logging.getLogger("continual_bench")

CHUNK = 1 << 16
USER_AGENT = f"continual-bench/{__version__} (dataset fetcher; python-requests)"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
HTML_MESSAGE = "got an HTML page (quota or login page?) instead of the file"
_HTML_PREFIXES = (b"<!doctype", b"<html")
HF_HOSTS = frozenset({"huggingface.co"})


def mirror_url(url: str, base_url: str | None) -> str:
    """``url`` itself, or with a mirror ``base_url``: ``scheme://host/path?query`` -> ``<base_url>/host/path?query``."""
    if not base_url:
        return url
    parts = urlsplit(url)
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{base_url.rstrip('/')}/{parts.netloc}{rest}"


def _auth_headers(url: str) -> dict[str, str]:
    token = os.environ.get("HF_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token and urlsplit(url).hostname in HF_HOSTS else {}


# --------------------------------------------------------------------------------------------- hashes
def file_digests(path: str | Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each hashlib algorithm name, in one pass over the file."""
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def sha256_file(path: str | Path) -> str:
    return file_digests(path)["sha256"]


def check_sha256_prefix(actual: str, prefix: str | None, name: str | Path) -> None:
    """A file named after its hash (torch hub's ``<name>-<first hex digits of sha256>.pth``) must match it."""
    if prefix and not actual.startswith(prefix.lower()):
        raise UserError(f"{name}: sha256 {actual} does not start with the published prefix {prefix}")


def verify_checksums(path: Path, *, sha256: str | None = None, md5: str | None = None,
                     name: str | Path | None = None) -> None:
    """Raise a UserError naming ``name`` (default ``path``), the expected and the actual hash on mismatch."""
    expected = {k: v.lower() for k, v in (("sha256", sha256), ("md5", md5)) if v}
    if not expected:
        return
    actual = file_digests(path, tuple(expected))
    for algo, want in expected.items():
        if actual[algo] != want:
            raise UserError(f"{name or path}: {algo} mismatch (expected {want}, got {actual[algo]})")


# ----------------------------------------------------------------------------------------- rate limit
class RateLimiter:
    """At least ``min_interval`` seconds between consecutive requests to one host (thread-safe).

    :func:`download` shares one module-level instance, so its ``min_interval`` spaces requests across
    calls, which is what a polite crawl of many small files (GLDv2 images on Wikimedia) needs.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self._clock, self._sleep = clock, sleep
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str, min_interval: float) -> None:
        if min_interval <= 0:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next.get(host, now))
            self._next[host] = start + min_interval
        if start > now:
            self._sleep(start - now)


_RATE_LIMITER = RateLimiter()


# ------------------------------------------------------------------------------------------- download
class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, 429/5xx, body shorter than announced)."""

    def __init__(self, reason: str, retry_after: float = 0.0):
        super().__init__(reason)
        self.retry_after = retry_after


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_PREFIXES)


def _retry_after(resp: requests.Response) -> float:
    value = resp.headers.get("Retry-After", "")
    return min(float(value), 300.0) if value.isdigit() else 0.0


def _content_range(resp: requests.Response) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` or ``bytes */total`` header."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
    if not m:
        return None, None
    first, total = m.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


_NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError)


def _attempt(session: requests.Session, url: str, part: Path, timeout: float, min_interval: float, bar) -> None:
    """One HTTP request that appends to (or restarts) ``part``, counting the bytes in ``bar`` (a tqdm); raises
    _Transient or UserError."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity", **_auth_headers(url)}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    _RATE_LIMITER.wait(urlsplit(url).netloc, min_interval)
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
            status = resp.status_code
            if status == 416 and offset:  # nothing left to send: complete, or a stale longer .part
                if _content_range(resp)[1] == offset:
                    return
                part.unlink()
                raise _Transient(f"discarded a partial file that does not match the server's ({offset} bytes)")
            if status in RETRY_STATUS:
                raise _Transient(f"HTTP {status} {resp.reason}", _retry_after(resp))
            if status >= 400:
                raise UserError(f"{url}: HTTP {status} {resp.reason}")
            if status not in (200, 206):
                raise UserError(f"{url}: unexpected HTTP status {status} {resp.reason}")
            if "text/html" in resp.headers.get("Content-Type", "").lower():
                raise UserError(f"{url}: {HTML_MESSAGE}")
            if status == 206:
                if _content_range(resp)[0] != offset:
                    part.unlink()
                    raise _Transient(f"server answered another range than bytes={offset}-")
                mode = "ab"
            else:  # no Range asked, or the server ignored it: start over
                mode, offset = "wb", 0
            announced = resp.headers.get("Content-Length", "")
            expected = offset + int(announced) if announced.isdigit() else None
            received = offset
            bar.reset(total=expected)  # a resumed range or a restart: the bar follows the file
            bar.update(offset)
            try:
                with open(part, mode) as f:
                    for chunk in resp.raw.stream(CHUNK, decode_content=False):
                        f.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            except _NETWORK_ERRORS as exc:
                if expected is None:
                    raise
                raise _Transient(f"truncated transfer: got {received} of {expected} bytes "
                                 f"({type(exc).__name__})") from exc
            if expected is not None and received != expected:
                raise _Transient(f"truncated transfer: got {received} of {expected} bytes")
    except _NETWORK_ERRORS as exc:
        raise _Transient(f"{type(exc).__name__}: {_one_line(exc)}") from exc
    except requests.RequestException as exc:  # bad URL, too many redirects, ...: retrying cannot help
        raise UserError(f"{url}: {type(exc).__name__}: {_one_line(exc)}") from None


def _checked(sha256: str | None, md5: str | None, size: int | None) -> str:
    """What a verified download was checked against, in words (for its log line)."""
    done = [what for what, given in (("size", size), ("sha256", sha256), ("md5", md5)) if given is not None]
    return " and ".join(done) + " ok" if done else "no checksum given (locked by the caller)"


def download(url: str, dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
             size: int | None = None, retries: int = 3, timeout: float = 60.0, min_interval: float = 0.0,
             backoff: float = 1.0, session: requests.Session | None = None, report: bool = True) -> Path:
    """Download ``url`` to ``dest``, resumably, and verify it before it appears at ``dest``.

    ``dest`` already present: kept if it matches the given checksums (or if none are given), replaced
    otherwise. ``retries``: further attempts after the first, waiting ``backoff * 2**i`` seconds (or the
    server's ``Retry-After``); each resumes from ``<dest>.part``, which is also kept for a later call when
    all attempts fail. ``timeout``: seconds without progress on connect or read. ``min_interval``: at
    least this many seconds between requests to the host, across calls. ``size``: expected bytes. ``report``: a
    progress bar of the bytes (:func:`~continual_bench.utils.progress`) and a log line when the file is verified
    (:func:`download_many` reports per batch instead).
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify_checksums(dest, sha256=sha256, md5=md5)
            if report:
                log.info("%s: already here, %s", dest, _checked(sha256, md5, None))
            return dest
        except UserError as exc:
            log.warning("%s; downloading it again", exc)
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or new_session()
    bar = progress(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {dest.name}",
                   **({} if report else {"disable": True}))
    try:
        for attempt in range(retries + 1):
            try:
                _attempt(session, url, part, timeout, min_interval, bar)
                break
            except _Transient as exc:
                if attempt == retries:
                    resume = f"; run again to resume from {part}" if part.exists() else ""
                    raise UserError(f"{url}: download failed after {retries + 1} attempt(s) ({exc}){resume}") from None
                delay = max(exc.retry_after, backoff * 2**attempt)
                log.warning("%s: %s; retrying in %.1f s", url, exc, delay)
                time.sleep(delay)
    finally:
        bar.close()
        if own_session:
            session.close()
    _check_complete(part, url, dest, sha256=sha256, md5=md5, size=size)
    os.replace(part, dest)
    if report:
        log.info("downloaded %s: %d bytes, %s", dest, dest.stat().st_size, _checked(sha256, md5, size))
    return dest


def _check_complete(part: Path, url: str, dest: Path, *, sha256: str | None, md5: str | None,
                    size: int | None) -> None:
    """Size, HTML sniff and checksums of a finished ``part``; on failure it is deleted (never resumed)."""
    try:
        with open(part, "rb") as f:
            if _looks_like_html(f.read(512)):
                raise UserError(f"{url}: {HTML_MESSAGE}")
        actual = part.stat().st_size
        if size is not None and actual != size:
            raise UserError(f"{dest}: size mismatch (expected {size} bytes, got {actual})")
        verify_checksums(part, sha256=sha256, md5=md5, name=dest)
    except UserError:
        part.unlink()
        raise


def new_session() -> requests.Session:
    """A requests session with this project's User-Agent (Wikimedia and others require one)."""
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    return session


# -------------------------------------------------------------------------------------- checksum lock
class ChecksumLock:
    """sha256 per relative path, pinned on first use, for sources that publish no checksums.

    The lock is a JSON file ``{"version": 1, "sha256": {relative path: hex}}``, rewritten atomically on
    every new entry (one writer at a time: give parallel jobs separate lock files). Commit it next to a
    manifest to pin the data for every user of the repository.
    """

    VERSION = 1

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries: dict[str, str] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                entries = data["sha256"]
                ok = data.get("version") == self.VERSION and isinstance(entries, dict) and all(
                    isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                    for k, v in entries.items())
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise UserError(f"{self.path}: not a checksum lock file (expected "
                                f'{{"version": {self.VERSION}, "sha256": {{path: sha256}}}})')
            self._entries = dict(entries)

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def record(self, key: str, sha256: str) -> None:
        self._entries[key] = sha256
        atomic_write_json(self.path, {"version": self.VERSION, "sha256": self._entries})

    def verify_or_record(self, key: str, file: str | Path) -> str:
        """Check ``file`` against the locked hash of ``key``, or lock it if ``key`` is new; return the hash."""
        actual = sha256_file(file)
        expected = self._entries.get(key)
        if expected is None:
            self.record(key, actual)
            log.info("%s: sha256 %s locked in %s", key, actual, self.path)
        elif actual != expected:
            raise UserError(f"{file}: sha256 mismatch with {self.path} entry '{key}' (expected {expected}, "
                            f"got {actual}); if the source changed on purpose, delete that entry")
        return actual


def download_locked(url: str, dest: str | Path, lock: ChecksumLock, key: str, **kwargs) -> Path:
    """:func:`download` verified against ``lock[key]``; the first download of ``key`` records its hash."""
    expected = lock.get(key)
    dest = download(url, dest, sha256=expected, **kwargs)
    if expected is None:
        lock.verify_or_record(key, dest)
    return dest


# ---------------------------------------------------------------------------------- many small files
@dataclass
class BatchResult:
    """Outcome of :func:`download_many`: files now present and verified, and the reason per failure."""

    ok: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def download_many(urls: Mapping[str, str], root: str | Path, lock: ChecksumLock, *, images: bool = True,
                  min_interval: float = 1.0, retries: int = 2, timeout: float = 30.0,
                  backoff: float = 1.0, bar=None) -> BatchResult:
    """Fetch ``{relative path: url}`` under ``root``, politely, resuming where a previous call stopped.

    A file already at its path and matching its lock entry costs no request. Each new file must decode
    with :func:`verify_image` (with ``images``) and is then locked in ``lock`` (key: its relative path). A
    failing file (dead link, HTML page, corrupt image) is deleted and listed in ``failed`` while the batch
    goes on; the caller decides whether enough files came through. ``bar``: a progress bar (tqdm) to count the
    files in (a crawl of many batches shares one); default: one of this batch.
    """
    root = Path(root)
    result = BatchResult()
    own_bar = bar is None
    bar = progress(total=len(urls), unit="file", desc="download") if own_bar else bar
    with new_session() as session:
        for rel, url in urls.items():
            dest = root / rel
            expected = lock.get(rel)
            try:
                download(url, dest, sha256=expected, min_interval=min_interval, retries=retries,
                         timeout=timeout, backoff=backoff, session=session, report=False)
                if expected is None:  # a locked file passed these checks before it was locked
                    if images:
                        verify_image(dest)
                    lock.verify_or_record(rel, dest)
            except UserError as exc:
                if dest.exists():
                    dest.unlink()
                result.failed[rel] = str(exc)
                log.warning("%s", exc)
            else:
                result.ok[rel] = dest
            bar.update(1)
    if own_bar:
        bar.close()
    return result


# -------------------------------------------------------------------------------------------- images
def verify_image(path: str | Path) -> None:
    """Raise a UserError "corrupt image" unless ``path`` decodes completely with PIL."""
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums, without decoding pixels
        with Image.open(path) as im:  # verify() leaves the image unusable: reopen and decode everything
            im.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: corrupt image ({_one_line(exc)})") from None


# ------------------------------------------------------------------------------------------ archives
def _member_path(archive: Path, name: str) -> PurePosixPath:
    """The member's path if it is relative and has no ``..``; else a UserError naming the member."""
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UserError(f"{archive}: refusing member '{name}' (absolute path)")
    if "\\" in name:  # a Windows separator: '..\\x' would be a literal name here, but is never meant as one
        raise UserError(f"{archive}: refusing member '{name}' (backslash in its path)")
    if ".." in path.parts:
        raise UserError(f"{archive}: refusing member '{name}' ('..' in its path)")
    return path


def _check_layout(archive: Path, members: list[tuple[str, bool]]) -> None:
    """No member may be a file where another member needs a folder (``a`` and ``a/b``, or ``a`` and ``a/``, in either
    order): (name, is_dir) pairs of the already checked members. (A file listed twice is extracted twice, the last
    copy winning, as tar does.)"""
    files: dict[tuple[str, ...], str] = {}
    dirs: dict[tuple[str, ...], str] = {}
    for name, is_dir in members:
        parts = PurePosixPath(name).parts
        for i in range(1, len(parts)):
            dirs.setdefault(parts[:i], name)
        if is_dir:
            dirs.setdefault(parts, name)
        else:
            files.setdefault(parts, name)
    for parts, name in files.items():
        if parts in dirs:
            raise UserError(f"{archive}: refusing member '{name}' (a file, and '{dirs[parts]}' needs a folder of "
                            "that name)")


def _check_tar_member(archive: Path, m: tarfile.TarInfo) -> None:
    _member_path(archive, m.name)
    if m.issym() or m.islnk():
        raise UserError(f"{archive}: refusing member '{m.name}' (link to '{m.linkname}')")
    if not (m.isfile() or m.isdir()):
        raise UserError(f"{archive}: refusing member '{m.name}' (device, fifo or other special file)")


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:" if archive.name.endswith(".tar") else "r:gz") as tf:
        members = tf.getmembers()
        for m in members:
            _check_tar_member(archive, m)
        _check_layout(archive, [(m.name, m.isdir()) for m in members])
        # Members were checked above; the "data" filter is a second line of defence (and clears unsafe
        # mode bits such as setuid).
        tf.extractall(target, members=members, filter="data")


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            if not info.filename.strip("/"):  # ZipInfo.is_dir() fails on an empty name
                raise UserError(f"{archive}: refusing member '{info.filename}' (empty name)")
            path = _member_path(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UserError(f"{archive}: refusing member '{info.filename}' (symbolic link)")
            if not path.parts and not info.is_dir():
                raise UserError(f"{archive}: refusing member '{info.filename}' (empty name)")
        _check_layout(archive, [(info.filename, info.is_dir()) for info in infos])
        for info in infos:  # written by hand: ZipFile.extract silently rewrites unsafe names instead
            out = target.joinpath(*PurePosixPath(info.filename).parts)
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:  # reading checks each member's CRC
                shutil.copyfileobj(src, dst, CHUNK)


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a .tar, .tar.gz/.tgz or .zip archive (told apart by name) to the new directory ``dest``.

    Every member is checked first: absolute paths, ``..`` components, symbolic and hard links, devices
    and fifos are refused with a UserError naming the member. Extraction goes to a temporary directory
    beside ``dest`` (removed on failure) that is renamed to ``dest`` only when everything succeeded, so
    nothing is written elsewhere and ``dest`` never holds a partial extraction. A truncated or corrupt
    archive gives a UserError naming it. (A tar cut exactly at a member boundary reads as a shorter
    valid tar: only a checksum of the archive catches that, which is why downloads are verified.)
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise UserError(f"{archive}: archive not found")
    if dest.exists():
        raise UserError(f"{dest}: already exists; remove it to extract {archive.name} again")
    if archive.name.endswith(".zip"):
        extract = _extract_zip
    elif archive.name.endswith((".tar", ".tar.gz", ".tgz")):
        extract = _extract_tar
    else:
        raise UserError(f"{archive}: unknown archive type (expected .tar, .tar.gz, .tgz or .zip)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
    try:
        try:
            extract(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise UserError(f"{archive}: truncated or corrupt archive ({_one_line(exc)})") from None
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; datasets are meant to be shared
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


# -------------------------------------------------------------------------------------- manual files
def resolve_manual(manual_dir: str | Path | None, filename: str, sha256: str | None = None, *,
                   md5: str | None = None, source: str = "", instructions: str = "") -> Path:
    """The verified file ``manual_dir/filename`` that a user downloaded by hand (like TFDS ``manual_dir``).

    Missing: a UserError saying which file to download from where, where to put it, and which checksum it
    must have. Present: its checksums are verified (with none known, the caller locks it on first use).
    """
    path = Path(manual_dir) / filename if manual_dir is not None else None
    if path is None or not path.is_file():
        where = path if path is not None else f"<dir>/{filename} and pass <dir> as the manual directory"
        check = (f"expected sha256 {sha256}" if sha256 else f"expected md5 {md5}" if md5
                 else "no published checksum: the first copy found is locked")
        how = _one_line(instructions) or "download it by hand"
        raise UserError(f"{filename}: manual download required: {how}" + (f" (from {source})" if source else "")
                        + f"; place it at {where}; {check}")
    verify_checksums(path, sha256=sha256, md5=md5)
    return path


def _link_or_copy(src: Path, dest: Path) -> None:
    """Make ``dest`` a hard link to ``src`` (a copy across file systems), atomically."""
    if dest.exists() and dest.samefile(src):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.linking")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ manifest
def fetch_manifest(manifest: Manifest, out: str | Path, *, manual_dir: str | Path | None = None,
                   lock: ChecksumLock | None = None, retries: int = 3, timeout: float = 60.0,
                   min_interval: float = 0.0, backoff: float = 1.0, offline: bool = False,
                   base_url: str | None = None) -> dict[str, Path]:
    """Fetch, verify and extract every file of ``manifest`` under ``out``; return ``{path: local file}``.

    Files with a sha256 or md5 in the manifest are verified against it; the others against ``lock``
    (default ``out/checksums.lock.json``), which records them on first use; a ``sha256_prefix`` is checked
    as well. Manual files are taken from ``manual_dir`` and hard-linked (or copied) to ``out/<path>``. An
    ``extract`` directory already present is not extracted again (it only ever appears complete); its
    ``provides`` paths must exist. ``offline``: nothing is downloaded; every file must already be at
    ``out/<path>`` (and verify), else a UserError names the first missing one. ``base_url``: fetch from a
    mirror (:func:`mirror_url`).
    """
    out = Path(out)
    lock = lock or ChecksumLock(out / "checksums.lock.json")
    files: dict[str, Path] = {}
    for entry in manifest.files:
        dest = out / entry.path
        pinned = bool(entry.sha256 or entry.md5)
        if entry.manual:
            src = resolve_manual(manual_dir, PurePosixPath(entry.path).name, entry.sha256, md5=entry.md5,
                                 source=entry.url or manifest.homepage, instructions=entry.instructions)
            if not pinned:
                lock.verify_or_record(entry.path, src)
            _link_or_copy(src, dest)
            log.info("%s: taken from %s, %s", dest, src, _checked(entry.sha256, entry.md5, None))
        elif offline:
            if not dest.is_file():
                raise UserError(f"{dest}: missing, and offline is set (nothing is downloaded); fetch it once "
                                f"without offline, or place the file there yourself (source: {entry.url})")
            verify_checksums(dest, sha256=entry.sha256, md5=entry.md5)
            if not pinned:
                lock.verify_or_record(entry.path, dest)
            log.info("%s: present (offline), %s", dest, _checked(entry.sha256, entry.md5, None))
        elif pinned:
            download(mirror_url(entry.url, base_url), dest, sha256=entry.sha256, md5=entry.md5, size=entry.size,
                     retries=retries, timeout=timeout, min_interval=min_interval, backoff=backoff)
        else:
            download_locked(mirror_url(entry.url, base_url), dest, lock, entry.path, size=entry.size,
                            retries=retries, timeout=timeout, min_interval=min_interval, backoff=backoff)
        if entry.sha256_prefix:
            check_sha256_prefix(entry.sha256 or lock.get(entry.path) or sha256_file(dest), entry.sha256_prefix, dest)
        files[entry.path] = dest
        if entry.extract:
            target = out / entry.extract
            if not target.exists():
                log.info("extracting %s to %s", dest, target)
                safe_extract(dest, target)
            missing = [p for p in entry.provides if not (target / p).exists()]
            if missing:
                raise UserError(f"{dest}: extracted to {target} but {missing[0]} is missing "
                                f"({len(missing)} of the manifest's expected paths are)")
    return files


def write_fetch_record(files: Mapping[str, Path], out: str | Path, *, manifest: Manifest,
                       lock: ChecksumLock | None = None) -> Path:
    """``out`` (JSON): which manifest was fetched, each file's path and sha256 (from the manifest or lock, or
    hashed now). The workflow's fetch rules declare this file as their output: it appears only when the
    whole manifest was fetched and verified."""
    record = {"manifest": manifest.name, "source": str(manifest.source or ""), "files": {}}
    by_path = {f.path: f for f in manifest.files}
    for rel, path in sorted(files.items()):
        entry = by_path.get(rel)
        digest = (entry.sha256 if entry else None) or (lock.get(rel) if lock else None)
        sums = ({"sha256": digest} if digest else {"md5": entry.md5} if entry and entry.md5
                else {"sha256": sha256_file(path)})
        record["files"][rel] = {**sums, "bytes": Path(path).stat().st_size}
    atomic_write_json(out, record)
    return Path(out)
