"""A shard server on 127.0.0.1 that misbehaves on request, for the tests of truncated and stalled reads.

`/plain/PATH` serves the file under the root as it is; `/cl/PATH` serves it but announces the Content-Length of
the file it was cut from (`full_sizes`), so the body ends early; `/nocl/PATH` sends no Content-Length (the body
ends where the file does, as a server that closes the connection would); `/stall/PATH` announces the whole
file, sends half of it and then stops sending until the test ends. Each request is logged (path, Range)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FaultyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):  # quiet; requests are recorded in server.requests
        pass

    def do_GET(self):
        server = self.server
        mode, _, rest = self.path.lstrip("/").partition("/")
        server.requests.append((self.path, self.headers.get("Range")))
        path = server.root / rest
        if mode not in ("plain", "cl", "nocl", "stall") or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        if mode == "plain":
            self.send_header("Content-Length", str(len(data)))
        elif mode in ("cl", "stall"):
            self.send_header("Content-Length", str(server.full_sizes.get(rest, len(data))))
        self.end_headers()
        if mode == "stall":
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            server.release.wait(120)
            return
        self.wfile.write(data)


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.root, self.full_sizes, self.requests = Path(root), {}, []
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.shutdown()
        self.server_close()
