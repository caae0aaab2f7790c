"""Traces: one span per request, exported over OTLP/HTTP only when an endpoint is set.

Without an endpoint the gateway uses OpenTelemetry's no-op tracer, so tracing
costs nothing. With one, spans go through a batch processor whose exporter runs
in its own thread, never on the event loop. The endpoint follows the OTLP
convention: the base URL (`http://collector:4318`), to which `/v1/traces` is added;
the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
variables are honoured too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from mesh_operator import __version__

TRACER_NAME = "mesh.gateway"
TRACES_PATH = "/v1/traces"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"


@dataclass
class Tracing:
    tracer: trace.Tracer
    provider: TracerProvider | None

    def shutdown(self) -> None:
        """Flush what is buffered; blocking (call it from a thread)."""
        if self.provider is not None:
            self.provider.shutdown()


def traces_url(endpoint: str) -> str:
    """The traces URL for an OTLP/HTTP base endpoint."""
    trimmed = endpoint.rstrip("/")
    return trimmed if trimmed.endswith(TRACES_PATH) else trimmed + TRACES_PATH


def configured_endpoint(flag: str | None) -> str | None:
    """The traces URL from the flag or the standard variables, or None (tracing off)."""
    if flag:
        return traces_url(flag)
    if os.environ.get(TRACES_ENDPOINT_ENV):
        return os.environ[TRACES_ENDPOINT_ENV]
    if os.environ.get(ENDPOINT_ENV):
        return traces_url(os.environ[ENDPOINT_ENV])
    return None


def setup_tracing(
    endpoint: str | None,
    *,
    service_name: str = "mesh-gateway",
    processor: SpanProcessor | None = None,
) -> Tracing:
    """A tracer exporting to `endpoint` (a traces URL), or to `processor`, or a no-op one."""
    if endpoint is None and processor is None:
        return Tracing(trace.NoOpTracer(), None)
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service_name, "service.version": __version__})
    )
    if processor is not None:
        provider.add_span_processor(processor)
    if endpoint is not None:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider.get_tracer(TRACER_NAME, __version__), provider)
