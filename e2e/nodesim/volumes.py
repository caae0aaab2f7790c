"""A pod's volumes as directories, and how container paths reach them.

Test infrastructure. There is no container engine, so no mount namespace: each
volume is a directory under the pod's (or node's) state folder, and every
command, argument, env value and workingDir that names a path under a
volumeMount's mountPath is rewritten to the volume's directory. The rule is
deterministic: a value equal to the mountPath or starting with `mountPath/`, or
the part after the first `=` of a value (`--model=/models/x.gguf`), longest
mountPath first. A path a program computes by itself (not passed in) is not
rewritten: pass paths in.

Where volumes live:
* emptyDir, configMap, secret, projected, downwardAPI: `<pod>/volumes/<name>`;
* hostPath: `<node>/host/<path>`, so two simulated nodes never share a "host"
  path; /proc, /sys and /dev are the machine's own (all nodes share one kernel);
* persistentVolumeClaim: `<simulated cluster>/pvc/<namespace>/<claimName>`,
  shared by all nodes like network storage.

Secret, ConfigMap and token contents are written once when the pod starts
(no later refresh); `readOnly` is not enforced.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from e2e.nodesim.environment import ConfigError, Downward, ObjectSource, expand

Obj = dict[str, Any]

SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
SYSTEM_PATHS = ("/proc", "/sys", "/dev")
DEFAULT_TOKEN_SECONDS = 3607


class MountError(Exception):
    """A volume cannot be made (missing object, unsupported type, bad hostPath)."""


class VolumeSource(ObjectSource, Protocol):
    async def token(self, pod: Obj, audience: str | None, expiration_seconds: int) -> str: ...


@dataclass(frozen=True)
class PodLayout:
    """Where one pod's files live on the simulated node."""

    pod_dir: Path
    node_dir: Path
    shared_dir: Path

    @property
    def volumes_dir(self) -> Path:
        return self.pod_dir / "volumes"

    @property
    def pids_dir(self) -> Path:
        return self.pod_dir / "pids"

    def container_dir(self, container: str) -> Path:
        return self.pod_dir / "containers" / container

    def log_dir(self, container: str) -> Path:
        return self.pod_dir / "logs" / container

    def log_file(self, container: str, attempt: int) -> Path:
        return self.log_dir(container) / f"{attempt}.log"

    def kubeconfig(self, volume: str) -> Path:
        return self.pod_dir / "kubeconfigs" / f"{volume}.yaml"

    def host_path(self, path: str) -> Path:
        clean = os.path.normpath("/" + path.lstrip("/"))
        if any(clean == p or clean.startswith(p + "/") for p in SYSTEM_PATHS):
            return Path(clean)
        return self.node_dir / "host" / clean.lstrip("/")

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.shared_dir / "pvc" / namespace / claim


def _write(folder: Path, relative: str, content: bytes, mode: int | None) -> None:
    target = (folder / relative).resolve()
    if not str(target).startswith(str(folder.resolve())):
        raise MountError(f"path {relative!r} leaves the volume")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    if mode is not None:
        target.chmod(mode)


def _select(
    data: Mapping[str, str], items: list[Obj] | None, what: str, optional: bool
) -> list[tuple[str, str, int | None]]:
    """(path, value, mode) for `items`, or for every key when items are absent."""
    if not items:
        return [(key, value, None) for key, value in data.items()]
    chosen: list[tuple[str, str, int | None]] = []
    for item in items:
        key = item.get("key", "")
        if key not in data:
            if optional:
                continue
            raise MountError(f"couldn't find key {key} in {what}")
        mode = item.get("mode")
        chosen.append((str(item.get("path", key)), data[key], int(mode) if mode else None))
    return chosen


async def _object_files(
    folder: Path,
    source: VolumeSource,
    namespace: str,
    ref: Obj,
    kind: str,
) -> None:
    name = ref.get("name") or ref.get("secretName") or ""
    optional = bool(ref.get("optional"))
    data = await (source.secret if kind == "Secret" else source.configmap)(namespace, name)
    if data is None:
        if optional:
            return
        raise MountError(f'{kind.lower()} "{name}" not found')
    mode = ref.get("defaultMode")
    for path, value, item_mode in _select(data, ref.get("items"), f"{kind} {name}", optional):
        _write(folder, path, value.encode(), item_mode if item_mode is not None else mode)


def _downward_files(folder: Path, items: list[Obj], downward: Downward, pod: Obj) -> None:
    containers = {c["name"]: c for c in pod.get("spec", {}).get("containers", [])}
    for item in items:
        try:
            if "fieldRef" in item:
                value = downward.field(item["fieldRef"].get("fieldPath", ""))
            elif "resourceFieldRef" in item:
                ref = item["resourceFieldRef"]
                container = containers.get(ref.get("containerName", ""), {})
                value = downward.resource(ref, container)
            else:
                raise MountError(f"unsupported downwardAPI item {sorted(item)}")
        except ConfigError as exc:
            raise MountError(str(exc)) from exc
        _write(folder, item.get("path", ""), value.encode(), item.get("mode"))


async def _projected(
    folder: Path, sources: list[Obj], source: VolumeSource, pod: Obj, downward: Downward
) -> None:
    namespace = pod["metadata"]["namespace"]
    for entry in sources:
        if "serviceAccountToken" in entry:
            spec = entry["serviceAccountToken"]
            token = await source.token(
                pod,
                spec.get("audience") or None,
                int(spec.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS),
            )
            _write(folder, spec.get("path", "token"), token.encode(), 0o600)
        elif "configMap" in entry:
            await _object_files(folder, source, namespace, entry["configMap"], "ConfigMap")
        elif "secret" in entry:
            await _object_files(folder, source, namespace, entry["secret"], "Secret")
        elif "downwardAPI" in entry:
            _downward_files(folder, entry["downwardAPI"].get("items") or [], downward, pod)
        else:
            raise MountError(f"unsupported projected source {sorted(entry)}")


def _host_path(layout: PodLayout, spec: Obj) -> Path:
    target = layout.host_path(spec.get("path", "/"))
    kind = spec.get("type") or ""
    if kind in ("", "DirectoryOrCreate"):
        if not target.exists():
            target.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    elif kind == "Directory" and not target.is_dir():
        raise MountError(f"hostPath type check failed: {spec.get('path')} is not a directory")
    elif kind == "File" and not target.is_file():
        raise MountError(f"hostPath type check failed: {spec.get('path')} is not a file")
    elif kind not in ("Directory", "File") and not target.exists():
        raise MountError(f"hostPath {spec.get('path')} of type {kind} does not exist")
    return target


async def materialize(
    pod: Obj, layout: PodLayout, source: VolumeSource, downward: Downward
) -> dict[str, Path]:
    """Make every volume of the pod; return volume name -> directory (or file)."""
    namespace = pod["metadata"]["namespace"]
    made: dict[str, Path] = {}
    for volume in pod.get("spec", {}).get("volumes") or []:
        name = volume["name"]
        folder = layout.volumes_dir / name
        if "hostPath" in volume:
            made[name] = _host_path(layout, volume["hostPath"])
            continue
        if "persistentVolumeClaim" in volume:
            claim = layout.claim_dir(namespace, volume["persistentVolumeClaim"]["claimName"])
            claim.mkdir(parents=True, exist_ok=True)
            made[name] = claim
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            pass
        elif "configMap" in volume:
            await _object_files(folder, source, namespace, volume["configMap"], "ConfigMap")
        elif "secret" in volume:
            await _object_files(folder, source, namespace, volume["secret"], "Secret")
        elif "projected" in volume:
            sources = volume["projected"].get("sources") or []
            await _projected(folder, sources, source, pod, downward)
        elif "downwardAPI" in volume:
            _downward_files(folder, volume["downwardAPI"].get("items") or [], downward, pod)
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise MountError(f"volume {name}: unsupported type {', '.join(kinds)}")
        made[name] = folder
    return made


@dataclass(frozen=True)
class MountTable:
    """A container's mountPaths and the directories standing in for them."""

    mounts: tuple[tuple[str, Path], ...]

    def path(self, container_path: str) -> Path | None:
        for mount, host in self.mounts:
            if container_path == mount or container_path.startswith(mount + "/"):
                return Path(str(host) + container_path[len(mount) :])
        return None

    def rewrite(self, value: str) -> str:
        direct = self.path(value)
        if direct is not None:
            return str(direct)
        head, sep, tail = value.partition("=")
        if sep:
            inner = self.path(tail)
            if inner is not None:
                return f"{head}={inner}"
        return value


def mount_table(
    container: Obj,
    volumes: Mapping[str, Path],
    env: Mapping[str, str],
    files: Mapping[str, Path] | None = None,
) -> MountTable:
    """The container's mounts; `files` are single files the kubelet mounts itself
    (the termination message file)."""
    mounts: list[tuple[str, Path]] = [(os.path.normpath(k), v) for k, v in (files or {}).items()]
    for mount in container.get("volumeMounts") or []:
        base = volumes.get(mount.get("name", ""))
        if base is None:
            raise MountError(f"volumeMount {mount.get('name')!r} names no volume")
        sub = mount.get("subPath") or expand(mount.get("subPathExpr") or "", env)
        target = base / sub if sub else base
        if sub and not target.exists():
            target.mkdir(parents=True, exist_ok=True)
        path = os.path.normpath(mount.get("mountPath", "/"))
        mounts.append((path, target))
    mounts.sort(key=lambda m: len(m[0]), reverse=True)
    return MountTable(tuple(mounts))


def write_pod_kubeconfig(target: Path, server: str, token_dir: Path, namespace: str) -> Path | None:
    """A kubeconfig for the pod's own service account, from its mounted token.

    In-cluster loaders read the token from a fixed path and the API address
    from KUBERNETES_SERVICE_HOST/PORT, neither of which can point here, so the
    pod gets KUBECONFIG instead (and those two variables stay unset).
    """
    token_file, ca_file = token_dir / "token", token_dir / "ca.crt"
    if not token_file.is_file() or not ca_file.is_file():
        return None
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "in-cluster",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": "service-account", "user": {"token": token_file.read_text().strip()}}],
        "contexts": [
            {
                "name": "in-cluster",
                "context": {
                    "cluster": "in-cluster",
                    "user": "service-account",
                    "namespace": namespace,
                },
            }
        ],
        "current-context": "in-cluster",
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    target.chmod(0o600)
    return target
