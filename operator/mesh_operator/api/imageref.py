"""Image references as container runtimes read them: the grammar (also the CRD's
pattern of a MeshModel's `source.oci.reference`) and its normalized parts.

Pure and light: the resource models import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

# The grammar of github.com/distribution/reference, restricted to sha256 digests.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[a-f0-9]{64}"
REFERENCE_PATTERN: Final = (
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$"
)
REFERENCE_MAX = 512
_REFERENCE_RE = re.compile(REFERENCE_PATTERN)

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


def api_host(registry: str) -> str:
    """Where a registry's API answers: Docker Hub's is not at docker.io."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


@dataclass(frozen=True)
class Reference:
    """An image reference, normalized as container runtimes do."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return api_host(self.registry)

    @property
    def version(self) -> str:
        """What the manifest is asked by: the digest when there is one."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """`registry/repo:tag`, `registry/repo@sha256:...` or both; without a registry
    (no `.` or `:` in the first part, and not `localhost`) the image is Docker
    Hub's, under `library/` when it has one part. ValueError naming the problem."""
    if len(text) > REFERENCE_MAX:
        raise ValueError(f"image reference longer than {REFERENCE_MAX} characters")
    if not _REFERENCE_RE.match(text):
        raise ValueError(
            f"{text!r} is not an image reference (registry/repository[:tag][@sha256:<64 hex>])"
        )
    rest, _, digest = text.partition("@")
    name, tag = rest, None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
        if repository != repository.lower():
            raise ValueError(f"{text!r}: a repository name must be lowercase")
        if "/" not in repository:
            repository = f"library/{repository}"
    return Reference(registry, repository, tag, digest or None)
