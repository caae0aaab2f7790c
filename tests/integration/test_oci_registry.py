"""Model images in a real registry (the CNCF distribution registry the real nodes
use as their mirror, here on loopback): `mesh push-model` pushes gemma-3-270m,
and the operator's profile cache reads its GGUF header through the registry API
without pulling the image; a gzip layer made by Python's own tarfile, with other
entries before the model, is read the same way; each failure is the condition
reason a MeshModel would show."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import parts
from e2e.nodes import configs
from e2e.procs import ProcessTable
from e2e.waiting import free_port, wait_for
from mesh_operator.api.imageref import parse_reference
from mesh_operator.api.meshmodel import ModelSource
from mesh_operator.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, RegistryClient
from mesh_operator.planner import read_model_profile
from mesh_operator.source import ProfileCache, SourceError
from tests.conftest import require_part

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a registry started for this module, stopped by pid."""
    program = require_part(lambda: parts.binary("registry"))
    state = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    conf = state / "registry.yaml"
    conf.write_text(configs.registry_config(state / "storage", address))
    procs = ProcessTable(state)
    procs.start(
        "registry", [str(program), "serve", str(conf)], env={"OTEL_TRACES_EXPORTER": "none"}
    )
    try:
        wait_for("the registry", lambda: _answers(address), timeout=30)
        yield address
    finally:
        procs.stop_all()


def _answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _push(model: Path, reference: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(parts.mesh_cli()), "push-model", str(model), reference, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def pushed(registry: str, model_file: Path) -> str:
    """gemma-3-270m pushed by `mesh push-model`; its reference by digest."""
    result = _push(model_file, f"{registry}/models/gemma:q4_k_m")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _source(reference: str, file: str = "model.gguf") -> ModelSource:
    return ModelSource.model_validate({"oci": {"reference": reference, "file": file}})


def test_push_prints_the_digest_the_registry_serves_the_tag_by(registry: str, pushed: str) -> None:
    client = RegistryClient(registry)
    _, body, digest = client.manifest("models/gemma", "q4_k_m")
    assert pushed == f"{registry}/models/gemma@{digest}"
    manifest = json.loads(body)
    assert manifest["mediaType"] == OCI_MANIFEST
    (layer,) = manifest["layers"]
    config = json.loads(client.read_blob("models/gemma", manifest["config"]["digest"], 0, 4096))
    # The runtime unpacks an uncompressed layer: its diff ID is its digest.
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")


def test_the_layer_holds_the_model_file_byte_for_byte(
    registry: str, pushed: str, model_file: Path
) -> None:
    manifest = RegistryClient(registry).image_manifest(parse_reference(pushed))
    (layer,) = manifest["layers"]
    with urllib.request.urlopen(
        f"http://{registry}/v2/models/gemma/blobs/{layer['digest']}", timeout=60
    ) as resp:
        blob = resp.read()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
    assert len(blob) == layer["size"]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert tar.getnames() == ["model.gguf"]
        data = tar.extractfile("model.gguf")
        assert data is not None
        digest = hashlib.sha256(data.read()).hexdigest()
    assert digest == Path(f"{model_file.resolve()}.sha256").read_text().strip()


def test_a_second_push_gives_the_same_digest(registry: str, pushed: str, model_file: Path) -> None:
    again = _push(model_file, f"{registry}/models/gemma:again")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().split("@")[1] == pushed.split("@")[1]


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_the_header_is_read_through_the_registry(
    registry: str, pushed: str, model_file: Path, by: str
) -> None:
    reference = f"{registry}/models/gemma:q4_k_m" if by == "tag" else pushed
    profile = ProfileCache().get(_source(reference), None, None)
    assert profile == read_model_profile(model_file, file_name="model.gguf")


def _push_gzip_image(registry: str, repository: str, model_file: Path) -> None:
    """An image as other tools make them: a gzip layer whose tar (Python's tarfile,
    PAX format) has a folder, a file with a long name and a big file before the
    model, which is the start of gemma (enough for its header)."""
    header_bytes = model_file.read_bytes()[: 16 * 1024 * 1024]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("weights")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in (
            ("weights/" + "long-" * 40 + "notes.txt", b"not the model\n"),
            ("weights/padding.bin", bytes(3 * 1024 * 1024 + 7)),
            ("./weights/gemma.gguf", header_bytes),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), compresslevel=1)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()],
            },
        }
    ).encode()
    client = RegistryClient(registry)
    blobs = {}
    for blob in (layer, config):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        client.upload_blob(repository, digest, len(blob), io.BytesIO(blob))
        blobs[blob] = {"digest": digest, "size": len(blob)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **blobs[config]},
        "layers": [{"mediaType": OCI_LAYER_GZIP, **blobs[layer]}],
    }
    client.put_manifest(repository, "gz", OCI_MANIFEST, json.dumps(manifest).encode())


def test_a_gzip_layer_is_read_from_its_start(registry: str, model_file: Path) -> None:
    _push_gzip_image(registry, "models/gemma-gz", model_file)
    source = _source(f"{registry}/models/gemma-gz:gz", "weights/gemma.gguf")
    profile = ProfileCache().get(source, None, None)
    assert profile == read_model_profile(model_file, file_name="gemma.gguf")


@pytest.mark.parametrize(
    ("reference", "file", "reason", "says"),
    [
        ("models/absent:1", "model.gguf", "SourceNotFound", "404"),
        ("models/gemma:no-such-tag", "model.gguf", "SourceNotFound", "404"),
        ("models/gemma:q4_k_m", "other.gguf", "SourceNotFound", "no file other.gguf"),
        ("models/gemma-gz:gz", "weights/notes.gguf", "SourceNotFound", "no file"),
    ],
)
def test_failures_are_model_conditions(
    registry: str, pushed: str, reference: str, file: str, reason: str, says: str
) -> None:
    with pytest.raises(SourceError) as caught:
        ProfileCache().get(_source(f"{registry}/{reference}", file), None, None)
    assert caught.value.reason == reason
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_file_that_is_not_gguf_is_source_invalid(registry: str, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 100)
    result = _push(text, f"{registry}/models/notes:1", "--file", "notes.gguf")
    assert result.returncode == 0, result.stderr
    with pytest.raises(SourceError) as caught:
        ProfileCache().get(_source(f"{registry}/models/notes:1", "notes.gguf"), None, None)
    assert caught.value.reason == "SourceInvalid"
    assert "not a GGUF model" in str(caught.value)


def test_no_registry_there_is_unreachable() -> None:
    with pytest.raises(SourceError) as caught:
        ProfileCache().get(_source(f"127.0.0.1:{free_port()}/models/gemma:1"), None, None)
    assert caught.value.reason == "SourceUnreachable"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["{model}", "{registry}/Models/x:1"], "not an image reference"),
        (["{model}", "{registry}/models/x@sha256:" + "a" * 64], "push to a tag"),
        (["{missing}", "{registry}/models/x:1"], "no such file"),
        (["{model}", "{registry}/models/x:1", "--file", "x.bin"], "ends in .gguf"),
    ],
)
def test_push_refuses_bad_input_in_one_line(
    registry: str, model_file: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    values = {"model": model_file, "registry": registry, "missing": tmp_path / "none.gguf"}
    argv = [a.format(**values) for a in args]
    result = subprocess.run(
        [str(parts.mesh_cli()), "push-model", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
