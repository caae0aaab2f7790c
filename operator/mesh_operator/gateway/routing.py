"""The routing table: which model a requested name means, and what `/v1/models` lists.

Pure. A discovery source (static file or Kubernetes watch) describes every model
as a `ModelRecord`; `RouteTable` indexes their served names and aliases.

Name rule, the same for requests and for the listing:
- a served name or alias that exactly one model has routes to that model;
- `<namespace>/<name>` routes to the model serving `<name>` in that namespace,
  which is how a name served in two namespaces is reached (the bare name is then
  ambiguous and refused, listing the qualified forms);
- an exact served name wins over the qualified reading, because served names may
  themselves contain a `/` (e.g. `google/gemma-3`).

The listing shows the models that are Ready or scaled to zero; every model routes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelRecord:
    """One model as discovery sees it: names, readiness, and where its hosts listen."""

    namespace: str
    name: str
    served_names: tuple[str, ...]
    slots: int
    ready: bool
    backends: tuple[str, ...]
    created: int = 0
    # (node, share of the plan's layers): how the model's tokens are counted
    # per node (gateway.shares); empty without a plan, or with several replicas
    # (whose shares differ: `backend_shares` then says which a host's tokens follow).
    node_shares: tuple[tuple[str, float], ...] = ()
    # (backend URL, its replica's node shares), for the hosts whose node is known.
    backend_shares: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    # The key llama-server wants (MeshModel spec.apiKeySecretRef); never printed.
    upstream_api_key: str | None = field(default=None, repr=False)
    # Not Ready because the operator scaled it to zero replicas (Ready condition
    # reason `ScaledToZero`): still listed, and its requests are held until it
    # is Ready again.
    scaled_to_zero: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def listed(self) -> bool:
        """Whether `/v1/models` shows it: Ready, or scaled to zero (it comes back on demand)."""
        return self.ready or self.scaled_to_zero


@dataclass(frozen=True)
class Listed:
    """One entry of `/v1/models`."""

    id: str
    owned_by: str
    created: int
    key: str


class ResolveError(Exception):
    """The requested name does not pick exactly one model."""

    def __init__(self, requested: str, candidates: tuple[str, ...]) -> None:
        super().__init__(requested)
        self.requested = requested
        self.candidates = candidates


class UnknownModelError(ResolveError):
    """No model serves that name; `candidates` are the names that would work."""


class AmbiguousModelError(ResolveError):
    """Several namespaces serve that name; `candidates` are its qualified forms."""


class RouteTable:
    """Immutable index of served names over a set of records."""

    def __init__(self, records: Iterable[ModelRecord] = ()) -> None:
        self.records: dict[str, ModelRecord] = {}
        self._by_name: dict[str, list[str]] = {}
        for record in records:
            self.records[record.key] = record
            for served in dict.fromkeys(record.served_names):
                self._by_name.setdefault(served, []).append(record.key)

    def resolve(self, requested: str) -> ModelRecord:
        """The record `requested` names, or `UnknownModelError` / `AmbiguousModelError`."""
        keys = self._by_name.get(requested, [])
        if len(keys) == 1:
            return self.records[keys[0]]
        if len(keys) > 1:
            qualified = tuple(sorted(f"{self.records[k].namespace}/{requested}" for k in keys))
            raise AmbiguousModelError(requested, qualified)
        namespace, sep, rest = requested.partition("/")
        if sep:
            for key in self._by_name.get(rest, []):
                if self.records[key].namespace == namespace:
                    return self.records[key]
        raise UnknownModelError(requested, tuple(entry.id for entry in self.names()))

    def names(self, *, listed_only: bool = False) -> list[Listed]:
        """Every routable id, sorted: bare where unique, `namespace/name` where not.

        `listed_only`: only the models `/v1/models` shows (`ModelRecord.listed`).
        """
        out: list[Listed] = []
        for served, keys in self._by_name.items():
            for key in keys:
                record = self.records[key]
                if listed_only and not record.listed:
                    continue
                ident = served if len(keys) == 1 else f"{record.namespace}/{served}"
                out.append(Listed(ident, record.namespace, record.created, key))
        out.sort(key=lambda entry: entry.id)
        return out
