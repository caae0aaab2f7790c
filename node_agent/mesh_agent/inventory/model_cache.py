"""Which model files sit in the node's model cache.

Every `*.gguf` under the cache folder (a few levels deep, following the layout of
llama.cpp's and Hugging Face's caches), with its size. A checksum is reported only
when a `<file>.sha256` sidecar written at download time says it: hashing
many-gigabyte files every cycle would cost more than the agent's whole budget.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_SHA256 = re.compile(r"^[a-f0-9]{64}$")
MAX_DEPTH = 6
MAX_FILES = 256


@dataclass(frozen=True)
class CachedFile:
    file: str
    size_bytes: int
    sha256: str | None


def _sidecar_sha(path: Path) -> str | None:
    sidecar = path.with_name(path.name + ".sha256")
    try:
        token = sidecar.read_text().split()[0].lower()
    except (OSError, IndexError):
        return None
    return token if _SHA256.match(token) else None


def scan(root: Path | None) -> list[CachedFile]:
    """GGUF files under `root`, sorted by path; an absent folder is an empty cache."""
    if root is None or not root.is_dir():
        return []
    found: list[CachedFile] = []
    base_depth = len(root.parts)
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        if len(here.parts) - base_depth >= MAX_DEPTH:
            dirs.clear()
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".gguf"):
                continue
            path = here / name
            try:
                # Hugging Face snapshots are symlinks into blobs/: stat follows them.
                size = path.stat().st_size
            except OSError:
                continue
            found.append(
                CachedFile(
                    file=str(path.relative_to(root))[:512],
                    size_bytes=size,
                    sha256=_sidecar_sha(path),
                )
            )
            if len(found) >= MAX_FILES:
                return found
    return found
