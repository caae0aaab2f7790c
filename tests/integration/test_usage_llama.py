"""Usage accounting against a real llama-server and the real API server: tokens per
model, per API key and per node after real requests, plain and streamed.

As in test_gateway_kubernetes.py the test plays the operator's part: a MeshModel
whose status carries a plan (gemma-3-270m's 19 layers, 12 on node-a and 7 on
node-b) and Ready, and the host EndpointSlice (FQDN `*.mesh.test`, resolved to
the real llama-server on 127.0.0.1). The gateway reads both through its
Kubernetes discovery, checks two API keys, and counts what llama-server reported:
`usage` of a plain answer and of a stream that asked for it
(`stream_options.include_usage`), llama.cpp's `timings` of a stream that did not.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import LocalCluster
from e2e.gateway import start_host
from mesh_operator.gateway.auth import KeyReloader, KeyRing
from mesh_operator.gateway.kube_discovery import KubernetesSource
from mesh_operator.gateway.server import Gateway
from mesh_operator.gateway.settings import GatewaySettings
from mesh_operator.kubeclient import api_client
from tests.integration.test_gateway_kubernetes import (
    MESSAGES,
    LoopbackTestHosts,
    host_slice,
    meshmodel,
    until,
)

pytestmark = pytest.mark.integration

KEYS = {"alice": "sk-usage-alice-0001", "bob": "sk-usage-bob-0002"}
LAYERS = {"node-a": (0, 12), "node-b": (12, 19)}
TOTAL_LAYERS = 19


def planned_ready_status() -> str:
    devices = [
        {
            "node": node,
            "device": "CPU",
            "layers": list(layers),
            "weightsMiB": 100,
            "kvMiB": 10,
            "computeMiB": 5,
            "totalMiB": 115,
        }
        for node, layers in LAYERS.items()
    ]
    return json.dumps(
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "HostReady",
                        "message": "set by the test",
                        "lastTransitionTime": "2026-11-21T23:40:00Z",
                    }
                ],
                "plan": {
                    "devices": devices,
                    "tensorSplit": [12, 7],
                    "rpc": ["node-b"],
                    "hostNode": "node-a",
                },
            }
        }
    )


def counters(gateway: Gateway) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The three token counters the gateway serves, by sorted labels."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(gateway.metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name in (
                "mesh_gateway_tokens_total",
                "mesh_gateway_key_tokens_total",
                "mesh_gateway_node_tokens_total",
            ):
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_tokens_per_model_key_and_node(
    crds: LocalCluster,
    namespace: str,
    tmp_path: Path,
    llama_server_bin: Path,
    model_file: Path,
) -> None:
    cluster = crds
    served = f"gemma-{namespace}"
    model = f"{namespace}/gemma"
    host = start_host(tmp_path, model_file, served, slots=2)

    def kubectl(*args: str, obj: dict[str, Any] | None = None) -> str:
        return cluster.kubectl(*args, input_text=json.dumps(obj) if obj else None)

    async def scenario() -> None:
        spec = meshmodel(namespace, served)
        del spec["spec"]["apiKeySecretRef"]
        await asyncio.to_thread(kubectl, "apply", "-f", "-", obj=spec)
        await asyncio.to_thread(
            kubectl, "apply", "-f", "-", obj=host_slice(namespace, host.port, ready=True)
        )
        await asyncio.to_thread(
            kubectl, "patch", "meshmodel", "gemma", "-n", namespace,
            "--subresource=status", "--type=merge", "-p", planned_ready_status(),
        )  # fmt: skip
        source = KubernetesSource(api_client(cluster.kubeconfig), resync_seconds=30)
        gateway = Gateway(
            GatewaySettings(host="127.0.0.1", port=0, hold_timeout=60),
            source,
            keys=KeyReloader(KeyRing(), lambda: dict(KEYS)),
            resolver=LoopbackTestHosts(),
        )
        await gateway.start()
        clients = {
            name: openai.AsyncOpenAI(
                base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=120.0
            )
            for name, key in KEYS.items()
        }
        try:
            router = gateway.router
            assert router is not None
            await until(
                lambda: model in router.gates and router.gates[model].dispatchable(), timeout=60
            )
            assert router.gates[model].record.node_shares == (
                ("node-a", 12 / TOTAL_LAYERS),
                ("node-b", 7 / TOTAL_LAYERS),
            )
            # No request yet: no label set of a token counter exists.
            assert counters(gateway) == {}

            # alice: a plain answer.
            plain = await clients["alice"].chat.completions.create(
                model=served, messages=MESSAGES, max_tokens=8
            )
            assert plain.usage is not None and plain.usage.completion_tokens > 0
            # bob: a stream that asks for usage (its last chunk carries it).
            streamed = await clients["bob"].chat.completions.create(
                model=served,
                messages=MESSAGES,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            reported = None
            async for chunk in streamed:
                if chunk.usage is not None:
                    reported = chunk.usage
            assert reported is not None and reported.completion_tokens > 0

            seen = counters(gateway)
            want_prompt = plain.usage.prompt_tokens + reported.prompt_tokens
            want_completion = plain.usage.completion_tokens + reported.completion_tokens
            per_model = seen["mesh_gateway_tokens_total"]
            assert per_model == {
                (("kind", "prompt"), ("model", model)): want_prompt,
                (("kind", "completion"), ("model", model)): want_completion,
            }
            per_key = seen["mesh_gateway_key_tokens_total"]
            assert per_key == {
                (("key", "alice"), ("kind", "prompt"), ("model", model)): plain.usage.prompt_tokens,
                (("key", "alice"), ("kind", "completion"), ("model", model)): (
                    plain.usage.completion_tokens
                ),
                (("key", "bob"), ("kind", "prompt"), ("model", model)): reported.prompt_tokens,
                (("key", "bob"), ("kind", "completion"), ("model", model)): (
                    reported.completion_tokens
                ),
            }
            per_node = seen["mesh_gateway_node_tokens_total"]
            for node, (first, last) in LAYERS.items():
                share = (last - first) / TOTAL_LAYERS
                labels = (("kind", "prompt"), ("model", model), ("node", node))
                assert per_node[labels] == pytest.approx(want_prompt * share)
                labels = (("kind", "completion"), ("model", model), ("node", node))
                assert per_node[labels] == pytest.approx(want_completion * share)

            # bob again, streamed without asking for usage: llama.cpp's `timings`
            # in the last event are counted.
            plain_stream = await clients["bob"].chat.completions.create(
                model=served, messages=MESSAGES, max_tokens=8, stream=True
            )
            pieces = [c async for c in plain_stream]
            assert pieces and all(c.usage is None for c in pieces)
            after = counters(gateway)
            bob_completion = (("key", "bob"), ("kind", "completion"), ("model", model))
            added = after["mesh_gateway_key_tokens_total"][bob_completion] - (
                reported.completion_tokens
            )
            assert 0 < added <= 8
            bob_prompt = (("key", "bob"), ("kind", "prompt"), ("model", model))
            assert after["mesh_gateway_key_tokens_total"][bob_prompt] > reported.prompt_tokens
            node_total = sum(
                v
                for k, v in after["mesh_gateway_node_tokens_total"].items()
                if ("kind", "completion") in k
            )
            assert node_total == pytest.approx(want_completion + added)
        finally:
            for client in clients.values():
                await client.close()
            await gateway.stop()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        host.stop()
