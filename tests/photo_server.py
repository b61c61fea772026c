"""A real HTTP server on 127.0.0.1 that serves photos the way the internet does: sometimes.

The first path segment picks the behaviour, the last names a registered photo:

    /photo/<name>               200 with the photo (Content-Type from `types`, default image/jpeg)
    /status/<code>/<name>       that status, always
    /flaky/<n>/<code>/<name>    that status for the first n requests of this path, then the photo
    /slow/<seconds>/<name>      waits before answering
    /drip/<seconds>/<name>      sends the headers, then one byte every <seconds>
    /truncated/<name>           Content-Length says 1000 bytes more than the body it sends
    /html/<name>                200 with an HTML page (a CDN's error page or a login wall)
    /undeclared/<name>          the photo with no Content-Length (HTTP/1.0: the body ends at close)
    /notype/<name>              the photo with no Content-Type
    /declared-huge/<name>       Content-Length of 10 GB
    /redirect/<path>            302 to /<path> on this server (or to <path> itself when it is a URL)

A photo named in `outages` (name -> seconds) makes every path that serves it wait that long first: the
same URL that worked yesterday times out today. Every request is counted per path in `hits`, so tests
can tell how often the client tried, and every accepted TCP connection in `connections`, so tests can
tell that a refused URI never reached the server at all.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class PhotoServer:
    def __init__(self) -> None:
        self.photos: dict[str, bytes] = {}
        self.types: dict[str, str] = {}
        self.outages: dict[str, float] = {}
        self.hits: Counter[str] = Counter()
        self.connections = 0
        self._lock = threading.Lock()
        self._httpd = _CountingHTTPServer(self, ("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, name: str, data: bytes, content_type: str = "image/jpeg") -> None:
        self.photos[name] = data
        self.types[name] = content_type

    def accepted(self) -> None:
        with self._lock:
            self.connections += 1

    def hit(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _CountingHTTPServer(ThreadingHTTPServer):
    def __init__(self, photos: PhotoServer, *args) -> None:
        self.photos = photos
        super().__init__(*args)

    def get_request(self):
        request = super().get_request()
        self.photos.accepted()
        return request


def _handler(server: PhotoServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            hit = server.hit(self.path)
            kind, *args = self.path.strip("/").split("/")
            name = args[-1] if args else ""
            data = server.photos.get(name)
            if data is None:
                return self._send(404, b"<html>no such photo</html>", "text/html")
            content_type = server.types[name]
            time.sleep(server.outages.get(name, 0))
            if kind == "redirect":
                target = "/".join(args)
                self.send_response(302)
                self.send_header("Location", target if "://" in target else f"/{target}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if kind == "status":
                return self._send(int(args[0]), b"<html>error</html>", "text/html")
            if kind == "flaky" and hit <= int(args[0]):
                return self._send(int(args[1]), b"<html>try again</html>", "text/html")
            if kind == "slow":
                time.sleep(float(args[0]))
            if kind == "html":
                return self._send(200, b"<!doctype html><html><body>Sign in to view</body></html>", "text/html; charset=utf-8")
            if kind == "drip":
                self._headers(200, content_type, len(data))
                for byte in data:
                    time.sleep(float(args[0]))
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                return None
            if kind == "truncated":
                self._headers(200, content_type, len(data) + 1000)
                self.wfile.write(data)
                return None
            if kind == "undeclared":
                self._headers(200, content_type, None)
                self.wfile.write(data)
                return None
            if kind == "notype":
                self._headers(200, None, len(data))
                self.wfile.write(data)
                return None
            if kind == "declared-huge":
                self._headers(200, content_type, 10 * 1024**3)
                self.wfile.write(data)
                return None
            return self._send(200, data, content_type)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self._headers(status, content_type, len(body))
            self.wfile.write(body)

        def _headers(self, status: int, content_type: str | None, length: int | None) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, size cap): as intended
                pass

        def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
            pass

    return Handler
