"""Download a model file into the node's cache: resumable, verified, atomic.

What the host pod's init container runs (`mesh fetch`). A finished file is
renamed into place only after its sha256 matches (the one given, else for a
Hugging Face file the Hub's); an interrupted download, from a URL or from
Hugging Face (`mesh_operator.hub`), resumes from its `.part` file. A file already
in the cache whose size and mtime match the recorded digest is not hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh_operator.hub import HF_ENDPOINT_DEFAULT, HubError, HubFile, discard_part
from mesh_operator.hub import download as hub_download

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
PROGRESS_STEP = 0.1  # log every 10%


class FetchError(RuntimeError):
    """The model could not be fetched or verified."""


@dataclass(frozen=True)
class FetchRequest:
    dest: Path
    url: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    revision: str = "main"
    sha256: str | None = None
    token: str | None = None
    hf_endpoint: str = HF_ENDPOINT_DEFAULT


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(CHUNK):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256.json")


def _recorded_digest(dest: Path) -> str | None:
    """The digest recorded for `dest`, if the file has not changed since."""
    try:
        stamp = json.loads(_stamp_path(dest).read_text())
        stat = dest.stat()
    except (OSError, ValueError):
        return None
    if stamp.get("size") == stat.st_size and stamp.get("mtime_ns") == stat.st_mtime_ns:
        value = stamp.get("sha256")
        return value if isinstance(value, str) else None
    return None


def _record_digest(dest: Path, digest: str) -> None:
    stat = dest.stat()
    _stamp_path(dest).write_text(
        json.dumps({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    )


def _verify(path: Path, want: str | None, name: str) -> str:
    got = sha256_file(path)
    if want and got != want:
        raise FetchError(f"sha256 mismatch for {name}: got {got}, want {want}")
    return got


def already_cached(req: FetchRequest) -> bool:
    if not req.dest.is_file():
        return False
    if req.sha256 is None:
        return True
    recorded = _recorded_digest(req.dest)
    if recorded is None:
        recorded = sha256_file(req.dest)
        _record_digest(req.dest, recorded)
    return recorded == req.sha256


def _download_url(url: str, part: Path, token: str | None) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        shutil.copyfile(urllib.request.url2pathname(parsed.path), part)
        return
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url)
    if have:
        req.add_header("Range", f"bytes={have}-")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return  # the part file is already complete
        raise FetchError(f"{parsed.hostname}{parsed.path} answered {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{parsed.hostname}: {getattr(exc, 'reason', exc)}") from exc
    with resp:
        resumed = resp.status == 206
        total = resp.headers.get("Content-Length")
        size = int(total) + (have if resumed else 0) if total else None
        mode = "ab" if resumed else "wb"
        done = have if resumed else 0
        next_log = PROGRESS_STEP
        with part.open(mode) as out:
            while block := resp.read(CHUNK):
                out.write(block)
                done += len(block)
                if size and done / size >= next_log:
                    log.info("fetched %d%% of %s", int(done * 100 / size), part.name[:-5])
                    next_log += PROGRESS_STEP


def _download_hf(req: FetchRequest, part: Path) -> str | None:
    """Download into `part`; the sha256 the Hub gives the file, if it gives one."""
    assert req.hf_repo is not None and req.hf_file is not None
    where = HubFile(req.hf_repo, req.hf_file, req.revision)
    have = part.stat().st_size if part.exists() else 0
    resuming = f", {have} bytes already here" if have else ""
    log.info("fetching %s from %s%s", where, req.hf_endpoint, resuming)
    try:
        blob = hub_download(where, part, endpoint=req.hf_endpoint, token=req.token)
    except HubError as exc:
        raise FetchError(str(exc)) from exc
    return blob.sha256


def fetch_model(req: FetchRequest) -> Path:
    """Make `req.dest` hold the model; return its path."""
    if already_cached(req):
        log.info("%s already cached", req.dest)
        return req.dest
    req.dest.parent.mkdir(parents=True, exist_ok=True)
    part = req.dest.with_name(req.dest.name + ".part")
    want = req.sha256
    if req.url is not None:
        _download_url(req.url, part, req.token)
    elif req.hf_repo is not None:
        hub_sha256 = _download_hf(req, part)
        want = req.sha256 or hub_sha256
    else:
        raise FetchError("nothing to fetch: give --url or --hf-repo/--hf-file")
    try:
        digest = _verify(part, want, req.dest.name)
    except FetchError:
        discard_part(part)  # start over next time, not from bad bytes
        raise
    os.replace(part, req.dest)
    discard_part(part)  # the record of what the part held
    _record_digest(req.dest, digest)
    log.info("%s ready (sha256 %s)", req.dest, digest)
    return req.dest
