#!/usr/bin/env python3
"""A minimal OpenTelemetry trace receiver (OTLP/gRPC) for scope's end-to-end tests.

Implements opentelemetry.proto.collector.trace.v1.TraceService/Export with the official
`opentelemetry-proto` and `grpcio` packages, and appends every span it receives to a file as
one JSON object per line:

    {"trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex or empty>",
     "name": ..., "kind": ..., "start_time_unix_nano": ..., "end_time_unix_nano": ...,
     "attributes": {...}, "resource": {...}, "scope": {"name": ..., "version": ...}}

Attribute values become JSON values: strings, ints, floats, bools, arrays (lists), key-value
lists (objects); bytes as hex.

Usage:
    python3 -m venv /tmp/otlpenv && /tmp/otlpenv/bin/pip install opentelemetry-proto grpcio
    /tmp/otlpenv/bin/python tests/otlp_receiver.py PORT OUTPUT.jsonl [--host 127.0.0.1]

PORT 0 picks a free port. Once it listens, the receiver prints `listening PORT` on stdout (and
flushes), so a test can start it and read the line to learn where to send. It runs until
SIGTERM or SIGINT. Every span is written and flushed before the Export call returns, so once
the sender has its answer the span is in the file.
"""

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

# OTLP requests can be large (scope sends up to ~2000 spans per request); grpcio's default
# limit is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def any_value(value):
    """An AnyValue as a JSON value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(key_values):
    return {kv.key: any_value(kv.value) for kv in key_values}


def span_lines(request):
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = {"name": scope_spans.scope.name, "version": scope_spans.scope.version}
            for span in scope_spans.spans:
                yield json.dumps(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "start_time_unix_nano": span.start_time_unix_nano,
                        "end_time_unix_nano": span.end_time_unix_nano,
                        "status_code": span.status.code,
                        "attributes": attributes(span.attributes),
                        "resource": resource,
                        "scope": scope,
                    },
                    sort_keys=True,
                )


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        text = "".join(line + "\n" for line in span_lines(request))
        with self.lock:
            self.out.write(text)
            self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="port to listen on; 0 picks a free one")
    parser.add_argument("output", help="file to append one JSON line per span to")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args()

    out = open(args.output, "a", encoding="utf-8")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        print(f"otlp_receiver: cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    server.start()
    print(f"listening {port}", flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
