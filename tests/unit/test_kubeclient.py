"""mesh_operator.kubeclient: the resolution order, one client per call, one-line errors;
and the CLI commands that read the API, when there is no cluster to read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3

from e2e.waiting import free_port
from mesh_operator import kubeclient
from mesh_operator.cli.main import main
from mesh_operator.kubeclient import KubeconfigError, api_client, unreachable_reason

pytestmark = pytest.mark.unit


def write_kubeconfig(path: Path, server: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: '{server}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
    )
    return path


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A kubeconfig for each source, a service account, and an empty environment."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "ca.crt").write_text("not checked until a request")
    incluster = kubernetes.config.incluster_config
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(account / "token"))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
    return {
        "explicit": write_kubeconfig(tmp_path / "explicit", "https://explicit:6443"),
        "env": write_kubeconfig(tmp_path / "env", "https://env:6443"),
        "home": write_kubeconfig(home / ".kube" / "config", "https://home:6443"),
        "account": account,
        "tmp": tmp_path,
    }


def in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")


def test_explicit_path_comes_first(places: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(places["env"]))
    in_a_pod(monkeypatch)
    assert api_client(places["explicit"]).configuration.host == "https://explicit:6443"
    assert api_client(str(places["explicit"])).configuration.host == "https://explicit:6443"


def test_kubeconfig_env_comes_before_the_pod(
    places: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set after the client library was imported: read at each call.
    monkeypatch.setenv("KUBECONFIG", str(places["env"]))
    in_a_pod(monkeypatch)
    assert api_client().configuration.host == "https://env:6443"


def test_kubeconfig_env_lists_several_files(
    places: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = places["tmp"] / "missing"
    monkeypatch.setenv("KUBECONFIG", f"{missing}:{places['env']}")
    assert api_client().configuration.host == "https://env:6443"


def test_the_pod_comes_before_home(places: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    in_a_pod(monkeypatch)
    api = api_client()
    assert api.configuration.host == "https://10.96.0.1:443"
    assert api.configuration.ssl_ca_cert == str(places["account"] / "ca.crt")


def test_home_comes_last(places: dict[str, Any]) -> None:
    assert api_client().configuration.host == "https://home:6443"


def test_each_call_has_its_own_client_and_the_default_is_untouched(
    places: dict[str, Any],
) -> None:
    before = kubernetes.client.Configuration.get_default_copy().host
    one = api_client(places["explicit"], retries=0, user_agent="mesh-agent")
    two = api_client(places["env"])
    assert (one.configuration.host, two.configuration.host) == (
        "https://explicit:6443",
        "https://env:6443",
    )
    assert one.configuration is not two.configuration
    assert (one.configuration.retries, two.configuration.retries) == (0, None)
    assert one.user_agent == "mesh-agent" and two.user_agent != "mesh-agent"
    assert kubernetes.client.Configuration.get_default_copy().host == before


def test_timeout_fills_requests_that_set_none(
    places: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = api_client(places["explicit"], timeout=7.5)
    seen: list[object] = []

    def request(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs.get("_request_timeout"))

    monkeypatch.setattr(api.rest_client, "request", request)
    api.call_api("GET", "https://explicit:6443/version")
    api.call_api("GET", "https://explicit:6443/version", _request_timeout=(1, 2))
    assert seen == [7.5, (1, 2)]
    untimed = api_client(places["explicit"])
    monkeypatch.setattr(untimed.rest_client, "request", request)
    untimed.call_api("GET", "https://explicit:6443/version")
    assert seen[-1] is None


@pytest.mark.parametrize(
    ("setup", "names"),
    [
        ("explicit-missing", "kubeconfig {tmp}/nowhere does not exist"),
        ("explicit-folder", "kubeconfig {tmp} does not exist or is not a file"),
        ("env-missing", "$KUBECONFIG names no existing file ({tmp}/nowhere)"),
        ("bad-yaml", "kubeconfig {tmp}/bad: "),
        ("no-context", "Expected key current-context"),
        ("pod-without-token", "in-cluster service account: "),
        ("nothing", "$KUBECONFIG unset, not in a pod ($KUBERNETES_SERVICE_HOST unset)"),
    ],
)
def test_what_is_missing_is_named_on_one_line(
    places: dict[str, Any], monkeypatch: pytest.MonkeyPatch, setup: str, names: str
) -> None:
    tmp: Path = places["tmp"]
    explicit: Path | None = None
    if setup == "explicit-missing":
        explicit = tmp / "nowhere"
    elif setup == "explicit-folder":
        explicit = tmp
    elif setup == "env-missing":
        monkeypatch.setenv("KUBECONFIG", str(tmp / "nowhere"))
    elif setup == "bad-yaml":
        explicit = tmp / "bad"
        explicit.write_text("clusters: [\n  - oops\n")
    elif setup == "no-context":
        explicit = tmp / "empty"
        explicit.write_text("apiVersion: v1\nkind: Config\n")
    elif setup == "pod-without-token":
        in_a_pod(monkeypatch)
        (places["account"] / "token").unlink()
    else:
        places["home"].unlink()
    with pytest.raises(KubeconfigError) as info:
        api_client(explicit)
    message = str(info.value)
    assert "\n" not in message
    assert names.format(tmp=tmp) in message


def test_unreachable_reason_is_the_innermost_one() -> None:
    inner = urllib3.exceptions.NewConnectionError(
        None,  # type: ignore[arg-type]
        "Failed to establish a new connection: [Errno 111] Connection refused",
    )
    outer = urllib3.exceptions.MaxRetryError(None, "/version", inner)  # type: ignore[arg-type]
    assert unreachable_reason(outer) == str(inner)
    assert unreachable_reason(OSError("two\nlines")) == "two lines"


def test_follow_kubeconfig_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kube_config = kubernetes.config.kube_config
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", "~/.kube/config")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    kubeclient.follow_kubeconfig_env()
    assert kube_config.KUBE_CONFIG_DEFAULT_LOCATION == "~/.kube/config"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    kubeclient.follow_kubeconfig_env()
    wanted = str(tmp_path / "config")
    assert wanted == kube_config.KUBE_CONFIG_DEFAULT_LOCATION


# -- the CLI commands that read the API ------------------------------------------


@pytest.mark.parametrize("command", ["status", "doctor"])
def test_cli_without_a_cluster_configuration_exits_2_with_one_line(
    places: dict[str, Any], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    absent = places["tmp"] / "absent"
    assert main([command, "--kubeconfig", str(absent)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(
        f"mesh {command}: error: cannot reach the cluster: kubeconfig {absent}"
    )


@pytest.mark.parametrize("command", ["status", "doctor"])
def test_cli_with_no_api_server_exits_2_with_one_line(
    places: dict[str, Any], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    dead = write_kubeconfig(places["tmp"] / "dead", f"https://127.0.0.1:{free_port()}")
    assert main([command, "--kubeconfig", str(dead)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"mesh {command}: error: cannot reach the API server: ")
    assert "Traceback" not in captured.err
