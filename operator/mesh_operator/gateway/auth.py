"""API keys: where they come from and how a request's bearer token is checked.

Keys come from a Kubernetes Secret, either mounted as files (one file per key; the
file name is the key's name, the content its value) or read from the API. Only a
key's name ever leaves this module (as a metrics label); values are kept as
SHA-256 digests and compared with `hmac.compare_digest` against every key, so
neither the time taken nor the logs tell anything about a key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BEARER = "bearer"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyRing:
    """The accepted keys, by name."""

    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        self._digests: tuple[tuple[str, bytes], ...] = ()
        self.replace(keys or {})

    def replace(self, keys: Mapping[str, str]) -> None:
        self._digests = tuple(
            (name, _digest(value)) for name, value in sorted(keys.items()) if value
        )

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an `Authorization` header, or None if it is not one."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != BEARER or not token:
            return None
        candidate = _digest(token)
        found: str | None = None
        # No early exit: every key is compared whatever matches.
        for name, digest in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = name
        return found


def load_key_dir(directory: Path) -> dict[str, str]:
    """Keys from a mounted Secret: one file per key, hidden entries skipped.

    Kubernetes mounts a Secret as `..data` symlinks plus one link per key, and
    swaps them atomically on update; names starting with a dot are its plumbing.
    """
    keys: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        value = path.read_text().strip()
        if value:
            keys[path.name] = value
    return keys


def keys_from_secret_data(data: Mapping[str, Any] | None) -> dict[str, str]:
    """Keys from a Secret's `data` (base64 values, as the API returns them)."""
    keys: dict[str, str] = {}
    for name, encoded in (data or {}).items():
        if not isinstance(encoded, str | bytes):
            continue
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            value = base64.b64decode(encoded, validate=True).decode().strip()
            if value:
                keys[name] = value
    return keys


def secret_loader(core_api: Any, namespace: str, name: str) -> Callable[[], dict[str, str]]:
    """A blocking loader reading Secret `namespace/name` with a `CoreV1Api` (run it in a thread)."""

    def load() -> dict[str, str]:
        secret = core_api.read_namespaced_secret(name, namespace, _request_timeout=30)
        return keys_from_secret_data(secret.data)

    return load


class KeyReloader:
    """Keeps a `KeyRing` current by calling a blocking loader in a thread, periodically."""

    def __init__(
        self, ring: KeyRing, load: Callable[[], dict[str, str]], interval: float = 30.0
    ) -> None:
        self.ring = ring
        self._load = load
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.loaded = False

    async def start(self) -> None:
        """Load once (an error here is fatal: no keys means nobody gets in), then keep polling."""
        self.ring.replace(await asyncio.to_thread(self._load))
        self.loaded = True
        log.info("loaded %d API key(s)", len(self.ring))
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="api key reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                keys = await asyncio.to_thread(self._load)
            except Exception as exc:
                # Keep the keys we have: a transient API error must not lock users out.
                # The exception's text never holds key values (files and API errors only).
                log.warning("reloading API keys failed, keeping the current ones: %s", exc)
                continue
            self.ring.replace(keys)
