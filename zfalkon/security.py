"""CurveZMQ keys: creating them, keeping them private, and checking who may connect.

A broker's key directory (``zfalkon keys init DIR``)::

    DIR/                     0700
      broker.key             the broker's public key (give it to every worker and client)
      broker.key_secret      0600
      worker/NAME.key        public keys allowed to register as workers (and their slots)
      client/NAME.key        public keys allowed to act as clients
      revoked/ROLE.NAME.key  keys taken back by ``zfalkon keys revoke``
      issued/NAME/           0700, written by ``zfalkon keys new``: the bundle for one peer

A *bundle* (what ``--keys`` means for a worker or a client) is a directory holding
``broker.key`` and exactly one ``NAME.key_secret`` (0600, in a 0700 directory).

Key files are pyzmq's certificate format (``zmq.auth.create_certificates``). Any process
that reads a secret key refuses to start when the key or its directory is readable by
others. The broker's ZAP handler (:class:`BrokerAuthenticator`) runs in the broker's
context, starts before bind, and re-reads the allow-lists when their directories change,
so ``keys new`` and ``keys revoke`` take effect for new connections without a restart.
It gives each connection the user id ``ROLE:NAME``, which the broker checks against every
HELLO's role and binds to the routing id.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
from typing import NamedTuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zfalkon.constants import KEYS_ENV
from zfalkon.errors import ConfigError

ROLES = ("worker", "client")
ZAP_DOMAIN = "zfalkon"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KeyInfo(NamedTuple):
    """One authorized (or revoked) key, as ``zfalkon keys list`` shows it."""

    name: str
    role: str
    public: str
    revoked: bool


def check_private(path: str) -> None:
    """Raise ConfigError unless ``path`` (a secret key or a directory holding one) is
    closed to group and others."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        want = "0700" if os.path.isdir(path) else "0600"
        raise ConfigError(f"{path} has mode {mode:04o}: others could read a secret key; "
                          f"it must be {want} (chmod {want[1:]} {path})")


def _load_secret(path: str) -> tuple[bytes, bytes]:
    check_private(os.path.dirname(os.path.abspath(path)))
    check_private(path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the key {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key")
    return public, secret


def _load_public(path: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the public key {path}: {exc}") from None
    return public


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"key name {name!r}: use letters, digits, '_', '.', '-' "
                          "(at most 64, starting with a letter or digit)")


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _create(directory: str, name: str) -> tuple[str, str]:
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


# -- the key directory (zfalkon keys ...) ----------------------------------------------


def init_keys(directory: str) -> str:
    """Create a broker key directory; return the broker's public key file."""
    if os.path.exists(os.path.join(directory, "broker.key_secret")):
        raise ConfigError(f"{directory} already holds a broker key; not replacing it")
    _private_dir(directory)
    for sub in (*ROLES, "revoked", "issued"):
        _private_dir(os.path.join(directory, sub))
    public, _ = _create(directory, "broker")
    return public


def new_key(directory: str, name: str, role: str, out: str | None = None) -> str:
    """Create and authorize a key for a worker or client; return its bundle directory."""
    _check_name(name)
    if name == "broker":
        raise ConfigError("the name 'broker' is the broker's own key; choose another")
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    BrokerKeys(directory)  # the directory must be a valid, private broker key directory
    if any(k.name == name and not k.revoked for k in list_keys(directory)):
        raise ConfigError(f"a key named {name!r} already exists in {directory}")
    bundle = out or os.path.join(directory, "issued", name)
    if os.path.exists(bundle) and os.listdir(bundle):
        raise ConfigError(f"{bundle} exists and is not empty")
    _private_dir(bundle)
    public, _ = _create(bundle, name)
    shutil.copyfile(os.path.join(directory, "broker.key"), os.path.join(bundle, "broker.key"))
    # Authorize last, by rename: the broker never sees a half-written allow-list entry.
    staged = os.path.join(directory, role, f".{name}.key.tmp")
    shutil.copyfile(public, staged)
    os.replace(staged, os.path.join(directory, role, f"{name}.key"))
    os.remove(public)  # the bundle needs only the secret file (it holds the public key too)
    return bundle


def list_keys(directory: str) -> list[KeyInfo]:
    """Every authorized and revoked key in a broker key directory."""
    out = []
    for role in ROLES:
        for path, name in _key_files(os.path.join(directory, role)):
            out.append(KeyInfo(name, role, _load_public(path).decode(), False))
    for path, name in _key_files(os.path.join(directory, "revoked")):
        role, _, plain = name.partition(".")
        out.append(KeyInfo(plain, role, _load_public(path).decode(), True))
    return out


def revoke(directory: str, name: str) -> KeyInfo:
    """Take a key's authorization back (new connections with it are refused at once)."""
    for role in ROLES:
        path = os.path.join(directory, role, f"{name}.key")
        if os.path.exists(path):
            info = KeyInfo(name, role, _load_public(path).decode(), True)
            os.replace(path, os.path.join(directory, "revoked", f"{role}.{name}.key"))
            return info
    raise ConfigError(f"no authorized key named {name!r} in {directory}")


def _key_files(directory: str) -> list[tuple[str, str]]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [(os.path.join(directory, n), n[:-4]) for n in names
            if n.endswith(".key") and not n.startswith(".")]


# -- the broker's side -------------------------------------------------------------------


class BrokerKeys:
    """A broker key directory, loaded: the server key pair and the allow-lists."""

    def __init__(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise ConfigError(f"key directory {directory} does not exist "
                              "(create one with: zfalkon keys init DIR)")
        check_private(directory)
        self.directory = directory
        self.public, self.secret = _load_secret(os.path.join(directory, "broker.key_secret"))
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._allowed: dict[bytes, str] = {}  # z85 public key -> "ROLE:NAME"
        self.refresh()

    def refresh(self) -> None:
        """Re-read the allow-lists if a role directory changed since the last read."""
        dirs = [os.path.join(self.directory, role) for role in ROLES]
        try:
            stamp = tuple(os.stat(d).st_mtime_ns for d in dirs)
        except OSError as exc:
            raise ConfigError(f"cannot read the allow-lists in {self.directory}: {exc}") from None
        with self._lock:
            if stamp == self._stamp:
                return
            allowed = {}
            for role, d in zip(ROLES, dirs):
                for path, name in _key_files(d):
                    allowed[_load_public(path)] = f"{role}:{name}"
            self._allowed, self._stamp = allowed, stamp

    def user(self, z85_public: bytes) -> str | None:
        """``ROLE:NAME`` of an authorized key, else None."""
        try:
            self.refresh()
        except ConfigError:
            return None  # fail closed
        return self._allowed.get(z85_public)

    def callback(self, domain: str, z85_public: bytes) -> bool:
        """pyzmq's credentials-provider hook: may this key connect?"""
        return self.user(z85_public) is not None

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before bind)."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)


class BrokerAuthenticator(ThreadAuthenticator):
    """ZAP handler in the broker's context: allow-listed keys only, user id ``ROLE:NAME``."""

    def __init__(self, ctx: zmq.Context, keys: BrokerKeys) -> None:
        super().__init__(ctx)
        self.keys = keys

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.keys)

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85_key = zmq.utils.z85.encode(client_public_key)
        return self.keys.user(z85_key) or "revoked:"


# -- a worker's or client's side -------------------------------------------------------


def peer_keys(directory: str | None) -> "PeerKeys | None":
    """The bundle at ``directory`` (default ``$ZFALKON_KEYS``), or None for plaintext."""
    directory = directory or os.environ.get(KEYS_ENV)
    return PeerKeys(directory) if directory else None


class PeerKeys:
    """A bundle (``--keys`` of a worker or client): the broker's public key and ours."""

    def __init__(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise ConfigError(f"key bundle {directory} does not exist "
                              "(the broker's owner makes one with: zfalkon keys new NAME)")
        check_private(directory)
        secrets = [n for n in os.listdir(directory) if n.endswith(".key_secret")]
        if len(secrets) != 1:
            raise ConfigError(f"{directory} must hold exactly one *.key_secret file, "
                              f"found {len(secrets)}")
        self.directory = directory
        self.name = secrets[0][: -len(".key_secret")]
        self.public, self.secret = _load_secret(os.path.join(directory, secrets[0]))
        self.server = _load_public(os.path.join(directory, "broker.key"))

    def connect_with(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the broker (before connect)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
