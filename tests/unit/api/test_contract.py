"""The labels, ports and name rules every mesh process shares."""

from __future__ import annotations

import re

import pytest

from mesh_operator.api import contract
from mesh_operator.api.crdgen import build_crds
from mesh_operator.api.meshpool import MeshPoolSpec

pytestmark = pytest.mark.unit

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@pytest.mark.parametrize(
    ("model", "service"),
    [("gemma", "gemma-host"), ("llama-3-8b", "llama-3-8b-host"), ("q" * 45, "q" * 45 + "-host")],
)
def test_service_name(model: str, service: str) -> None:
    contract.check_model_name(model)
    assert contract.host_service_name(model) == service
    assert DNS_1035_LABEL.match(service)


@pytest.mark.parametrize("name", ["a" * 46, "qwen2.5", "Gemma", "9b", "gemma-", ""])
def test_model_names_the_crd_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="DNS-1035 label of at most 45 characters"):
        contract.check_model_name(name)


def test_the_crd_rule_on_the_name_is_built_from_the_same_constants() -> None:
    crd = build_crds()["mesh.dev_meshmodels.yaml"]
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rule = root["x-kubernetes-validations"][0]
    assert rule == contract.model_name_rule()
    assert f"size() <= {contract.MODEL_NAME_MAX}" in rule["rule"]
    assert contract.MODEL_NAME_PATTERN in rule["rule"]


def test_selector_labels_and_slice_selector_agree() -> None:
    host = contract.host_selector_labels("gemma")
    assert host[contract.MODEL_LABEL] == "gemma"
    assert host.items() <= contract.build_labels("gemma", contract.HOST_COMPONENT).items()
    for term in contract.host_slice_selector().split(","):
        key, value = term.split("=")
        assert host[key] == value


def test_owned_selector_matches_every_owned_object() -> None:
    built = contract.build_labels("gemma", contract.RPC_COMPONENT)
    for term in contract.owned_selector(contract.RPC_COMPONENT).split(","):
        key, value = term.split("=")
        assert built[key] == value


def test_ports() -> None:
    assert (contract.HOST_PORT, contract.HOST_PORT_NAME) == (8080, "http")
    assert MeshPoolSpec().rpc_port == contract.DEFAULT_RPC_PORT == 50052
