"""Models kept as OCI images: references, the registry API, the header inside an
image and pushing a model file as one.

A model image is an ordinary container image whose layer holds the `.gguf` file,
so a node's runtime pulls and caches it and the kubelet mounts it read-only as an
`image` volume. This module owns what mesh itself does with a registry, over the
HTTP API of the OCI distribution spec (no other client):

- `parse_reference`: `registry/repository[:tag][@sha256:...]`, named as
  container runtimes name images (a name without a registry is Docker Hub's);
- `read_header`: the GGUF header of the model file, for the planner, without
  pulling the image: the manifest (an index resolves to its first Linux image),
  then, layer by layer from the top, the start of the layer blob by Range
  requests, gzip decompressed as far as needed, walking the tar headers to the
  file and reading its first bytes;
- `push_model` (`mesh push-model`): a model file as a one-layer image (an
  uncompressed tar layer, reproducible: the same file gives the same digests),
  digests computed here and checked against what the registry answers.

Plain HTTP is used for loopback registries and for those named in
`MESH_INSECURE_REGISTRIES` (comma-separated `host[:port]`), HTTPS for the rest.
Registries that want a token get one through their `WWW-Authenticate` challenge
(anonymous pulls, as public images need on ghcr.io or Docker Hub).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from mesh_operator.api.imageref import Reference, api_host, parse_reference
from mesh_operator.api.meshmodel import OciSource
from mesh_operator.planner.errors import HeaderTruncatedError

INSECURE_ENV = "MESH_INSECURE_REGISTRIES"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES: Final = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES: Final = (OCI_INDEX, DOCKER_LIST)
TAR_LAYERS: Final = (OCI_LAYER_TAR, "application/vnd.docker.image.rootfs.diff.tar")
GZIP_LAYERS: Final = (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP)
# A manifest is small; the distribution registry refuses those above 4 MiB.
MANIFEST_MAX = 4 * 1024 * 1024

# How far into a layer the model file is looked for, and how much of it is read
# for its header (the planner's reader asks for more while the header goes on).
HEADER_FIRST_READ = 4 * 1024 * 1024
HEADER_MAX = 256 * 1024 * 1024
TAR_BLOCK = 512
TAR_ENTRIES_MAX = 10000
RAW_CHUNK = 1024 * 1024
UPLOAD_CHUNK = 8 * 1024 * 1024


class RegistryError(RuntimeError):
    """The registry or the image cannot give what is asked; `reason` is the
    CamelCase condition reason a MeshModel reports for it; `status` the HTTP
    status the registry answered, if it answered."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def insecure_registries(env: str | None = None) -> frozenset[str]:
    """Registries spoken to over plain HTTP, from `MESH_INSECURE_REGISTRIES`."""
    value = os.environ.get(INSECURE_ENV, "") if env is None else env
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def uses_plain_http(registry: str, insecure: Collection[str]) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    loopback = host in ("localhost", "[::1]") or host.startswith("127.")
    return loopback or registry in insecure or host in insecure


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the HTTP API -------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by `RegistryClient` itself: a blob served from other
    storage must not get the registry's token."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class RegistryClient:
    """The registry API of one registry, with the token its challenge asks for."""

    registry: str
    insecure: Collection[str] = field(default_factory=insecure_registries)
    timeout: float = 30.0
    # (username, password): shown to the token service, or to a registry that
    # asks for Basic authentication; None pulls anonymously.
    credentials: tuple[str, str] | None = field(default=None, repr=False)
    # The Authorization header of each scope, once a challenge asked for one.
    _auth: dict[str, str] = field(default_factory=dict, repr=False)

    def _basic(self) -> str | None:
        if self.credentials is None:
            return None
        return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()

    @property
    def base(self) -> str:
        scheme = "http" if uses_plain_http(self.registry, self.insecure) else "https"
        return f"{scheme}://{api_host(self.registry)}"

    def request(
        self,
        method: str,
        path: str,
        repository: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | IO[bytes] | None = None,
        push: bool = False,
    ) -> Any:
        """An open response (close it), after one token round if challenged and
        following redirects (without the token to another host). HTTP errors are
        RegistryErrors with the reason a model reports."""
        url = path if path.startswith(("http://", "https://")) else self.base + path
        scope = f"repository:{repository}:{'pull,push' if push else 'pull'}"
        for attempt in range(2):
            sent = dict(headers or {})
            auth = self._auth.get(scope)
            same_host = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(self.base).netloc
            if auth and same_host:
                sent["Authorization"] = auth
            req = urllib.request.Request(url, data=data, headers=sent, method=method)
            try:
                return self._open(req)
            except urllib.error.HTTPError as exc:
                challenge = exc.headers.get("WWW-Authenticate", "") if exc.headers else ""
                scheme = challenge.split(" ", 1)[0].lower()
                if exc.code != 401 or attempt or scheme not in ("bearer", "basic"):
                    raise self._http_error(exc, method, url) from exc
                exc.close()
                if scheme == "bearer":
                    self._auth[scope] = "Bearer " + self._token(challenge, scope)
                else:
                    basic = self._basic()
                    if basic is None:
                        raise RegistryError(
                            "SourceForbidden",
                            f"{self.registry} wants a user name and password",
                            401,
                        ) from exc
                    self._auth[scope] = basic
                if data is not None and not isinstance(data, bytes):
                    if not data.seekable():
                        raise RegistryError(
                            "SourceForbidden",
                            f"{self.registry} asked for a token in the middle of an upload",
                        ) from exc
                    data.seek(0)
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise RegistryError("SourceUnreachable", f"{self.registry}: {reason}") from exc
        raise RegistryError("SourceForbidden", f"{self.registry} refused its own token")

    def _open(self, req: urllib.request.Request) -> Any:
        for _ in range(5):
            try:
                return _OPENER.open(req, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location") if exc.headers else None
                if exc.code not in (301, 302, 303, 307, 308) or not location:
                    raise
                exc.close()
                target = urllib.parse.urljoin(req.full_url, location)
                kept = {
                    k: v
                    for k, v in req.header_items()
                    if k.lower() != "authorization"
                    or urllib.parse.urlsplit(target).netloc
                    == urllib.parse.urlsplit(req.full_url).netloc
                }
                method = req.get_method()
                req = urllib.request.Request(target, headers=kept, method=method, data=req.data)
        raise RegistryError("SourceUnreachable", f"{self.registry}: too many redirects")

    def _token(self, challenge: str, scope: str) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm")
        if not realm:
            raise RegistryError(
                "SourceForbidden", f"{self.registry}: a token challenge without a realm"
            )
        query = {"scope": scope}
        if "service" in params:
            query["service"] = params["service"]
        if self.credentials is not None:
            query["account"] = self.credentials[0]
        request = urllib.request.Request(f"{realm}?{urllib.parse.urlencode(query)}")
        basic = self._basic()
        if basic is not None:
            request.add_header("Authorization", basic)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                body = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            raise RegistryError(
                "SourceForbidden", f"{self.registry}: the token service answered {exc.code}"
            ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RegistryError(
                "SourceUnreachable", f"{self.registry}: token service: {exc}"
            ) from exc
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str):
            raise RegistryError(
                "SourceForbidden", f"{self.registry}: the token service gave no token"
            )
        return token

    def _http_error(self, exc: urllib.error.HTTPError, method: str, url: str) -> RegistryError:
        where = f"{method} {urllib.parse.urlsplit(url).path}"
        if exc.code in (401, 403):
            return RegistryError(
                "SourceForbidden", f"{self.registry} answered {exc.code} to {where}", exc.code
            )
        if exc.code == 404:
            return RegistryError(
                "SourceNotFound", f"{self.registry} answered 404 to {where}", exc.code
            )
        detail = ""
        try:
            errors = json.loads(exc.read(1 << 16)).get("errors") or []
            detail = ": " + "; ".join(str(e.get("message", e.get("code"))) for e in errors)
        except (ValueError, AttributeError, OSError):
            pass
        return RegistryError(
            "SourceUnreachable", f"{self.registry} answered {exc.code} to {where}{detail}", exc.code
        )

    # -- reading -----------------------------------------------------------------

    def manifest(self, repository: str, version: str) -> tuple[str, bytes, str]:
        """Media type, bytes and digest of a manifest or index; a digest asked for
        is checked against the bytes."""
        accept = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
        with self.request(
            "GET", f"/v2/{repository}/manifests/{version}", repository, headers={"Accept": accept}
        ) as resp:
            body: bytes = resp.read(MANIFEST_MAX + 1)
            media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        if len(body) > MANIFEST_MAX:
            raise RegistryError("SourceInvalid", f"{repository}:{version}: manifest over 4 MiB")
        digest = _digest_of(body)
        if version.startswith("sha256:") and digest != version:
            raise RegistryError(
                "SourceInvalid", f"{repository}@{version}: the registry sent a manifest of {digest}"
            )
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise RegistryError(
                "SourceInvalid", f"{repository}:{version}: manifest is not JSON"
            ) from exc
        return doc.get("mediaType") or media_type, body, digest

    def image_manifest(self, ref: Reference) -> dict[str, Any]:
        """The image manifest of `ref`; an index resolves to its first Linux image."""
        media_type, body, _ = self.manifest(ref.repository, ref.version)
        if media_type in INDEX_TYPES:
            entries = json.loads(body).get("manifests") or []
            linux = [e for e in entries if (e.get("platform") or {}).get("os", "linux") == "linux"]
            if not linux:
                raise RegistryError("SourceInvalid", f"{ref}: an index with no Linux image")
            media_type, body, _ = self.manifest(ref.repository, linux[0]["digest"])
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(
                "SourceInvalid", f"{ref}: not an image manifest ({media_type or 'no media type'})"
            )
        doc: dict[str, Any] = json.loads(body)
        return doc

    def read_blob(self, repository: str, digest: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a blob, or fewer at its end."""
        if length <= 0:
            return b""
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        try:
            resp = self.request(
                "GET", f"/v2/{repository}/blobs/{digest}", repository, headers=headers
            )
        except RegistryError as exc:
            if exc.status == 416:  # the range starts at or past the end
                return b""
            raise
        with resp:
            if resp.status == 206:
                data: bytes = resp.read(length)
                return data
            # The server ignored the range: skip to the start, read what is asked.
            skipped = 0
            while skipped < start:
                chunk = resp.read(min(RAW_CHUNK, start - skipped))
                if not chunk:
                    return b""
                skipped += len(chunk)
            out: bytes = resp.read(length)
            return out

    # -- writing -----------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        try:
            with self.request("HEAD", f"/v2/{repository}/blobs/{digest}", repository, push=True):
                return True
        except RegistryError as exc:
            if exc.reason == "SourceNotFound":
                return False
            raise

    def upload_blob(self, repository: str, digest: str, size: int, body: IO[bytes]) -> None:
        """One monolithic upload; the registry checks `digest` against the bytes."""
        with self.request(
            "POST", f"/v2/{repository}/blobs/uploads/", repository, data=b"", push=True
        ) as resp:
            location = resp.headers.get("Location")
        if not location:
            raise RegistryError("SourceUnreachable", f"{self.registry} gave no upload location")
        url = urllib.parse.urljoin(self.base + "/", location)
        sep = "&" if "?" in url else "?"
        url += f"{sep}digest={urllib.parse.quote(digest)}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self.request("PUT", url, repository, headers=headers, data=body, push=True) as resp:
            answered = resp.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise RegistryError("SourceInvalid", f"{self.registry} stored {answered}, not {digest}")

    def put_manifest(self, repository: str, tag: str, media_type: str, body: bytes) -> str:
        digest = _digest_of(body)
        headers = {"Content-Type": media_type}
        with self.request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            repository,
            headers=headers,
            data=body,
            push=True,
        ) as resp:
            answered = resp.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise RegistryError(
                "SourceInvalid", f"{self.registry} stored manifest {answered}, not {digest}"
            )
        return digest


# -- the model file inside an image --------------------------------------------------


class _Layer:
    """Random reads of a layer's tar stream: Range requests on an uncompressed
    layer; a gzip one decompressed from its start, as far as asked, keeping only
    what lies after the last offset read."""

    def __init__(self, client: RegistryClient, ref: Reference, descriptor: dict[str, Any]) -> None:
        self.client = client
        self.ref = ref
        self.digest = str(descriptor.get("digest", ""))
        media_type = str(descriptor.get("mediaType", ""))
        if media_type in GZIP_LAYERS:
            self.gzip = True
        elif media_type in TAR_LAYERS:
            self.gzip = False
        else:
            raise RegistryError(
                "SourceInvalid", f"{ref}: layer {self.digest[:19]} is {media_type}, not a tar layer"
            )
        self._raw_offset = 0
        self._raw_done = False
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._base = 0
        self._buf = b""

    def read(self, offset: int, length: int) -> bytes:
        if not self.gzip:
            return self.client.read_blob(self.ref.repository, self.digest, offset, length)
        if offset < self._base:
            raise RegistryError("SourceInvalid", f"{self.ref}: layer read backwards")
        while self._base + len(self._buf) < offset + length and not self._raw_done:
            if self._base + len(self._buf) > HEADER_MAX + offset:
                break
            raw = self.client.read_blob(
                self.ref.repository, self.digest, self._raw_offset, RAW_CHUNK
            )
            self._raw_offset += len(raw)
            try:
                self._buf += self._inflate.decompress(raw) if raw else self._inflate.flush()
            except zlib.error as exc:
                raise RegistryError(
                    "SourceInvalid", f"{self.ref}: layer {self.digest[:19]}: {exc}"
                ) from exc
            if not raw or self._inflate.eof:
                self._raw_done = True
            # Keep only what lies from the offset asked for.
            if offset > self._base:
                drop = min(offset - self._base, len(self._buf))
                self._buf = self._buf[drop:]
                self._base += drop
        start = offset - self._base
        return self._buf[start : start + length]


def _tar_entries(layer: _Layer) -> Iterator[tuple[str, int, int, bytes]]:
    """(name, data offset, size, type) of each entry of the layer's tar stream."""
    offset = 0
    long_name: str | None = None
    for _ in range(TAR_ENTRIES_MAX):
        block = layer.read(offset, TAR_BLOCK)
        if len(block) < TAR_BLOCK or block == bytes(TAR_BLOCK):
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise RegistryError("SourceInvalid", f"{layer.ref}: layer is not a tar: {exc}") from exc
        data = offset + TAR_BLOCK
        padded = (info.size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
            extension = layer.read(data, info.size)
            long_name = _extension_name(info.type, extension) or long_name
        elif info.type != tarfile.XGLTYPE:
            yield long_name or info.name, data, info.size, info.type
            long_name = None
        offset = data + padded
    raise RegistryError("SourceInvalid", f"{layer.ref}: more than {TAR_ENTRIES_MAX} tar entries")


def _extension_name(kind: bytes, data: bytes) -> str | None:
    if kind == tarfile.GNUTYPE_LONGNAME:
        return data.rstrip(b"\0").decode("utf-8", "surrogateescape")
    # pax records: "<length> <key>=<value>\n"
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _normal(name: str) -> str:
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    return name


def read_header(
    client: RegistryClient, ref: Reference, file: str, parse: Callable[[bytes], object]
) -> bytes:
    """The smallest start of the image's `file` that `parse` accepts (as
    `source.fetch_header_bytes`: `parse` raises HeaderTruncatedError while the
    bytes end inside the header). Looked for from the top layer down; a file
    deleted by an upper layer (a whiteout) is not looked behind."""
    manifest = client.image_manifest(ref)
    layers = manifest.get("layers") or []
    wanted = _normal(file)
    whiteout = "/".join([*wanted.split("/")[:-1], ".wh." + wanted.rsplit("/", 1)[-1]])
    for descriptor in reversed(layers):
        layer = _Layer(client, ref, descriptor)
        for entry, offset, size, kind in _tar_entries(layer):
            name = _normal(entry)
            if name == whiteout:
                raise RegistryError("SourceNotFound", f"{ref}: {file} is deleted in the image")
            if name != wanted:
                continue
            if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise RegistryError("SourceInvalid", f"{ref}: {file} is not a regular file")
            return _read_file_start(layer, file, offset, size, parse)
    raise RegistryError("SourceNotFound", f"{ref}: no file {file} in the image")


def _read_file_start(
    layer: _Layer, file: str, offset: int, size: int, parse: Callable[[bytes], object]
) -> bytes:
    ref = layer.ref
    want = min(HEADER_FIRST_READ, size)
    while True:
        data = layer.read(offset, want)
        try:
            parse(data)
            return data
        except HeaderTruncatedError as exc:
            if want >= size or want >= HEADER_MAX or len(data) < want:
                raise RegistryError(
                    "SourceInvalid",
                    f"{ref}: {file} ends inside its GGUF header ({len(data)} bytes)",
                ) from exc
            want = min(want * 4, HEADER_MAX, size)
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(
                "SourceInvalid", f"{ref}: {file} is not a GGUF model: {exc}"
            ) from exc


def read_source_header(source: OciSource, parse: Callable[[bytes], object]) -> bytes:
    """`read_header` for a MeshModel's `source.oci` (a reference the CRD admitted)."""
    ref = parse_reference(source.reference)
    return read_header(RegistryClient(ref.registry), ref, source.file, parse)


# -- pushing a model file -------------------------------------------------------------


@dataclass(frozen=True)
class PushedModel:
    reference: Reference
    manifest_digest: str
    layer_digest: str
    layer_size: int
    file: str

    @property
    def pinned(self) -> str:
        """The pushed image by digest: `registry/repository@sha256:...`."""
        return f"{self.reference.registry}/{self.reference.repository}@{self.manifest_digest}"


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    info.mtime = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _tar_trailer(size: int) -> bytes:
    padding = (TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK
    return bytes(padding) + bytes(2 * TAR_BLOCK)


class _TarStream(io.RawIOBase):
    """The one-entry tar layer of a file, read as a stream (nothing held in memory)."""

    def __init__(self, header: bytes, path: Path, size: int) -> None:
        self._parts: list[bytes | Path] = [header, path, _tar_trailer(size)]
        self._file: IO[bytes] | None = None
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        while not self._pending:
            if self._file is not None:
                chunk = self._file.read(len(view))
                if chunk:
                    self._pending = chunk
                    break
                self._file.close()
                self._file = None
            if not self._parts:
                return 0
            part = self._parts.pop(0)
            if isinstance(part, Path):
                self._file = part.open("rb")
            else:
                self._pending = part
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _layer_stream(path: Path, name: str) -> tuple[bytes, int]:
    header = _tar_header(name, path.stat().st_size)
    return header, len(header) + path.stat().st_size + len(_tar_trailer(path.stat().st_size))


def push_model(
    path: Path,
    reference: str,
    *,
    file: str | None = None,
    insecure: Collection[str] | None = None,
    credentials: tuple[str, str] | None = None,
    architecture: str = "amd64",
) -> PushedModel:
    """Push `path` as a one-layer image to `reference` (a tag: a digest is what
    the push makes). The file is `file` (default: its own name) at the image's
    root. The layer's digest is computed here from the bytes read, the registry
    checks it on upload, and the manifest's digest it answers must be ours."""
    ref = parse_reference(reference)
    if ref.digest:
        raise ValueError(f"{reference}: push to a tag; the digest is what the push makes")
    name = _normal(file or path.name)
    if not name or name.endswith("/") or ".." in name.split("/"):
        raise ValueError(f"{file!r} is not a file name inside an image")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    header, layer_size = _layer_stream(path, name)
    digest = hashlib.sha256()
    with _TarStream(header, path, path.stat().st_size) as stream:
        for chunk in iter(lambda: stream.read(UPLOAD_CHUNK), b""):
            digest.update(chunk)
    layer_digest = "sha256:" + digest.hexdigest()
    config = json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    config_digest = _digest_of(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {
                    "mediaType": OCI_LAYER_TAR,
                    "digest": layer_digest,
                    "size": layer_size,
                    "annotations": {"org.opencontainers.image.title": name},
                }
            ],
            "annotations": {"org.opencontainers.image.title": name},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    client = RegistryClient(
        ref.registry,
        insecure_registries() if insecure is None else insecure,
        credentials=credentials,
    )
    if not client.blob_exists(ref.repository, layer_digest):
        with _TarStream(header, path, path.stat().st_size) as stream:
            client.upload_blob(ref.repository, layer_digest, layer_size, io.BufferedReader(stream))
    if not client.blob_exists(ref.repository, config_digest):
        client.upload_blob(ref.repository, config_digest, len(config), io.BytesIO(config))
    manifest_digest = client.put_manifest(
        ref.repository, ref.tag or "latest", OCI_MANIFEST, manifest
    )
    return PushedModel(ref, manifest_digest, layer_digest, layer_size, name)
