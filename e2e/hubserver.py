"""A stand-in for the Hugging Face Hub's file downloads, on loopback. Test infrastructure.

The Hub cannot be reached from here, so the tests point `huggingface_hub` at this
server (`HF_ENDPOINT`). It answers the one route the library uses to read and
download a file, as the Hub documents and answers it:

- `HEAD`/`GET /{org}/{name}/resolve/{revision}/{file}`: a 302 to the file's blob on a
  second origin (the Hub's CDN), with `X-Repo-Commit`, `ETag`, `X-Linked-Etag` (the
  file's sha256, as for every LFS file) and `X-Linked-Size`. A revision is a branch
  name or the full commit hash.
- Failures as the Hub gives them, with `X-Error-Code` and `X-Error-Message`: an
  invalid token is 401 `Invalid credentials in Authorization header`; a missing
  repository is 401 `RepoNotFound` without a token and 404 with one; a gated
  repository is 401 `GatedRepo` without a token and 403 `GatedRepo` with a token
  not granted access; a missing revision is 404 `RevisionNotFound`; a missing file
  is 404 `EntryNotFound` (with the commit).
- `GET`/`HEAD /blobs/{sha256}` on the CDN origin: the bytes, with single `Range`
  requests (206, 416). A fault can be set for the next blob GET: cut the connection
  after some bytes, or stall there until released.

Not implemented (404): the `/api/...` routes (repository info, file listings,
commits, `HfApi`, `snapshot_download`, `HfFileSystem`, and the library's own
best-effort `/api/agent-harnesses` look-up for its user agent). Nor Xet storage
(`X-Xet-*`), files kept in git rather than LFS, repository types other than models,
signed and expiring CDN URLs, uploads, rate limits. Every request is recorded for
the tests to read.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
STALL_LIMIT_SECONDS = 300.0
INVALID_TOKEN = "Invalid credentials in Authorization header"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class HubRepo:
    """A model repository: its files (name in the repo -> local file) at one commit."""

    files: Mapping[str, Path]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: tuple[str, ...] = ("main",)
    gated: bool = False


@dataclass(frozen=True)
class Seen:
    """One request the server answered."""

    origin: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    token: str | None


@dataclass
class _Fault:
    at: int
    stall: bool
    released: threading.Event = field(default_factory=threading.Event)


class HubServer:
    """The Hub origin and its CDN origin, each a threaded HTTP server on loopback."""

    def __init__(self, repos: Mapping[str, HubRepo], tokens: Mapping[str, set[str]]) -> None:
        self.repos = dict(repos)
        # token -> the gated repositories it has been granted; any listed token is valid.
        self.tokens = {token: set(granted) for token, granted in tokens.items()}
        self.seen: list[Seen] = []
        self._fault: _Fault | None = None
        self._lock = threading.Lock()
        self._digests: dict[Path, str] = {}
        self._blobs: dict[str, Path] = {}
        self._hub = _Server(("127.0.0.1", 0), _handler(self, "hub"))
        self._cdn = _Server(("127.0.0.1", 0), _handler(self, "cdn"))
        self._threads = [
            threading.Thread(target=s.serve_forever, daemon=True) for s in (self._hub, self._cdn)
        ]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def sha256(self, path: Path) -> str:
        with self._lock:
            digest = self._digests.get(path)
        if digest is None:
            h = hashlib.sha256()
            with path.open("rb") as stream:
                while block := stream.read(CHUNK):
                    h.update(block)
            digest = h.hexdigest()
            with self._lock:
                self._digests[path] = digest
                self._blobs[digest] = path
        return digest

    def cut_next_download(self, at: int) -> None:
        """The next blob GET sends the bytes before offset `at`, then drops the connection."""
        with self._lock:
            self._fault = _Fault(at, stall=False)

    def stall_next_download(self, at: int) -> threading.Event:
        """The next blob GET sends the bytes before `at`, then waits; set the event to end it."""
        fault = _Fault(at, stall=True)
        with self._lock:
            self._fault = fault
        return fault.released

    def clear_fault(self) -> None:
        """Drop a fault no download has met yet, and end a stall in progress."""
        with self._lock:
            fault, self._fault = self._fault, None
        if fault is not None:
            fault.released.set()

    def mark(self) -> int:
        """A point in the record of requests, for `requests(since=...)`."""
        with self._lock:
            return len(self.seen)

    def requests(self, origin: str, method: str | None = None, since: int = 0) -> list[Seen]:
        with self._lock:
            return [
                s for s in self.seen[since:] if s.origin == origin and method in (None, s.method)
            ]

    def start(self) -> None:
        for repo in self.repos.values():
            for path in repo.files.values():
                self.sha256(path)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._lock:
            if self._fault is not None:
                self._fault.released.set()
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)

    # -- answers -------------------------------------------------------------------

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            fault, self._fault = self._fault, None
        return fault

    def resolve(self, path: str, token: str | None) -> tuple[int, dict[str, str], str]:
        """Status, headers and error message of a `/resolve/` request."""
        parts = path.lstrip("/").split("/", 4)
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {}, "Not Found"
        repo_id = f"{parts[0]}/{parts[1]}"
        revision = urllib.parse.unquote(parts[3])
        file = urllib.parse.unquote(parts[4])
        if token is not None and token not in self.tokens:
            return 401, {}, INVALID_TOKEN
        repo = self.repos.get(repo_id)
        if repo is None:
            return (404 if token else 401), {"X-Error-Code": "RepoNotFound"}, "Repository not found"
        if repo.gated and (token is None or repo_id not in self.tokens[token]):
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in."
                if token is None
                else f"Access to model {repo_id} is restricted and you are not in the "
                "authorized list."
            )
            return (401 if token is None else 403), {"X-Error-Code": "GatedRepo"}, message
        if revision not in repo.branches and revision != repo.commit:
            return 404, {"X-Error-Code": "RevisionNotFound"}, f"Invalid rev id: {revision}"
        local = repo.files.get(file)
        commit = {"X-Repo-Commit": repo.commit}
        if local is None:
            return 404, {"X-Error-Code": "EntryNotFound", **commit}, "Entry not found"
        digest = self.sha256(local)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\n"
        return (
            302,
            {
                **commit,
                "ETag": f'"{hashlib.sha1(pointer.encode()).hexdigest()}"',
                "X-Linked-Etag": f'"{digest}"',
                "X-Linked-Size": str(local.stat().st_size),
                "Location": f"{self.cdn}/blobs/{digest}",
            },
            "",
        )

    def blob(self, path: str) -> Path | None:
        name = path.rsplit("/", 1)[-1]
        with self._lock:
            return self._blobs.get(name) if path.startswith("/blobs/") else None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Readers of a header hang up after the bytes they need: expected.
        pass


def _handler(hub: HubServer, origin: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

        def _answer(self, body: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            rng = self.headers.get("Range")
            hub._record(Seen(origin, self.command, path, rng, self._token()))
            if origin == "hub":
                status, headers, message = hub.resolve(path, self._token())
                if status >= 400:
                    self._error(status, headers, message, body)
                else:
                    self._send_head(status, {**headers, "Content-Length": "0"})
                return
            local = hub.blob(path)
            if local is None:
                self._error(404, {}, "Not Found", body)
                return
            self._send_blob(local, rng, body)

        def _send_head(self, status: int, headers: Mapping[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()

        def _error(self, status: int, headers: Mapping[str, str], message: str, body: bool) -> None:
            payload = json.dumps({"error": message}).encode() if body else b""
            self._send_head(
                status,
                {
                    **headers,
                    "X-Error-Message": message,
                    "Content-Type": "application/json",
                    "Content-Length": str(len(payload)),
                },
            )
            self.wfile.write(payload)

        def _send_blob(self, local: Path, rng: str | None, body: bool) -> None:
            size = local.stat().st_size
            start, end, status = 0, size - 1, 200
            if rng is not None:
                match = _RANGE.match(rng.strip())
                if match is None:
                    self._error(416, {"Content-Range": f"bytes */{size}"}, "Bad range", body)
                    return
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size or start > end:
                    self._error(416, {"Content-Range": f"bytes */{size}"}, "Bad range", body)
                    return
                status = 206
            headers = {
                "Content-Length": str(end - start + 1),
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
                "ETag": f'"{hub.sha256(local)}"',
            }
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send_head(status, headers)
            if not body:
                return
            fault = hub._take_fault()
            stop = end + 1 if fault is None else min(end + 1, max(fault.at, start))
            with local.open("rb") as stream:
                stream.seek(start)
                at = start
                while at < stop:
                    block = stream.read(min(CHUNK, stop - at))
                    if not block:
                        break
                    self.wfile.write(block)
                    at += len(block)
            if fault is None:
                return
            self.wfile.flush()
            if fault.stall:
                fault.released.wait(STALL_LIMIT_SECONDS)
            # Drop the connection with the body unfinished.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)

    return Handler


@contextlib.contextmanager
def serve_hub(
    repos: Mapping[str, HubRepo], tokens: Mapping[str, set[str]] | None = None
) -> Iterator[HubServer]:
    """Run a stand-in Hub for `repos`; `tokens` maps each valid token to the gated
    repositories it is granted."""
    server = HubServer(repos, tokens or {})
    server.start()
    try:
        yield server
    finally:
        server.stop()


# The repositories the tests serve: the README's example model (public), the same
# file in a gated repository, and the tokens that can and cannot read it.
README_REPO = "unsloth/gemma-3-270m-it-GGUF"
README_FILE = "gemma-3-270m-it-Q4_K_M.gguf"
GATED_REPO = "mesh-test/gemma-3-270m-gated"
GRANTED_TOKEN = "hf_granted_0123456789"
NOT_GRANTED_TOKEN = "hf_not_granted_0123456789"


def project_repos(model_file: Path) -> dict[str, HubRepo]:
    return {
        README_REPO: HubRepo({README_FILE: model_file}),
        GATED_REPO: HubRepo({README_FILE: model_file}, gated=True),
    }


def project_tokens() -> dict[str, set[str]]:
    return {GRANTED_TOKEN: {GATED_REPO}, NOT_GRANTED_TOKEN: set()}
