"""TLS for gRPC (server and client, mutual optional) and for Redis (`rediss://`), from PEM files.

One `Tls` names a server's certificate and key and the CA bundle that verifies its clients; a client's credentials
(`client_credentials`) name the CA that verifies the server and, for mutual TLS, its own certificate. With
`client_auth` the server refuses a client without a certificate the CA signed. A plaintext client of a TLS port fails
its handshake: gRPC answers it UNAVAILABLE, it never reaches a handler.

Redis over TLS needs no code here: redis-py takes `rediss://` URLs, and the CA and client certificate ride in the
URL's query (`rediss://:<password>@host:6380/0?ssl_ca_certs=/etc/tls/ca.pem`); `redact` keeps such a URL's
password out of what is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc

from services.common import env


@dataclass(frozen=True)
class Tls:
    cert: Path  # PEM certificate chain this process's gRPC server serves
    key: Path  # its PEM private key
    ca: Path | None = None  # PEM bundle that verifies peers; None: the system's roots (clients), no client check
    client_auth: bool = False  # server: require a client certificate signed by `ca`

    @classmethod
    def from_env(cls) -> Tls | None:
        """RALMSPEC_TLS_CERT / _KEY / _CA / _CLIENT_AUTH; None when no certificate is set (plaintext)."""
        cert, key, ca = env.TLS_CERT.get(), env.TLS_KEY.get(), env.TLS_CA.get()
        client_auth = env.TLS_CLIENT_AUTH.get() == "1"
        if not cert and not key:
            if ca or client_auth:
                raise ValueError(f"{env.TLS_CA.name} / {env.TLS_CLIENT_AUTH.name} need {env.TLS_CERT.name} and "
                                 f"{env.TLS_KEY.name}")
            return None
        if not (cert and key):
            raise ValueError(f"TLS needs both {env.TLS_CERT.name} and {env.TLS_KEY.name}")
        if client_auth and not ca:
            raise ValueError(f"{env.TLS_CLIENT_AUTH.name}=1 needs {env.TLS_CA.name}: the CA client certificates "
                             "must chain to")
        tls = cls(Path(cert), Path(key), Path(ca) if ca else None, client_auth)
        tls.read()  # fail at start-up, naming the file, rather than at the first handshake
        return tls

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        def load(p: Path, what: str) -> bytes:
            try:
                return p.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the TLS {what} {p}: {e.strerror}") from e

        return load(self.cert, "certificate"), load(self.key, "key"), None if self.ca is None else load(self.ca, "CA")

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self.read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=self.client_auth)

def client_credentials(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """A client's: verify the server with `ca` (None: the system's roots); present `cert` and `key` to a server that
    requires a client certificate (mutual TLS)."""
    return grpc.ssl_channel_credentials(root_certificates=None if ca is None else ca.read_bytes(),
                                        private_key=None if key is None else key.read_bytes(),
                                        certificate_chain=None if cert is None else cert.read_bytes())


def redact(url: str) -> str:
    """`url` with its password (and user) replaced by `***`: for logs, errors and printed addresses."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
