"""CurveZMQ keys for the service and its clients, and the loopback rule for binds.

The service binds loopback by default. Any other bind needs CurveZMQ: the service then
encrypts every connection and admits only clients whose public key it holds. Key folder
(written by ``spatialavatar keys DIR``)::

    DIR/server.key                 the service's public key: give it to every client
    DIR/server.key_secret          the service's secret key: never leaves this machine
    DIR/authorized/NAME.key        public keys of the clients the service admits
    DIR/clients/NAME.key_secret    one client's key pair: copy it, with server.key, to that client

Pure Python + pyzmq (no torch): the Blender add-on loads client keys with this module.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from backend.errors import InputError, SpatialAvatarError

SERVER = "server"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_loopback(endpoint: str) -> bool:
    """True when ``endpoint`` cannot be reached from another machine.

    tcp on 127.0.0.0/8, ::1 or "localhost"; ipc (guarded by file permissions) and inproc.
    A wildcard, an interface name or any other host counts as reachable.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    authorized: Path  # folder of admitted clients' public keys

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ServerKeys:
        d = Path(directory)
        public, secret = _load(d / f"{SERVER}.key_secret", need_secret=True)
        authorized = d / "authorized"
        if not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise InputError(f"{authorized}: no client public keys; run `spatialavatar keys {d}` to make one")
        return cls(public, secret, authorized)


@dataclass(frozen=True)
class ClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_public: str | os.PathLike, client_secret: str | os.PathLike) -> ClientKeys:
        """From the service's ``server.key`` and this client's ``NAME.key_secret``."""
        server, _ = _load(Path(server_public), need_secret=False)
        public, secret = _load(Path(client_secret), need_secret=True)
        return cls(server, public, secret)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, client: str = "blender") -> ClientKeys:
        """From a key folder as ``spatialavatar keys`` writes it."""
        d = Path(directory)
        return cls.load(d / f"{SERVER}.key", d / "clients" / f"{client}.key_secret")


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes]:
    if not path.is_file():
        raise InputError(f"key file not found: {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a CurveZMQ certificate ({exc})") from exc
    if need_secret and not secret:
        raise InputError(f"{path}: holds no secret key; pass the .key_secret file")
    return public, secret or b""


def generate_keys(directory: str | os.PathLike, client: str = "blender") -> dict[str, str]:
    """Create the service's key pair (unless present) and one client's; returns the files written."""
    if not _CLIENT_NAME.fullmatch(client):
        raise InputError(f"client name {client!r} must be 1-64 letters, digits, '_' or '-'")
    d = Path(directory)
    for sub in ("authorized", "clients"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if not (d / f"{SERVER}.key_secret").exists():
        public, secret = zmq.auth.create_certificates(d, SERVER)
        os.chmod(secret, 0o600)
        written.update(server_public=public, server_secret=secret)
    if (d / "clients" / f"{client}.key_secret").exists():
        raise InputError(f"{d / 'clients' / (client + '.key_secret')} exists; pick another --client name")
    public, secret = zmq.auth.create_certificates(d / "clients", client)
    os.chmod(secret, 0o600)
    authorized = d / "authorized" / f"{client}.key"
    Path(public).replace(authorized)
    written.update(client_public=str(authorized), client_secret=secret)
    return written


def check_bind(endpoint: str, keys: ServerKeys | None) -> None:
    """Refuse a bind other machines could reach unless CurveZMQ keys are configured."""
    if keys is None and not is_loopback(endpoint):
        raise SpatialAvatarError(
            f"refusing to bind {endpoint} without CurveZMQ keys: anyone on the network could use the service; "
            "run `spatialavatar keys DIR` and pass --keys DIR, or bind tcp://127.0.0.1"
        )


def secure_server(socket: zmq.Socket, keys: ServerKeys, context: zmq.Context):  # type: ignore[no-untyped-def]
    """Make ``socket`` a CurveZMQ server admitting only authorized keys (call before bind).

    Returns the running authenticator; stop it when the socket closes.
    """
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    return auth


def secure_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``socket`` a CurveZMQ client of the service whose public key is in ``keys`` (before connect)."""
    socket.curve_serverkey = keys.server_public
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
