"""Reaching the cluster from a CLI command: one client, and what each failure exits with.

Exit status 2 when the cluster cannot be reached (no usable kubeconfig, no answer,
credentials refused); 1 when the API server answered with another error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import urllib3
from kubernetes.client import ApiClient, ApiException

from mesh_operator.kubeclient import KubeconfigError, api_client, unreachable_reason

T = TypeVar("T")

EXIT_UNREACHABLE = 2
EXIT_API_ERROR = 1
# Seconds for each API request: an API server that does not answer is unreachable.
API_TIMEOUT = 30.0

KUBECONFIG_HELP = (
    "kubeconfig file (default: $KUBECONFIG, in a pod its service account, ~/.kube/config)"
)


@dataclass(frozen=True)
class Read(Generic[T]):
    """What was read, or the exit status and why not."""

    value: T | None = None
    exit_code: int = 0


def read_cluster(
    prog: str,
    kubeconfig: str | None,
    read: Callable[[ApiClient], T],
    not_found: str | None = None,
) -> Read[T]:
    """Call `read` with a client; on failure print one line to stderr naming why
    (`not_found`: what a 404 means to the caller)."""
    try:
        return Read(read(api_client(kubeconfig, timeout=API_TIMEOUT)))
    except KubeconfigError as exc:
        message, code = f"cannot reach the cluster: {exc}", EXIT_UNREACHABLE
    except ApiException as exc:
        if exc.status == 404 and not_found:
            message, code = not_found, EXIT_API_ERROR
        elif exc.status == 401:
            message = "cannot reach the cluster: the API server refused the credentials (401)"
            code = EXIT_UNREACHABLE
        else:
            message, code = f"the API server answered {exc.status} {exc.reason}", EXIT_API_ERROR
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        message = f"cannot reach the API server: {unreachable_reason(exc)}"
        code = EXIT_UNREACHABLE
    print(f"{prog}: error: {message}", file=sys.stderr)
    return Read(None, code)
