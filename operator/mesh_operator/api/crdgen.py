"""Generate the CustomResourceDefinitions in `crds/` from the pydantic models.

The models are the one source of truth: their JSON schema is turned into the
structural OpenAPI v3 schema Kubernetes wants (references inlined, optional
fields plain, no titles), and the CEL rules, printer columns and names are
added here. `python -m mesh_operator.api.crdgen --write crds/` rewrites the files;
`--check crds/` exits 1 when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from mesh_operator import __version__
from mesh_operator.api.base import (
    GROUP,
    MESHMODEL_PLURAL,
    MESHNODE_PLURAL,
    MESHPOOL_PLURAL,
    VERSION,
)
from mesh_operator.api.contract import VERSION_ANNOTATION, model_name_rule
from mesh_operator.api.meshmodel import SERVED_NAMES_RULE, MeshModelSpec, MeshModelStatus
from mesh_operator.api.meshnode import MeshNodeSpec, MeshNodeStatus
from mesh_operator.api.meshpool import MeshPoolSpec, MeshPoolStatus

Schema = dict[str, Any]

# Keys of pydantic's JSON schema that a structural Kubernetes schema must not carry.
_DROPPED_KEYS = {"title", "$defs", "examples"}


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: str
    spec: type[BaseModel]
    status: type[BaseModel]
    spec_required: bool
    columns: tuple[Schema, ...] = ()
    categories: tuple[str, ...] = ("mesh",)
    root_rules: tuple[Schema, ...] = field(default=())


def _column(name: str, path: str, type_: str = "string", **extra: Any) -> Schema:
    return {"name": name, "type": type_, "jsonPath": path, **extra}


AGE = _column("Age", ".metadata.creationTimestamp", "date")

KINDS = (
    Kind(
        kind="MeshPool",
        plural=MESHPOOL_PLURAL,
        singular="meshpool",
        short_names=("mpool",),
        scope="Cluster",
        spec=MeshPoolSpec,
        status=MeshPoolStatus,
        spec_required=False,
        columns=(
            _column("Backend", ".spec.backend"),
            _column("Nodes", ".status.readyNodes", "integer"),
            _column("Devices", ".status.devices", "integer"),
            _column("Free MiB", ".status.memoryFreeMiB", "integer"),
            _column("Claimed MiB", ".status.memoryClaimedMiB", "integer"),
            AGE,
        ),
    ),
    Kind(
        kind="MeshModel",
        plural=MESHMODEL_PLURAL,
        singular="meshmodel",
        short_names=("mm", "mmodel"),
        scope="Namespaced",
        spec=MeshModelSpec,
        status=MeshModelStatus,
        spec_required=True,
        root_rules=(model_name_rule(), SERVED_NAMES_RULE),
        columns=(
            _column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            _column("Replicas", ".spec.replicas", "integer"),
            _column("Available", ".status.readyReplicas", "integer"),
            _column("Nodes", ".status.nodes"),
            _column("Split", ".status.split"),
            _column("Endpoint", ".status.endpoint"),
            _column("Reason", '.status.conditions[?(@.type=="Ready")].reason', priority=1),
            AGE,
        ),
    ),
    Kind(
        kind="MeshNode",
        plural=MESHNODE_PLURAL,
        singular="meshnode",
        short_names=("mnode",),
        scope="Cluster",
        spec=MeshNodeSpec,
        status=MeshNodeStatus,
        spec_required=False,
        columns=(
            _column("Health", ".status.health.state"),
            _column("Reason", ".status.health.reason"),
            _column("Heartbeat", ".status.heartbeatTime", "date"),
            AGE,
        ),
    ),
)


def _resolve(schema: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline references and turn pydantic's shapes into structural ones."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}
        return _resolve(merged, defs)
    out: Schema = {}
    any_of = schema.get("anyOf")
    if any_of is not None:
        # Optional[X] is `anyOf: [X, {type: null}]`: absent means unset in Kubernetes.
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {any_of}")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return _resolve({**non_null[0], **rest}, defs)
    for key, value in schema.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _resolve(value, defs)
        elif key == "additionalProperties":
            if value is False:
                continue  # structural schemas prune unknown fields already
            out[key] = _resolve(value, defs) if isinstance(value, dict) else value
        elif key == "const":
            out["enum"] = [value]
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "number":
        # JSON has one number type; Kubernetes wants ints and floats told apart
        # only where `format` says so. Floats stay in status, never in spec.
        out.setdefault("format", "double")
    return out


def model_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _resolve(raw, raw.get("$defs", {}))


def build_crd(kind: Kind) -> Schema:
    spec = model_schema(kind.spec)
    status = model_schema(kind.status)
    root: Schema = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if kind.spec_required:
        root["required"] = ["spec"]
    if kind.root_rules:
        root["x-kubernetes-validations"] = list(kind.root_rules)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "mesh"},
            # The release that made it: `mesh doctor` compares it with the operator's.
            "annotations": {VERSION_ANNOTATION: __version__},
        },
        "spec": {
            "group": GROUP,
            "scope": kind.scope,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": list(kind.categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(kind.columns),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def build_crds() -> dict[str, Schema]:
    """File name -> CRD document, for every kind."""
    return {f"{GROUP}_{k.plural}.yaml": build_crd(k) for k in KINDS}


class _PlainDumper(yaml.SafeDumper):
    """Write shared sub-schemas out in full: CRDs are read by people and tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(doc: Schema) -> str:
    header = "# Generated by `python -m mesh_operator.api.crdgen --write crds/`. Do not edit.\n"
    return header + yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh_operator.api.crdgen")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="DIR")
    mode.add_argument("--check", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, doc in build_crds().items():
        text = render(doc)
        if args.write is not None:
            args.write.mkdir(parents=True, exist_ok=True)
            (args.write / name).write_text(text)
            continue
        path = args.check / name
        if not path.exists() or path.read_text() != text:
            stale.append(str(path))
    if stale:
        print(
            "stale CRDs (run python -m mesh_operator.api.crdgen --write crds/): "
            + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
