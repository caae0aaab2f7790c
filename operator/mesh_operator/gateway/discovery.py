"""Discovery: where the gateway learns which models exist and where their hosts are.

A source publishes full snapshots (`list[ModelRecord]`) to the router, on the event
loop, whenever something changes. Two sources:

- `KubernetesSource` (`kube_discovery`): the production source, watching MeshModels
  and host EndpointSlices;
- `StaticSource` (here): models and host URLs from a file and/or command-line
  flags, for tests and for running the gateway without the operator. The file
  is re-read when it changes.

Static file format (YAML or JSON):

    models:
      - name: gemma                     # served name (required)
        aliases: [gemma-3]              # other names it answers to
        namespace: default              # owned_by in /v1/models; `default/gemma` form
        slots: 4                        # llama-server -np: requests in flight per host
        backends: [http://10.0.0.5:8080, http://10.0.0.6:8080]
        apiKeyFile: /etc/mesh/gemma-key # optional: key llama-server wants (--api-key)

A static model is Ready by definition; its hosts are still health-checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Protocol
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from mesh_operator.api.meshmodel import NAME_PATTERN
from mesh_operator.gateway.routing import ModelRecord

log = logging.getLogger(__name__)

Publish = Callable[[list[ModelRecord]], None]

DEFAULT_NAMESPACE = "default"


class DiscoverySource(Protocol):
    """Something that tells the router which models exist and where they are served."""

    async def start(self, publish: Publish) -> None:
        """Publish a first snapshot when it can, then one on every change."""

    def synced(self) -> bool:
        """True once the first complete snapshot was published."""

    async def stop(self) -> None:
        """Stop watching; no publish after this returns."""


class DiscoveryError(RuntimeError):
    """A source's configuration cannot be read."""


def normalize_backend_url(url: str) -> str:
    """`http(s)://host:port` without a trailing slash; refuses anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"backend URL must be http(s)://host:port, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"backend URL must not have a path or query, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}"


ServedName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=128)]


class StaticModel(BaseModel):
    """One model of the static configuration."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    name: ServedName
    namespace: str = Field(default=DEFAULT_NAMESPACE, min_length=1, max_length=63)
    aliases: list[ServedName] = Field(default_factory=list, max_length=16)
    slots: int = Field(default=1, ge=1, le=64)
    backends: list[str] = Field(min_length=1, max_length=256)
    api_key_file: Path | None = None

    @field_validator("backends")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [normalize_backend_url(url) for url in value]


class StaticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[StaticModel] = Field(default_factory=list)


def parse_static_config(text: str) -> StaticConfig:
    """The models of a static file's text (YAML or JSON); `DiscoveryError` if invalid."""
    try:
        document = yaml.safe_load(text) or {}
        return StaticConfig.model_validate(document)
    except (yaml.YAMLError, ValidationError) as exc:
        raise DiscoveryError(f"invalid static configuration: {exc}") from exc


def build_static_records(models: Sequence[StaticModel], created: int) -> list[ModelRecord]:
    """Records for static models; a name given twice in one namespace is an error."""
    records: list[ModelRecord] = []
    seen: set[tuple[str, str]] = set()
    for model in models:
        key = (model.namespace, model.name)
        if key in seen:
            raise DiscoveryError(f"model {model.namespace}/{model.name} is configured twice")
        seen.add(key)
        api_key = None
        if model.api_key_file is not None:
            try:
                api_key = model.api_key_file.read_text().strip() or None
            except OSError as exc:
                raise DiscoveryError(f"cannot read apiKeyFile of {model.name}: {exc}") from exc
        records.append(
            ModelRecord(
                namespace=model.namespace,
                name=model.name,
                served_names=(model.name, *model.aliases),
                slots=model.slots,
                ready=True,
                backends=tuple(dict.fromkeys(model.backends)),
                created=created,
                upstream_api_key=api_key,
            )
        )
    return records


class StaticSource:
    """Models from flags and/or a file, the file polled for changes."""

    def __init__(
        self,
        models: Sequence[StaticModel] = (),
        path: Path | None = None,
        *,
        reload_interval: float = 2.0,
    ) -> None:
        self._flag_models = list(models)
        self._path = path
        self._reload_interval = reload_interval
        self._created = int(time.time())
        self._task: asyncio.Task[None] | None = None
        self._synced = False
        self._stamp: tuple[int, int] | None = None

    def _stat(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        info = self._path.stat()
        return (info.st_mtime_ns, info.st_size)

    def _load(self) -> list[ModelRecord]:
        models = list(self._flag_models)
        if self._path is not None:
            self._stamp = self._stat()
            models.extend(parse_static_config(self._path.read_text()).models)
        return build_static_records(models, self._created)

    async def start(self, publish: Publish) -> None:
        # A bad file at start is fatal (the user is there to read the error);
        # a bad edit later keeps the last good snapshot.
        try:
            records = await asyncio.to_thread(self._load)
        except OSError as exc:
            raise DiscoveryError(f"cannot read {self._path}: {exc}") from exc
        publish(records)
        self._synced = True
        if self._path is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(publish), name="static discovery"
            )

    def synced(self) -> bool:
        return self._synced

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, publish: Publish) -> None:
        while True:
            await asyncio.sleep(self._reload_interval)
            try:
                stamp = await asyncio.to_thread(self._stat)
                if stamp == self._stamp:
                    continue
                records = await asyncio.to_thread(self._load)
            except (OSError, DiscoveryError) as exc:
                log.warning("keeping the last static configuration: %s", exc)
                continue
            log.info("static configuration reloaded: %d model(s)", len(records))
            publish(records)
