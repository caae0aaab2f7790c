"""The static source's file format and the `--backend` flag."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mesh_operator.cli.gateway_cmd import parse_backend
from mesh_operator.gateway.discovery import (
    DiscoveryError,
    StaticSource,
    build_static_records,
    normalize_backend_url,
    parse_static_config,
)
from mesh_operator.gateway.routing import ModelRecord
from tests.unit.gateway.fakes import run

pytestmark = pytest.mark.unit

CONFIG = """
models:
  - name: gemma
    aliases: [gemma-3]
    namespace: team-a
    slots: 4
    backends: [http://10.0.0.5:8080/, http://10.0.0.6:8080]
  - name: embed
    backends: [http://127.0.0.1:9000]
"""


def test_file_to_records() -> None:
    records = build_static_records(parse_static_config(CONFIG).models, created=7)
    by_key = {r.key: r for r in records}
    gemma = by_key["team-a/gemma"]
    assert gemma.served_names == ("gemma", "gemma-3")
    assert gemma.slots == 4
    assert gemma.backends == ("http://10.0.0.5:8080", "http://10.0.0.6:8080")
    assert gemma.ready is True
    assert by_key["default/embed"].slots == 1


def test_json_is_accepted_too() -> None:
    config = parse_static_config('{"models": [{"name": "m", "backends": ["http://h:1"]}]}')
    assert config.models[0].backends == ["http://h:1"]


@pytest.mark.parametrize(
    "text",
    [
        "models: [{name: m}]",
        "models: [{name: m, backends: []}]",
        "models: [{name: m, backends: ['ftp://h:1']}]",
        "models: [{name: m, backends: ['http://h:1/v1']}]",
        "models: [{name: m, slots: 0, backends: ['http://h:1']}]",
        "models: [{name: m, backend: ['http://h:1']}]",
        "models: [{name: '-bad', backends: ['http://h:1']}]",
        "models: {",
    ],
)
def test_invalid_files_are_refused(text: str) -> None:
    with pytest.raises(DiscoveryError):
        parse_static_config(text)


def test_a_model_twice_in_one_namespace_is_refused() -> None:
    models = parse_static_config(
        "models: [{name: m, backends: ['http://a:1']}, {name: m, backends: ['http://b:1']}]"
    ).models
    with pytest.raises(DiscoveryError, match="twice"):
        build_static_records(models, created=0)


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("http://10.0.0.5:8080/", "http://10.0.0.5:8080"),
        (" https://host.example:443 ", "https://host.example:443"),
        ("http://[fd00::1]:8080", "http://[fd00::1]:8080"),
    ],
)
def test_normalize_backend_url(url: str, normal: str) -> None:
    assert normalize_backend_url(url) == normal


def test_backend_flag() -> None:
    model = parse_backend("gemma=http://127.0.0.1:8080,http://127.0.0.1:8081", slots=2)
    assert (model.name, model.slots) == ("gemma", 2)
    assert model.backends == ["http://127.0.0.1:8080", "http://127.0.0.1:8081"]


@pytest.mark.parametrize("text", ["gemma", "=http://h:1", "gemma="])
def test_bad_backend_flags(text: str) -> None:
    with pytest.raises(ValueError, match="NAME=URL"):
        parse_backend(text, slots=1)


def test_upstream_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("abc\n")
    config = parse_static_config(
        f"models: [{{name: m, backends: ['http://h:1'], apiKeyFile: '{key}'}}]"
    )
    [record] = build_static_records(config.models, created=0)
    assert record.upstream_api_key == "abc"


def test_file_changes_are_published(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models: [{name: a, backends: ['http://h:1']}]")
    snapshots: list[list[ModelRecord]] = []

    async def scenario() -> None:
        source = StaticSource(path=path, reload_interval=0.05)
        await source.start(snapshots.append)
        assert source.synced()
        path.write_text("models: [{name: b, backends: ['http://h:2']}]")
        for _ in range(100):
            if len(snapshots) > 1:
                break
            await asyncio.sleep(0.05)
        # A broken edit keeps the last good snapshot.
        path.write_text("models: {")
        await asyncio.sleep(0.3)
        await source.stop()

    run(scenario())
    assert [[r.name for r in s] for s in snapshots] == [["a"], ["b"]]
