"""OpenTelemetry tracing for both processes: off unless the standard variables ask for it.

On when `OTEL_TRACES_EXPORTER` names `otlp` and/or `console` (and `OTEL_SDK_DISABLED` is not
true). Everything else is the SDK's own configuration, read by the SDK: the endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `..._TRACES_ENDPOINT`), headers, `OTEL_SERVICE_NAME` (default
offload-gateway / offload-compute), `OTEL_RESOURCE_ATTRIBUTES`, the sampler
(`OTEL_TRACES_SAMPLER`), the batch processor (`OTEL_BSP_*`). The OTLP transport is
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (the
specification's default) or `grpc`.

Off, no OpenTelemetry module is imported and the callers hold `None`: a request pays one
`is None` test (measured in `make bench`'s hop section).

One trace links every process through the W3C traceparent offload already carries
(offload/context.py): the gateway's HTTP span -> compute's RPC span (one per batched item
too) -> a span per pool task and per job chunk. Pool workers export nothing (they import no
exporter and no grpc): a worker reports when its task ran, and compute records the task's
span with those times (`record`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from opentelemetry.trace import Span

_EXPORTERS = ("otlp", "console")


def enabled_exporters(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER asks for ([]: tracing off). ValueError for an unknown one."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} (offload knows otlp, console, none)")
    return names


def check_env(environ: Mapping[str, str] = os.environ) -> None:
    """ValueError, in one line, for OTEL_* values offload cannot honour; builds nothing (no
    thread, no channel: safe before a fork)."""
    if "otlp" in enabled_exporters(environ):
        _otlp_protocol(environ)


def _otlp_protocol(environ: Mapping[str, str]) -> str:
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)")
    return protocol


class Tracing:
    """This process's tracer provider and the few operations offload needs. `from_env()` after
    any fork (it starts the span exporter's thread, and an OTLP/gRPC exporter opens a channel):
    in compute after the pool's forkserver, in the gateway in each worker's lifespan.
    `shutdown()` once at exit, which flushes what is pending."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._provider = provider
        self._tracer = provider.get_tracer("offload")
        self._propagator = TraceContextTextMapPropagator()
        self.SERVER, self.INTERNAL = trace.SpanKind.SERVER, trace.SpanKind.INTERNAL

    @classmethod
    def from_env(cls, service_name: str, environ: Mapping[str, str] = os.environ) -> "Tracing | None":
        exporters = enabled_exporters(environ)
        if not exporters:
            return None
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        defaults = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        provider = TracerProvider(resource=Resource.create(defaults))  # sampler from OTEL_TRACES_SAMPLER
        for name in exporters:
            provider.add_span_processor(BatchSpanProcessor(_exporter(name, environ)))
        return cls(provider)

    def start(self, name: str, traceparent: str | None, *, kind: Any = None, attributes: dict | None = None,
              start_time: int | None = None) -> "Span":
        """A span, child of `traceparent` (W3C header value; None or "": a new trace)."""
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        return self._tracer.start_span(
            name, context=parent, kind=kind if kind is not None else self.INTERNAL, attributes=attributes,
            start_time=start_time,
        )

    def end(self, span: "Span", error: str | None = None, end_time: int | None = None) -> None:
        """End `span`; `error` (e.g. a google.rpc code name) marks it failed."""
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=end_time)

    def record(self, name: str, traceparent: str | None, start_ns: int, end_ns: int, attributes: dict,
               error: str | None = None) -> None:
        """A finished span measured elsewhere (a pool task, timed by its worker)."""
        self.end(self.start(name, traceparent, attributes=attributes, start_time=start_ns), error, end_ns)

    @staticmethod
    def traceparent(span: "Span") -> str:
        """The W3C header value naming `span` as the parent of the next hop."""
        sc = span.get_span_context()
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"

    def shutdown(self) -> None:
        """Flush pending spans and stop the exporters. Idempotent."""
        self._provider.shutdown()


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if _otlp_protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()
