"""From MeshModels and EndpointSlices, as the API server returns them, to records.

The two objects below were recorded from the local control plane: the MeshModel
as applied and patched, the EndpointSlice as the EndpointSlice controller made it
for a host Service and a pod on a kwok node. Variants are derived from them.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh_operator.gateway.kube_discovery import build_records, model_routing, slice_backends

pytestmark = pytest.mark.unit

MESHMODEL: dict[str, Any] = {
    "apiVersion": "mesh.dev/v1alpha1",
    "kind": "MeshModel",
    "metadata": {
        "creationTimestamp": "2026-11-21T23:33:05Z",
        "generation": 1,
        "name": "gemma",
        "namespace": "t1",
        "resourceVersion": "281",
        "uid": "5edda6c6-ea2e-422d-bbd9-c14815376ef0",
    },
    "spec": {
        "aliases": ["gemma"],
        "cacheTypeK": "f16",
        "cacheTypeV": "f16",
        "contextSize": 2048,
        "embeddings": False,
        "flashAttention": "auto",
        "parallel": 4,
        "poolRef": "cpu",
        "servedName": "gemma-3",
        "source": {
            "huggingface": {
                "file": "gemma-3-270m-Q4_K_M.gguf",
                "repo": "ggml-org/gemma-3-270m-GGUF",
                "revision": "main",
            }
        },
        "strategy": "latency",
    },
    "status": {
        "conditions": [
            {
                "lastTransitionTime": "2026-11-21T23:40:00Z",
                "message": "llama-server answers /health",
                "observedGeneration": 1,
                "reason": "HostReady",
                "status": "True",
                "type": "Ready",
            }
        ],
        "endpoint": "http://gemma-host.t1.svc:8080",
        "servedNames": ["gemma-3", "gemma"],
    },
}

SLICE: dict[str, Any] = {
    "addressType": "IPv4",
    "apiVersion": "discovery.k8s.io/v1",
    "endpoints": [
        {
            "addresses": ["10.244.0.1"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "node-a",
            "targetRef": {"kind": "Pod", "name": "gemma-host-0", "namespace": "t1"},
        }
    ],
    "kind": "EndpointSlice",
    "metadata": {
        "creationTimestamp": "2026-11-21T23:32:57Z",
        "generateName": "gemma-host-",
        "labels": {
            "app.kubernetes.io/component": "host",
            "app.kubernetes.io/instance": "gemma",
            "app.kubernetes.io/name": "mesh",
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            "kubernetes.io/service-name": "gemma-host",
            "mesh.dev/model": "gemma",
        },
        "name": "gemma-host-txxfc",
        "namespace": "t1",
    },
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
}


def variant(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    for path, value in changes.items():
        node = out
        *parents, last = path.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return out


def test_recorded_model_and_slice() -> None:
    [record] = build_records([MESHMODEL], [SLICE])
    assert record.key == "t1/gemma"
    assert record.served_names == ("gemma-3", "gemma")
    assert record.slots == 4
    assert record.ready is True
    assert record.backends == ("http://10.244.0.1:8080",)
    assert record.created > 0
    assert record.upstream_api_key is None


@pytest.mark.parametrize(
    ("conditions", "ready"),
    [
        ([{"type": "Ready", "status": "False", "reason": "Replanning"}], False),
        ([{"type": "Ready", "status": "Unknown", "reason": "Starting"}], False),
        ([{"type": "Planned", "status": "True", "reason": "Planned"}], False),
        ([], False),
    ],
)
def test_ready_only_from_a_true_ready_condition(
    conditions: list[dict[str, str]], ready: bool
) -> None:
    model = variant(MESHMODEL, status__conditions=conditions)
    [record] = build_records([model], [SLICE])
    assert record.ready is ready


@pytest.mark.parametrize(
    ("conditions", "scaled"),
    [
        ([{"type": "Ready", "status": "False", "reason": "ScaledToZero"}], True),
        ([{"type": "Ready", "status": "False", "reason": "Replanning"}], False),
        ([{"type": "Ready", "status": "True", "reason": "HostReady"}], False),
        ([{"type": "Ready", "status": "Unknown", "reason": "ScaledToZero"}], False),
        ([{"type": "Planned", "status": "False", "reason": "ScaledToZero"}], False),
        ([], False),
    ],
)
def test_scaled_to_zero_from_the_ready_condition_reason(
    conditions: list[dict[str, str]], scaled: bool
) -> None:
    model = variant(MESHMODEL, status__conditions=conditions)
    [record] = build_records([model], [])
    assert record.scaled_to_zero is scaled
    assert record.listed is (scaled or record.ready)


def test_the_recorded_model_is_not_scaled_to_zero() -> None:
    [record] = build_records([MESHMODEL], [SLICE])
    assert (record.ready, record.scaled_to_zero, record.listed) == (True, False, True)


def test_a_model_without_status_is_not_ready_and_still_routable() -> None:
    model = copy.deepcopy(MESHMODEL)
    del model["status"]
    [record] = build_records([model], [])
    assert (record.ready, record.backends) == (False, ())
    assert record.served_names == ("gemma-3", "gemma")


@pytest.mark.parametrize(
    ("conditions", "used"),
    [
        ({"ready": True, "serving": True, "terminating": False}, True),
        ({"ready": False, "serving": True, "terminating": True}, False),
        ({"ready": False, "serving": False, "terminating": False}, False),
        # The API: an unset `ready` is to be read as ready.
        ({}, True),
    ],
)
def test_endpoint_conditions(conditions: dict[str, bool], used: bool) -> None:
    slice_ = copy.deepcopy(SLICE)
    slice_["endpoints"][0]["conditions"] = conditions
    assert slice_backends(slice_) == (["http://10.244.0.1:8080"] if used else [])


@pytest.mark.parametrize(
    ("ports", "port"),
    [
        ([{"name": "http", "port": 8080}], 8080),
        ([{"name": "metrics", "port": 9000}, {"name": "http", "port": 18080}], 18080),
        ([{"name": "", "port": 9001}], 9001),
        ([], 8080),
    ],
)
def test_port_is_the_http_port(ports: list[dict[str, Any]], port: int) -> None:
    assert slice_backends(variant(SLICE, ports=ports)) == [f"http://10.244.0.1:{port}"]


def test_ipv6_and_fqdn_addresses() -> None:
    v6 = variant(SLICE, addressType="IPv6")
    v6["endpoints"][0]["addresses"] = ["fd00::5"]
    fqdn = variant(SLICE, addressType="FQDN")
    fqdn["endpoints"][0]["addresses"] = ["gemma-0.hosts.example"]
    assert slice_backends(v6) == ["http://[fd00::5]:8080"]
    assert slice_backends(fqdn) == ["http://gemma-0.hosts.example:8080"]


def test_slices_of_other_services_and_namespaces_are_ignored() -> None:
    other_service = variant(SLICE, metadata__labels={"kubernetes.io/service-name": "other-host"})
    other_namespace = variant(SLICE, metadata__namespace="t2")
    [record] = build_records([MESHMODEL], [other_service, other_namespace])
    assert record.backends == ()


def test_hosts_from_several_slices_without_duplicates() -> None:
    second = variant(SLICE, metadata__name="gemma-host-zzzzz")
    second["endpoints"] = [
        copy.deepcopy(SLICE["endpoints"][0]),
        {"addresses": ["10.244.0.2"], "conditions": {"ready": True}},
    ]
    [record] = build_records([MESHMODEL], [SLICE, second])
    assert record.backends == ("http://10.244.0.1:8080", "http://10.244.0.2:8080")


def test_a_spec_from_a_newer_operator_still_routes() -> None:
    model = variant(MESHMODEL, spec__speculative={"mode": "ngram"})
    assert model_routing(model)[:2] == (("gemma-3", "gemma"), 4)


def test_upstream_key_is_looked_up_by_secret_reference() -> None:
    model = variant(MESHMODEL, spec__apiKeySecretRef={"name": "gemma-key"})
    [record] = build_records([model], [SLICE], {("t1", "gemma-key", "token"): "s3cret"})
    assert record.upstream_api_key == "s3cret"
    assert "s3cret" not in repr(record)
