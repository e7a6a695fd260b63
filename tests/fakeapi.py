"""A misbehaving "AWS API" on 127.0.0.1, for what moto never does: answer every request with an
HTTP 500 and a body that is no API answer (as a broken proxy or load balancer would: botocore
cannot parse it and raises its ResponseParserError, not a ClientError), or take a request and
never answer it. Point AWS_ENDPOINT_URL at `url`.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from conftest import reply

ERROR_PAGE = b"Internal Server Error: upstream connect error"


class BrokenApi:
    def __init__(self, mode: str) -> None:
        """mode "500": every request gets a 500 with a plain-text body; "hang": no answer, ever."""
        assert mode in ("500", "hang")
        self.requests = 0
        self._release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 -- the name http.server calls
                api.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if mode == "hang":
                    api._release.wait(120)
                    return
                reply(self, 500, "text/plain", ERROR_PAGE)

            do_GET = do_POST  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- http.server's signature
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> BrokenApi:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
