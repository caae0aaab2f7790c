"""API group, version, names and the base model every resource part derives from."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

GROUP = "mesh.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# kopf's own annotations, finalizer and field manager live under the project's prefix.
ANNOTATION_PREFIX = GROUP
FINALIZER = f"{GROUP}/finalizer"
FIELD_MANAGER = "mesh-operator"

MESHPOOL_PLURAL = "meshpools"
MESHMODEL_PLURAL = "meshmodels"
MESHNODE_PLURAL = "meshnodes"


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
    )

    def to_wire(self) -> dict[str, object]:
        """The JSON-ready dict that goes to the API server (aliases, no unset Nones)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def cel_rule(rule: str, message: str) -> JsonDict:
    """A CEL rule for the generated CRD, checked by the API server at admission."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


def cel_rules(*rules: Mapping[str, str]) -> JsonDict:
    """Several CEL rules (`rule` and `message` or `messageExpression`, maybe `fieldPath`)."""
    return {"x-kubernetes-validations": [dict(rule) for rule in rules]}
