"""`mesh fetch` as the host pod's init container runs it, a process fetching the
README's model from Hugging Face (the stand-in Hub, `HF_ENDPOINT`): killed half-way
and resumed by the next run, a wrong sha256 refused, failures in one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from e2e.hubserver import GATED_REPO, GRANTED_TOKEN, README_FILE, README_REPO, HubServer
from e2e.waiting import wait_for

pytestmark = pytest.mark.integration


def _argv(dest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mesh_operator.cli.main", "fetch", "--dest", str(dest), *extra]


def _env(hub: HubServer, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env["HF_ENDPOINT"] = hub.endpoint
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _fetch(
    hub: HubServer, dest: Path, *extra: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv = _argv(dest, *extra)
    env = _env(hub, token)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)


def _error_line(output: str) -> str:
    errors = [ln for ln in output.splitlines() if ln.startswith("mesh fetch: error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def test_a_fetch_killed_half_way_is_resumed_by_the_next_run(
    hub: HubServer, model_file: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "cache" / "abc" / README_FILE
    part = dest.with_name(dest.name + ".part")
    size = model_file.stat().st_size
    released = hub.stall_next_download(size // 2)
    hf_args = ["--hf-repo", README_REPO, "--hf-file", README_FILE]
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _argv(dest, *hf_args), env=_env(hub), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        # The library writes whole chunks: the part stops at the last one before the stall.
        chunk = constants.DOWNLOAD_CHUNK_SIZE
        stalled_at = (size // 2) // chunk * chunk
        wait_for(
            "half the model in the .part file",
            lambda: part.exists() and part.stat().st_size >= stalled_at,
            timeout=300,
        )
    finally:
        proc.kill()  # as a node losing the pod: no cleanup
        proc.wait(30)
        released.set()
        hub.clear_fault()
    kept = part.stat().st_size
    assert not dest.exists() and 0 < kept < size, log.read_text()[-2000:]

    since = hub.mark()
    done = _fetch(hub, dest, *hf_args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(dest)
    gets = hub.requests("cdn", "GET", since=since)
    assert [g.range for g in gets] == [f"bytes={kept}-"]
    assert _sha256(dest) == hub.sha256(model_file)
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        README_FILE,
        f"{README_FILE}.sha256.json",
    ]


def test_a_wrong_sha256_is_refused_and_nothing_looks_complete(
    hub: HubServer, tmp_path: Path
) -> None:
    dest = tmp_path / "cache" / README_FILE
    since = hub.mark()
    done = _fetch(
        hub, dest, "--hf-repo", GATED_REPO, "--hf-file", README_FILE, "--sha256", "0" * 64,
        token=GRANTED_TOKEN,
    )  # fmt: skip
    assert done.returncode == 1
    assert "sha256 mismatch" in _error_line(done.stderr)
    # The whole file came, with the token (from $HF_TOKEN) on the Hub only, and went.
    resolves = [s for s in hub.requests("hub", since=since) if "/resolve/" in s.path]
    assert {s.token for s in resolves} == {GRANTED_TOKEN}
    assert [s.range for s in hub.requests("cdn", "GET", since=since)] == [None]
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "token", "says"),
    [
        (["--hf-repo", GATED_REPO, "--hf-file", README_FILE], None, ["token missing", GATED_REPO]),
        (
            ["--hf-repo", GATED_REPO, "--hf-file", README_FILE],
            "hf_unknown",
            ["token refused", GATED_REPO],
        ),
        (
            ["--hf-repo", README_REPO, "--hf-file", "absent.gguf"],
            None,
            ["file not found", "absent.gguf", README_REPO, "revision main"],
        ),
        (
            ["--hf-repo", README_REPO, "--hf-file", README_FILE, "--revision", "v9"],
            None,
            ["revision v9 not found", README_FILE, README_REPO],
        ),
    ],
    ids=["gated-no-token", "token-refused", "no-file", "no-revision"],
)
def test_hub_failures_exit_1_with_one_line(
    hub: HubServer, tmp_path: Path, args: list[str], token: str | None, says: list[str]
) -> None:
    dest = tmp_path / "cache" / README_FILE
    done = _fetch(hub, dest, *args, token=token)
    assert done.returncode == 1
    line = _error_line(done.stderr)
    assert all(part in line for part in says), line
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
