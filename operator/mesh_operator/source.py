"""Where a MeshModel's file comes from, where it lands on a node, and its header.

The pure half (`model_file_name`, `cache_key`, `container_model_path`,
`build_fetch_args`) decides names and paths that the operator, the init
container (`mesh fetch`) and the node agent's cache scan agree on. The I/O half
(`fetch_header_bytes`) reads just the GGUF header of a remote file, with HTTP range
requests (a Hugging Face file through `huggingface_hub`, in `mesh_operator.hub`),
so the operator can plan before anything is downloaded; `ProfileCache` keeps the
model profiles so read, once per source.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from mesh_operator import oci
from mesh_operator.api.meshmodel import ModelSource
from mesh_operator.hub import HF_ENDPOINT_DEFAULT, HubError, HubFile, file_url, hub_endpoint
from mesh_operator.hub import read_range as hub_read_range
from mesh_operator.hub import resolve as hub_resolve
from mesh_operator.manifests.workloads import MODELS_MOUNT
from mesh_operator.planner import read_model_profile
from mesh_operator.planner.errors import HeaderTruncatedError
from mesh_operator.planner.profile import ModelProfile

# A GGUF header (metadata + tensor infos) is rarely above a few MiB; the vocabulary
# of large tokenizers is what makes it big. Read in growing chunks up to a bound.
HEADER_FIRST_READ = 4 * 1024 * 1024
HEADER_MAX = 256 * 1024 * 1024


class SourceError(RuntimeError):
    """The model source cannot be read; `reason` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def model_file_name(source: ModelSource) -> str:
    if source.oci is not None:
        return source.oci.file.rsplit("/", 1)[-1]
    if source.huggingface is not None:
        return source.huggingface.file.rsplit("/", 1)[-1]
    if source.pvc is not None:
        return source.pvc.path.rsplit("/", 1)[-1]
    assert source.url is not None
    path = urllib.parse.urlparse(source.url).path
    return path.rsplit("/", 1)[-1] or "model.gguf"


def cache_key(source: ModelSource) -> str:
    """A short stable key of the source, the folder the file is cached in on a node."""
    canonical = json.dumps(source.to_wire(), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def container_model_path(source: ModelSource) -> str:
    """Path of the model file inside the host container."""
    if source.pvc is not None:
        return f"{MODELS_MOUNT}/{source.pvc.path}"
    if source.oci is not None:
        # The image itself is the volume (an `image` volume).
        return f"{MODELS_MOUNT}/{source.oci.file}"
    return f"{MODELS_MOUNT}/{cache_key(source)}/{model_file_name(source)}"


def build_fetch_args(source: ModelSource, sha256: str | None) -> list[str]:
    """Arguments of `mesh fetch` for the host pod's init container."""
    args = ["--dest", container_model_path(source)]
    if source.huggingface is not None:
        hf = source.huggingface
        args += ["--hf-repo", hf.repo, "--hf-file", hf.file, "--revision", hf.revision]
    elif source.url is not None:
        args += ["--url", source.url]
    if sha256:
        args += ["--sha256", sha256]
    return args


def source_url(source: ModelSource, hf_endpoint: str = HF_ENDPOINT_DEFAULT) -> str:
    """The HTTP(S) or file URL the bytes of the model are read from."""
    if source.huggingface is not None:
        return file_url(_hub_file(source), hf_endpoint.rstrip("/"))
    if source.url is not None:
        return source.url
    raise SourceError("SourceUnreadable", "a pvc source cannot be read by the operator")


def _hub_file(source: ModelSource) -> HubFile:
    hf = source.huggingface
    assert hf is not None
    return HubFile(hf.repo, hf.file, hf.revision)


def _read_range(url: str, start: int, length: int, token: str | None, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-{start + length - 1}"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status == 206:
                data: bytes = resp.read(length)
                return data
            # The server ignored the range: read the prefix we need and close.
            body = b""
            while len(body) < start + length:
                chunk = resp.read(min(1 << 20, start + length - len(body)))
                if not chunk:
                    break
                body += chunk
            return body[start : start + length]
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return b""
        if exc.code in (401, 403):
            raise SourceError(
                "SourceForbidden", f"{_redact(url)} answered {exc.code}: check the token Secret"
            ) from exc
        if exc.code == 404:
            raise SourceError("SourceNotFound", f"{_redact(url)} answered 404") from exc
        raise SourceError("SourceUnreachable", f"{_redact(url)} answered {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError("SourceUnreachable", f"{_redact(url)}: {reason}") from exc


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def fetch_header_bytes(
    source: ModelSource,
    parse: Callable[[bytes], object],
    *,
    token: str | None = None,
    hf_endpoint: str = HF_ENDPOINT_DEFAULT,
    timeout: float = 30.0,
) -> bytes:
    """Read the smallest prefix of the remote file that `parse` accepts.

    `parse` raises `HeaderTruncatedError` while the prefix ends before the tensor
    infos, and any other exception when the bytes are not a GGUF model.
    """
    read: Callable[[int, int], bytes]
    if source.huggingface is not None:
        where = _hub_file(source)
        name = str(where)
        try:
            blob = hub_resolve(where, endpoint=hf_endpoint, token=token, timeout=timeout)
        except HubError as exc:
            raise SourceError(exc.reason, str(exc)) from exc

        def read(start: int, length: int) -> bytes:
            try:
                return hub_read_range(where, blob, start, length, token=token, timeout=timeout)
            except HubError as exc:
                raise SourceError(exc.reason, str(exc)) from exc
    else:
        url = source_url(source, hf_endpoint)
        name = _redact(url)

        def read(start: int, length: int) -> bytes:
            return _read_range(url, start, length, token, timeout)

    data = b""
    want = HEADER_FIRST_READ
    while True:
        chunk = read(len(data), want - len(data))
        data += chunk
        try:
            parse(data)
            return data
        except HeaderTruncatedError as exc:
            if not chunk or len(data) < want or want >= HEADER_MAX:
                raise SourceError(
                    "SourceInvalid",
                    f"{name} ends inside its GGUF header ({len(data)} bytes)",
                ) from exc
            want = min(want * 4, HEADER_MAX)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError("SourceInvalid", f"{name} is not a GGUF model: {exc}") from exc


class ProfileCache:
    """Model profiles by source, a remote one read from its header once.

    A profile read with a token is kept under that token: a model naming a Secret
    of the same name in another namespace gets it only if its own token reads it.
    """

    def __init__(self, hf_endpoint: str | None = None) -> None:
        # The same variable huggingface_hub (and so `mesh fetch`) reads: a mirror.
        self.hf_endpoint = hub_endpoint(hf_endpoint)
        self._profiles: dict[tuple[str, str | None, str | None], ModelProfile] = {}
        self._lock = threading.Lock()

    @property
    def mirror(self) -> str | None:
        """The Hub read from when it is not huggingface.co."""
        return None if self.hf_endpoint == HF_ENDPOINT_DEFAULT else self.hf_endpoint

    @staticmethod
    def _key(
        source: ModelSource, sha256: str | None, token: str | None
    ) -> tuple[str, str | None, str | None]:
        digest = hashlib.sha256(token.encode()).hexdigest() if token else None
        return cache_key(source), sha256, digest

    def cached(
        self, source: ModelSource, sha256: str | None, token: str | None = None
    ) -> ModelProfile | None:
        with self._lock:
            return self._profiles.get(self._key(source, sha256, token))

    def put(
        self,
        source: ModelSource,
        sha256: str | None,
        profile: ModelProfile,
        token: str | None = None,
    ) -> None:
        """Keep a profile read elsewhere (a model on a PVC, by its header-reader pod)."""
        with self._lock:
            self._profiles[self._key(source, sha256, token)] = profile

    def get(self, source: ModelSource, sha256: str | None, token: str | None) -> ModelProfile:
        """The profile of a remote source, read once per token; not for PVC sources."""
        cached = self.cached(source, sha256, token)
        if cached is not None:
            return cached
        if source.pvc is not None:
            raise SourceError("SourceUnreadable", "a model on a PVC is read by its own pod")
        file_name = model_file_name(source)
        read: list[ModelProfile] = []

        def parse(data: bytes) -> None:
            read.append(read_model_profile(data, file_name=file_name))

        # The profile of the prefix that parsed is the profile: no second parse.
        if source.oci is not None:
            try:
                oci.read_source_header(source.oci, parse)
            except oci.RegistryError as exc:
                raise SourceError(exc.reason, str(exc)) from exc
        else:
            fetch_header_bytes(source, parse, token=token, hf_endpoint=self.hf_endpoint)
        profile = read[-1]
        self.put(source, sha256, profile, token)
        return profile
