"""Name resolution and the `/v1/models` listing."""

from __future__ import annotations

import pytest

from mesh_operator.gateway.routing import (
    AmbiguousModelError,
    ModelRecord,
    RouteTable,
    UnknownModelError,
)

pytestmark = pytest.mark.unit


def rec(namespace: str, name: str, *served: str, ready: bool = True) -> ModelRecord:
    return ModelRecord(
        namespace=namespace,
        name=name,
        served_names=served or (name,),
        slots=1,
        ready=ready,
        backends=(),
    )


TABLE = RouteTable(
    [
        rec("team-a", "gemma", "gemma", "gemma-3"),
        rec("team-a", "llama", "llama"),
        rec("team-b", "llama", "llama"),
        rec("team-b", "hf", "google/gemma-3-270m"),
        rec("team-c", "qwen", "qwen", ready=False),
    ]
)


@pytest.mark.parametrize(
    ("requested", "key"),
    [
        ("gemma", "team-a/gemma"),
        ("gemma-3", "team-a/gemma"),
        ("team-a/gemma", "team-a/gemma"),
        ("team-a/gemma-3", "team-a/gemma"),
        ("team-a/llama", "team-a/llama"),
        ("team-b/llama", "team-b/llama"),
        ("google/gemma-3-270m", "team-b/hf"),
        ("team-b/google/gemma-3-270m", "team-b/hf"),
        ("qwen", "team-c/qwen"),
    ],
)
def test_resolve(requested: str, key: str) -> None:
    assert TABLE.resolve(requested).key == key


def test_a_name_in_two_namespaces_is_ambiguous() -> None:
    with pytest.raises(AmbiguousModelError) as caught:
        TABLE.resolve("llama")
    assert caught.value.candidates == ("team-a/llama", "team-b/llama")


@pytest.mark.parametrize("requested", ["mistral", "team-b/gemma", "team-z/llama", ""])
def test_unknown_names_list_what_exists(requested: str) -> None:
    with pytest.raises(UnknownModelError) as caught:
        TABLE.resolve(requested)
    assert "gemma" in caught.value.candidates
    assert "team-a/llama" in caught.value.candidates


def test_listing_is_ready_only_and_qualifies_duplicates() -> None:
    listed = {(e.id, e.owned_by) for e in TABLE.names(listed_only=True)}
    assert listed == {
        ("gemma", "team-a"),
        ("gemma-3", "team-a"),
        ("team-a/llama", "team-a"),
        ("team-b/llama", "team-b"),
        ("google/gemma-3-270m", "team-b"),
    }


def test_every_listed_id_resolves_to_its_model() -> None:
    for entry in TABLE.names():
        assert TABLE.resolve(entry.id).key == entry.key


def test_a_repeated_alias_is_indexed_once() -> None:
    table = RouteTable([rec("ns", "m", "m", "m")])
    assert [e.id for e in table.names()] == ["m"]
    assert table.resolve("m").key == "ns/m"
