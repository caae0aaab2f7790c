"""Reading the header of a GGUF file: metadata and tensor infos, never tensor data.

Owns the byte format. A header is everything up to the end of the tensor-info
section, which is what an HTTP range request for the start of a remote file
returns, so a file truncated right there reads the same as the whole file.
Multi-file models (`name-00001-of-00003.gguf`) are read split by split and merged.

Value types, quantization block sizes and key names come from the `gguf` package;
nothing here repeats its tables.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, Keys

from mesh_operator.planner.errors import HeaderTruncatedError, PlannerInputError

# Scalar value types of GGUF and their little-endian struct codes.
_SCALARS: Mapping[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}

# Arrays longer than this (vocabularies, merges, scores) are skipped, keeping only
# their length: the planner needs per-layer arrays, never the tokenizer.
_ARRAY_KEEP_LIMIT = 4096
# Sanity bounds so garbage counts fail fast instead of looping for hours.
_MAX_COUNT = 1 << 24
_MAX_DIMS = 8
_CHUNK = 1 << 20
_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

MetadataValue = int | float | bool | str | tuple[int | float | bool | str, ...]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; `n_bytes` is its size in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    n_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    """Metadata and tensor infos of one model (all its split files merged)."""

    source: str
    version: int
    metadata: Mapping[str, MetadataValue]
    array_lengths: Mapping[str, int]
    tensors: tuple[TensorInfo, ...]
    header_bytes: int

    def get(self, key: str, default: MetadataValue | None = None) -> MetadataValue | None:
        return self.metadata.get(key, default)


class _TruncatedError(Exception):
    pass


class _Cursor:
    """Sequential little-endian reads over a stream, buffering in chunks."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0  # position inside _buf
        self._base = 0  # file offset of _buf[0]

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _ensure(self, n: int) -> None:
        if self._pos + n <= len(self._buf):
            return
        rest = self._buf[self._pos :]
        self._base += self._pos
        self._pos = 0
        parts = [rest]
        have = len(rest)
        while have < n:
            chunk = self._stream.read(max(_CHUNK, n - have))
            if not chunk:
                self._buf = b"".join(parts)
                raise _TruncatedError
            parts.append(chunk)
            have += len(chunk)
        self._buf = b"".join(parts)

    def take(self, n: int) -> bytes:
        self._ensure(n)
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def skip(self, n: int) -> None:
        if self._pos + n <= len(self._buf):
            self._pos += n
        else:
            self.take(n)

    def scalar(self, code: str) -> int | float | bool:
        size = struct.calcsize(code)
        self._ensure(size)
        (value,) = struct.unpack_from(code, self._buf, self._pos)
        self._pos += size
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        length = self.u64()
        if length > _MAX_COUNT * 16:
            raise ValueError(f"string length {length} is not plausible")
        return self.take(length).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.u64()
        if length > _MAX_COUNT * 16:
            raise ValueError(f"string length {length} is not plausible")
        self.skip(length)


def tensor_nbytes(ggml_type: GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of this type and shape, from the gguf package's block sizes."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    elements = 1
    for dim in shape:
        elements *= dim
    if shape and shape[0] % block_size:
        raise ValueError(f"row of {shape[0]} elements is not a multiple of block size {block_size}")
    return elements // block_size * type_size


def _value_type(code: int, where: str) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise ValueError(f"unknown metadata value type {code} for {where}") from None


def _read_value(
    cur: _Cursor, vtype: GGUFValueType, key: str
) -> tuple[MetadataValue | None, int | None]:
    """Return (value, array length); long arrays come back as (None, length)."""
    if vtype == GGUFValueType.STRING:
        return cur.string(), None
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype]), None
    if vtype != GGUFValueType.ARRAY:
        raise ValueError(f"unknown metadata value type {vtype} for {key}")
    item_type = _value_type(cur.u32(), key)
    count = cur.u64()
    if count > _MAX_COUNT:
        raise ValueError(f"array {key} has {count} items, not plausible")
    if item_type == GGUFValueType.ARRAY:
        raise ValueError(f"nested arrays are not supported ({key})")
    if item_type == GGUFValueType.STRING:
        if count <= _ARRAY_KEEP_LIMIT:
            return tuple(cur.string() for _ in range(count)), count
        for _ in range(count):
            cur.skip_string()
        return None, count
    code = _SCALARS[item_type]
    size = struct.calcsize(code)
    if count > _ARRAY_KEEP_LIMIT:
        cur.skip(size * count)
        return None, count
    raw = cur.take(size * count)
    return tuple(v[0] for v in struct.iter_unpack(code, raw)), count


def _read_one(stream: BinaryIO, source: str) -> GgufHeader:
    cur = _Cursor(stream)
    stage = "the magic number"
    try:
        magic = cur.u32()
        if magic != GGUF_MAGIC:
            raise PlannerInputError(f"{source}: not a GGUF file (magic {magic:#010x})")
        stage = "the version"
        version = cur.u32()
        if version not in (2, 3):
            raise PlannerInputError(f"{source}: unsupported GGUF version {version}")
        stage = "the counts"
        n_tensors = cur.u64()
        n_kv = cur.u64()
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise PlannerInputError(
                f"{source}: implausible header ({n_tensors} tensors, {n_kv} metadata keys)"
            )
        metadata: dict[str, MetadataValue] = {}
        lengths: dict[str, int] = {}
        for i in range(n_kv):
            stage = f"metadata key {i + 1} of {n_kv}"
            key = cur.string()
            stage = f"metadata value {key!r}"
            value, length = _read_value(cur, _value_type(cur.u32(), key), key)
            if value is not None:
                metadata[key] = value
            if length is not None:
                lengths[key] = length
        tensors: list[TensorInfo] = []
        for i in range(n_tensors):
            stage = f"tensor info {i + 1} of {n_tensors}"
            name = cur.string()
            n_dims = cur.u32()
            if n_dims > _MAX_DIMS:
                raise PlannerInputError(f"{source}: tensor {name!r} has {n_dims} dimensions")
            shape = tuple(cur.u64() for _ in range(n_dims))
            type_code = cur.u32()
            cur.u64()  # data offset: the planner never reads tensor data
            try:
                ggml_type = GGMLQuantizationType(type_code)
                n_bytes = tensor_nbytes(ggml_type, shape)
            except (ValueError, KeyError):
                raise PlannerInputError(
                    f"{source}: unknown tensor type {type_code} for tensor {name!r}"
                ) from None
            tensors.append(TensorInfo(name, shape, ggml_type, n_bytes))
    except _TruncatedError:
        raise HeaderTruncatedError(source, cur.offset, stage) from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, PlannerInputError):
            raise
        raise PlannerInputError(f"{source}: bad header at byte {cur.offset}: {exc}") from None
    return GgufHeader(source, version, metadata, lengths, tuple(tensors), cur.offset)


def read_header_bytes(data: bytes, source: str = "<bytes>") -> GgufHeader:
    """Parse one GGUF header from bytes (a whole file or just its start)."""
    return _read_one(io.BytesIO(data), source)


def read_header_file(path: str | os.PathLike[str]) -> GgufHeader:
    """Parse one GGUF header from a file, reading only the header's bytes."""
    source = str(path)
    try:
        with open(path, "rb") as stream:
            return _read_one(stream, source)
    except OSError as exc:
        raise PlannerInputError(f"{source}: cannot read: {exc.strerror or exc}") from None


def split_siblings(path: str | os.PathLike[str]) -> list[Path]:
    """All files of a split model named like `x-00001-of-00003.gguf`, in order."""
    p = Path(path)
    match = _SPLIT_NAME.match(p.name)
    if not match:
        return [p]
    count = int(match["count"])
    return [
        p.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]


def merge_split_headers(parts: Sequence[GgufHeader]) -> GgufHeader:
    """One header from the headers of a split model's files, in any order.

    The first split (split.no 0) holds the model's metadata; every split holds
    its own tensor infos.
    """
    if not parts:
        raise PlannerInputError("no GGUF header given")

    def split_no(h: GgufHeader) -> int:
        no = h.get(Keys.Split.LLM_KV_SPLIT_NO, 0)
        return int(no) if isinstance(no, int) else 0

    ordered = sorted(parts, key=split_no)
    first = ordered[0]
    count = first.get(Keys.Split.LLM_KV_SPLIT_COUNT, 1)
    expected = int(count) if isinstance(count, int) and count > 0 else 1
    if len(ordered) != expected:
        raise PlannerInputError(
            f"{first.source}: model is split in {expected} files, got {len(ordered)}"
        )
    if [split_no(h) for h in ordered] != list(range(expected)):
        raise PlannerInputError(f"{first.source}: split files do not number 0..{expected - 1}")
    tensors = tuple(t for h in ordered for t in h.tensors)
    declared = first.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if isinstance(declared, int) and declared != len(tensors):
        raise PlannerInputError(
            f"{first.source}: splits declare {declared} tensors, headers list {len(tensors)}"
        )
    return GgufHeader(
        source=first.source,
        version=first.version,
        metadata=first.metadata,
        array_lengths=first.array_lengths,
        tensors=tensors,
        header_bytes=sum(h.header_bytes for h in ordered),
    )
