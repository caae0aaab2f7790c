"""The chart's files agree with the sources they restate: the CRDs with the
generator, the defaults with the API models, the schema with values.yaml, and the
examples with the API models. Pure: no helm, no cluster."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_operator import __version__
from mesh_operator.api import meshpool
from mesh_operator.api.crdgen import build_crds, render
from mesh_operator.api.meshmodel import MeshModelSpec
from mesh_operator.api.meshpool import MeshPoolSpec

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mesh"
EXAMPLES = REPO / "manifests" / "examples"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_chart_ships_exactly_the_generated_crds() -> None:
    shipped = {p.name: p.read_text() for p in (CHART / "files" / "crds").glob("*.yaml")}
    generated = {name: render(doc) for name, doc in build_crds().items()}
    assert sorted(shipped) == sorted(generated)
    stale = [name for name in generated if shipped[name] != generated[name]]
    assert not stale, f"stale chart CRDs {stale}: run scripts/render-manifests.sh"


def test_chart_and_crds_folder_agree() -> None:
    for path in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "files" / "crds" / path.name).read_text() == path.read_text()


def test_versions_and_default_images_match_the_api() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    values = load_yaml(CHART / "values.yaml")
    assert chart["appVersion"] == __version__
    assert values["registry"] == meshpool.DEFAULT_REGISTRY
    # With the default values the chart leaves the generated CRDs untouched: its
    # image defaults (as _helpers.tpl builds them) are the API's.
    registry = values["registry"]
    mesh = values["image"]["repository"] or f"{registry}/mesh"
    assert f"{mesh}:{values['image']['tag'] or chart['appVersion']}" == meshpool.DEFAULT_MESH_IMAGE
    tag = values["llamaCpp"]["tag"] or chart["annotations"]["mesh.dev/llama-cpp"]
    llama_cpp = f"{registry}/llama.cpp:{tag}-{{variant}}"
    assert (values["llamaCpp"]["rpcServerImage"] or llama_cpp) == meshpool.DEFAULT_RPC_IMAGE
    assert (values["llamaCpp"]["llamaServerImage"] or llama_cpp) == meshpool.DEFAULT_SERVER_IMAGE


def _pin(name: str) -> str:
    for line in (REPO / "scripts" / "llama-cpp.pin").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip().strip('"')
    raise AssertionError(f"{name} not in scripts/llama-cpp.pin")


def test_llama_cpp_tag_is_the_pinned_build() -> None:
    # Helm cannot read scripts/llama-cpp.pin: the chart restates it, the API too.
    pinned = _pin("LLAMA_CPP_PYTHON_VERSION")
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["annotations"]["mesh.dev/llama-cpp"] == pinned
    assert pinned == meshpool.LLAMA_CPP_VERSION
    assert f":{pinned}-{{variant}}" in meshpool.DEFAULT_RPC_IMAGE


@pytest.mark.parametrize("folder", ["charts", "crds", "manifests"])
def test_nothing_defaults_to_upstream_llama_cpp_images(folder: str) -> None:
    # Upstream's images hold no ggml-rpc-server and predate `-fit off`.
    found = [
        str(p.relative_to(REPO))
        for p in (REPO / folder).rglob("*")
        if p.is_file() and "ghcr.io/ggml-org" in p.read_text(errors="replace")
    ]
    assert not found


def _object_nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if schema.get("type") == "object" and "properties" in schema:
        found.append((path or "/", schema))
        for key, sub in schema["properties"].items():
            found += _object_nodes(sub, f"{path}/{key}")
    if isinstance(schema.get("items"), dict):
        found += _object_nodes(schema["items"], f"{path}[]")
    return found


def test_schema_refuses_unknown_keys_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    nodes = _object_nodes(schema)
    assert len(nodes) > 20
    open_nodes = [path for path, node in nodes if node.get("additionalProperties") is not False]
    assert not open_nodes, f"objects accepting unknown keys: {open_nodes}"


def _check_against(value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    if isinstance(value, dict) and "properties" in schema:
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}/{key}: required by the schema, missing in values.yaml")
        for key, sub in value.items():
            if key not in schema["properties"]:
                errors.append(f"{path}/{key}: not in the schema")
            else:
                _check_against(sub, schema["properties"][key], f"{path}/{key}", errors)


def test_every_value_is_described_by_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = load_yaml(CHART / "values.yaml")
    errors: list[str] = []
    _check_against(values, schema, "", errors)
    assert not errors, "\n".join(errors)


def test_dashboard_files_are_the_three_of_the_issue() -> None:
    names = sorted(p.stem for p in (CHART / "dashboards").glob("*.json"))
    assert names == ["fleet", "models", "operator"]


@pytest.mark.parametrize("name", ["pool.yaml", "cpu-pool.yaml"])
def test_pool_examples_are_valid_meshpools(name: str) -> None:
    doc = load_yaml(EXAMPLES / name)
    assert (doc["apiVersion"], doc["kind"]) == ("mesh.dev/v1alpha1", "MeshPool")
    spec = MeshPoolSpec.model_validate(doc["spec"])
    assert spec.node_selector, "an example pool should say which nodes it takes"


def test_cpu_pool_example_is_cpu_only() -> None:
    spec = MeshPoolSpec.model_validate(load_yaml(EXAMPLES / "cpu-pool.yaml")["spec"])
    assert spec.backend == "cpu"
    assert spec.runtime_class_name is None
    # Its models' namespaces can enforce `restricted`: no hostPath cache.
    assert (spec.rpc_cache.volume, spec.model_cache.volume) == ("emptyDir", "emptyDir")


def test_model_example_serves_gemma_from_hugging_face() -> None:
    doc = load_yaml(EXAMPLES / "model.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("mesh.dev/v1alpha1", "MeshModel")
    spec = MeshModelSpec.model_validate(doc["spec"])
    assert spec.source.huggingface is not None
    assert "gemma-3-270m" in spec.source.huggingface.file
    pools = {load_yaml(EXAMPLES / n)["metadata"]["name"] for n in ("pool.yaml", "cpu-pool.yaml")}
    assert spec.pool_ref in pools


def test_values_examples_only_use_known_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    files = sorted(EXAMPLES.glob("values-*.yaml"))
    assert len(files) >= 3
    for path in files:
        errors: list[str] = []
        overrides = load_yaml(path)
        for key, sub in overrides.items():
            if key not in schema["properties"]:
                errors.append(f"/{key}: not in the schema")
            else:
                _check_keys_only(sub, schema["properties"][key], f"/{key}", errors)
        assert not errors, f"{path.name}: " + "; ".join(errors)


def _check_keys_only(value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key not in schema["properties"]:
                errors.append(f"{path}/{key}: not in the schema")
            else:
                _check_keys_only(sub, schema["properties"][key], f"{path}/{key}", errors)


def _inputs_digest() -> str:
    """What scripts/render-manifests.sh records: sha256 over `sha256sum` lines of the
    chart's files and the script, in byte order of their paths."""
    files = [p for p in CHART.rglob("*") if p.is_file()]
    files.append(REPO / "scripts" / "render-manifests.sh")
    paths = sorted(p.relative_to(REPO).as_posix() for p in files)
    lines = "".join(f"{hashlib.sha256((REPO / p).read_bytes()).hexdigest()}  {p}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


def test_install_manifest_was_rendered_from_the_current_chart() -> None:
    header = (REPO / "manifests" / "install.yaml").read_text().splitlines()[:3]
    recorded = next(line.split(":", 1)[1].strip() for line in header if "inputs-sha256" in line)
    assert recorded == _inputs_digest(), (
        "manifests/install.yaml is stale: run scripts/render-manifests.sh"
    )
