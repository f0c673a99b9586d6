"""The lean reader's connections (http_wire.PlainReader): keep-alive TCP, and TLS over it.

`Wire` calls the socket without trio's wrapper on the data path (see there). `TlsConn` runs
OpenSSL over memory buffers on the trio socket and decrypts straight into the result buffer;
measured here against a non-blocking ssl.SSLSocket (about as fast, more CPU per byte: OpenSSL
reads each record in two syscalls) and a blocking socket in a worker thread (slower: a thread
hop per request), both far ahead of httpx (~5x). The URL's host is the SNI and the name the
certificate is verified for, as with httpx.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

ConnKey = tuple[str, str, int]  # scheme, host, port


_A = TypeVar("_A")
_R = TypeVar("_R")


class Wire:
    """A connected non-blocking TCP socket used without trio's socket wrapper on the data path:
    each trio socket call ends in a scheduler round trip even when the kernel answered at once
    (a cancel-shielded checkpoint); here a call that the kernel answers returns straight away
    and only a call that would block waits, for readiness (which is a checkpoint). A cold 4 KiB
    miss makes three such calls: this took ~20 % off the lean reader's CPU per request. A
    long body that keeps arriving yields now and then instead (http_wire.YIELD_BYTES)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock  # trio's: it closes the descriptor and wakes waiters (notify_closing)
        self.fd = sock.fileno()
        self.raw = socket.socket(fileno=socket.dup(self.fd))  # the same socket, stdlib calls
        self.raw.setblocking(False)

    async def send(self, data: memoryview | bytes) -> int:
        return await self._call(self.raw.send, data, trio.lowlevel.wait_writable)

    async def recv(self, size: int) -> bytes:
        return await self._call(self.raw.recv, size, trio.lowlevel.wait_readable)

    async def recv_into(self, view: memoryview) -> int:
        return await self._call(self.raw.recv_into, view, trio.lowlevel.wait_readable)

    async def _call(
        self, call: Callable[[_A], _R], arg: _A, ready: Callable[[int], Awaitable[None]]
    ) -> _R:
        """`call(arg)` at once, or once the socket is `ready` when it would block."""
        while True:
            try:
                return call(arg)
            except BlockingIOError:
                await ready(self.fd)

    def quiet(self) -> bool:
        """Whether nothing is waiting to be read, the connection still open (no EOF)."""
        try:
            self.raw.recv(1, socket.MSG_PEEK)  # b"": closed; a byte: not asked for
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        self.raw.close()
        self.sock.close()


class PlainConn(Wire):
    """A keep-alive TCP connection."""

    def __init__(self, sock: trio.socket.SocketType, key: ConnKey) -> None:
        super().__init__(sock)
        self.key = key

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.send(view) :]


class TlsConn:
    """A keep-alive TLS connection: OpenSSL over memory buffers (ssl.SSLObject + MemoryBIO) on
    a trio socket. The socket is read in large pieces (one recv per ~16 records; an SSLSocket
    makes OpenSSL read each record's header and body separately) and records are decrypted
    straight into the caller's buffer."""

    RECV_BYTES = 256 * 1024

    def __init__(
        self, sock: trio.socket.SocketType, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO, key: ConnKey,
    ) -> None:
        self.wire = Wire(sock)
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.key = key

    @classmethod
    async def handshake(
        cls, sock: trio.socket.SocketType, context: ssl.SSLContext, host: str, key: ConnKey
    ) -> TlsConn:
        """TLS over the connected `sock`, verified for `host` (also the SNI)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=host)
        conn = cls(sock, tls, incoming, outgoing, key)
        try:
            await conn._drive(tls.do_handshake)
        except BaseException:
            conn.close()  # its duplicate descriptor too, not only the caller's socket
            raise
        return conn

    async def _flush(self) -> None:
        if self.outgoing.pending:
            data = memoryview(self.outgoing.read())
            while data:
                data = data[await self.wire.send(data) :]

    async def _drive(self, op, *args):
        while True:
            try:
                result = op(*args)
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.wire.recv(self.RECV_BYTES)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            await self._flush()
            return result

    async def send_all(self, data: bytes) -> None:
        await self._drive(self.tls.write, data)

    async def recv(self, size: int) -> bytes:
        try:
            return await self._drive(self.tls.read, size)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # closed, with or without close_notify: the caller tells which matters

    async def recv_into(self, view: memoryview) -> int:
        try:
            return await self._drive(self.tls.read, len(view), view)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0

    def quiet(self) -> bool:
        """Whether nothing at all is waiting to be read, the connection still open: neither
        decrypted bytes nor received ones. Part of a record tells nothing of what it holds (an
        answer nobody asked for, or TLS's own, a session ticket): either way the connection
        goes (a reconnection the rare time it is TLS's own)."""
        return not self.tls.pending() and not self.incoming.pending and self.wire.quiet()

    def close(self) -> None:
        self.wire.close()


Conn = PlainConn | TlsConn


async def connect(key: ConnKey, stall: float, tls: ssl.SSLContext | None) -> Conn:
    """A new connection to `key`'s server (TLS for https, verified with `tls`), made within
    `stall` seconds (trio.TooSlowError otherwise). Every address of the host name is tried,
    as httpx does (trio's happy eyeballs): with only the first, a name whose first address
    the server does not listen on (localhost as ::1, a server on IPv4 only) failed every read
    while the listing, through httpx, worked."""
    scheme, host, port = key
    sock = None
    try:
        with trio.fail_after(stall):
            stream = await trio.open_tcp_stream(host, port)
            sock = stream.socket  # TCP_NODELAY set by trio's SocketStream
            if scheme == "https":
                if tls is None:
                    raise ssl.SSLError("no TLS context")
                return await TlsConn.handshake(sock, tls, host, key)
            return PlainConn(sock, key)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
