"""Optional OpenTelemetry spans: one per RPC served, one per stream entry handled, one per call sent, parented
across processes by W3C `traceparent` carried beside the request id (gRPC metadata, the stream entry's envelope).

Off unless `setup` turned it on (`RALMSPEC_OTEL`, or `OTEL_EXPORTER_OTLP_ENDPOINT` set) and the `otel` extra is
installed (`pip install 'ralmspec[otel]'`); off, every function here is a no-op that imports nothing. OpenTelemetry's
context lives in contextvars, so it follows the request id wherever that goes (`tracing.ContextExecutor`, asyncio).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from services.common import env, tracing

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # W3C trace context: the gRPC metadata key, and the stream entry field (as bytes)
_provider: Any = None  # once `setup` turned export on: this process's TracerProvider...
_tracer: Any = None  # ...and its tracer (OpenTelemetry's own provider is a process global too)


def wanted() -> bool:
    """RALMSPEC_OTEL=1: on; 0: off; unset: on exactly when an OTLP endpoint is configured."""
    flag = env.OTEL.get().strip().lower()
    if flag in ("1", "true", "on"):
        return True
    if flag in ("0", "false", "off"):
        return False
    return bool(env.OTEL_ENDPOINT.get())


def setup(service: str, replica: str, exporter: Any = None) -> bool:
    """Export this process's spans (service.name `ralmspec-<service>`) through `exporter` (default: OTLP over gRPC
    to OTEL_EXPORTER_OTLP_ENDPOINT); True when on. Not wanted, or the packages missing: off (the latter logged)."""
    global _provider, _tracer
    if exporter is None and not wanted():
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
    except ImportError as e:
        log.warning("OpenTelemetry export asked for but not installed (pip install 'ralmspec[otel]'): %s", e)
        return False
    shutdown()
    _provider = TracerProvider(resource=Resource.create({"service.name": f"ralmspec-{service}",
                                                         "service.instance.id": replica}))
    batch = not type(exporter).__name__.startswith("InMemory")  # a test's exporter: spans at once
    _provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    _tracer = _provider.get_tracer("ralmspec")
    log.info("OpenTelemetry: exporting spans of ralmspec-%s with %s", service, type(exporter).__name__)
    return True


def shutdown() -> None:
    """Stop exporting (flushes what is buffered)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


@contextlib.contextmanager
def span(name: str, kind: str, parent: Mapping[str, str] | None = None,
         attributes: Mapping[str, str] | None = None) -> Iterator[None]:
    """A span `name` of `kind` ("server", "client", "producer", "consumer") around the block, child of the span in
    `parent` (a carrier: {"traceparent": ...}) when given, else of the current one; tagged with the request id."""
    if _tracer is None:
        yield
        return
    from opentelemetry import propagate, trace

    context = propagate.extract(parent) if parent else None
    attrs = {**(attributes or {})}
    if (rid := tracing.current()) is not None:
        attrs["ralmspec.request_id"] = rid
    with _tracer.start_as_current_span(name, context=context, kind=getattr(trace.SpanKind, kind.upper()),
                                       attributes=attrs):
        yield


def carrier() -> dict[str, str]:
    """The current span as {"traceparent": ...} to send along; {} when off or outside a span."""
    if _tracer is None:
        return {}
    from opentelemetry import propagate

    out: dict[str, str] = {}
    propagate.inject(out)
    return {k: v for k, v in out.items() if k == TRACEPARENT}
