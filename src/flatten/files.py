"""Files written whole or not at all, and digests of tensors."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import torch


def tensors_sha256(named) -> str:
    """A digest of ``(name, tensor)`` pairs (names, dtypes, shapes and bytes): equal exactly when the tensors
    are bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Modes. What we write must end with the mode a plain ``open()`` / ``mkdir()`` gives under the process's umask,
# but ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 on purpose and a rename keeps the mode, and some
# writers we call do the same inside (safetensors' ``save_file``, so ``save_pretrained`` too, writes a private
# temporary file and renames it over the path it is given). So the helpers below create their temporary file or
# folder themselves, under a fresh random name, exclusively (O_EXCL / mkdir fail if the name is taken,
# O_NOFOLLOW refuses a planted symlink), asking for 0666 / 0777 as a plain ``open()`` / ``mkdir()`` does; the
# kernel applies the umask (and a folder's default ACL, where one is set). They note the mode it gave and, once
# the writer is done, give that mode back to whatever the writer left there. The umask is thus learnt from the
# kernel, never read or changed: the set-and-restore idiom (``os.umask(0); os.umask(old)``) would for a moment
# give files that other threads create meanwhile the wrong mode, and ``/proc/self/status`` has a ``Umask:`` line
# on Linux only and knows nothing of default ACLs.
_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))
_PERMISSIONS = 0o777


def _new_beside(parent: Path, prefix: str, suffix: str, make: Callable[[Path], None]) -> Path:
    """``make(candidate)`` for a fresh ``parent/{prefix}{random}{suffix}``, retried while the name is taken."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {parent}")


def _permissions(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode) & _PERMISSIONS


def _give(path, permissions: int) -> None:
    """Set the permission bits of ``path`` (a file or folder, not a link) to ``permissions``; others (setgid)
    kept."""
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode & _PERMISSIONS != permissions:
        os.chmod(path, (mode & ~_PERMISSIONS) | permissions)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``: the file is
    written whole or not at all, with the mode a plain ``open()`` gives under the process's umask."""
    path = Path(path)
    tmp = str(_new_beside(path.parent, f".{path.name}.", ".partial",
                          lambda candidate: os.close(os.open(candidate, _FILE_FLAGS, 0o666))))
    try:
        plain = _permissions(tmp)
        write(tmp)
        _give(tmp, plain)  # the writer may have replaced the file with a private one of its own
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_folder_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a new, empty folder beside ``path``, then put it in place of ``path``
    (replacing a folder there, of which nothing is kept): the folder is written whole or not at all. It and
    everything in it end with the modes a plain ``mkdir()`` / ``open()`` gives under the process's umask.

    The temporary folder is ``.{name}.partial-*``; a process killed while writing leaves it (safe to delete)
    and ``path`` as it was."""
    path = Path(path)
    staging = _new_beside(path.parent, f".{path.name}.partial-", "", lambda candidate: os.mkdir(candidate, 0o777))
    try:
        folders = _permissions(staging)
        files = folders & 0o666  # what open(..., 0o666) gives where mkdir(..., 0o777) gave ``folders``
        write(staging)
        _give(staging, folders)
        for root, dirs, names in os.walk(staging):  # top-down: each folder is given its mode before it is read
            for name in dirs + names:
                entry = os.path.join(root, name)
                kind = os.lstat(entry).st_mode  # links (to folders too) are left alone, and not followed
                if stat.S_ISDIR(kind) or stat.S_ISREG(kind):
                    _give(entry, folders if stat.S_ISDIR(kind) else files)
        if path.exists():
            # a private holding folder, deleted once the new folder is in place
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
