"""CURVE key pairs for the uploader and the ingest server.

Keys are ZeroMQ certificate files as ``zmq.auth`` writes them: ``NAME.key`` holds the
public key (share it), ``NAME.key_secret`` both keys (keep it; mode 0600). The ingest
server's allow-list is a directory of client ``*.key`` files.

Functions here raise ``ValueError`` with a message fit for a config error; callers wrap it
into :class:`agent.errors.ConfigError` with the key path. Called from any thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq
import zmq.auth

_Z85_LEN = 40


def generate(out_dir: str | os.PathLike[str], name: str,
             force: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/name.key`` (0644) and ``out_dir/name.key_secret`` (0600); the
    directory is created 0700 when missing. Refuses to overwrite unless ``force``."""
    from .protocol import valid_id

    if not valid_id(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
    out = Path(out_dir)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise ValueError(f"{public} or {secret} exists; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        for p in (public, secret):
            if force and p.exists():
                p.unlink()
        zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def _read_cert(path: Path) -> tuple[bytes, bytes | None]:
    try:
        pub, sec = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read key file {path}: {e}") from None
    if pub is None or len(pub) != _Z85_LEN:
        raise ValueError(f"{path} holds no public-key line")
    return pub, sec


def load_public_key(value: str) -> bytes:
    """A public key given either as its 40-character Z85 text or as the path of a
    ``.key`` certificate file; returns the Z85 bytes."""
    if len(value) == _Z85_LEN and not os.path.exists(value):
        try:
            zmq.utils.z85.decode(value.encode("ascii"))
        except (ValueError, UnicodeEncodeError, KeyError):
            raise ValueError("not a Z85 public key (40 characters) nor a key file") from None
        return value.encode("ascii")
    return _read_cert(Path(value))[0]


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """Load ``(public, secret)`` from a ``.key_secret`` file. Refuses a file that other
    users can read (chmod 600 it), as ssh does."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise ValueError(f"cannot read key file {p}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{p} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                         f"run: chmod 600 {p}")
    pub, sec = _read_cert(p)
    if not sec or len(sec) != _Z85_LEN:
        raise ValueError(f"{p} holds no secret key (is it the public .key file?)")
    return pub, sec


def load_allow_list(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Client public keys allowed to upload: ``{z85 public key: name}`` from every
    ``*.key`` file in ``directory`` (the name is the file name without ``.key``)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory of client .key files")
    keys: dict[bytes, str] = {}
    for f in sorted(d.glob("*.key")):
        pub, _ = _read_cert(f)
        keys[pub] = f.name.removesuffix(".key")
    return keys
