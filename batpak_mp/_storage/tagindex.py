"""The tag index as the writer keeps it: sorted runs of (tag, sequence) postings.

Owns: filing every published event under its tags (``_format/tags``: each entity prefix,
its scope, its kind) in run files of consecutive sequences, built in the publish path once
``TAG_CHUNK`` events wait (numpy, one pass; Python only per entity not met before);
merging them on a merger thread, ``MERGE_FANOUT`` runs of one tier into one (so a log of n
events has O(log n) runs, none over ``MAX_RUN_POSTINGS``, and no merge ever delays a
commit); naming them in the manifest ``tags.man`` (updated in place as a seqlock); at
open, keeping the runs when they are this store's, of this boot and within the recovered
log, and building the rest from records.idx.
Invariants: the manifest names only complete run files; a run is never changed, only
replaced by a merge (the manifest first, then the old files go); runs cover ``1..through``
with ``through`` <= the published frontier; the run list and the manifest change under one
lock (builds append, the merger replaces a slice it read). Derived data, never fsynced:
after a reboot (a full recovery) they are rebuilt. A failure here never refuses a commit:
the events stay in the unindexed tail (queries scan it) and the build is tried again a
chunk later. Every OS call goes through ``osio.Disk``.
Must not import the engine, the read side or any process role.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import BatpakError, CorruptSegment
from .._format.record import RECORD_SIZE, RECORDS_HEADER_SIZE, numpy_dtype
from .._format.tags import (
    MANIFEST_GENERATION_AT,
    MANIFEST_HEADER_SIZE,
    MANIFEST_MAX_RUNS,
    MANIFEST_SIZE,
    RUN_HEADER_SIZE,
    TAGS_MANIFEST,
    decode_manifest,
    decode_run_header,
    encode_run_header,
    manifest_body,
    manifest_generation,
    manifest_header,
    prefix_tags,
    run_name,
    scope_and_kind_tags,
)
from .osio import Disk
from .planning import M_ENTITY, M_ENTITY_HASH, EventMeta

__all__ = ["TAG_CHUNK", "TagIndex"]

TAG_CHUNK = 1024  # events per run built in the publish path: a query scans at most this many unindexed records
MAX_RUN_POSTINGS = 1 << 21  # no merge past ~2M postings (32 MiB): bounds a merge's pause (~0.1 s) and memory
FANOUT_BITS = 3
MERGE_FANOUT = 1 << FANOUT_BITS  # runs of one level merged into one: a posting is rewritten log8(n / chunk) times
LEVEL_UNIT = 1 << 12  # postings of a level-0 run (about a chunk's); level k holds up to 8**(k+1) of them
CATCHUP_EVENTS = 1 << 18  # events per run while catching up at open (~1M postings)
NAMES_MAX = 1 << 20  # entity hash -> prefix tags remembered (then forgotten: rebuilt from hints or frames)
RECUR_MERGE = 64  # entities of one chunk met in an earlier one but not yet in the sorted table: merge them in


class TagIndex:
    """The tag runs of one data directory (the writer's side)."""

    def __init__(self, disk: Disk, idx_dir: str, store_key: int) -> None:
        self.disk = disk
        self.dir = idx_dir
        self.store_key = store_key
        self.manifest_path = os.path.join(idx_dir, TAGS_MANIFEST)
        self.manifest_fd = -1
        self.generation = 0  # of the manifest as last written (even)
        self.runs: list[tuple[int, int, int]] = []  # (lo, hi, postings), ascending
        self.opened = False
        self.failed: str | None = None  # why the last build failed (the tail waits); no traceback kept (it pins maps)
        self.rebuilt = 0  # events filed at the last open (tests and the recovery report)
        self._entity_of: Callable[[int], bytes] | None = None
        self._hints: list[Sequence[EventMeta]] = []  # groups noted since the last build: entity names
        self._hinted: dict[int, bytes] | None = None  # the hints by entity hash, made when first needed
        self._names = _PrefixRows()
        self._retry_tail = TAG_CHUNK
        self._lock = threading.RLock()  # runs, the manifest and the merger's flags
        self._wake = threading.Condition(self._lock)
        self._merger: threading.Thread | None = None
        self._merge_wanted = False
        self._stopping = False
        self.merge_failed: str | None = None  # why the last merge failed

    @property
    def through(self) -> int:
        return self.runs[-1][1] if self.runs else 0

    def close(self) -> None:
        merger = self._merger
        if merger is not None:
            with self._lock:
                self._stopping = True
                self._wake.notify()
            merger.join()  # a merge under way finishes (its files are whole, or removed by the next open)
            self._merger = None
        self._stopping = False
        self.opened = False
        if self.manifest_fd >= 0:
            self.disk.close_quietly(self.manifest_fd, self.manifest_path)
            self.manifest_fd = -1
        self._hints = []
        self._names = _PrefixRows()

    # -- open -------------------------------------------------------------------------------
    def open(self, records: Any, visible: int, *, trusted: bool, entity_of: Callable[[int], bytes]) -> None:
        """Keep the runs the manifest names when they are this store's, ``trusted`` (same
        boot) and within ``visible``; remove every other run file; file the rest of the
        log. ``entity_of(seq)``: the entity name of a published event (its frame)."""
        self.close()
        self._entity_of = entity_of
        self.runs = []
        start = 0
        published = False
        try:
            kept = self._open_manifest(visible)
            self.opened = True
            self.runs = kept if trusted else []
            start = self.through
            self._publish(self.runs)  # first: the old manifest may name runs of events a torn tail took back
            published = True
            names = {run_name(lo, hi) for lo, hi, _ in self.runs}
            for name in self.disk.listdir(self.dir):
                if name.startswith("tags-") and name.endswith(".run") and name not in names:
                    self.disk.unlink_quietly(os.path.join(self.dir, name))
            while self.through < visible:
                self._build(records, self.through + 1, min(visible, self.through + CATCHUP_EVENTS), merge=False)
                self.merge_all()  # here, not on the merger: the open is not a commit
        except Exception as exc:  # derived data: any failure leaves the tail to scans
            self.failed = _why(exc)  # the rest stays unindexed: queries scan it; a later chunk tries again
            if not published:  # the old manifest must not outlive a recovery it may not match
                self.opened = False
                self.disk.unlink_quietly(self.manifest_path)
        self.rebuilt = self.through - start

    def remove(self) -> None:
        """Keep no tag index (``EngineConfig.tag_index`` False): the manifest goes first (a
        reader that finds none filters the records), then every run file."""
        self.close()
        self.runs = []
        self.disk.unlink(self.manifest_path)
        for name in self.disk.listdir(self.dir):
            if name.startswith("tags-") and name.endswith(".run"):
                self.disk.unlink_quietly(os.path.join(self.dir, name))

    def _open_manifest(self, visible: int) -> list[tuple[int, int, int]]:
        """Open (or create) the manifest; the runs it names that are whole, this store's
        and within ``visible``, in order (a run past ``visible``: the log was cut below it,
        and it goes with every later one)."""
        path = self.manifest_path
        got = self.disk.open_existing(path, os.O_RDWR)
        fd = self.manifest_fd = -1 if got is None else got  # close() closes it whatever fails below
        if fd >= 0 and self.disk.fstat(fd, path).st_size != MANIFEST_SIZE:  # another layout's
            self.disk.close_quietly(fd, path)
            self.manifest_fd = -1
            self.disk.unlink(path)
        if self.manifest_fd < 0:
            fd = self.manifest_fd = self.disk.open(path, os.O_RDWR | os.O_CREAT)
            self.disk.truncate(fd, MANIFEST_SIZE, path)  # sparse; never shrinks (readers map it)
            return []
        head = self.disk.pread(fd, MANIFEST_HEADER_SIZE, 0, path)
        if len(head) < MANIFEST_HEADER_SIZE:
            return []
        self.generation = (manifest_generation(head) | 1) + 1  # past whatever a reader saw
        count = min(int.from_bytes(head[32:40], "little"), MANIFEST_MAX_RUNS)
        try:
            key, _, runs = decode_manifest(head + self.disk.pread(fd, 16 * count, MANIFEST_HEADER_SIZE, path), path)
        except (BatpakError, ValueError):
            return []
        if key != self.store_key:
            return []
        kept: list[tuple[int, int, int]] = []
        for lo, hi in runs:
            postings = self._check_run(lo, hi) if hi <= visible else None
            if postings is None:
                break
            kept.append((lo, hi, postings))
        return kept

    def _check_run(self, lo: int, hi: int) -> int | None:
        """The postings of run ``lo..hi`` when its file is whole and this store's."""
        path = os.path.join(self.dir, run_name(lo, hi))
        try:
            fd = self.disk.open_existing(path, os.O_RDONLY)
            if fd is None:
                return None
            try:
                size = self.disk.fstat(fd, path).st_size
                head = self.disk.pread(fd, RUN_HEADER_SIZE, 0, path)
            finally:
                self.disk.close_quietly(fd, path)
        except BatpakError:
            return None
        try:
            key, got_lo, got_hi, postings = decode_run_header(head, size, path)
        except (BatpakError, ValueError):
            return None
        if key != self.store_key or (got_lo, got_hi) != (lo, hi):
            return None
        return postings

    # -- the publish path ---------------------------------------------------------------------
    def note(self, metas: Sequence[EventMeta], records: Any, last_seq: int) -> None:
        """A group was indexed (its records are in ``records``): build a run once a chunk
        of events waits."""
        if not self.opened:
            return
        self._hints.append(metas)
        tail = last_seq - self.through
        if tail >= self._retry_tail:
            self.build(records, last_seq)

    def build(self, records: Any, last_seq: int) -> None:
        """File every event up to ``last_seq`` now (the writer when idle, and at close)."""
        if not self.opened or last_seq <= self.through:
            return
        try:
            self._build(records, self.through + 1, last_seq)
        except Exception as exc:  # derived data: never refuses the commit that noted it
            self.failed = _why(exc)
            self._retry_tail = last_seq - self.through + TAG_CHUNK  # a chunk later
        else:
            self.failed = None
            self._retry_tail = TAG_CHUNK
        finally:
            self._hints = []
            self._hinted = None

    # -- runs ---------------------------------------------------------------------------------
    def _build(self, records: Any, lo: int, hi: int, *, merge: bool = True) -> None:
        import numpy as np

        n = hi - lo + 1
        recs = np.frombuffer(records, dtype=numpy_dtype(), count=n, offset=RECORDS_HEADER_SIZE + (lo - 1) * RECORD_SIZE)
        seqs = np.arange(lo, hi + 1, dtype=np.uint64)
        table = self._names.rows(recs["entity_hash"], lo, self._name_of)
        scope, kind = scope_and_kind_tags(recs["scope_hash"], recs["kind"])
        # one row per event (its prefixes, scope, kind): raveled, the postings are in
        # sequence order, so a stable sort by tag alone leaves each tag's sequences ascending
        tags = np.concatenate([table, scope[:, None], kind[:, None]], axis=1)
        width = tags.shape[1]
        tags = tags.reshape(-1)
        postings = np.repeat(seqs, width)
        keep = tags != 0
        tags, postings = tags[keep], postings[keep]
        order = np.argsort(tags, kind="stable")
        self._write_run(lo, hi, tags[order], postings[order])
        with self._lock:
            self._publish([*self.runs, (lo, hi, len(tags))])
            due = _merge_due(self.runs) is not None
        if due and merge:
            self._start_merger()

    # -- merges (on the merger thread: a merge of ~2M postings takes ~0.2 s, never in a commit) --
    def _start_merger(self) -> None:
        with self._lock:
            self._merge_wanted = True
            if self._merger is None or not self._merger.is_alive():
                self._merger = threading.Thread(target=self._merge_loop, name="batpak-tag-merger", daemon=True)
                self._merger.start()
            self._wake.notify()

    def _merge_loop(self) -> None:
        while True:
            with self._lock:
                while not self._merge_wanted and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                self._merge_wanted = False
            self.merge_all()

    def merge_all(self) -> None:
        """Merge while some tier is full (the merger thread; open and tests call it too).
        A failure is recorded and waits for the next run to be added."""
        try:
            while True:
                with self._lock:
                    if self._stopping and threading.current_thread() is self._merger:
                        return
                    due = _merge_due(self.runs)
                    if due is None:
                        return
                    at, count = due
                    part = self.runs[at:at + count]
                merged = self._merge(part)  # outside the lock: builds go on meanwhile (they only append)
                with self._lock:
                    i = self.runs.index(part[0])
                    self._publish([*self.runs[:i], merged, *self.runs[i + len(part):]])
                for lo, hi, _ in part:  # after the manifest stopped naming them (a reader maps anew)
                    self.disk.unlink_quietly(os.path.join(self.dir, run_name(lo, hi)))
        except Exception as exc:  # derived data: the runs stay as they are, a later run tries again
            self.merge_failed = _why(exc)

    def _name_of(self, h: int, seq: int) -> bytes:
        """The entity name of hash ``h`` (at sequence ``seq``): from the groups noted since
        the last build, else from its frame."""
        hinted = self._hinted
        if hinted is None:
            hinted = self._hinted = {m[M_ENTITY_HASH]: m[M_ENTITY] for metas in self._hints for m in metas}
        entity = hinted.get(h)
        if entity is None:
            assert self._entity_of is not None
            entity = self._entity_of(seq)
        return entity

    def _write_run(self, lo: int, hi: int, tags: Any, postings: Any) -> None:
        body = b"".join((encode_run_header(self.store_key, lo, hi, len(tags)), tags.astype("<u8").tobytes(),
                         postings.astype("<u8").tobytes()))
        self.disk.write_file(os.path.join(self.dir, run_name(lo, hi)), body)

    def _merge(self, runs: list[tuple[int, int, int]]) -> tuple[int, int, int]:
        """Write one run holding the postings of consecutive ``runs``: each tag's postings
        of the older runs first (their sequences are lower, so a stable sort by tag keeps
        every tag's sequences ascending)."""
        import numpy as np

        tag_cols, seq_cols = [], []
        for lo, hi, p in runs:
            path = os.path.join(self.dir, run_name(lo, hi))
            raw = self.disk.read_file(path)
            if raw is None or len(raw) != RUN_HEADER_SIZE + 16 * p:
                raise CorruptSegment(path, 0, "tag run changed under the writer")
            col = np.frombuffer(raw, dtype="<u8", offset=RUN_HEADER_SIZE)
            tag_cols.append(col[:p])
            seq_cols.append(col[p:])
        tags = np.concatenate(tag_cols)
        order = np.argsort(tags, kind="stable")
        lo, hi = runs[0][0], runs[-1][1]
        self._write_run(lo, hi, tags[order], np.concatenate(seq_cols)[order])
        return lo, hi, len(tags)

    def _publish(self, runs: list[tuple[int, int, int]]) -> None:
        """Name ``runs`` in the manifest (odd generation, runs, header with the next even
        one), then take them as current."""
        if len(runs) > MANIFEST_MAX_RUNS:
            raise CorruptSegment(self.manifest_path, 0, f"more than {MANIFEST_MAX_RUNS} tag runs")
        fd, path, g = self.manifest_fd, self.manifest_path, self.generation
        pairs = [(lo, hi) for lo, hi, _ in runs]
        self.disk.pwrite(fd, (g + 1).to_bytes(8, "little"), MANIFEST_GENERATION_AT, path)
        self.disk.pwrite(fd, manifest_body(pairs), MANIFEST_HEADER_SIZE, path)
        self.disk.pwrite(fd, manifest_header(self.store_key, g + 2, pairs), 0, path)
        self.generation = g + 2
        self.runs = runs


class _PrefixRows:
    """Entity hash -> its prefix tags, as numpy rows (padded with 0): a sorted table looked
    up for a whole chunk at once, plus the entities met since it was last merged."""

    def __init__(self) -> None:
        import numpy as np

        self.hashes = np.zeros(0, dtype=np.uint64)
        self.table = np.zeros((0, 1), dtype=np.uint64)
        self.recent: dict[int, tuple[int, ...]] = {}

    def rows(self, hashes_of: Any, first_seq: int, name_of: Callable[[int, int], bytes]) -> Any:
        """The prefix-tag row of each event whose entity hash is in ``hashes_of`` (the
        events of sequences ``first_seq``, ``first_seq + 1``, ...): one look-up of the whole
        chunk in the sorted table; Python only for entities not in it."""
        import numpy as np

        hashes, table = self.hashes, self.table
        at = np.minimum(np.searchsorted(hashes, hashes_of), max(len(hashes) - 1, 0))
        hit = hashes[at] == hashes_of if len(hashes) else np.zeros(len(hashes_of), dtype=bool)
        if hit.all():
            return table[at]
        missed = np.flatnonzero(~hit)
        uniq, first, inverse = np.unique(hashes_of[missed], return_index=True, return_inverse=True)
        rows = []
        again = 0  # entities met before but not yet in the table: they recur, worth a merge
        for h, i in zip(uniq.tolist(), first.tolist(), strict=True):
            row = self.recent.get(h)
            if row is None:
                row = self.recent[h] = prefix_tags(name_of(h, first_seq + int(missed[i])))
            else:
                again += 1
            rows.append(row)
        width = max(table.shape[1], max(len(r) for r in rows))
        if again >= RECUR_MERGE or len(self.recent) >= max(4096, len(hashes) // 8):
            self._merge(width)
            return self.rows(hashes_of, first_seq, name_of)  # every entity is in the table now
        out = np.zeros((len(hashes_of), width), dtype=np.uint64)
        out[:, :table.shape[1]] = table[at] if len(hashes) else 0
        new = np.zeros((len(rows), width), dtype=np.uint64)
        for j, row in enumerate(rows):
            new[j, :len(row)] = row
        out[missed] = new[inverse.reshape(-1)]
        return out

    def _merge(self, width: int) -> None:
        import numpy as np

        if len(self.hashes) + len(self.recent) > NAMES_MAX:  # forget all (rebuilt from hints or frames)
            self.hashes, self.table = np.zeros(0, dtype=np.uint64), np.zeros((0, 1), dtype=np.uint64)
        new_h = np.array(list(self.recent), dtype=np.uint64)
        new_t = np.zeros((len(new_h), width), dtype=np.uint64)
        for i, row in enumerate(self.recent.values()):
            new_t[i, :len(row)] = row
        old_t = np.zeros((len(self.hashes), width), dtype=np.uint64)
        old_t[:, :self.table.shape[1]] = self.table
        hashes = np.concatenate([self.hashes, new_h])
        order = np.argsort(hashes)
        self.hashes, self.table, self.recent = hashes[order], np.concatenate([old_t, new_t])[order], {}


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _merge_due(runs: Sequence[tuple[int, int, int]]) -> tuple[int, int] | None:
    """(where, how many) consecutive runs to merge next: the newest place where
    ``MERGE_FANOUT`` runs of one level stand, all of them, or as many of the first as fit
    in ``MAX_RUN_POSTINGS`` (at least 2: a tier of big runs still halves); None: no tier
    is full."""
    for at in range(len(runs) - MERGE_FANOUT, -1, -1):
        part = runs[at:at + MERGE_FANOUT]
        if len({_level(p) for _, _, p in part}) != 1:
            continue
        total, k = 0, 0
        for _, _, p in part:
            if total + p > MAX_RUN_POSTINGS:
                break
            total, k = total + p, k + 1
        if k >= 2:
            return at, k
    return None


def _level(postings: int) -> int:
    """The merge tier of a run of ``postings``: 0 below 8 units, then one more per factor 8."""
    return (postings // LEVEL_UNIT).bit_length() // FANOUT_BITS
