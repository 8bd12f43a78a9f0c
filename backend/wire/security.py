"""CurveZMQ keys for the service and its clients, and the loopback rule for binds.

The service binds loopback by default. Any other bind needs CurveZMQ: the service then
encrypts every connection and admits only clients whose public key it holds. Key folder
(written by ``spatialavatar keys DIR``)::

    DIR/server.key                 the service's public key: give it to every client
    DIR/server.key_secret          the service's secret key: never leaves this machine
    DIR/authorized/NAME.key        public keys of the clients the service admits
    DIR/clients/NAME.key_secret    one client's key pair: copy it, with server.key, to that client

The folders are owner-only (0700) and secret key files are created owner-only (0600), never
readable by others for a moment. The running service re-reads ``authorized/`` when it
changes, so adding or removing a client's public key takes effect at that client's next
connection, without a restart.

Pure Python + pyzmq (no torch): the Blender add-on loads client keys with this module.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .errors import InputError, SpatialAvatarError

log = logging.getLogger("spatialavatar.server")

SERVER = "server"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PRIVATE_DIR = 0o700
_SECRET_FILE = 0o600
_PUBLIC_FILE = 0o644


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
    for folder in (d, d / "authorized", d / "clients"):
        _private_dir(folder)
    written: dict[str, str] = {}
    if not (d / f"{SERVER}.key_secret").exists():
        public, secret = zmq.curve_keypair()
        _write_certificate(d / f"{SERVER}.key_secret", public, secret)
        _write_certificate(d / f"{SERVER}.key", public)
        written.update(server_public=str(d / f"{SERVER}.key"), server_secret=str(d / f"{SERVER}.key_secret"))
    client_secret = d / "clients" / f"{client}.key_secret"
    if client_secret.exists():
        raise InputError(f"{client_secret} exists; pick another --client name")
    public, secret = zmq.curve_keypair()
    _write_certificate(client_secret, public, secret)
    # Written last: the service admits the client only once its secret is complete.
    _write_certificate(d / "authorized" / f"{client}.key", public)
    written.update(client_public=str(d / "authorized" / f"{client}.key"), client_secret=str(client_secret))
    return written


def _private_dir(folder: Path) -> None:
    # mkdir's mode keeps a new folder private from the start; chmod tightens one made by an older version.
    folder.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(folder, _PRIVATE_DIR)


def _write_certificate(path: Path, public: bytes, secret: bytes | None = None) -> None:
    """A zmq.auth certificate file (czmq's layout), written whole to a scratch file then renamed.

    The scratch file is created with its final mode, so a secret is never readable by others.
    """
    kind = "Secret" if secret else "Public"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate, written by spatialavatar keys on {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if secret:
        lines.append("#   Keep it private: whoever holds this file can connect as this key's owner.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _SECRET_FILE if secret else _PUBLIC_FILE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


class AuthorizedKeys:
    """The admitted clients' public keys, read from a folder of ``NAME.key`` files.

    Consulted at every CurveZMQ handshake (a zmq.auth credentials provider): the folder is
    re-read whenever a file in it was added, removed or rewritten, so key changes need no
    restart. Connections already open are not dropped.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stamp: tuple | None = None
        self._keys: frozenset[bytes] = frozenset()
        self.refresh()

    def _current_stamp(self) -> tuple:
        stamp = []
        for path in sorted(self.folder.glob("*.key")):
            try:
                st = path.stat()
            except OSError:  # removed while listing: the read that follows does not see it either
                continue
            stamp.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamp)

    def refresh(self) -> None:
        """Re-read the folder when it changed since the last read."""
        # Stamped before reading: a change during the read shows at the next handshake.
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        keys = set()
        for path in sorted(self.folder.glob("*.key")):
            try:
                keys.add(zmq.auth.load_certificate(path)[0])
            except (ValueError, OSError) as exc:
                log.warning("authorized keys: skipping %s, not a CurveZMQ public key (%s)", path.name, exc)
        if self._stamp is not None:
            log.info("authorized keys: %d client key(s) admitted after a change in %s/", len(keys), self.folder.name)
        self._keys, self._stamp = frozenset(keys), stamp

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's question at each handshake: is this z85-encoded client key admitted?"""
        try:
            self.refresh()
        except Exception:  # the authenticator thread must outlive any failure; nobody is admitted meanwhile
            log.exception("authorized keys: reading %s/ failed", self.folder.name)
            return False
        return key in self._keys


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
    auth.configure_curve_callback(domain="*", credentials_provider=AuthorizedKeys(keys.authorized))
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    return auth


def secure_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``socket`` a CurveZMQ client of the service whose public key is in ``keys`` (before connect)."""
    socket.curve_serverkey = keys.server_public
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
