"""CURVE keys and the loopback rule: without CURVE the server binds only to loopback
(or ipc) unless the operator says ``--insecure``."""
from __future__ import annotations

import ipaddress
from pathlib import Path

from earthgptx.errors import EarthGPTXError


class SecurityError(EarthGPTXError):
    """Keys that cannot be used, or an unsafe bind refused."""


def is_loopback(address: str) -> bool:
    """``ipc://``, ``inproc://`` and ``tcp://`` on 127.0.0.0/8, ::1 or localhost."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or '*': not loopback
        return False


def check_bind(address: str, curve: bool, insecure: bool) -> None:
    if "://" not in address:
        raise SecurityError(f"--bind {address!r} is not a ZeroMQ address; use e.g. tcp://127.0.0.1:5555")
    if not curve and not insecure and not is_loopback(address):
        raise SecurityError(f"refusing to serve {address} without encryption: give --curve-secret FILE and "
                            "--allow DIR (keys from `egx keys`), bind to tcp://127.0.0.1:PORT, "
                            "or accept the risk with --insecure")


def write_keys(out: str | Path, names: tuple[str, ...] = ("server", "client")) -> dict[str, str]:
    """One CURVE key pair per name in ``out``: ``NAME.key`` (public) and ``NAME.key_secret``
    (mode 600). An existing pair is kept, never overwritten. Returns name -> "written"/"kept"."""
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        raise SecurityError("this libzmq has no CURVE support; install pyzmq from PyPI (it bundles libsodium)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        public, secret = out / f"{name}.key", out / f"{name}.key_secret"
        if public.exists() or secret.exists():  # never overwrite a key: it may be deployed
            load_keys(secret, need_secret=True)
            written[name] = "kept"
            continue
        zmq.auth.create_certificates(out, name)
        secret.chmod(0o600)
        written[name] = "written"
    return written


def load_keys(path: str | Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a ``.key`` or ``.key_secret`` file written by ``egx keys``."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"key file {path} not found; write keys with `egx keys --out DIR`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise SecurityError(f"{path} is not a CURVE key file from `egx keys`: {exc}") from None
    if need_secret and secret is None:
        raise SecurityError(f"{path} holds only a public key; give the .key_secret file")
    return public, secret
