"""Discovery from Kubernetes: MeshModels and their host EndpointSlices, watched.

The production source. Two threads (the official `kubernetes` client blocks) each
list then watch one kind, MeshModels (`mesh.dev/v1alpha1`) and the EndpointSlices
labelled as mesh hosts (`contract.host_slice_selector()`), and relist every
`resync_seconds` or after an error. After every change a thread rebuilds the full
snapshot with the pure `build_records` and hands it to the event loop with
`call_soon_threadsafe`, still under the lock, so snapshots arrive in order.

A MeshModel is matched to its slices by the Service name rule
(`contract.host_service_name`) through the `kubernetes.io/service-name` label the
EndpointSlice controller sets. Hosts are pod IPs and the slice's `http` port: no
ClusterIP, so kube-proxy is not needed. An endpoint is used when its
`conditions.ready` is true or unset (the API says unset means ready).

A model whose Ready condition is False with reason `ScaledToZero` is marked
`scaled_to_zero`: it stays listed and its requests are held until it is Ready.

The model's plan (`status.plan`) gives each node's share of its layers, by which
the gateway counts tokens per node (`gateway.shares`).

The API key llama-server wants (`spec.apiKeySecretRef`) is read from the Secret in
the model's namespace and cached until the next relist.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from mesh_operator.api.base import GROUP, MESHMODEL_PLURAL, VERSION
from mesh_operator.api.contract import (
    HOST_PORT,
    HOST_PORT_NAME,
    SCALED_TO_ZERO,
    SERVICE_NAME_LABEL,
    host_service_name,
    host_slice_selector,
)
from mesh_operator.api.meshmodel import MeshModelSpec, SecretKeyRef
from mesh_operator.gateway.auth import keys_from_secret_data
from mesh_operator.gateway.discovery import Publish
from mesh_operator.gateway.routing import ModelRecord
from mesh_operator.gateway.shares import host_shares, layer_shares, replica_plans

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
ObjKey = tuple[str, str]
SecretRefKey = tuple[str, str, str]

MODELS = "meshmodels"
SLICES = "endpointslices"
HTTP_GONE = 410
MAX_BACKOFF = 30.0


# -- pure: API objects to records ------------------------------------------------


def object_key(obj: Obj) -> ObjKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _timestamp(value: object) -> int:
    if not isinstance(value, str):
        return 0
    try:
        return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _ready_condition(obj: Obj) -> Mapping[str, Any] | None:
    status = obj.get("status") or {}
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond
    return None


def model_is_ready(obj: Obj) -> bool:
    cond = _ready_condition(obj)
    return cond is not None and cond.get("status") == "True"


def model_is_scaled_to_zero(obj: Obj) -> bool:
    """Not Ready because the operator scaled the model to zero replicas."""
    cond = _ready_condition(obj)
    return (
        cond is not None and cond.get("status") == "False" and cond.get("reason") == SCALED_TO_ZERO
    )


def model_routing(obj: Obj) -> tuple[tuple[str, ...], int, SecretKeyRef | None]:
    """Served names, slots per host and upstream key reference of a MeshModel."""
    name = str((obj.get("metadata") or {}).get("name") or "")
    raw = obj.get("spec") or {}
    try:
        spec = MeshModelSpec.model_validate(raw)
        return tuple(spec.served_names(name)), spec.parallel, spec.api_key_secret_ref
    except ValidationError:
        # A spec this gateway cannot fully read (e.g. written by a newer operator)
        # still routes by the few fields routing needs.
        pass
    served = raw.get("servedName") if isinstance(raw.get("servedName"), str) else None
    aliases = [a for a in raw.get("aliases") or () if isinstance(a, str)]
    status_names = [
        n for n in (obj.get("status") or {}).get("servedNames") or () if isinstance(n, str)
    ]
    names = (served or name, *aliases) if (served or not status_names) else tuple(status_names)
    parallel = raw.get("parallel")
    slots = parallel if isinstance(parallel, int) and parallel >= 1 else 1
    ref = None
    raw_ref = raw.get("apiKeySecretRef")
    if isinstance(raw_ref, Mapping):
        try:
            ref = SecretKeyRef.model_validate(raw_ref)
        except ValidationError:
            ref = None
    return tuple(dict.fromkeys(names)), slots, ref


def _slice_port(slice_: Obj) -> int:
    ports = [p for p in slice_.get("ports") or () if isinstance(p, Mapping) and p.get("port")]
    for port in ports:
        if port.get("name") == HOST_PORT_NAME:
            return int(port["port"])
    if len(ports) == 1:
        return int(ports[0]["port"])
    return HOST_PORT


def slice_backends(slice_: Obj) -> list[str]:
    """Base URLs of the ready endpoints of one EndpointSlice."""
    return [url for url, _ in slice_endpoints(slice_)]


def slice_endpoints(slice_: Obj) -> list[tuple[str, str | None]]:
    """(base URL, node name or None) of the ready endpoints of one EndpointSlice."""
    port = _slice_port(slice_)
    ipv6 = slice_.get("addressType") == "IPv6"
    urls: list[tuple[str, str | None]] = []
    for endpoint in slice_.get("endpoints") or ():
        if not isinstance(endpoint, Mapping):
            continue
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is False:
            continue
        addresses = endpoint.get("addresses") or ()
        if not addresses:
            continue
        # Consumers use the first address (the API allows one today).
        host = f"[{addresses[0]}]" if ipv6 else str(addresses[0])
        node = endpoint.get("nodeName")
        urls.append((f"http://{host}:{port}", node if isinstance(node, str) and node else None))
    return urls


def build_records(
    models: Iterable[Obj],
    slices: Iterable[Obj],
    upstream_keys: Mapping[SecretRefKey, str | None] | None = None,
) -> list[ModelRecord]:
    """The full snapshot: one record per MeshModel, hosts from its Service's slices."""
    by_service: dict[ObjKey, list[Obj]] = {}
    for slice_ in slices:
        namespace, _ = object_key(slice_)
        service = ((slice_.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            by_service.setdefault((namespace, str(service)), []).append(slice_)
    keys = upstream_keys or {}
    records: list[ModelRecord] = []
    for obj in models:
        namespace, name = object_key(obj)
        if not name:
            continue
        served, slots, ref = model_routing(obj)
        endpoints: list[tuple[str, str | None]] = []
        for slice_ in sorted(
            by_service.get((namespace, host_service_name(name)), []),
            key=lambda s: object_key(s)[1],
        ):
            endpoints.extend(slice_endpoints(slice_))
        backends = [url for url, _ in endpoints]
        status = obj.get("status") or {}
        by_host = host_shares(status)
        plans = replica_plans(status)
        records.append(
            ModelRecord(
                namespace=namespace,
                name=name,
                served_names=served,
                slots=slots,
                ready=model_is_ready(obj),
                backends=tuple(dict.fromkeys(backends)),
                created=_timestamp((obj.get("metadata") or {}).get("creationTimestamp")),
                node_shares=layer_shares(plans[0]) if len(plans) == 1 else (),
                backend_shares=tuple(
                    (url, by_host[node]) for url, node in endpoints if node in by_host
                ),
                upstream_api_key=(
                    keys.get((namespace, ref.name, ref.key)) if ref is not None else None
                ),
                scaled_to_zero=model_is_scaled_to_zero(obj),
            )
        )
    return records


# -- I/O: the watching threads ---------------------------------------------------


class KubernetesSource:
    """Watches MeshModels and host EndpointSlices in one namespace or all of them."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str | None = None,
        resync_seconds: float = 300.0,
    ) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._discovery = client.DiscoveryV1Api(api)
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._resync = resync_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._objects: dict[str, dict[ObjKey, Obj]] = {MODELS: {}, SLICES: {}}
        self._listed: set[str] = set()
        self._keys: dict[SecretRefKey, str | None] = {}
        self._watches: dict[str, Any] = {}
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publish: Publish | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self, publish: Publish) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish = publish
        for kind in (MODELS, SLICES):
            thread = threading.Thread(
                target=self._run, args=(kind,), name=f"watch {kind}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def synced(self) -> bool:
        return self._listed == {MODELS, SLICES}

    async def stop(self) -> None:
        self._stop.set()
        # In a thread: the lock may be held by a thread reading a Secret.
        await asyncio.to_thread(self._halt)

    def _halt(self) -> None:
        with self._lock:
            watches = list(self._watches.values())
        for active in watches:
            # Shuts the socket down so the blocked read in the thread returns now.
            active.stop()
        for thread in self._threads:
            thread.join(timeout=10)

    # -- the threads -----------------------------------------------------------

    def _list_call(self, kind: str) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        if kind == MODELS:
            if self._namespace:
                return (
                    self._custom.list_namespaced_custom_object,
                    (GROUP, VERSION, self._namespace, MESHMODEL_PLURAL),
                    {},
                )
            return self._custom.list_cluster_custom_object, (GROUP, VERSION, MESHMODEL_PLURAL), {}
        selector = {"label_selector": host_slice_selector()}
        if self._namespace:
            return self._discovery.list_namespaced_endpoint_slice, (self._namespace,), selector
        return self._discovery.list_endpoint_slice_for_all_namespaces, (), selector

    def _run(self, kind: str) -> None:
        backoff = 0.5
        func, args, kwargs = self._list_call(kind)
        while not self._stop.is_set():
            try:
                # Raw JSON: the routing needs plain dicts, not the client's models.
                response = func(*args, **kwargs, _preload_content=False, _request_timeout=60)
                try:
                    listing = json.loads(response.data)
                finally:
                    response.release_conn()
                version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                self._replace(kind, listing.get("items") or [])
                backoff = 0.5
                stream = watch.Watch()  # type: ignore[no-untyped-call]
                with self._lock:
                    self._watches[kind] = stream
                if self._stop.is_set():
                    break
                for event in stream.stream(  # type: ignore[no-untyped-call]
                    func,
                    *args,
                    **kwargs,
                    resource_version=version,
                    timeout_seconds=int(self._resync),
                    allow_watch_bookmarks=True,
                    _request_timeout=self._resync + 30,
                ):
                    if self._stop.is_set():
                        break
                    self._on_event(kind, str(event.get("type")), event.get("raw_object"))
            except ApiException as exc:
                if exc.status == HTTP_GONE:
                    continue
                if self._stop.is_set():
                    break
                log.warning("watching %s: API error %s %s", kind, exc.status, exc.reason)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.warning("watching %s failed, relisting: %s", kind, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            finally:
                with self._lock:
                    self._watches.pop(kind, None)

    def _replace(self, kind: str, items: list[Obj]) -> None:
        with self._lock:
            self._objects[kind] = {object_key(obj): obj for obj in items}
            self._listed.add(kind)
            if kind == MODELS:
                # A relist is also when rotated upstream keys are picked up.
                self._keys.clear()
            self._emit()

    def _on_event(self, kind: str, type_: str, obj: Any) -> None:
        if not isinstance(obj, Mapping) or type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK carries only a resourceVersion.
        with self._lock:
            if type_ == "DELETED":
                self._objects[kind].pop(object_key(obj), None)
            else:
                self._objects[kind][object_key(obj)] = obj
            self._emit()

    def _emit(self) -> None:
        """Build and hand over a snapshot; called with the lock held, so in order."""
        if not self.synced() or self._loop is None or self._stop.is_set():
            return
        models = list(self._objects[MODELS].values())
        for obj in models:
            _, _, ref = model_routing(obj)
            if ref is not None:
                namespace, _ = object_key(obj)
                ref_key = (namespace, ref.name, ref.key)
                if ref_key not in self._keys:
                    self._keys[ref_key] = self._read_upstream_key(*ref_key)
        records = build_records(models, self._objects[SLICES].values(), self._keys)
        self._loop.call_soon_threadsafe(self._deliver, records)

    def _deliver(self, records: list[ModelRecord]) -> None:
        if self._publish is not None and not self._stop.is_set():
            self._publish(records)

    def _read_upstream_key(self, namespace: str, name: str, key: str) -> str | None:
        try:
            secret = self._core.read_namespaced_secret(name, namespace, _request_timeout=30)
        except ApiException as exc:
            log.warning(
                "cannot read Secret %s/%s for a model's API key: %s %s",
                namespace,
                name,
                exc.status,
                exc.reason,
            )
            return None
        return keys_from_secret_data(secret.data or {}).get(key)
