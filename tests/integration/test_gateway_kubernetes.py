"""The gateway's Kubernetes discovery against the real local control plane.

The test plays the operator's part by hand: it creates a MeshModel, marks it
Ready, and creates the host EndpointSlice the way the EndpointSlice controller
would for the Service named by `host_service_name`. Behind the slice is a real
llama-server started with an API key that the gateway reads from the Secret the
MeshModel references.

The API server refuses loopback addresses in EndpointSlices, so the slice uses
addressType FQDN with a `*.mesh.test` name that the gateway's injected resolver
maps to 127.0.0.1; pod IPs go through the same code without a resolver.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from e2e.cluster import LocalCluster
from e2e.gateway import start_host
from mesh_operator.api.contract import host_selector_labels, host_service_name
from mesh_operator.gateway.kube_discovery import KubernetesSource
from mesh_operator.gateway.server import Gateway
from mesh_operator.gateway.settings import GatewaySettings
from mesh_operator.kubeclient import api_client

pytestmark = pytest.mark.integration

UPSTREAM_KEY = "llama-server-key-for-the-test"
TEST_DOMAIN = ".mesh.test"
MESSAGES: list[Any] = [{"role": "user", "content": "Name a colour."}]


class LoopbackTestHosts(AbstractResolver):
    """Resolves `*.mesh.test` to 127.0.0.1 and nothing else."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if not host.endswith(TEST_DOMAIN):
            raise OSError(f"{host} is not a test host")
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def meshmodel(namespace: str, served: str) -> dict[str, Any]:
    return {
        "apiVersion": "mesh.dev/v1alpha1",
        "kind": "MeshModel",
        "metadata": {"name": "gemma", "namespace": namespace},
        "spec": {
            "source": {
                "huggingface": {
                    "repo": "ggml-org/gemma-3-270m-GGUF",
                    "file": "gemma-3-270m-Q4_K_M.gguf",
                }
            },
            "poolRef": "cpu",
            "contextSize": 2048,
            "parallel": 2,
            "servedName": served,
            "aliases": [f"{served}-alias"],
            "apiKeySecretRef": {"name": "gemma-key"},
        },
    }


def host_slice(namespace: str, port: int, *, ready: bool) -> dict[str, Any]:
    service = host_service_name("gemma")
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-x7k2p",
            "namespace": namespace,
            "labels": {**host_selector_labels("gemma"), "kubernetes.io/service-name": service},
        },
        "addressType": "FQDN",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [f"gemma-0.{namespace}{TEST_DOMAIN}"], "conditions": {"ready": ready}}
        ],
    }


def ready_status(status: str) -> str:
    return json.dumps(
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": status,
                        "reason": "HostReady" if status == "True" else "Replanning",
                        "message": "set by the test",
                        "lastTransitionTime": "2026-11-21T23:40:00Z",
                    }
                ]
            }
        }
    )


def test_routes_by_meshmodels_and_endpointslices(
    crds: LocalCluster,
    namespace: str,
    tmp_path: Path,
    llama_server_bin: Path,
    model_file: Path,
) -> None:
    cluster = crds
    served = f"gemma-{namespace}"
    host = start_host(tmp_path, model_file, served, slots=2, extra=["--api-key", UPSTREAM_KEY])

    def kubectl(*args: str, obj: dict[str, Any] | None = None) -> str:
        return cluster.kubectl(*args, input_text=json.dumps(obj) if obj else None)

    async def scenario() -> None:
        await asyncio.to_thread(
            kubectl,
            "create", "secret", "generic", "gemma-key", "-n", namespace,
            f"--from-literal=token={UPSTREAM_KEY}",
        )  # fmt: skip
        await asyncio.to_thread(kubectl, "apply", "-f", "-", obj=meshmodel(namespace, served))

        source = KubernetesSource(api_client(cluster.kubeconfig), resync_seconds=5)
        gateway = Gateway(
            GatewaySettings(host="127.0.0.1", port=0, hold_timeout=60),
            source,
            resolver=LoopbackTestHosts(),
        )
        await gateway.start()
        client = openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120.0
        )
        try:
            await until(source.synced)
            assert await asyncio.to_thread(readyz, gateway) == 200
            router = gateway.router
            assert router is not None
            key = f"{namespace}/gemma"
            await until(lambda: key in router.gates)

            # Not Ready yet: not listed, and a request for it is held.
            listed = {m.id async for m in client.models.list()}
            assert served not in listed
            held = asyncio.create_task(
                client.chat.completions.create(model=served, messages=MESSAGES, max_tokens=8)
            )
            await asyncio.sleep(1.0)
            assert not held.done()

            # The operator's part: the host's slice, then Ready.
            await asyncio.to_thread(
                kubectl, "apply", "-f", "-", obj=host_slice(namespace, host.port, ready=True)
            )
            await asyncio.to_thread(
                kubectl, "patch", "meshmodel", "gemma", "-n", namespace,
                "--subresource=status", "--type=merge", "-p", ready_status("True"),
            )  # fmt: skip
            reply = await asyncio.wait_for(held, 60)
            assert reply.usage is not None and reply.usage.completion_tokens > 0
            gate = router.gates[key]
            assert gate.record.slots == 2
            assert gate.record.backends == (f"http://gemma-0.{namespace}{TEST_DOMAIN}:{host.port}",)

            owners = {m.id: m.owned_by async for m in client.models.list()}
            assert owners[served] == namespace
            assert owners[f"{served}-alias"] == namespace
            reply = await client.chat.completions.create(
                model=f"{namespace}/{served}-alias", messages=MESSAGES, max_tokens=4
            )
            assert reply.choices

            # The host's endpoint turns not ready: requests wait for it again.
            await asyncio.to_thread(
                kubectl, "apply", "-f", "-", obj=host_slice(namespace, host.port, ready=False)
            )
            await until(lambda: not gate.backends)
            held = asyncio.create_task(
                client.chat.completions.create(model=served, messages=MESSAGES, max_tokens=4)
            )
            await asyncio.sleep(1.0)
            assert not held.done()
            await asyncio.to_thread(
                kubectl, "apply", "-f", "-", obj=host_slice(namespace, host.port, ready=True)
            )
            reply = await asyncio.wait_for(held, 60)
            assert reply.choices

            # Survives a relist (resync every 5 s) without losing the model.
            relists = router.snapshots
            await until(lambda: router.snapshots > relists + 1, timeout=20)
            assert router.resolve(served) is gate

            # Deleted: unknown again.
            await asyncio.to_thread(kubectl, "delete", "meshmodel", "gemma", "-n", namespace)
            await until(lambda: key not in router.gates)
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model=served, messages=MESSAGES, max_tokens=4)
        finally:
            await client.close()
            await gateway.stop()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        host.stop()


def readyz(gateway: Gateway) -> int:
    with urllib.request.urlopen(f"{gateway.url}/readyz", timeout=5) as resp:
        return int(resp.status)


async def until(condition: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
