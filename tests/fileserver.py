"""A local HTTP file server for download tests (127.0.0.1, an ephemeral port, a thread).

Serves in-memory files with HTTP Range support and logs every request, and can misbehave
on purpose: cut a response short (once per path), ignore Range headers, or answer 404.

    with FileServer({"/a.bin": data}) as server:
        url = server.url("/a.bin")
"""
from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set

RANGE = re.compile(r"bytes=(\d+)-$")
POLL_S = 0.02  # how often serve_forever checks for shutdown


class FileServer:
    """Args:
        files: URL path -> content.
        cut_once: paths whose first response announces the full length but stops halfway.
        ignore_range: answer every request with the whole file (status 200).
    """

    def __init__(self, files: Dict[str, bytes], cut_once: Optional[Set[str]] = None,
                 ignore_range: bool = False):
        self.files = dict(files)
        self.cut_once = set(cut_once or ())
        self.ignore_range = ignore_range
        self.requests: List[dict] = []  # {"path", "range"} per GET, in order
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": POLL_S},
                                        daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                match = RANGE.match(self.headers.get("Range") or "")
                start = int(match.group(1)) if match and not server.ignore_range else 0
                if start and start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler
