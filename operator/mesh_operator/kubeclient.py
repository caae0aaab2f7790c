"""Building a Kubernetes API client: the one way every mesh process does it.

The operator's handlers, the gateway, the node agent and the CLI all call
`api_client`. The configuration is resolved in this order, the first that is
present wins:

1. the kubeconfig path the caller passes (a `--kubeconfig` flag);
2. `$KUBECONFIG` (one path or several joined by the path separator, merged);
3. the pod's service account, when `KUBERNETES_SERVICE_HOST` is set;
4. `~/.kube/config`.

Every call builds its own `Configuration` and `ApiClient`; the client library's
process-wide default configuration is never touched, so two clients in one
process (two clusters, a test and the code it tests) do not interfere. A source
that is present but unusable (a missing file, bad YAML, no token in the pod) is
an error, not a reason to try the next one.

Imports only the `kubernetes` package and the standard library: the node agent
imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, Configuration

IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
HOME_KUBECONFIG = Path("~/.kube/config")


class KubeconfigError(RuntimeError):
    """No usable cluster configuration; the message is one line naming what is missing."""


class _TimedApiClient(ApiClient):
    """An ApiClient whose requests that set no timeout get `default_timeout` seconds."""

    def __init__(self, configuration: Configuration, default_timeout: float) -> None:
        super().__init__(configuration)
        self.default_timeout = default_timeout

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.default_timeout
        return super().call_api(*args, **kwargs)


def api_client(
    kubeconfig: Path | str | None = None,
    *,
    timeout: float | None = None,
    retries: int | None = None,
    user_agent: str | None = None,
) -> ApiClient:
    """A new API client, configured from the first source present (see the module).

    `timeout` (seconds) applies to every request that sets no `_request_timeout`
    of its own; `retries` caps urllib3's retries under each request (0: none, for
    a caller that retries with its own backoff); `user_agent` names the caller in
    the API server's audit log. Raises `KubeconfigError`.
    """
    configuration = Configuration()
    _load(configuration, kubeconfig)
    if retries is not None:
        configuration.retries = retries
    api = ApiClient(configuration) if timeout is None else _TimedApiClient(configuration, timeout)
    if user_agent:
        api.user_agent = user_agent
    return api


def _load(configuration: Configuration, kubeconfig: Path | str | None) -> None:
    """Fill `configuration` from the first source present, or raise KubeconfigError."""
    if kubeconfig is not None and str(kubeconfig):
        path = Path(kubeconfig).expanduser()
        if not path.is_file():
            raise KubeconfigError(f"kubeconfig {path} does not exist or is not a file")
        _load_file(configuration, str(path), str(path))
        return
    env = os.environ.get("KUBECONFIG", "")
    if env:
        paths = [p for p in env.split(os.pathsep) if p]
        if not any(Path(p).expanduser().is_file() for p in paths):
            raise KubeconfigError(f"$KUBECONFIG names no existing file ({env})")
        _load_file(configuration, env, f"$KUBECONFIG ({env})")
        return
    if os.environ.get(IN_CLUSTER_ENV):
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except Exception as exc:  # the loader raises ConfigException and OSError alike
            raise KubeconfigError(f"in-cluster service account: {_one_line(exc)}") from None
        return
    home = HOME_KUBECONFIG.expanduser()
    if not home.is_file():
        raise KubeconfigError(
            f"no kubeconfig given, $KUBECONFIG unset, not in a pod (${IN_CLUSTER_ENV} unset) "
            f"and {home} does not exist"
        )
    _load_file(configuration, str(home), str(home))


def _load_file(configuration: Configuration, config_file: str, where: str) -> None:
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=config_file, client_configuration=configuration
        )
    except Exception as exc:
        # Beyond ConfigException the loader lets through whatever its YAML parser
        # and auth plugins raise; each is a kubeconfig that cannot be used.
        raise KubeconfigError(f"kubeconfig {where}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def unreachable_reason(exc: BaseException) -> str:
    """Why a request reached no API server, on one line.

    urllib3 wraps the socket's error several times (MaxRetryError, then
    NewConnectionError); the innermost `reason` is the one that says why.
    """
    reason = exc
    while isinstance(getattr(reason, "reason", None), BaseException):
        reason = reason.reason  # type: ignore[attr-defined]
    return _one_line(reason)


def follow_kubeconfig_env() -> None:
    """Point the client library's default kubeconfig path at $KUBECONFIG as it is now.

    For code that loads the library's process-wide configuration itself (kopf's
    login): the library reads $KUBECONFIG once, at import, and would miss a value
    set later (a test harness, a CLI flag).
    """
    path = os.environ.get("KUBECONFIG")
    if path:
        kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path
