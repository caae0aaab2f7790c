"""The CRDs in crds/ are generated from the models and kept fresh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_operator.api import crdgen

pytestmark = pytest.mark.unit

CRDS = Path(__file__).resolve().parents[3] / "crds"


def test_generated_crds_are_not_stale() -> None:
    assert crdgen.main(["--check", str(CRDS)]) == 0, (
        "crds/ is stale: run python -m mesh_operator.api.crdgen --write crds/"
    )


def test_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    assert crdgen.main(["--write", str(tmp_path)]) == 0
    target = next(tmp_path.glob("*.yaml"))
    target.write_text(target.read_text() + "# edited by hand\n")
    assert crdgen.main(["--check", str(tmp_path)]) == 1


def _walk(schema: dict[str, Any], path: str = "") -> list[str]:
    """Every place that a structural schema forbids."""
    bad = []
    for key in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
        if key in schema:
            bad.append(f"{path}:{key}")
    untyped = ("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
    if schema.get("type") is None and not any(schema.get(key) for key in untyped):
        bad.append(f"{path}:no type")
    for name, sub in schema.get("properties", {}).items():
        bad.extend(_walk(sub, f"{path}.{name}"))
    if isinstance(schema.get("items"), dict):
        bad.extend(_walk(schema["items"], f"{path}[]"))
    if isinstance(schema.get("additionalProperties"), dict):
        bad.extend(_walk(schema["additionalProperties"], f"{path}{{}}"))
    return bad


@pytest.mark.parametrize("name", sorted(crdgen.build_crds()))
def test_schemas_are_structural(name: str) -> None:
    crd = crdgen.build_crds()[name]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []


@pytest.mark.parametrize(
    ("plural", "columns"),
    [
        (
            "meshmodels",
            ["Ready", "Replicas", "Available", "Nodes", "Split", "Endpoint", "Reason", "Age"],
        ),
        ("meshpools", ["Backend", "Nodes", "Devices", "Free MiB", "Claimed MiB", "Age"]),
        ("meshnodes", ["Health", "Reason", "Heartbeat", "Age"]),
    ],
)
def test_printer_columns(plural: str, columns: list[str]) -> None:
    doc = yaml.safe_load((CRDS / f"mesh.dev_{plural}.yaml").read_text())
    version = doc["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == columns
    assert version["subresources"] == {"status": {}}
    assert doc["spec"]["names"]["shortNames"]
