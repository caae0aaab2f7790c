"""`mesh gateway`: run the OpenAI-compatible gateway.

Discovery is Kubernetes (MeshModels and EndpointSlices) unless `--static` or
`--backend` give the models directly. See docs/gateway.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kubernetes import client
from pydantic import ValidationError

from mesh_operator.gateway.affinity import ROUTINGS
from mesh_operator.gateway.auth import KeyReloader, KeyRing, load_key_dir, secret_loader
from mesh_operator.gateway.discovery import DiscoverySource, StaticModel, StaticSource
from mesh_operator.gateway.kube_discovery import KubernetesSource
from mesh_operator.gateway.server import Gateway, serve
from mesh_operator.gateway.settings import GatewaySettings
from mesh_operator.gateway.tracing import configured_endpoint, setup_tracing
from mesh_operator.kubeclient import KubeconfigError, api_client

DEFAULTS = GatewaySettings()
EXIT_FAILURE = 1


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run the OpenAI-compatible gateway in front of every model",
        description="One OpenAI-compatible endpoint for every model: routes by the `model` "
        "field, holds requests while a model restarts, caps requests per host at its slots.",
    )
    listen = parser.add_argument_group("listening")
    listen.add_argument("--host", default=DEFAULTS.host, help="address to bind (%(default)s)")
    listen.add_argument("--port", type=int, default=DEFAULTS.port, help="port (%(default)s)")

    found = parser.add_argument_group(
        "discovery", "Kubernetes by default; --static/--backend replace it"
    )
    found.add_argument(
        "--static",
        type=Path,
        metavar="FILE",
        help="YAML/JSON file listing models and their host URLs (re-read when it changes)",
    )
    found.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME=URL[,URL...]",
        help="a model and its llama-server URL(s); repeatable",
    )
    found.add_argument(
        "--slots", type=int, default=1, help="slots per host for --backend models (%(default)s)"
    )
    found.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, in a pod its service account, ~/.kube/config)",
    )
    found.add_argument("--namespace", help="watch only this namespace (default: all)")
    found.add_argument(
        "--resync", type=float, default=300.0, help="seconds between relists (%(default)s)"
    )

    admit = parser.add_argument_group("admission")
    admit.add_argument(
        "--hold-timeout",
        type=float,
        default=DEFAULTS.hold_timeout,
        help="seconds a request may wait for its model (%(default)s)",
    )
    admit.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULTS.max_queue,
        help="waiting requests per model (%(default)s)",
    )
    admit.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULTS.max_attempts,
        help="sends of a request whose host broke before answering (%(default)s)",
    )
    admit.add_argument(
        "--retry-after",
        type=int,
        default=DEFAULTS.retry_after,
        help="Retry-After seconds on 503 (%(default)s)",
    )
    admit.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULTS.max_body_bytes,
        help="largest request body (%(default)s)",
    )
    admit.add_argument(
        "--routing",
        choices=ROUTINGS,
        default=DEFAULTS.routing,
        help="which host of a model takes a request: the one its prompt's prefix hashes to "
        "while it has a free slot, else the least busy (prefix); always the least busy "
        "(least-busy); in turn (round-robin) (default: %(default)s)",
    )
    admit.add_argument(
        "--prefix-chars",
        type=int,
        default=DEFAULTS.prefix_chars,
        help="characters at the start of a prompt that make its routing key (%(default)s)",
    )
    admit.add_argument("--connect-timeout", type=float, default=DEFAULTS.connect_timeout)
    admit.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULTS.read_timeout,
        help="longest silence from a host (%(default)s s)",
    )

    auth = parser.add_argument_group("authentication (off unless a key source is given)")
    auth.add_argument(
        "--api-keys-dir",
        type=Path,
        metavar="DIR",
        help="a Secret mounted as files: one file per key, named after the key",
    )
    auth.add_argument(
        "--api-keys-secret", metavar="NAME", help="read keys from this Secret through the API"
    )
    auth.add_argument(
        "--api-keys-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of --api-keys-secret (default: $POD_NAMESPACE or default)",
    )

    obs = parser.add_argument_group("observability and shutdown")
    obs.add_argument(
        "--otlp-endpoint",
        help="OTLP/HTTP endpoint for traces (default: $OTEL_EXPORTER_OTLP_ENDPOINT; none: off)",
    )
    obs.add_argument("--access-log", action="store_true", help="log one line per request")
    obs.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    obs.add_argument(
        "--shutdown-delay",
        type=float,
        default=DEFAULTS.shutdown_delay,
        help="seconds to keep serving after SIGTERM (%(default)s)",
    )
    obs.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULTS.drain_timeout,
        help="seconds in-flight requests get to finish on shutdown (%(default)s)",
    )


def parse_backend(text: str, slots: int) -> StaticModel:
    """A `NAME=URL[,URL...]` flag value as a static model."""
    name, sep, urls = text.partition("=")
    if not sep or not name or not urls:
        raise ValueError(f"--backend wants NAME=URL[,URL...], got {text!r}")
    return StaticModel(name=name, slots=slots, backends=[u for u in urls.split(",") if u])


def _settings(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        host=args.host,
        port=args.port,
        hold_timeout=args.hold_timeout,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_attempts=args.max_attempts,
        retry_after=args.retry_after,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        shutdown_delay=args.shutdown_delay,
        drain_timeout=args.drain_timeout,
        access_log=args.access_log,
        routing=args.routing,
        prefix_chars=args.prefix_chars,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        flag_models = [parse_backend(text, args.slots) for text in args.backend]
    except (ValueError, ValidationError) as exc:
        print(f"mesh gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.api_keys_dir and args.api_keys_secret:
        print("mesh gateway: give --api-keys-dir or --api-keys-secret, not both", file=sys.stderr)
        return EXIT_FAILURE

    api: client.ApiClient | None = None
    source: DiscoverySource
    needs_api = not (args.static or flag_models) or bool(args.api_keys_secret)
    if needs_api:
        try:
            api = api_client(args.kubeconfig)
        except KubeconfigError as exc:
            print(f"mesh gateway: no usable cluster configuration: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if api is not None and not (args.static or flag_models):
        source = KubernetesSource(api, namespace=args.namespace, resync_seconds=args.resync)
    else:
        source = StaticSource(flag_models, args.static)

    keys = None
    if args.api_keys_dir:
        directory: Path = args.api_keys_dir
        keys = KeyReloader(KeyRing(), lambda: load_key_dir(directory))
    elif args.api_keys_secret:
        core = client.CoreV1Api(api)
        keys = KeyReloader(
            KeyRing(), secret_loader(core, args.api_keys_namespace, args.api_keys_secret)
        )

    gateway = Gateway(
        _settings(args),
        source,
        keys=keys,
        tracing=setup_tracing(configured_endpoint(args.otlp_endpoint)),
    )
    try:
        asyncio.run(serve(gateway))
    except Exception as exc:
        logging.getLogger("mesh.gateway").error("gateway failed: %s", exc)
        return EXIT_FAILURE
    return 0
