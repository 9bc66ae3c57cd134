"""A throw-away PKI made at test time with `openssl`: a CA, a server certificate for 127.0.0.1/localhost and a client
certificate, all signed by the CA, plus a second CA that signed nothing here (a stranger's)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # trusts none of the above


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-keyout", str(key), "-out", str(cert))
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    cert, key, csr, extfile = (folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr",
                               folder / f"{name}.ext")
    extfile.write_text(ext)
    _run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial", "-days", "2",
         "-extfile", str(extfile), "-out", str(cert))
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    server = _leaf(folder, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    other, _ = _ca(folder, "other-ca")
    return Pki(ca[0], *server, *client, other)
