"""The HTTP side of serving: a threaded server that no single client can hold up.

Each connection has its own thread; a client must send its request line, headers and body within
`read_timeout` seconds (an idle or trickling connection is answered 408 and closed), a body may not exceed
`max_body_bytes` (413, unread), and a full queue is answered 503 at once. The port is bound when the server is
made, before anything slow is loaded, so a port in use is reported first; requests that connect meanwhile wait
in the listen queue until `serve` is called.
"""

import dataclasses
import http.server
import json
import socket
import threading
import time
from typing import Any

from adapter_jax.batching import Batcher, QueueFull
from adapter_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may ask of the server."""

    read_timeout: float  # seconds to send a whole request (line, headers, body)
    max_body_bytes: int
    max_connections: int  # open at once; more are answered 503 and closed


class _Refused(Exception):
    """A request answered with an error status; the connection is closed after it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class AnsweringServer(http.server.ThreadingHTTPServer):
    """Answers POSTed JSON lists of requests through a Batcher, once `serve` has been given one."""

    daemon_threads = True  # a connection still open does not keep the process from exiting
    request_queue_size = 128  # connections waiting to be accepted (socketserver's default is 5)

    def __init__(self, host: str, port: int, limits: Limits):
        self.limits = limits
        self.batcher: Batcher | None = None
        self._open = threading.BoundedSemaphore(limits.max_connections)
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise ConfigError(f"--host/--port: cannot listen on {host}:{port}: {e.strerror or e}") from e

    def serve(self, batcher: Batcher) -> None:
        """Answers requests through `batcher` until shut down."""
        self.batcher = batcher
        self.serve_forever()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._open.acquire(blocking=False):
            _refuse_raw(request, 503, f"{self.limits.max_connections} connections are open; try again shortly")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.release()


def _refuse_raw(connection: socket.socket, status: int, message: str) -> None:
    """An error answer written straight to a connection no handler thread serves."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.0 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    try:
        connection.settimeout(1)
        connection.sendall(head.encode() + body)
    except OSError:
        pass  # the client is gone; nothing is owed to it


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AnsweringServer

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout  # each read of the socket (StreamRequestHandler applies it)
        super().setup()
        self.deadline = time.monotonic() + self.server.limits.read_timeout

    def do_POST(self) -> None:  # http.server's name for the POST handler
        try:
            requests = self._read_requests()
            if len(requests) > self.server.batcher.max_queued:
                raise _Refused(413, f"the body holds {len(requests)} requests; at most "
                                    f"{self.server.batcher.max_queued} are taken at once")
            try:
                future = self.server.batcher.submit(requests)
            except QueueFull as e:
                raise _Refused(503, str(e)) from e
            answers = future.result()
        except _Refused as e:
            self.close_connection = True
            return self._send(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 (a failure answering is the server's; the client still hears)
            self.log_error("answering failed: %r", e)
            return self._send(500, {"error": f"the server failed to answer: {type(e).__name__}: {e}"})
        self._send(200, answers)

    def _read_requests(self) -> list:
        """The body's JSON list, read within the limits; _Refused with the status that says what is wrong."""
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise _Refused(411, "the request needs a Content-Length header")
        if not declared.strip().isdigit():
            raise _Refused(400, f"Content-Length {declared!r} is not a whole number of bytes")
        length = int(declared)
        if length > self.server.limits.max_body_bytes:
            raise _Refused(413, f"the body has {length} bytes; at most {self.server.limits.max_body_bytes} are taken")
        try:
            requests = json.loads(self._read_body(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Refused(400, f"the body is not valid JSON ({e})") from e
        if not isinstance(requests, list):
            raise _Refused(400, "the body must be a JSON list of requests")
        return requests

    def _read_body(self, length: int) -> bytes:
        chunks, received = [], 0
        try:
            while received < length:
                if time.monotonic() > self.deadline:
                    raise TimeoutError
                chunk = self.rfile.read1(min(length - received, 1 << 16))
                if not chunk:
                    raise _Refused(400, f"the body ended after {received} of its {length} bytes")
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError as e:
            raise _Refused(408, f"the body did not arrive within {self.server.limits.read_timeout:g} s "
                                f"({received} of {length} bytes)") from e
        return b"".join(chunks)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 503:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client left before its answer; others are unaffected

    def log_message(self, format, *args):
        pass  # one line per request would bury the console
