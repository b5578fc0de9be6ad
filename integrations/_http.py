"""A small threaded HTTP server for ``/metrics`` that can be stopped cleanly."""

from __future__ import annotations

import errno
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class PortInUseError(OSError):
    """The exporter's port is already taken by another process (or another sink)."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Drop the per-request access log (one line per scrape would flood the console)."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves a WSGI app on ``addr:port`` from a daemon thread.

    Args:
        app: the WSGI application (``prometheus_client.make_wsgi_app(registry)``).
        addr: the address to listen on.
        port: the port; 0 picks a free one (read it back from :attr:`port`).

    Raises:
        PortInUseError: when the port is taken.
        OSError: for other bind failures (an address this host does not have, ...).
    """

    def __init__(self, app: Any, addr: str, port: int) -> None:
        server_class = _ThreadingServer6 if ":" in addr else _ThreadingServer
        try:
            self._server = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    exc.errno,
                    f"cannot serve StepGuard metrics on {addr}:{port}: the port is already in "
                    "use (another exporter, or another rank on this host?); pass port=0 to pick "
                    "a free port, or per_rank=True to offset the port by the local rank",
                ) from exc
            raise
        self.addr = addr
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"stepguard-metrics-{self.port}", daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """The ``/metrics`` URL."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
