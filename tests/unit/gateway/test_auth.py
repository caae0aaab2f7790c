"""API keys: loading them and checking bearer tokens."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from mesh_operator.gateway.auth import KeyRing, keys_from_secret_data, load_key_dir

pytestmark = pytest.mark.unit

RING = KeyRing({"team-a": "sk-alpha-1234", "team-b": "sk-beta-5678"})


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("Bearer sk-alpha-1234", "team-a"),
        ("bearer sk-beta-5678", "team-b"),
        ("Bearer   sk-beta-5678  ", "team-b"),
        ("Bearer sk-alpha-123", None),
        ("Bearer sk-alpha-12345", None),
        ("Basic sk-alpha-1234", None),
        ("sk-alpha-1234", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_identify(header: str | None, name: str | None) -> None:
    assert RING.identify(header) == name


def test_empty_values_are_never_keys() -> None:
    assert KeyRing({"blank": ""}).identify("Bearer ") is None
    assert len(KeyRing({"blank": ""})) == 0


def test_mounted_secret_layout(tmp_path: Path) -> None:
    # What the kubelet writes for a Secret volume: a hidden timestamped folder,
    # a `..data` link to it and one link per key.
    stamp = tmp_path / "..2026_11_21_23_00_00.000000001"
    stamp.mkdir()
    (stamp / "team-a").write_text("sk-alpha-1234\n")
    (stamp / "team-b").write_text("sk-beta-5678")
    (tmp_path / "..data").symlink_to(stamp.name)
    for key in ("team-a", "team-b"):
        (tmp_path / key).symlink_to(f"..data/{key}")
    assert load_key_dir(tmp_path) == {"team-a": "sk-alpha-1234", "team-b": "sk-beta-5678"}


def test_secret_data_from_the_api() -> None:
    data = {
        "team-a": base64.b64encode(b"sk-alpha-1234\n").decode(),
        "broken": "not base64!",
        "empty": "",
    }
    assert keys_from_secret_data(data) == {"team-a": "sk-alpha-1234"}
    assert keys_from_secret_data(None) == {}


def test_replace_swaps_the_keys() -> None:
    ring = KeyRing({"old": "sk-old"})
    ring.replace({"new": "sk-new"})
    assert ring.identify("Bearer sk-old") is None
    assert ring.identify("Bearer sk-new") == "new"
