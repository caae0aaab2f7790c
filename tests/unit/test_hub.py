"""Hugging Face sources through `huggingface_hub`, against a stand-in Hub
(e2e/hubserver.py): the header read of the README's model, every failure as a
one-line condition, and downloads that resume and refuse a wrong sha256."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.hubserver import (
    GATED_REPO,
    GRANTED_TOKEN,
    NOT_GRANTED_TOKEN,
    README_FILE,
    README_REPO,
    HubRepo,
    HubServer,
    serve_hub,
)
from mesh_operator.api.meshmodel import ModelSource
from mesh_operator.fetch import FetchError, FetchRequest, fetch_model
from mesh_operator.planner import read_model_profile
from mesh_operator.source import ProfileCache, SourceError, source_url

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf(repo: str = README_REPO, file: str = README_FILE, **kw: Any) -> ModelSource:
    return ModelSource.model_validate({"huggingface": {"repo": repo, "file": file, **kw}})


def test_the_readme_and_the_example_name_the_model_the_tests_serve() -> None:
    line = next(
        ln for ln in (REPO_ROOT / "README.md").read_text().splitlines() if "huggingface:" in ln
    )
    readme = yaml.safe_load(line)["source"]["huggingface"]
    example = yaml.safe_load((REPO_ROOT / "manifests/examples/model.yaml").read_text())
    for source in (readme, example["spec"]["source"]["huggingface"]):
        assert (source["repo"], source["file"]) == (README_REPO, README_FILE)


def test_header_of_the_readme_model_is_read_by_range_through_the_library(
    hub: HubServer, model_file: Path
) -> None:
    since = hub.mark()
    profile = ProfileCache(hub.endpoint).get(hf(), None, None)
    assert profile == read_model_profile(model_file, file_name=README_FILE)
    # One HEAD on the Hub, then ranges of the blob on the CDN: the header, not the file.
    resolves = [s for s in hub.requests("hub", since=since) if "/resolve/" in s.path]
    assert [s.method for s in resolves] == ["HEAD"]
    reads = hub.requests("cdn", since=since)
    assert reads and all(s.method == "GET" and s.range for s in reads)
    ends = [int(re.fullmatch(r"bytes=\d+-(\d+)", s.range or "")[1]) for s in reads]  # type: ignore[index]
    assert max(ends) < model_file.stat().st_size // 4


def test_a_revision_may_be_the_commit_and_the_token_stays_on_the_hub(
    hub: HubServer, model_file: Path
) -> None:
    since = hub.mark()
    source = hf(GATED_REPO, revision=hub.repos[GATED_REPO].commit)
    profile = ProfileCache(hub.endpoint).get(source, None, GRANTED_TOKEN)
    assert profile.file_bytes == read_model_profile(model_file).file_bytes
    resolves = [s for s in hub.requests("hub", since=since) if "/resolve/" in s.path]
    assert resolves and {s.token for s in resolves} == {GRANTED_TOKEN}
    assert {s.token for s in hub.requests("cdn", since=since)} == {None}
    assert source_url(source, hub.endpoint).startswith(f"{hub.endpoint}/{GATED_REPO}/resolve/")


@pytest.mark.parametrize(
    ("source", "token", "reason", "says"),
    [
        (hf(GATED_REPO), None, "SourceForbidden", ["token missing", GATED_REPO]),
        (hf(GATED_REPO), "hf_unknown", "SourceForbidden", ["token refused", "401"]),
        (hf(GATED_REPO), NOT_GRANTED_TOKEN, "SourceForbidden", ["token refused", "not granted"]),
        (hf("nobody/nothing"), None, "SourceNotFound", ["nobody/nothing", README_FILE, "main"]),
        (hf(file="absent.gguf"), None, "SourceNotFound", [README_REPO, "absent.gguf", "main"]),
        (hf(revision="v9"), None, "SourceNotFound", [README_REPO, README_FILE, "revision v9"]),
    ],
    ids=["gated-no-token", "token-invalid", "token-not-granted", "no-repo", "no-file", "no-rev"],
)
def test_hub_failures_become_one_line_reasons(
    hub: HubServer, source: ModelSource, token: str | None, reason: str, says: list[str]
) -> None:
    with pytest.raises(SourceError) as err:
        ProfileCache(hub.endpoint).get(source, None, token)
    assert err.value.reason == reason
    message = str(err.value)
    assert "\n" not in message and all(part in message for part in says), message


def test_no_hub_at_the_endpoint_is_unreachable() -> None:
    with pytest.raises(SourceError) as err:
        ProfileCache("http://127.0.0.1:9").get(hf(), None, None)
    assert err.value.reason == "SourceUnreachable" and "\n" not in str(err.value)


def test_a_file_that_is_not_a_model_is_invalid(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    repos = {"org/junk": HubRepo({"junk.gguf": junk})}
    with serve_hub(repos) as hub, pytest.raises(SourceError) as err:
        ProfileCache(hub.endpoint).get(hf("org/junk", "junk.gguf"), None, None)
    assert err.value.reason == "SourceInvalid"


# -- downloads -------------------------------------------------------------------------


@pytest.fixture
def blob_hub(tmp_path: Path) -> Iterator[tuple[HubServer, bytes]]:
    # Larger than the library's 10 MiB download chunk, so a cut leaves whole chunks.
    data = os.urandom(24 * 1024 * 1024 + 17)
    path = tmp_path / "srv" / "m.gguf"
    path.parent.mkdir()
    path.write_bytes(data)
    with serve_hub({"org/m": HubRepo({"m.gguf": path}, commit=COMMIT)}) as hub:
        yield hub, data


def _request(hub: HubServer, dest: Path, **kw: Any) -> FetchRequest:
    endpoint = hub.endpoint
    return FetchRequest(dest=dest, hf_repo="org/m", hf_file="m.gguf", hf_endpoint=endpoint, **kw)


def test_a_download_cut_half_way_resumes_where_it_stopped(
    blob_hub: tuple[HubServer, bytes], tmp_path: Path
) -> None:
    hub, data = blob_hub
    dest = tmp_path / "cache" / "m.gguf"
    cut = len(data) // 2
    hub.cut_next_download(cut)
    digest = hashlib.sha256(data).hexdigest()
    assert fetch_model(_request(hub, dest, sha256=digest)) == dest
    assert dest.read_bytes() == data
    gets = hub.requests("cdn", "GET")
    assert [g.range is None for g in gets] == [True, False]
    resumed_at = int((gets[1].range or "").removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= cut
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.gguf", "m.gguf.sha256.json"]


def test_a_part_of_another_version_of_the_file_is_not_resumed(
    blob_hub: tuple[HubServer, bytes], tmp_path: Path
) -> None:
    hub, data = blob_hub
    dest = tmp_path / "cache" / "m.gguf"
    dest.parent.mkdir()
    dest.with_name("m.gguf.part").write_bytes(b"x" * 1000)
    dest.with_name("m.gguf.part.json").write_text('{"etag": "' + "f" * 64 + '"}')
    fetch_model(_request(hub, dest))
    assert dest.read_bytes() == data
    assert [g.range for g in hub.requests("cdn", "GET")] == [None]


def test_a_wrong_sha256_is_refused_and_nothing_looks_complete(
    blob_hub: tuple[HubServer, bytes], tmp_path: Path
) -> None:
    hub, _ = blob_hub
    dest = tmp_path / "cache" / "m.gguf"
    with pytest.raises(FetchError, match=r"sha256 mismatch for m\.gguf"):
        fetch_model(_request(hub, dest, sha256="0" * 64))
    assert list(dest.parent.iterdir()) == []


def test_without_a_sha256_the_hubs_is_checked(
    blob_hub: tuple[HubServer, bytes], tmp_path: Path
) -> None:
    hub, data = blob_hub
    # The Hub keeps announcing the file's sha256 while serving other bytes.
    served = next(iter(hub.repos["org/m"].files.values()))
    served.write_bytes(bytes(len(data)))
    dest = tmp_path / "cache" / "m.gguf"
    with pytest.raises(FetchError, match=f"want {hashlib.sha256(data).hexdigest()}"):
        fetch_model(_request(hub, dest))
    assert list(dest.parent.iterdir()) == []


def test_a_download_error_names_the_file_and_leaves_nothing(
    blob_hub: tuple[HubServer, bytes], tmp_path: Path
) -> None:
    hub, _ = blob_hub
    dest = tmp_path / "cache" / "m.gguf"
    with pytest.raises(FetchError) as err:
        fetch_model(_request(hub, dest, revision="v2"))
    assert "revision v2 not found" in str(err.value) and "org/m" in str(err.value)
    assert not dest.exists() and not dest.with_name("m.gguf.part").exists()
