"""The Service name rule and labels the operator and the gateway share."""

from __future__ import annotations

import re

import pytest

from mesh_operator.gateway import (
    HOST_PORT,
    HOST_PORT_NAME,
    host_selector_labels,
    host_service_name,
    host_slice_selector,
)

pytestmark = pytest.mark.unit

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("model", "service"),
    [
        ("gemma", "gemma-host"),
        ("llama-3-8b", "llama-3-8b-host"),
        ("qwen2.5-7b", "qwen2-5-7b-host"),
    ],
)
def test_service_name_of_short_names(model: str, service: str) -> None:
    assert host_service_name(model) == service


@pytest.mark.parametrize(
    "model",
    [
        "a" * 60,
        "very-long-model-name-" * 10,
        "x." * 100 + "y",
    ],
)
def test_service_name_of_long_names_is_a_valid_label(model: str) -> None:
    name = host_service_name(model)
    assert len(name) <= 63
    assert DNS_1035_LABEL.match(name), name
    assert name.endswith("-host")


def test_long_names_sharing_a_prefix_get_different_services() -> None:
    prefix = "m" * 70
    assert host_service_name(prefix + "a") != host_service_name(prefix + "b")


def test_service_name_is_stable_across_calls() -> None:
    # The operator and the gateway run in different processes: no salted hash.
    assert host_service_name("z" * 80) == host_service_name("z" * 80)


def test_selector_labels_and_slice_selector_agree() -> None:
    labels = host_selector_labels("gemma")
    assert labels["mesh.dev/model"] == "gemma"
    for term in host_slice_selector().split(","):
        key, value = term.split("=")
        assert labels[key] == value


def test_host_port() -> None:
    assert (HOST_PORT, HOST_PORT_NAME) == (8080, "http")
