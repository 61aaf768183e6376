"""A real small file system for full-disk tests: a tmpfs mounted for one test, and a
ballast file that fills it.

Mounting needs root (CI and the development container run as root); where mounting is
not permitted the test is skipped with the reason. The mount is always undone.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

FILL_CHUNKS = (1 << 20, 1 << 16, 4096)  # bytes per write while filling: big first, then to the last page


@contextmanager
def small_tmpfs(parent: str, size: str = "12m") -> Iterator[str]:
    """A tmpfs of ``size`` mounted at ``parent``/tmpfs (mode 0700) for the duration."""
    path = os.path.join(parent, "tmpfs")
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], check=True)  # something still holds it: detach


def fill(directory: str) -> str:
    """Write a ballast file in ``directory`` until the file system is full (to the last
    page); returns its path. Removing it frees the space again."""
    path = os.path.join(directory, "ballast")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in FILL_CHUNKS:
            zeros = bytes(chunk)
            while True:
                try:
                    if os.write(fd, zeros) < chunk:
                        break  # a short write: the next one would fail
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path


def free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
