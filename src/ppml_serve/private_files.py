"""Files that hold secrets or decide who gets them (keys, API key hashes, the key-release
policy, Redis URLs): written owner-only and atomically, read only when nobody else could
have written them, never through a link someone else planted (the rules ssh applies to
``~/.ssh``).

Who may own such a file: the running user, or root (an orchestrator's mounted secret, e.g. a
Kubernetes secret volume, whose files are root-owned links into a read-only directory).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ppml_serve.errors import ConfigError

MAX_PRIVATE_BYTES = 16 << 20
"""No key, policy or key table is near this; a larger file is refused before it is read."""


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable only by its owner, atomically (never through a planted link)."""
    temporary = path.with_name(path.name + ".tmp")
    with_link = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    try:
        descriptor = os.open(temporary, with_link, 0o600)
    except OSError as exc:
        if not temporary.is_symlink():
            raise
        raise ConfigError(f"{temporary} is a symbolic link; remove it (ppml-serve never "
                          f"writes secrets through one): {exc.strerror}") from None
    os.fchmod(descriptor, 0o600)  # a leftover temporary file keeps its old mode otherwise
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _refuse(path: Path, why: str, fix: str) -> ConfigError:
    return ConfigError(f"{path}: {why}; refusing to use it ({fix})")


def check_status(path: Path, status: os.stat_result, secret: bool) -> None:
    """Refuse a file (or directory) that another user owns or could have written."""
    if not _trusted_owner(status.st_uid):
        raise _refuse(path, "owned by another user",
                      f"it belongs to uid {status.st_uid}, not to uid {os.geteuid()} who runs "
                      "ppml-serve; create it anew as that user")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(path, "writable by its group or by others",
                      f"check it was not tampered with, then chmod go-w {path}")
    # an orchestrator's root-owned secret may be 0644 (it decides who reads the volume)
    if secret and status.st_uid == os.geteuid() and status.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        raise _refuse(path, "readable by its group or by others",
                      f"chmod 600 {path}, and replace the secret: others may have read it")


def _check_link(path: Path) -> None:
    """A symlink is followed only if its owner may own the file too (an orchestrator's)."""
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(link.st_mode) and not _trusted_owner(link.st_uid):
        raise _refuse(path, "a symbolic link made by another user", "replace it by the file")


def read_protected(path: Path, secret: bool = True, max_bytes: int = MAX_PRIVATE_BYTES) -> bytes:
    """The file's bytes, after refusing one that another user owns, could have written, or
    (``secret``) could have read, and one larger than ``max_bytes``."""
    _check_link(path)
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        check_status(path, status, secret)
        if not stat.S_ISREG(status.st_mode):
            raise _refuse(path, "not a regular file", "point the setting at a file")
        if status.st_size > max_bytes:
            raise _refuse(path, f"{status.st_size} bytes, more than {max_bytes}",
                          "is it the right file?")
        return handle.read(max_bytes)


def secure_directory(path: Path) -> None:
    """Create ``path`` (0700) or check an existing one: owned by the running user (a
    symlink to it too), not writable by anyone else; then tighten it to 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_link(path)
    status = os.stat(path)
    if not stat.S_ISDIR(status.st_mode):
        raise _refuse(path, "not a directory", "pass a directory as --state-dir")
    if status.st_uid != os.geteuid():
        raise _refuse(path, f"owned by uid {status.st_uid}, not by uid {os.geteuid()} who "
                      "runs ppml-serve", "use a state directory of your own")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _refuse(path, "writable by its group or by others (its keys and API key "
                      "hashes could have been replaced)",
                      f"check its files, then chmod 700 {path}")
    os.chmod(path, 0o700)
