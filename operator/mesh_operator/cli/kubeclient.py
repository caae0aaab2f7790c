"""The API client of CLI commands: kubeconfig from the flag, $KUBECONFIG or in-cluster."""

from __future__ import annotations

import os

import kubernetes
from kubernetes.client import ApiClient


class KubeconfigError(RuntimeError):
    """No usable cluster configuration."""


def api_client(kubeconfig: str | None) -> ApiClient:
    path = kubeconfig or os.environ.get("KUBECONFIG")
    try:
        if path:
            return kubernetes.config.new_client_from_config(config_file=path)  # type: ignore[no-any-return,no-untyped-call]
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return ApiClient(configuration)
    except (kubernetes.config.ConfigException, OSError) as exc:
        where = path or "in-cluster service account"
        raise KubeconfigError(f"no usable cluster configuration ({where}): {exc}") from None
