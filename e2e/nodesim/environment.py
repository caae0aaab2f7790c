"""A container's environment as the kubelet computes it: envFrom, env with the
downward API and Secret/ConfigMap references, and `$(VAR)` expansion.

Test infrastructure. The rules follow the kubelet: envFrom sources first, then
`env` entries in order, each value expanded against what is defined so far;
command and args are expanded against the whole container environment; `$$`
escapes `$`; an undefined `$(VAR)` is left as written. A missing Secret,
ConfigMap or key that is not optional is a `ConfigError`, which the container
reports as waiting with reason `CreateContainerConfigError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

Obj = dict[str, Any]

_SUFFIXES: dict[str, Decimal] = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class ConfigError(Exception):
    """A referenced Secret, ConfigMap, key or field cannot be resolved."""


class ObjectSource(Protocol):
    """Reads the Secrets and ConfigMaps a pod refers to (None when absent)."""

    async def configmap(self, namespace: str, name: str) -> dict[str, str] | None: ...

    async def secret(self, namespace: str, name: str) -> dict[str, str] | None: ...


def parse_quantity(text: str) -> Decimal:
    match = _QUANTITY.match(str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ConfigError(f"invalid quantity {text!r}")
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]
    except InvalidOperation as exc:
        raise ConfigError(f"invalid quantity {text!r}") from exc


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion."""
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2 : end]
                    out.append(env[name] if name in env else value[i : end + 1])
                    i = end + 1
                    continue
        out.append(char)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Downward:
    """What the downward API can tell a pod about itself."""

    pod: Obj
    pod_ip: str
    host_ip: str
    node_allocatable: Mapping[str, str]

    def field(self, path: str) -> str:
        meta = self.pod.get("metadata", {})
        spec = self.pod.get("spec", {})
        simple = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
            "status.hostIP": self.host_ip,
            "status.hostIPs": self.host_ip,
        }
        if path in simple:
            return str(simple[path])
        match = _FIELD_KEY.match(path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise ConfigError(f"unsupported fieldRef {path!r}")

    def resource(self, ref: Obj, container: Obj) -> str:
        """A resourceFieldRef: the container's request or limit over the divisor."""
        resource = ref.get("resource", "")
        kind, _, name = resource.partition(".")
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = resources.get("requests") or {}
        if kind == "limits":
            raw = limits.get(name) or self.node_allocatable.get(name)
        elif kind == "requests":
            raw = requests.get(name) or limits.get(name) or "0"
        else:
            raise ConfigError(f"unsupported resourceFieldRef {resource!r}")
        if raw is None:
            raise ConfigError(f"no value for resourceFieldRef {resource!r}")
        divisor = parse_quantity(str(ref.get("divisor") or "1"))
        if divisor == 0:
            raise ConfigError(f"divisor of {resource!r} is zero")
        return str(math.ceil(parse_quantity(str(raw)) / divisor))


async def _env_from(namespace: str, source: Obj, objects: ObjectSource) -> dict[str, str]:
    prefix = source.get("prefix", "")
    if "configMapRef" in source:
        ref, kind = source["configMapRef"], "ConfigMap"
        data = await objects.configmap(namespace, ref.get("name", ""))
    elif "secretRef" in source:
        ref, kind = source["secretRef"], "Secret"
        data = await objects.secret(namespace, ref.get("name", ""))
    else:
        raise ConfigError(f"unsupported envFrom source {sorted(source)}")
    if data is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f'{kind.lower()} "{ref.get("name", "")}" not found')
    return {f"{prefix}{key}": value for key, value in data.items()}


async def _value_from(
    namespace: str, source: Obj, container: Obj, downward: Downward, objects: ObjectSource
) -> str | None:
    if "fieldRef" in source:
        return downward.field(source["fieldRef"].get("fieldPath", ""))
    if "resourceFieldRef" in source:
        return downward.resource(source["resourceFieldRef"], container)
    for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
        if key not in source:
            continue
        ref = source[key]
        name = ref.get("name", "")
        getter = objects.secret if kind == "Secret" else objects.configmap
        data = await getter(namespace, name)
        if data is None:
            if ref.get("optional"):
                return None
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        if ref.get("key") not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref.get('key')} in {kind} {namespace}/{name}")
        return data[ref["key"]]
    raise ConfigError(f"unsupported valueFrom {sorted(source)}")


async def container_env(
    container: Obj, downward: Downward, objects: ObjectSource
) -> dict[str, str]:
    """The environment the pod spec defines for one container (no image defaults)."""
    namespace = downward.pod.get("metadata", {}).get("namespace", "")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(await _env_from(namespace, source, objects))
    for entry in container.get("env") or []:
        name = entry.get("name", "")
        if "valueFrom" in entry:
            value = await _value_from(namespace, entry["valueFrom"], container, downward, objects)
            if value is None:
                continue
            env[name] = value
        else:
            env[name] = expand(str(entry.get("value", "")), env)
    return env


def expand_command(container: Obj, env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    command = [expand(str(c), env) for c in container.get("command") or []]
    args = [expand(str(a), env) for a in container.get("args") or []]
    return command, args
