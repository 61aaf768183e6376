"""Faults on the per-scope position files: a full disk or a failed write while the engine
opens or rebuilds positions.idx / scopeheads.idx is a typed error, the lock is released,
nothing stored is lost, and the next open builds them."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar

import pytest
from conftest import SMALL, assert_verified

import batpak_mp as bp
from batpak_mp._format.tables import POSITIONS_FILE, SCOPE_HEADS_FILE
from batpak_mp._storage.osio import Disk

T = TypeVar("T")
K = bp.Kind(1, 1)


class PathFaults(Disk):
    """The real disk, failing once the first ``op`` on a file named ``name``."""

    def __init__(self, op: str, name: str, err: int) -> None:
        super().__init__()
        self.op, self.name, self.err, self.armed = op, name, err, True

    def _do(self, op: str, path: str, fn: Callable[[], T], *, inject: bool = True) -> T:
        if self.armed and op == self.op and os.path.basename(path).startswith(self.name):
            self.armed = False
            err = self.err

            def fail() -> T:
                raise OSError(err, os.strerror(err))
            return super()._do(op, path, fail, inject=inject)
        return super()._do(op, path, fn, inject=inject)


@pytest.mark.parametrize(("op", "name", "err", "error"), [
    ("fallocate", POSITIONS_FILE, errno.ENOSPC, bp.DiskFull),
    ("open", POSITIONS_FILE, errno.EIO, bp.StorageError),
    ("write", SCOPE_HEADS_FILE, errno.ENOSPC, bp.DiskFull),
])
def test_a_fault_on_the_position_files_at_open(data_dir: str, op: str, name: str, err: int,
                                               error: type[bp.StorageError]) -> None:
    with bp.Engine.open(data_dir, SMALL) as e:
        receipts = [e.append(bp.Coordinate(f"e{i}", f"s{i % 3}"), K, i) for i in range(30)]
    os.unlink(os.path.join(data_dir, "index", POSITIONS_FILE))  # the next open must rebuild
    disk = PathFaults(op, name, err)
    with pytest.raises(error):
        bp.Engine.open(data_dir, SMALL, disk=disk)
    assert not disk.armed  # the fault was met
    with bp.Engine.open(data_dir, SMALL) as e:  # the lock was released; nothing lost; rebuilt
        assert [e.get(r.event_id).payload for r in receipts] == list(range(30))
        assert [ev.scope_position for ev in e.query_scope("s1").events] == list(range(1, 11))
    assert_verified(data_dir)
