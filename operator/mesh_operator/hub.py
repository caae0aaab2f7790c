"""Files on the Hugging Face Hub, read and downloaded through `huggingface_hub`.

Every Hub access of mesh is here and goes through the library: `resolve` asks the
Hub where a file's bytes are (commit, size, sha256, the CDN URL it redirects to),
`read_range` reads a slice of them (the operator's GGUF header read) and
`download` appends them to a `.part` file that a later run resumes (`mesh fetch`).
The library's errors become `HubError`s: a condition reason and one line naming
the repository, file and revision, and whether a token was missing or refused.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

HF_ENDPOINT_DEFAULT = "https://huggingface.co"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubError(RuntimeError):
    """A Hub file cannot be read; `reason` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class HubFile:
    repo: str
    file: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{self.file} of {self.repo} at revision {self.revision}"


@dataclass(frozen=True)
class HubBlob:
    """Where the bytes of a Hub file are, as the Hub's `/resolve/` answered."""

    url: str
    size: int | None
    commit: str
    etag: str
    on_hub: bool  # the URL is on the Hub's own origin: the token may go there

    @property
    def sha256(self) -> str | None:
        """The file's sha256: the Hub's ETag of an LFS file (every GGUF model is one)."""
        return self.etag if _SHA256.match(self.etag) else None


def hub_endpoint(explicit: str | None = None) -> str:
    """The Hub to talk to: `explicit`, else `$HF_ENDPOINT` (a mirror), else the Hub."""
    return (explicit or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT_DEFAULT).rstrip("/")


def file_url(where: HubFile, endpoint: str) -> str:
    return hf_hub_url(where.repo, where.file, revision=where.revision, endpoint=endpoint)


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _headers(token: str | None, to_hub: bool) -> dict[str, str]:
    # Never a token found on the machine: only the one the model names.
    return build_hf_headers(token=token if token and to_hub else False)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def hub_error(where: HubFile, token: str | None, exc: BaseException) -> HubError:
    """The condition an error of the library means, in one line."""
    if isinstance(exc, GatedRepoError):
        status = exc.response.status_code
        if token is None:
            return HubError(
                "SourceForbidden",
                f"token missing: {where.repo} is a gated repository (reading {where}); "
                "set tokenSecretRef to a token of an account granted access",
            )
        return HubError(
            "SourceForbidden",
            f"token refused: the token's account is not granted access to the gated "
            f"repository {where.repo} ({status}, reading {where})",
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if token else " (a private repository needs tokenSecretRef)"
        return HubError("SourceNotFound", f"repository {where.repo} not found{hint}: {where}")
    if isinstance(exc, RevisionNotFoundError):
        return HubError("SourceNotFound", f"revision {where.revision} not found: {where}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError("SourceNotFound", f"file not found: {where}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        if status == 401 and token is not None:
            return HubError(
                "SourceForbidden", f"token refused: the Hub rejects the token (401) reading {where}"
            )
        if status in (401, 403):
            return HubError("SourceForbidden", f"the Hub answered {status} reading {where}")
        return HubError("SourceUnreachable", f"the Hub answered {status} reading {where}")
    if isinstance(exc, FileMetadataError):
        return HubError(
            "SourceUnreachable", f"no Hugging Face Hub answers reading {where}: {_one_line(exc)}"
        )
    return HubError("SourceUnreachable", f"cannot reach the Hub reading {where}: {_one_line(exc)}")


def resolve(where: HubFile, *, endpoint: str, token: str | None, timeout: float = 30.0) -> HubBlob:
    """Ask the Hub where the bytes of `where` are (one HEAD, redirects on the Hub followed)."""
    url = file_url(where, endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token or False, timeout=timeout, endpoint=endpoint)
    except (HfHubHTTPError, FileMetadataError, httpx2.HTTPError, OSError) as exc:
        raise hub_error(where, token, exc) from exc
    if meta.commit_hash is None or meta.etag is None:
        raise HubError(
            "SourceUnreachable",
            f"{endpoint} does not answer as a Hugging Face Hub (no commit or ETag) for {where}",
        )
    return HubBlob(
        url=meta.location,
        size=meta.size,
        commit=meta.commit_hash,
        etag=meta.etag,
        on_hub=_origin(meta.location) == _origin(url),
    )


def read_range(
    where: HubFile,
    blob: HubBlob,
    start: int,
    length: int,
    *,
    token: str | None,
    timeout: float = 30.0,
) -> bytes:
    """Bytes `start` .. `start + length` of the file (fewer at its end, none past it)."""
    headers = _headers(token, blob.on_hub)
    headers["Range"] = f"bytes={start}-{start + length - 1}"
    try:
        # No retries here: the caller looks again later.
        with http_stream_backoff(
            "GET",
            blob.url,
            headers=headers,
            timeout=timeout,
            retry_on_exceptions=(),
            retry_on_status_codes=(),
        ) as resp:
            if resp.status_code == 416:
                return b""
            hf_raise_for_status(resp)
            # A server that ignores the range sends the file from its start.
            skip = 0 if resp.status_code == 206 else start
            data = bytearray()
            for block in resp.iter_bytes():
                data += block
                if len(data) >= skip + length:
                    break
            return bytes(data[skip : skip + length])
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise hub_error(where, token, exc) from exc


def _part_record(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _part_record(part).unlink(missing_ok=True)


def download(where: HubFile, part: Path, *, endpoint: str, token: str | None) -> HubBlob:
    """Append the file's missing bytes to `part`, resuming what an earlier run left.

    `part` is kept when the download stops, with a record of which file version
    (ETag) it holds, so the next run resumes it; bytes of another version are
    dropped. The caller verifies the finished file and moves it into place.
    """
    blob = resolve(where, endpoint=endpoint, token=token)
    record = _part_record(part)
    have = part.stat().st_size if part.exists() else 0
    if have:
        try:
            held = json.loads(record.read_text()).get("etag")
        except (OSError, ValueError):
            held = None
        if held != blob.etag or (blob.size is not None and have > blob.size):
            discard_part(part)
            have = 0
    record.write_text(json.dumps({"etag": blob.etag, "commit": blob.commit, "file": str(where)}))
    try:
        with part.open("ab") as out:
            http_get(
                blob.url,
                out,
                resume_size=have,
                headers=_headers(token, blob.on_hub),
                expected_size=blob.size,
                displayed_filename=where.file,
            )
    except HfHubHTTPError as exc:
        raise hub_error(where, token, exc) from exc
    except (httpx2.HTTPError, OSError) as exc:
        got = part.stat().st_size if part.exists() else 0
        raise HubError(
            "SourceUnreachable",
            f"download of {where} stopped at {got} bytes ({_one_line(exc)}); run again to resume",
        ) from exc
    return blob
