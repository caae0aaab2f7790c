"""Helpers of the chart's integration tests: run the built helm, render the chart,
install stand-ins for the Prometheus operator's CRDs, and give a process the
credentials of a service account the chart created (a real token from the
TokenRequest API, as the pod would mount)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from e2e import parts
from e2e.cluster import LocalCluster
from e2e.procs import stop_popen
from tests.conftest import require_part
from tests.integration.kube_helpers import KWOK_TOLERATION

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mesh"
EXAMPLES = REPO / "manifests" / "examples"
VALUES_FILES = sorted(EXAMPLES.glob("values-*.yaml"))


def helm_bin() -> Path:
    return require_part(lambda: parts.binary("helm"))


def helm(*args: str, cluster: LocalCluster | None = None, check: bool = True) -> str:
    """Run helm (against `cluster` when given) and return its stdout."""
    argv = [str(helm_bin()), *args]
    if cluster is not None:
        argv += ["--kubeconfig", str(cluster.kubeconfig)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
    return result.stdout


def template(
    release: str,
    namespace: str,
    values: Sequence[Path] = (),
    sets: Sequence[str] = (),
    set_json: Sequence[str] = (),
) -> str:
    """`helm template` of the chart, hooks (the helm test pod) included."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", "1.34.0"]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    for item in set_json:
        args += ["--set-json", item]
    return helm(*args)


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def values_of(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def kwok_tolerations() -> list[str]:
    """--set-json items that let every pod of the chart onto kwok's simulated nodes."""
    toleration = json.dumps([KWOK_TOLERATION])
    return [
        f"{component}.tolerations={toleration}"
        for component in ("operator", "gateway", "agent", "tests")
    ]


# The Prometheus operator's PodMonitor and ServiceMonitor kinds, as stand-ins: the
# local API server has no Prometheus operator, and a server-side dry-run needs the
# kinds to exist. They check that the chart's monitors are well-formed objects of
# those kinds, not their fields (tests/unit cover those).
MONITOR_KINDS = (("PodMonitor", "podmonitors"), ("ServiceMonitor", "servicemonitors"))


def install_monitoring_crds(cluster: LocalCluster) -> None:
    for kind, plural in MONITOR_KINDS:
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "spec": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    }
                                },
                            }
                        },
                    }
                ],
            },
        }
        cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input_text=json.dumps(crd)
        )
        cluster.kubectl(
            "wait",
            "--for=condition=Established",
            f"crd/{plural}.monitoring.coreos.com",
            "--timeout=60s",
        )


def service_account_token(
    cluster: LocalCluster, namespace: str, account: str, bound_pod: str | None = None
) -> str:
    """A token of the service account from the TokenRequest API; bound to a pod
    (whose node name the API server then puts in the token) when given."""
    args = ["create", "token", account, "-n", namespace, "--duration=1h"]
    if bound_pod is not None:
        uid = cluster.kubectl(
            "get", "pod", bound_pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}"
        )
        args += ["--bound-object-kind=Pod", f"--bound-object-name={bound_pod}"]
        args += [f"--bound-object-uid={uid}"]
    return cluster.kubectl(*args).strip()


def write_token_kubeconfig(cluster: LocalCluster, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with `token` only (no client certificate)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": cluster.config().server,
                    "certificate-authority": str(cluster.pki_dir / "ca.crt"),
                },
            }
        ],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def adopt_crds(cluster: LocalCluster, release: str, namespace: str) -> None:
    """Let a release take over mesh CRDs that exist already (applied by another
    test from crds/, or kept by an earlier release): Helm adopts an object that
    carries its ownership metadata."""
    names = cluster.kubectl(
        "get", "crd", "-o", "name", "-l", "app.kubernetes.io/part-of=mesh", check=False
    ).split()
    for name in names:
        if not name.endswith(".mesh.dev"):
            continue
        cluster.kubectl("label", "--overwrite", name, "app.kubernetes.io/managed-by=Helm")
        cluster.kubectl(
            "annotate",
            "--overwrite",
            name,
            f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={namespace}",
        )


class MeshProcess:
    """A `mesh <command>` process of the repository's Python, logging to a file,
    stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        argv = [sys.executable, "-m", "mesh_operator.cli.main", *args]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> int:
        return stop_popen(self.proc, grace)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
