"""A threaded TCP server on 127.0.0.1 whose every connection is handed to `serve(socket)`:
the shared start of the tests' hostile server and fault proxy."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable


def start_loopback_server(
    serve: Callable[[socket.socket], None],
) -> socketserver.ThreadingTCPServer:
    """Started on a free port (`server.server_address[1]`), serving in a daemon thread; stop
    it with shutdown() and server_close()."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            serve(self.request)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
