"""Real servers for the tests and the benchmarks, on 127.0.0.1 with free ports: nginx (Debian's
binary, our own config in a temp dir) and moto's S3 server in a subprocess. Each is stopped by
its PID. Also a throwaway CA + server certificate made with openssl, for the TLS tests.
The pytest fixtures that share one of each per session are in tests/conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

NGINX = "/usr/sbin/nginx"

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_SESSION_TOKEN": "testing-session-token",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/corfs-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/corfs-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
TEST_BUCKET = "corfs-test"  # made by the moto_server fixture (tests/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settle_log(log: Path, quiet: float = 0.05, most: float = 2.0) -> None:
    """Until `log` has not grown for `quiet` seconds (at most `most`): a server may write it
    after its client has what it asked for (nginx logs a request after sending its answer:
    a test saw 3 of 4 lines; QEMU prints qemu-io's output after HMP answered)."""
    deadline = time.monotonic() + most
    size = log.stat().st_size
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if (now := log.stat().st_size) == size:
            return
        size = now


class PortTaken(RuntimeError):
    """Something else listens on the port a server was given (another test worker's server
    took it between free_port() and the bind): the server should start again on another."""


def _listener_inodes(port: int) -> set[str]:
    """The socket inodes listening on `port` (IPv4 and IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    return inodes


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_port(
    port: int, proc: subprocess.Popen[bytes], log: Path | None, timeout: float = 20.0
) -> None:
    """Until `proc` listens on `port` itself. PortTaken if something else has the port: a
    test that went on would talk to another test's server (a moto with other users)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if _in_use(port):
                raise PortTaken(f"port {port} was taken before the server bound it")
            detail = log.read_text() if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {detail}")
        listeners = _listener_inodes(port)
        if listeners & _socket_inodes(proc.pid):
            return
        time.sleep(0.05)
    if _listener_inodes(port):
        raise PortTaken(f"port {port} is taken by another process")
    raise RuntimeError(f"server on port {port} did not start")


def start_on_a_free_port(
    launch: Callable[[int], subprocess.Popen[bytes]], log: Path, timeout: float = 20.0
) -> tuple[int, subprocess.Popen[bytes]]:
    """`launch(port)` on a free port until the server listens there itself (three tries)."""
    for attempt in range(3):
        port = free_port()
        proc = launch(port)
        try:
            wait_port(port, proc, log, timeout)
            return port, proc
        except PortTaken:
            stop_process(proc)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if `proc` is still there after `timeout`; reaped either way."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path


def make_tls(tmp: Path) -> TlsFiles:
    """A throwaway CA and a certificate for 127.0.0.1 / localhost signed by it."""
    tmp.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=corfs test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )
    return TlsFiles(ca_cert=tmp / "ca.pem", cert=tmp / "server.pem", key=tmp / "server.key")


@dataclass
class Nginx:
    """nginx serving `root` with an autoindex, Range and keep-alive. Locations:
    /denied/ answers 403; /auth/ needs `Authorization: Bearer x`; /gone-if-missing/ answers
    403 for a file that is not there (an expired pre-signed URL); `locations` adds raw nginx
    directives to the server block (e.g. `location = /a { return 302 URL; }`).

    `autoindex` is the listing's format: "json" is what corfs reads, "html" what httpdirfs and
    rclone read. With `log_requests` each request is logged (`requests()`, `sent()`, for tests
    and benchmarks that count what a client fetched) and, beside it, its Authorization header
    (`authorizations()`, for tests that a credential never reached this server)."""

    root: Path
    workdir: Path
    tls: TlsFiles | None = None
    locations: str = ""
    autoindex: Literal["json", "html"] = "json"
    log_requests: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _id: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def auth_log(self) -> Path:
        return self.workdir / "auth.log"

    def config(self) -> str:
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""
        listen = f"listen 127.0.0.1:{self.port}"
        ssl = ""
        if self.tls:
            listen += " ssl"
            ssl = f"ssl_certificate {self.tls.cert};\n    ssl_certificate_key {self.tls.key};"
        logs = "access_log off;"
        if self.log_requests:
            logs = (
                "log_format corfs '$request_method $uri $status $body_bytes_sent';\n"
                "  log_format corfs_auth '$http_authorization';\n"
                f"  access_log {self.access_log} corfs;\n"
                f"  access_log {self.auth_log} corfs_auth;"
            )
        autoindex = f"autoindex on; autoindex_format {self.autoindex};"
        return f"""
daemon off;
master_process on;
worker_processes 2;
{user}
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  {logs}
  client_body_temp_path {w}/client_body;
  proxy_temp_path {w}/proxy;
  fastcgi_temp_path {w}/fastcgi;
  uwsgi_temp_path {w}/uwsgi;
  scgi_temp_path {w}/scgi;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 75s;
  keepalive_requests 100000;
  server {{
    {listen};
    {ssl}
    root {self.root};
    location / {{ {autoindex} }}
    location /denied/ {{ deny all; }}
    location /auth/ {{
      if ($http_authorization != "Bearer x") {{ return 403; }}
      {autoindex}
    }}
    location /gone-if-missing/ {{
      if (!-f $request_filename) {{ return 403; }}
    }}
    location = /.test-server-id {{ access_log off; return 200 "{self._id}"; }}
    {self.locations}
  }}
}}
"""

    def start(self) -> Nginx:
        """On a free port; again on another if that one was taken before nginx bound it (by
        another test worker's server or a client's connection): the server answering is
        checked to be this one, not only something on the port."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            conf = self.workdir / "nginx.conf"
            conf.write_text(self.config())
            log = self.workdir / "error.log"
            self.proc = subprocess.Popen(
                [NGINX, "-e", str(log), "-p", str(self.workdir), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=open(self.workdir / "stderr.log", "wb"),  # noqa: SIM115
            )
            try:
                wait_port(self.port, self.proc, self.workdir / "stderr.log")
                if self._answers_as_itself():
                    return self
            except RuntimeError:
                if attempt == 2:
                    raise
            stop_process(self.proc)
        raise RuntimeError(f"nginx in {self.workdir} found no port of its own")

    def _answers_as_itself(self) -> bool:
        context = ssl._create_unverified_context() if self.tls else None  # its own test cert
        direct = urllib.request.build_opener(  # never through a proxy of the environment
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with direct.open(f"{self.url}.test-server-id", timeout=10) as answer:
                return answer.read().decode() == self._id
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    # ---- the logs (with log_requests) ----

    def log_mark(self) -> int:
        """Where the access log ends now: `requests(since=mark)` then sees only later ones."""
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def requests(
        self, prefix: str = "", *, since: int = 0, method: str | None = None
    ) -> list[tuple[str, int, int]]:
        """(uri, status, body bytes) of the requests logged so far (after the mark `since`)
        for URIs under `prefix`, of any method or only `method`."""
        if not self.access_log.exists():
            return []
        settle_log(self.access_log)
        with open(self.access_log, "rb") as f:
            f.seek(since)
            lines = f.read().decode().splitlines()
        out = []
        for line in lines:
            verb, uri, status, sent = line.split()
            if uri.startswith(prefix) and method in (None, verb):
                out.append((uri, int(status), int(sent)))
        return out

    def sent(self, prefix: str, *, since: int = 0, method: str | None = None) -> tuple[int, int]:
        """(requests, body bytes) logged so far for URIs under `prefix` (as `requests()`)."""
        logged = self.requests(prefix, since=since, method=method)
        return len(logged), sum(sent for _, _, sent in logged)

    def authorizations(self) -> list[str]:
        """The Authorization header of each request logged so far ("" when there was none)."""
        if not self.auth_log.exists():
            return []
        settle_log(self.auth_log)
        return [("" if v == "-" else v) for v in self.auth_log.read_text().splitlines()]

    def authorizations_since(self, before: int, at_least: int, timeout: float = 10) -> list[str]:
        """Those logged after the first `before`, once there are `at_least` of them or at the
        timeout: nginx logs a request after it sent the answer, which its client may have
        read in full by then (seen in CI)."""
        deadline = time.monotonic() + timeout
        while len(seen := self.authorizations()[before:]) < at_least:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return seen


@dataclass
class Moto:
    """moto's S3 server in a subprocess. `client()` is a boto3 client with the fake
    credentials; `env` is what a store under test needs in os.environ."""

    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. INITIAL_NO_AUTH_ACTION_COUNT
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Moto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "moto.log"
        env = {**os.environ, **FAKE_AWS_ENV, **self.extra_env}

        def launch(port: int) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=open(log, "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                env=env,
            )

        self.port, self.proc = start_on_a_free_port(launch, log)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return self

    def client(self):  # -> botocore S3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


QMP_GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, ' \
    b'"package": ""}, "capabilities": []}}\r\n'


@contextlib.contextmanager
def qmp_speaker(path: Path, before_first_greeting: bytes) -> Iterator[list[dict]]:
    """A unix socket at `path` that speaks just enough QMP: a greeting, then `{"return": {}}`
    to every command. Its first connection gets `before_first_greeting` ahead of the greeting
    (as QEMU 7.2 can send an event there). Yields the commands received."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    received: list[bytes] = []

    def converse(conn: socket.socket, first: bool) -> None:
        decoder = json.JSONDecoder()
        with conn:
            conn.sendall((before_first_greeting if first else b"") + QMP_GREETING)
            pending = ""
            while data := conn.recv(4096):  # commands come unterminated: split by parsing
                pending += data.decode()
                with contextlib.suppress(json.JSONDecodeError):
                    while pending.strip():
                        command, end = decoder.raw_decode(pending.lstrip())
                        pending = pending.lstrip()[end:]
                        received.append(command)
                        answer = {"return": {}, "id": command.get("id")}
                        conn.sendall(json.dumps(answer).encode() + b"\r\n")

    def serve() -> None:
        first = True
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the end
                return
            threading.Thread(target=converse, args=(conn, first), daemon=True).start()
            first = False

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def unix_listener(path: Path, answer: bytes | None) -> Iterator[None]:
    """A unix socket at `path` that is not QEMU's: each connection gets `answer` and a hang-up,
    or (None) silence until the end."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the end
                return
            if answer is None:
                held.append(conn)
                continue
            with contextlib.suppress(OSError):
                conn.sendall(answer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)
        for conn in held:
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
