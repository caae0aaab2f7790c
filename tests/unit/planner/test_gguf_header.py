"""Reading GGUF headers: whole files, truncated files, bytes, split models, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from mesh_operator.planner import PlannerInputError, read_model_profile
from mesh_operator.planner.errors import HeaderTruncatedError
from mesh_operator.planner.gguf_header import read_header_bytes, read_header_file, split_siblings
from tests.unit.planner.builders import raw_gguf
from tests.unit.planner.llama_log import GEMMA_HEADER, MODEL_HEADERS

pytestmark = pytest.mark.unit


def _tiny_model(path: Path, *, split_max_tensors: int = 0) -> list[Path]:
    """A 2-layer llama with real (zero) tensor data, written by the gguf package."""
    writer = GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(512)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(64, dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float16))
    for il in range(2):
        p = f"blk.{il}."
        writer.add_tensor(p + "attn_norm.weight", np.zeros(64, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", np.zeros((64, 64), dtype=np.float16))
        writer.add_tensor(p + "attn_k.weight", np.zeros((32, 64), dtype=np.float16))
        writer.add_tensor(p + "attn_v.weight", np.zeros((32, 64), dtype=np.float16))
        writer.add_tensor(p + "attn_output.weight", np.zeros((64, 64), dtype=np.float16))
        writer.add_tensor(p + "ffn_up.weight", np.zeros((128, 64), dtype=np.float16))
    files = writer.format_shard_names(path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return files


def test_truncated_right_after_tensor_infos_reads_like_the_whole_file(tmp_path: Path) -> None:
    (whole,) = _tiny_model(tmp_path / "tiny.gguf")
    header = read_header_file(whole)
    data = whole.read_bytes()
    assert header.header_bytes < len(data)
    cut = read_header_bytes(data[: header.header_bytes])
    assert cut.tensors == header.tensors
    assert read_model_profile(data[: header.header_bytes], file_name="tiny.gguf") == (
        read_model_profile(whole)
    )


def test_header_only_fixture_matches_its_shape() -> None:
    profile = read_model_profile(MODEL_HEADERS / "llama-3.1-8b.header.gguf")
    assert (profile.architecture, profile.n_layer, profile.n_embd) == ("llama", 32, 4096)
    assert profile.n_vocab == 128256
    # Q4_K_M-like llama 3.1 8B: about 4.5 GiB of weights outside the embedding.
    assert 4.3 < profile.weight_bytes / 2**30 < 4.8


def test_tensor_sizes_come_from_gguf_block_sizes() -> None:
    header = read_header_file(GEMMA_HEADER)
    by_name = {t.name: t for t in header.tensors}
    embd = by_name["token_embd.weight"]
    assert embd.ggml_type.name == "Q8_0"
    assert embd.n_bytes == 640 * 262144 // 32 * 34  # 34-byte blocks of 32
    assert by_name["blk.0.attn_output.weight"].n_bytes == 1024 * 640 // 256 * 144  # Q4_K


def test_split_model_reads_like_the_single_file(tmp_path: Path) -> None:
    (single,) = _tiny_model(tmp_path / "one.gguf")
    parts = _tiny_model(tmp_path / "model.gguf", split_max_tensors=5)
    assert len(parts) == 3
    assert parts[0].name == "model-00001-of-00003.gguf"
    assert split_siblings(parts[1]) == parts
    from_first = read_model_profile(parts[0])
    from_list = read_model_profile([p.read_bytes() for p in parts], file_name="x")
    expected = dataclasses.replace(read_model_profile(single), file_name=from_first.file_name)
    assert from_first == expected
    assert dataclasses.replace(from_list, file_name=from_first.file_name) == expected


def test_split_model_with_a_missing_part_is_refused(tmp_path: Path) -> None:
    parts = _tiny_model(tmp_path / "model.gguf", split_max_tensors=5)
    parts[2].unlink()
    with pytest.raises(PlannerInputError, match=r"model-00003-of-00003\.gguf: cannot read"):
        read_model_profile(parts[0])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\x03\x04not a gguf at all", r"not a GGUF file"),
        (b"GG", r"truncated at byte 0 while reading the magic number"),
        (raw_gguf(version=1), r"unsupported GGUF version 1"),
        (raw_gguf()[:40], r"truncated at byte \d+ while reading metadata"),
        (raw_gguf()[:-6], r"truncated at byte \d+ while reading tensor info 1 of 1"),
        (
            raw_gguf(tensors=[("blk.0.x", (32,), 99)]),
            r"unknown tensor type 99 for tensor 'blk.0.x'",
        ),
        (raw_gguf(metadata=[("general.architecture", "mamba2")]), r"unknown architecture 'mamba2'"),
        (raw_gguf(metadata=[("general.name", "x")]), r"general.architecture is missing"),
        (raw_gguf(), r"block_count missing"),
    ],
    ids=[
        "not-gguf",
        "too-short",
        "old-version",
        "cut-in-metadata",
        "cut-in-tensor-infos",
        "unknown-tensor-type",
        "unknown-architecture",
        "no-architecture",
        "no-block-count",
    ],
)
def test_bad_headers_fail_with_one_line_saying_where(data: bytes, message: str) -> None:
    with pytest.raises(PlannerInputError, match=message) as info:
        read_model_profile(data)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("<bytes>: ")


@pytest.mark.parametrize(
    ("cut", "stage"),
    [(2, "the magic number"), (6, "the version"), (-6, "tensor info 1 of 1")],
    ids=["in-magic", "in-version", "in-tensor-infos"],
)
def test_a_cut_header_is_header_truncated_at_the_item_that_did_not_fit(
    cut: int, stage: str
) -> None:
    whole = raw_gguf()
    data = whole[:cut]
    with pytest.raises(HeaderTruncatedError) as info:
        read_header_bytes(data)
    assert info.value.stage == stage
    # The item that did not fit starts within the bytes given.
    assert info.value.offset <= len(data) < read_header_bytes(whole).header_bytes
    assert f"truncated at byte {info.value.offset} " in str(info.value)


def test_bad_header_is_not_header_truncated() -> None:
    with pytest.raises(PlannerInputError) as info:
        read_header_bytes(b"PK\x03\x04not a gguf at all")
    assert not isinstance(info.value, HeaderTruncatedError)


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(PlannerInputError, match=r"absent\.gguf: cannot read"):
        read_model_profile(tmp_path / "absent.gguf")
