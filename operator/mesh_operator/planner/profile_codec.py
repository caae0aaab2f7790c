"""A model profile as one short line of text, and back.

What a pod that can read a model file (one on a PVC) hands the operator, which
cannot: Kubernetes keeps at most 4096 bytes of a container's termination
message, so the profile travels as `mesh-profile/1:` + base64(zlib(JSON)). The
layers of a model are mostly alike, so even an 80-layer model compresses to well
under a kilobyte. Decoding checks every field's type: the text comes from a pod.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import zlib
from typing import Any, get_args

from mesh_operator.planner.errors import PlannerInputError
from mesh_operator.planner.profile import LayerProfile, ModelProfile, SwaKind

PREFIX = "mesh-profile/1:"
# Kubernetes truncates a termination message beyond this many bytes.
MAX_MESSAGE_BYTES = 4096
# A decoded profile bigger than this is not a profile (a guard against zip bombs).
_MAX_JSON_BYTES = 4 * 1024 * 1024

_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerProfile))
_REQUIRED_LAYER_FIELDS = sum(
    1 for f in dataclasses.fields(LayerProfile) if f.default is dataclasses.MISSING
)


def encode_profile(profile: ModelProfile) -> str:
    fields = dataclasses.asdict(profile)
    # Layers as rows: the field names once, not once per layer.
    fields["layers"] = [[getattr(layer, n) for n in _LAYER_FIELDS] for layer in profile.layers]
    raw = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
    text = PREFIX + base64.b64encode(zlib.compress(raw, 9)).decode("ascii")
    if len(text) > MAX_MESSAGE_BYTES:
        raise PlannerInputError(
            f"the profile of {profile.file_name} takes {len(text)} bytes encoded, "
            f"over the {MAX_MESSAGE_BYTES} of a termination message"
        )
    return text


def _typed(fields: dict[str, Any], name: str, kind: type) -> Any:
    value = fields.get(name)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise PlannerInputError(f"model profile: field {name} missing or not {kind.__name__}")
    return value


def decode_profile(text: str) -> ModelProfile:
    """The profile `encode_profile` wrote; PlannerInputError naming what is wrong."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise PlannerInputError(f"model profile: expected text starting with {PREFIX!r}")
    try:
        packed = base64.b64decode(text[len(PREFIX) :], validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, _MAX_JSON_BYTES)
        if inflater.unconsumed_tail:
            raise PlannerInputError("model profile: decoded text too large")
        fields = json.loads(raw)
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise PlannerInputError(f"model profile: not readable ({exc})") from None
    if not isinstance(fields, dict):
        raise PlannerInputError("model profile: expected a JSON object")
    rows = _typed(fields, "layers", list)
    layers = []
    for i, row in enumerate(rows):
        # Older text lacks the columns added later, which have defaults.
        if not isinstance(row, list) or not _REQUIRED_LAYER_FIELDS <= len(row) <= len(
            _LAYER_FIELDS
        ):
            raise PlannerInputError(f"model profile: layer {i} has the wrong shape")
        layer = dict(zip(_LAYER_FIELDS, row, strict=False))
        for f in dataclasses.fields(LayerProfile):
            if f.name in layer:
                _typed(layer, f.name, bool if f.type == "bool" else int)
        layers.append(LayerProfile(**layer))
    values: dict[str, Any] = {"layers": tuple(layers)}
    kinds = {"str": str, "int": int, "bool": bool, "SwaKind": str}
    for f in dataclasses.fields(ModelProfile):
        # A field added later, with a default, may be missing from older text.
        if f.name != "layers" and (f.name in fields or f.default is dataclasses.MISSING):
            values[f.name] = _typed(fields, f.name, kinds[str(f.type)])
    if values["swa_kind"] not in get_args(SwaKind):
        raise PlannerInputError(f"model profile: unknown swa_kind {values['swa_kind']!r}")
    if len(layers) != values["n_layer"]:
        raise PlannerInputError("model profile: layer count differs from n_layer")
    return ModelProfile(**values)
