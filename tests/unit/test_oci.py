"""Model images: references, the plain-HTTP rule, the layer `mesh push-model`
streams, and what a MeshModel with `source.oci` becomes (pure parts)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from mesh_operator.api.imageref import Reference, parse_reference
from mesh_operator.api.meshmodel import MeshModelSpec, ModelSource
from mesh_operator.manifests.workloads import build_host_deployment
from mesh_operator.oci import (
    _extension_name,
    _layer_stream,
    _TarStream,
    insecure_registries,
    uses_plain_http,
)
from mesh_operator.source import container_model_path, model_file_name
from tests.unit.test_manifests import pod_security_level, workload

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "ab" * 32


class TestReferences:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("ghcr.io/org/models/gemma:q4", Reference("ghcr.io", "org/models/gemma", "q4")),
            ("localhost:5000/gemma", Reference("localhost:5000", "gemma")),
            ("localhost/gemma:1", Reference("localhost", "gemma", "1")),
            ("172.30.0.1:5000/m/g:v1.0", Reference("172.30.0.1:5000", "m/g", "v1.0")),
            (f"r.example/m@{DIGEST}", Reference("r.example", "m", None, DIGEST)),
            (f"r.example/m:t@{DIGEST}", Reference("r.example", "m", "t", DIGEST)),
            ("gemma", Reference("docker.io", "library/gemma")),
            ("org/gemma:2", Reference("docker.io", "org/gemma", "2")),
        ],
    )
    def test_parsed_and_normalized_as_runtimes_do(self, text: str, expected: Reference) -> None:
        assert parse_reference(text) == expected

    def test_version_is_the_digest_when_there_is_one(self) -> None:
        assert parse_reference(f"r.example/m:t@{DIGEST}").version == DIGEST
        assert parse_reference("r.example/m").version == "latest"
        assert parse_reference("gemma").api_host == "registry-1.docker.io"

    @pytest.mark.parametrize(
        ("text", "says"),
        [
            ("r.example/Models/g:1", "not an image reference"),
            ("Org/gemma", "must be lowercase"),
            ("r.example/m@sha256:abc", "not an image reference"),
            ("r.example/m:-tag", "not an image reference"),
            ("r.example/m:t a", "not an image reference"),
            ("", "not an image reference"),
            ("r.example/" + "m" * 600, "longer than 512"),
        ],
    )
    def test_bad_references_are_one_line_naming_the_problem(self, text: str, says: str) -> None:
        with pytest.raises(ValueError, match=says) as caught:
            parse_reference(text)
        assert "\n" not in str(caught.value)

    @pytest.mark.parametrize(
        ("registry", "insecure", "plain"),
        [
            ("localhost:5000", "", True),
            ("127.0.0.1:5000", "", True),
            ("[::1]:5000", "", True),
            ("172.30.0.1:5000", "", False),
            ("172.30.0.1:5000", "172.30.0.1:5000", True),
            ("172.30.0.1:5000", " other:1 , 172.30.0.1 ", True),
            ("ghcr.io", "172.30.0.1:5000", False),
        ],
    )
    def test_plain_http_only_for_loopback_and_the_named_registries(
        self, registry: str, insecure: str, plain: bool
    ) -> None:
        assert uses_plain_http(registry, insecure_registries(insecure)) is plain


class TestSpec:
    def test_oci_source_defaults_to_model_gguf(self) -> None:
        source = ModelSource.model_validate({"oci": {"reference": "ghcr.io/o/m:1"}})
        assert source.oci is not None
        assert source.oci.file == "model.gguf"
        assert container_model_path(source) == "/models/model.gguf"
        nested = ModelSource.model_validate(
            {"oci": {"reference": "ghcr.io/o/m:1", "file": "gguf/m-q4.gguf"}}
        )
        assert container_model_path(nested) == "/models/gguf/m-q4.gguf"
        assert model_file_name(nested) == "m-q4.gguf"

    @pytest.mark.parametrize(
        ("spec", "says"),
        [
            ({"source": {"oci": {"reference": "ghcr.io/o/m:1", "file": "m.bin"}}}, "file"),
            ({"source": {"oci": {"reference": "Org/m"}}}, "must be lowercase"),
            (
                {"source": {"oci": {"reference": "r.example/m"}, "url": "http://m/a.gguf"}},
                "exactly one of huggingface, url, pvc, oci",
            ),
            (
                {"source": {"oci": {"reference": "r.example/m"}}, "sha256": "ab" * 32},
                "checked by its digest",
            ),
            (
                {
                    "source": {"oci": {"reference": "r.example/m"}},
                    "draft": {"source": {"url": "http://m/d.gguf"}},
                },
                "cannot have a draft model",
            ),
            (
                {
                    "source": {"url": "http://m/a.gguf"},
                    "draft": {"source": {"oci": {"reference": "r.example/d"}}},
                },
                "draft model cannot come from an OCI image",
            ),
        ],
    )
    def test_refused(self, spec: dict[str, object], says: str) -> None:
        with pytest.raises(ValidationError, match=says):
            MeshModelSpec.model_validate({"poolRef": "p", **spec})


class TestHostPod:
    def test_the_image_is_the_model_volume_and_nothing_is_fetched(self) -> None:
        spec = {"source": {"oci": {"reference": f"ghcr.io/o/gemma@{DIGEST}"}}}
        deployment = build_host_deployment(workload(spec=spec))
        pod = deployment["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        assert pod["volumes"][0] == {
            "name": "models",
            "image": {"reference": f"ghcr.io/o/gemma@{DIGEST}"},
        }
        (server,) = pod["containers"]
        mount = next(m for m in server["volumeMounts"] if m["name"] == "models")
        assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}

    @pytest.mark.parametrize("cache", ["hostPath", "emptyDir"])
    def test_runs_at_restricted_whatever_the_model_cache(self, cache: str) -> None:
        spec = {"source": {"oci": {"reference": "ghcr.io/o/gemma:1"}}}
        pool = {"modelCache": {"volume": cache}}
        pod = build_host_deployment(workload(spec=spec, pool=pool))["spec"]["template"]["spec"]
        assert pod_security_level(pod) == "restricted"


class TestLayer:
    def test_the_streamed_layer_is_a_tar_of_the_file_with_its_digest(self, tmp_path: Path) -> None:
        model = tmp_path / "m.gguf"
        model.write_bytes(b"GGUF" + bytes(range(256)) * 41)
        header, size = _layer_stream(model, "dir/model.gguf")
        with _TarStream(header, model, model.stat().st_size) as stream:
            layer = stream.read()
        assert len(layer) == size
        assert len(layer) % 512 == 0
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            (member,) = tar.getmembers()
            assert member.name == "dir/model.gguf"
            assert member.mode == 0o444
            assert member.mtime == 0
            extracted = tar.extractfile(member)
            assert extracted is not None
            assert extracted.read() == model.read_bytes()
        # Reproducible: the same file gives the same bytes, so the same digest.
        with _TarStream(header, model, model.stat().st_size) as again:
            assert hashlib.sha256(again.read()).digest() == hashlib.sha256(layer).digest()

    def test_pax_and_gnu_long_names(self) -> None:
        name = "a/" + "n" * 150 + ".gguf"
        pax = tarfile.TarInfo(name).tobuf(format=tarfile.PAX_FORMAT)
        gnu = tarfile.TarInfo(name).tobuf(format=tarfile.GNU_FORMAT)
        for kind, blocks in ((tarfile.XHDTYPE, pax), (tarfile.GNUTYPE_LONGNAME, gnu)):
            extension = tarfile.TarInfo.frombuf(blocks[:512], "utf-8", "surrogateescape")
            assert extension.type == kind
            assert _extension_name(kind, blocks[512 : 512 + extension.size]) == name
        assert _extension_name(tarfile.XHDTYPE, b"11 mtime=0\n") is None
