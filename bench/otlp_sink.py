"""An OTLP/HTTP endpoint that accepts span exports and counts them, for the tracing-on hop row
(and, with `on_export`, the collector of tests/test_tracing.py).

It parses nothing itself: the cost measured is what tracing costs the gateway and compute (span
creation, batching, protobuf encoding, the POST), not a collector's work.
"""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class OtlpSink:
    """`start()` then `endpoint`; `stop()` (idempotent). `exports` counts the POSTs received;
    `on_export(body)` gets each one's protobuf body (an ExportTraceServiceRequest), unzipped."""

    def __init__(self, on_export: Callable[[bytes], None] | None = None) -> None:
        self.exports = 0
        self._on_export = on_export
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "OtlpSink":
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector would

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                sink.exports += 1
                if sink._on_export is not None:
                    sink._on_export(gzip.decompress(body) if self.headers.get("content-encoding") == "gzip" else body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="otlp-sink").start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
