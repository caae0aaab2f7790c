"""A profile as one line (`mesh profile`, the header-reader pod's termination
message) and back: exact round trips, the 4096-byte bound, refusals that name
what is wrong, and the command's exit codes."""

from __future__ import annotations

import base64
import dataclasses
import json
import zlib
from pathlib import Path

import pytest

from mesh_operator.cli.main import main
from mesh_operator.planner import PlannerInputError, read_model_profile
from mesh_operator.planner.profile_codec import (
    MAX_MESSAGE_BYTES,
    PREFIX,
    decode_profile,
    encode_profile,
)
from tests.unit.planner.llama_log import GEMMA_HEADER, MODEL_HEADERS

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("header", sorted(MODEL_HEADERS.glob("*.gguf")), ids=lambda p: p.name)
def test_every_fixture_model_round_trips_within_a_termination_message(header: Path) -> None:
    profile = read_model_profile(header)
    text = encode_profile(profile)
    assert text.startswith(PREFIX)
    assert len(text.encode()) <= MAX_MESSAGE_BYTES
    assert decode_profile(text) == profile
    assert decode_profile(f"  {text}\n") == profile  # as a file or a log line gives it


def _packed(fields: object) -> str:
    return PREFIX + base64.b64encode(zlib.compress(json.dumps(fields).encode())).decode()


def _fields() -> dict[str, object]:
    text = encode_profile(read_model_profile(GEMMA_HEADER))
    loaded: dict[str, object] = json.loads(zlib.decompress(base64.b64decode(text[len(PREFIX) :])))
    return loaded


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected text starting with"),
        ("mesh-profile/2:abc", "expected text starting with"),
        (PREFIX + "not base64!", "not readable"),
        (PREFIX + base64.b64encode(b"not zlib").decode(), "not readable"),
        (_packed([1, 2]), "expected a JSON object"),
        (_packed({**_fields(), "n_layer": "18"}), "field n_layer"),
        (_packed({**_fields(), "tied_output": 1}), "field tied_output"),
        (_packed({**_fields(), "n_layer": True}), "field n_layer"),
        (_packed({**_fields(), "swa_kind": "sideways"}), "unknown swa_kind"),
        (_packed({**_fields(), "layers": [[1, 2]]}), "layer 0 has the wrong shape"),
        (_packed({**_fields(), "n_layer": 3}), "layer count differs"),
        (_packed({k: v for k, v in _fields().items() if k != "file_bytes"}), "field file_bytes"),
    ],
)
def test_bad_text_is_refused_naming_what(text: str, says: str) -> None:
    with pytest.raises(PlannerInputError, match=says):
        decode_profile(text)


def test_a_compression_bomb_is_refused() -> None:
    bomb = PREFIX + base64.b64encode(zlib.compress(b" " * (64 * 1024 * 1024))).decode()
    with pytest.raises(PlannerInputError, match="too large"):
        decode_profile(bomb)


def test_mesh_profile_prints_the_line_and_writes_the_termination_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "termination-log"
    assert main(["profile", "--model", str(GEMMA_HEADER), "--termination-log", str(log)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == log.read_text()
    assert decode_profile(out) == read_model_profile(GEMMA_HEADER)


@pytest.mark.parametrize("content", [b"not a model at all", None], ids=["not-gguf", "missing"])
def test_mesh_profile_bad_file_exits_2_with_one_line_in_both_places(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None
) -> None:
    model = tmp_path / "m.gguf"
    if content is not None:
        model.write_bytes(content)
    log = tmp_path / "termination-log"
    assert main(["profile", "--model", str(model), "--termination-log", str(log)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mesh profile: ") and str(model) in err
    assert log.read_text() == err.removeprefix("mesh profile: ").strip()


def test_text_from_before_the_compute_graph_fields_still_decodes() -> None:
    profile = read_model_profile(GEMMA_HEADER)
    fields = dataclasses.asdict(profile)
    old_layer = ["weight_bytes", "expert_bytes", "n_embd_k", "n_embd_v", "is_swa", "n_head"]
    fields["layers"] = [[getattr(layer, n) for n in old_layer] for layer in profile.layers]
    for name in ("qk_norm", "n_rot", "mla_rank", "head_dim_q", "head_dim_v_mla"):
        del fields[name]
    raw = json.dumps(fields).encode()
    decoded = decode_profile(PREFIX + base64.b64encode(zlib.compress(raw)).decode())
    assert decoded.layers[0].weight_bytes == profile.layers[0].weight_bytes
    assert (decoded.layers[0].ffn_dense, decoded.qk_norm) == (0, False)  # the defaults
