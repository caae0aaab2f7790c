"""Model sources: names and paths agreed on by operator, fetcher and agent; header
reads by range; `mesh fetch` resuming, verifying and refusing bad input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from e2e.fileserver import serve_directory
from mesh_operator.api.meshmodel import ModelSource
from mesh_operator.cli.main import main
from mesh_operator.fetch import FetchError, FetchRequest, fetch_model
from mesh_operator.planner import read_model_profile
from mesh_operator.planner.errors import HeaderTruncatedError
from mesh_operator.source import (
    ProfileCache,
    SourceError,
    build_fetch_args,
    cache_key,
    container_model_path,
    fetch_header_bytes,
    source_url,
)

pytestmark = pytest.mark.unit


def src(**kw: object) -> ModelSource:
    return ModelSource.model_validate(kw)


def test_paths_are_stable_and_per_source() -> None:
    a = src(url="https://m.example/x/gemma.gguf")
    b = src(url="https://other.example/gemma.gguf")
    assert cache_key(a) == cache_key(src(url="https://m.example/x/gemma.gguf"))
    assert cache_key(a) != cache_key(b)
    assert container_model_path(a) == f"/models/{cache_key(a)}/gemma.gguf"
    pvc = src(pvc={"claimName": "c", "path": "dir/m.gguf"})
    assert container_model_path(pvc) == "/models/dir/m.gguf"


def test_fetch_args_per_source_kind() -> None:
    hf = src(huggingface={"repo": "org/m", "file": "q/m.gguf", "revision": "v2"})
    args = build_fetch_args(hf, "a" * 64)
    assert args[args.index("--hf-repo") + 1] == "org/m"
    assert args[args.index("--revision") + 1] == "v2"
    assert args[-2:] == ["--sha256", "a" * 64]
    assert source_url(hf, "https://hub.example") == "https://hub.example/org/m/resolve/v2/q/m.gguf"


def _parse_prefix(data: bytes) -> None:
    # A toy header: the first 8 bytes say how long the header is.
    if len(data) < 8 or len(data) < int(data[:8]):
        raise HeaderTruncatedError("<toy>", len(data), "the header")
    if not data.startswith(b"0"):
        raise ValueError("bad magic")


def test_header_read_grows_until_parse_succeeds(tmp_path: Path) -> None:
    size = 6 * 1024 * 1024
    (tmp_path / "m.gguf").write_bytes(f"{size:08d}".encode() + b"x" * (size + 1000))
    with serve_directory(tmp_path) as base:
        data = fetch_header_bytes(src(url=f"{base}/m.gguf"), _parse_prefix)
    assert len(data) >= size


@pytest.mark.parametrize(
    ("name", "reason"),
    [("absent.gguf", "SourceNotFound"), ("junk.gguf", "SourceInvalid")],
)
def test_header_read_failures_have_reasons(tmp_path: Path, name: str, reason: str) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"99999999 not a model")
    with serve_directory(tmp_path) as base, pytest.raises(SourceError) as err:
        fetch_header_bytes(src(url=f"{base}/{name}"), _parse_prefix)
    assert err.value.reason == reason


def test_profile_of_a_remote_source_is_read_once(model_file: Path) -> None:
    cache = ProfileCache()
    with serve_directory(model_file.parent) as base:
        source = src(url=f"{base}/{model_file.name}")
        profile = cache.get(source, None, None)
    assert profile == read_model_profile(model_file)
    assert profile.file_name == model_file.name
    # Kept: read again with the server gone.
    assert cache.get(source, None, None) is profile
    with pytest.raises(SourceError) as err:
        cache.get(src(pvc={"claimName": "c", "path": "m.gguf"}), None, None)
    assert err.value.reason == "SourceUnreadable"


def _blob(tmp_path: Path) -> tuple[Path, bytes, str]:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "srv" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(data)
    return path, data, hashlib.sha256(data).hexdigest()


def test_fetch_resumes_a_partial_download_and_verifies(tmp_path: Path) -> None:
    path, data, digest = _blob(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    dest.parent.mkdir()
    dest.with_name("model.gguf.part").write_bytes(data[: 1024 * 1024])
    with serve_directory(path.parent) as base:
        fetch_model(FetchRequest(dest=dest, url=f"{base}/model.gguf", sha256=digest))
    assert dest.read_bytes() == data
    assert not dest.with_name("model.gguf.part").exists()
    # Cached: a second fetch neither downloads nor rehashes (no server needed).
    assert fetch_model(FetchRequest(dest=dest, url="http://127.0.0.1:9/x", sha256=digest)) == dest


def test_fetch_refuses_a_wrong_digest_and_keeps_nothing(tmp_path: Path) -> None:
    path, _, _ = _blob(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    with serve_directory(path.parent) as base, pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_model(FetchRequest(dest=dest, url=f"{base}/model.gguf", sha256="0" * 64))
    assert not dest.exists() and not dest.with_name("model.gguf.part").exists()


def test_fetch_cli_bad_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(
        ["fetch", "--dest", str(tmp_path / "m.gguf"), "--url", "http://x/m", "--sha256", "zz"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--sha256" in err


def test_fetch_cli_unreachable_source_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["fetch", "--dest", str(tmp_path / "m.gguf"), "--url", "http://127.0.0.1:9/m.gguf"])
    assert code == 1
    assert capsys.readouterr().err.startswith("mesh fetch: error:")
