"""A small asyncio client of the Kubernetes REST API, used by the simulated node.

Test infrastructure. The node process talks to the API server as the node itself
(a client certificate with CN=system:node:<name>, O=system:nodes), so the Node
authorizer decides what it may read and write, as it does for a real kubelet.
aiohttp lets the pod watch, Lease renewals, probes and status writes share one
event loop; objects are plain dicts, the way they travel on the wire.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

Obj = dict[str, Any]


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class WatchExpiredError(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    token: str | None = None


def _data(entry: Mapping[str, Any], key: str, base: Path) -> bytes | None:
    if f"{key}-data" in entry:
        return base64.b64decode(entry[f"{key}-data"])
    if key in entry:
        path = Path(entry[key])
        return (path if path.is_absolute() else base / path).read_bytes()
    return None


def load_kubeconfig(path: Path) -> Credentials:
    """Server, CA and client credentials of the current context of a kubeconfig."""
    config = yaml.safe_load(path.read_text())
    context_name = config["current-context"]
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    base = path.parent
    ca = _data(cluster, "certificate-authority", base)
    if ca is None:
        raise ValueError(f"{path}: the cluster has no certificate authority")
    return Credentials(
        server=cluster["server"].rstrip("/"),
        ca_pem=ca,
        cert_pem=_data(user, "client-certificate", base),
        key_pem=_data(user, "client-key", base),
        token=user.get("token"),
    )


def ssl_context(creds: Credentials, scratch: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=creds.ca_pem.decode())
    if creds.cert_pem is not None and creds.key_pem is not None:
        # The ssl module loads a client certificate from files only.
        scratch.mkdir(parents=True, exist_ok=True)
        cert, key = scratch / "client.crt", scratch / "client.key"
        cert.write_bytes(creds.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(creds.key_pem)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def path_of(
    resource: str,
    name: str | None = None,
    *,
    namespace: str | None = None,
    group: str = "",
    version: str = "v1",
    subresource: str | None = None,
) -> str:
    """The REST path of a resource: core group when `group` is empty."""
    parts = ["/api", version] if not group else ["/apis", group, version]
    if namespace is not None:
        parts += ["namespaces", quote(namespace, safe="")]
    parts.append(resource)
    if name is not None:
        parts.append(quote(name, safe=""))
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


class KubeClient:
    """Requests against one API server with one identity."""

    def __init__(self, creds: Credentials, scratch: Path) -> None:
        self.creds = creds
        self._ssl = ssl_context(creds, scratch)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Accept": "application/json", "User-Agent": "mesh-nodesim"}
            if self.creds.token:
                headers["Authorization"] = f"Bearer {self.creds.token}"
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Obj:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method,
            self.creds.server + path,
            params=params,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise _error(resp.status, text)
            result: Obj = json.loads(text) if text else {}
            return result

    async def get(self, path: str, **params: str) -> Obj:
        return await self.request("GET", path, params=params or None)

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: Obj) -> Obj:
        return await self.request("PUT", path, body=body)

    async def merge_patch(self, path: str, body: Obj) -> Obj:
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str, body: Obj | None = None) -> Obj:
        return await self.request("DELETE", path, body=body)

    async def watch(
        self, path: str, resource_version: str, params: Mapping[str, str]
    ) -> AsyncIterator[tuple[str, Obj]]:
        """Yield (event type, object) until the server ends the watch."""
        query = {
            **params,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "290",
        }
        async with self.session.get(
            self.creds.server + path,
            params=query,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=330),
        ) as resp:
            if resp.status >= 400:
                raise _error(resp.status, await resp.text())
            buffer = b""
            # Lines can be longer than aiohttp's readline limit: split by hand.
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpiredError(obj.get("message", ""))
                        raise ApiError(
                            int(obj.get("code", 500)), obj.get("reason", ""), obj.get("message", "")
                        )
                    yield kind, obj


def _error(status: int, text: str) -> ApiError:
    try:
        status_obj = json.loads(text)
        return ApiError(status, status_obj.get("reason", ""), status_obj.get("message", text))
    except ValueError:
        return ApiError(status, "", text.strip()[:300])
