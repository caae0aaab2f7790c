"""Model images in a real registry (the CNCF distribution registry the real nodes
use as their mirror, here on loopback): `mesh push-model` pushes gemma-3-270m,
and the operator's profile cache reads its GGUF header through the registry API
without pulling the image; a gzip layer made by Python's own tarfile, with other
entries before the model, is read the same way; each failure is the condition
reason a MeshModel would show.

A second registry process serves the same storage behind token authentication,
as ghcr.io and Docker Hub do for public images: it answers 401 with a Bearer
challenge and checks the signed tokens it is shown. The token service that signs
them is the one stand-in here (the hosted ones are out of reach): a small HTTP
server of this module that grants anonymous pulls of `models/*`, pushes there to
one user with a password, and nothing else, with a key the registry trusts
through a JWKS file. A third registry process on the same storage wants HTTP
Basic authentication (an htpasswd file, bcrypt by the system's libcrypt)."""

from __future__ import annotations

import base64
import ctypes
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from e2e import parts
from e2e.nodes import configs
from e2e.procs import ProcessTable
from e2e.waiting import free_port, wait_for
from mesh_operator.api.imageref import parse_reference
from mesh_operator.api.meshmodel import ModelSource
from mesh_operator.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    RegistryClient,
)
from mesh_operator.planner import read_model_profile
from mesh_operator.source import ProfileCache, SourceError
from tests.conftest import require_part

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registries' storage, shared by the open and the token-guarded one."""
    return tmp_path_factory.mktemp("registry-storage")


def _serve(state: Path, config: dict[str, object], address: str) -> ProcessTable:
    program = require_part(lambda: parts.binary("registry"))
    conf = state / "registry.yaml"
    conf.write_text(yaml.safe_dump(config))
    procs = ProcessTable(state)
    procs.start(
        "registry", [str(program), "serve", str(conf)], env={"OTEL_TRACES_EXPORTER": "none"}
    )
    try:
        wait_for("the registry", lambda: _answers(address), timeout=30)
    except BaseException:
        procs.stop_all()
        raise
    return procs


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, storage: Path) -> Iterator[str]:
    """host:port of a registry started for this module, stopped by pid."""
    state = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    procs = _serve(state, yaml.safe_load(configs.registry_config(storage, address)), address)
    try:
        yield address
    finally:
        procs.stop_all()


def _answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and asking for a token
    except OSError:
        return False


PUSHER = ("pusher", "s3cret")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    """Signs registry tokens (RS256, `kid` in the JWKS the registry trusts): pull
    of `models/*` for anyone, push there for PUSHER, nothing else. Remembers
    what it was asked."""

    key: rsa.RSAPrivateKey
    service: str = "mesh-test-registry"
    issuer: str = "mesh-test-tokens"
    kid: str = "mesh-test"
    asked: list[dict[str, list[str]]] = field(default_factory=list)

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        jwk = {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256"}
        return json.dumps({"keys": [{**jwk, "n": _b64(n), "e": _b64(e)}]})

    def token(self, query: dict[str, list[str]], authorization: str | None) -> str:
        self.asked.append(query)
        pusher = authorization == "Basic " + base64.b64encode(":".join(PUSHER).encode()).decode()
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            if kind == "repository" and name.startswith("models/"):
                granted = [a for a in actions.split(",") if a == "pull" or pusher]
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer, "sub": "", "aud": self.service, "exp": now + 300,
            "nbf": now - 10, "iat": now, "jti": _b64(now.to_bytes(8, "big")), "access": access,
        }  # fmt: skip
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signed = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signed}.{_b64(signature)}"


@pytest.fixture(scope="module")
def tokens() -> Iterator[tuple[TokenService, str]]:
    """The token service on loopback, and its URL (the registry's realm)."""
    service = TokenService(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            token = service.token(query, self.headers.get("Authorization"))
            body = json.dumps({"token": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield service, f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, storage: Path, tokens: tuple[TokenService, str]
) -> Iterator[str]:
    """host:port of a registry on the same storage that wants a signed token."""
    service, realm = tokens
    state = tmp_path_factory.mktemp("guarded")
    (state / "jwks.json").write_text(service.jwks())
    address = f"127.0.0.1:{free_port()}"
    config = yaml.safe_load(configs.registry_config(storage, address))
    config["auth"] = {
        "token": {
            "realm": realm,
            "service": service.service,
            "issuer": service.issuer,
            "jwks": str(state / "jwks.json"),
        }
    }
    procs = _serve(state, config, address)
    try:
        yield address
    finally:
        procs.stop_all()


def _push(
    model: Path, reference: str, *extra: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(parts.mesh_cli()), "push-model", str(model), reference, *extra],
        capture_output=True,
        text=True,
        input=stdin,
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


def _push_index(registry: str, tag: str, platforms: list[tuple[str, str]], manifest: str) -> None:
    """An image index on `models/gemma` whose every entry is the pushed manifest."""
    client = RegistryClient(registry)
    _, body, digest = client.manifest("models/gemma", manifest)
    entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body)}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**entry, "platform": {"os": os_, "architecture": arch}} for os_, arch in platforms
        ],
    }
    client.put_manifest("models/gemma", tag, OCI_INDEX, json.dumps(index).encode())


def test_an_index_resolves_to_its_linux_image(registry: str, pushed: str, model_file: Path) -> None:
    _push_index(registry, "multi", [("windows", "amd64"), ("linux", "arm64")], "q4_k_m")
    profile = ProfileCache().get(_source(f"{registry}/models/gemma:multi"), None, None)
    assert profile == read_model_profile(model_file, file_name="model.gguf")
    _push_index(registry, "windows-only", [("windows", "amd64")], "q4_k_m")
    with pytest.raises(SourceError) as caught:
        ProfileCache().get(_source(f"{registry}/models/gemma:windows-only"), None, None)
    assert caught.value.reason == "SourceInvalid"
    assert "no Linux image" in str(caught.value)


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


def test_a_registry_wanting_a_token_gets_one_anonymously(
    guarded: str, pushed: str, tokens: tuple[TokenService, str], model_file: Path
) -> None:
    service, _ = tokens
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{guarded}/v2/models/gemma/manifests/q4_k_m", timeout=10)
    assert refused.value.code == 401
    digest = pushed.split("@")[1]
    profile = ProfileCache().get(_source(f"{guarded}/models/gemma@{digest}"), None, None)
    assert profile == read_model_profile(model_file, file_name="model.gguf")
    assert {"scope": ["repository:models/gemma:pull"], "service": [service.service]} in (
        service.asked
    )


def test_a_token_without_the_right_is_forbidden(guarded: str, pushed: str) -> None:
    with pytest.raises(SourceError) as caught:
        ProfileCache().get(_source(f"{guarded}/private/gemma:q4_k_m"), None, None)
    assert caught.value.reason == "SourceForbidden"
    assert "401" in str(caught.value) or "token" in str(caught.value)


def test_push_to_a_registry_wanting_a_token_takes_a_user(
    guarded: str, registry: str, tmp_path: Path, model_file: Path
) -> None:
    small = tmp_path / "head.gguf"
    small.write_bytes(model_file.read_bytes()[: 8 * 1024 * 1024])
    anonymous = _push(small, f"{guarded}/models/pushed:1")
    assert anonymous.returncode == 2
    assert "answered 401" in anonymous.stderr
    assert len(anonymous.stderr.strip().splitlines()) == 1
    wrong = _push(
        small, f"{guarded}/models/pushed:1", "--username", PUSHER[0], "--password-stdin",
        stdin="not-it\n",
    )  # fmt: skip
    assert wrong.returncode == 2
    user = _push(
        small, f"{guarded}/models/pushed:1", "--username", PUSHER[0], "--password-stdin",
        stdin=PUSHER[1] + "\n",
    )  # fmt: skip
    assert user.returncode == 0, user.stderr
    # Through the open registry on the same storage: the image is there.
    profile = ProfileCache().get(_source(f"{registry}/models/pushed:1"), None, None)
    assert profile == read_model_profile(model_file, file_name="model.gguf")


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory, storage: Path) -> Iterator[str]:
    """host:port of a registry on the same storage that wants PUSHER's password."""
    libcrypt = ctypes.CDLL("libcrypt.so.1")
    libcrypt.crypt.restype = ctypes.c_char_p
    hashed = libcrypt.crypt(PUSHER[1].encode(), b"$2b$05$" + b"meshtestsaltmeshtestsa")
    state = tmp_path_factory.mktemp("basic")
    (state / "htpasswd").write_text(f"{PUSHER[0]}:{hashed.decode()}\n")
    address = f"127.0.0.1:{free_port()}"
    config = yaml.safe_load(configs.registry_config(storage, address))
    config["auth"] = {"htpasswd": {"realm": "mesh-test", "path": str(state / "htpasswd")}}
    procs = _serve(state, config, address)
    try:
        yield address
    finally:
        procs.stop_all()


def test_push_to_a_registry_wanting_a_password(
    basic: str, registry: str, tmp_path: Path, model_file: Path
) -> None:
    small = tmp_path / "head.gguf"
    small.write_bytes(model_file.read_bytes()[: 8 * 1024 * 1024])
    anonymous = _push(small, f"{basic}/models/basic:1")
    assert anonymous.returncode == 2
    assert "wants a user name and password" in anonymous.stderr
    user = _push(
        small, f"{basic}/models/basic:1", "--username", PUSHER[0], "--password-stdin",
        stdin=PUSHER[1] + "\n",
    )  # fmt: skip
    assert user.returncode == 0, user.stderr
    profile = ProfileCache().get(_source(f"{registry}/models/basic:1"), None, None)
    assert profile == read_model_profile(model_file, file_name="model.gguf")
    # The operator pulls anonymously: such a registry is forbidden to it.
    with pytest.raises(SourceError) as caught:
        ProfileCache().get(_source(f"{basic}/models/basic:1"), None, None)
    assert caught.value.reason == "SourceForbidden"


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
