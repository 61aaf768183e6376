"""The read side of the tag index: ``index/tags.man`` and the run files it names, mapped
read-only (docs/FORMAT.md §6.4; the writer's side is ``_storage/tagindex``).

Owns: noticing a new manifest generation (a word of the mapped manifest, no system call),
mapping the runs it names
(again when a merge replaced some), and the candidate sequences of a region in ascending
order: the postings of the cheapest of the region's tag options (each a set of tag ranges)
in ``(after, upto]``, run after run (the unindexed tail above them is the caller's).
Invariants: nothing here is trusted beyond "a superset of the events the region selects":
``_read/queries`` checks every candidate against its record, the fences and its frame. A
missing or unreadable manifest or run reads as "no index" (the caller scans). Maps are never
closed while a query may iterate them (they go when the last reference does).
Must not import the engine, writer or client.
"""

from __future__ import annotations

import heapq
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

from .._errors import BatpakError
from .._format.tags import (
    MANIFEST_HEADER_SIZE,
    MANIFEST_MAX_RUNS,
    MANIFEST_SIZE,
    RUN_HEADER_SIZE,
    TAGS_MANIFEST,
    decode_manifest,
    decode_run_header,
    manifest_generation,
    region_tag_options,
    run_name,
    seq_span,
    tag_spans,
)

__all__ = ["TagMaps"]

STALE_BEHIND = 8 * 1024  # sequences the runs may lag the view before the manifest file is looked up again
NATIVE_ORDER = sys.byteorder == "little"  # the columns are read as native u64 (a big-endian host scans)


SPANS_CACHED = 1024  # tag ranges a run remembers the postings spans of (a run never changes)


class _Run:
    __slots__ = ("_spans", "hi", "ino", "lo", "map", "seqs", "tags")

    def __init__(self, lo: int, hi: int, m: mmap.mmap, postings: int, ino: int) -> None:
        self.lo, self.hi, self.map, self.ino = lo, hi, m, ino
        col = memoryview(m)[RUN_HEADER_SIZE:RUN_HEADER_SIZE + 16 * postings].cast("Q")
        self.tags = col[:postings]
        self.seqs = col[postings:]
        self._spans: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def spans(self, first_tag: int, last_tag: int, after: int, upto: int) -> list[tuple[int, int]]:
        """[i, j) of the postings of each tag in ``first_tag..last_tag`` with
        ``after < seq <= upto`` (the tags' spans are remembered; the sequence bounds cost
        two binary searches only where the run reaches past them)."""
        key = (first_tag, last_tag)
        found = self._spans.get(key)
        if found is None:
            if len(self._spans) >= SPANS_CACHED:
                self._spans.clear()
            found = self._spans[key] = tag_spans(self.tags, first_tag, last_tag)
        if after < self.lo and self.hi <= upto:
            return found
        out = []
        for first, end in found:
            i, j = seq_span(self.seqs, first, end, after, upto)
            if j > i:
                out.append((i, j))
        return out


class TagMaps:
    """tags.man and its runs, mapped read-only."""

    def __init__(self, idx_dir: str, map_readonly: Callable[[str], mmap.mmap | None]) -> None:
        self._map = map_readonly  # the reader's (it imports this module, so it hands it in)
        self._dir = idx_dir
        self._path = os.path.join(idx_dir, TAGS_MANIFEST)
        self._manifest: mmap.mmap | None = None
        self._generation = -1  # of the runs held (-1: none read yet)
        self.runs: list[_Run] = []

    def close(self) -> None:
        self.runs = []  # the maps close with their last reference (a query may still iterate one)
        self._manifest = None
        self._generation = -1

    @property
    def through(self) -> int:
        return self.runs[-1].hi if self.runs else 0

    def current(self, visible: int = 0) -> list[_Run]:
        """The runs of the manifest's newest complete generation; while the writer is
        between two, the runs read before (their files stay whole); none when there is no
        manifest or it cannot be read. Runs far behind ``visible`` (a writer that stopped
        filing, or replaced the manifest file: a restart with the index off, then on) send
        it back to the file system for the manifest."""
        m = self._manifest
        if m is not None and visible - self.through > STALE_BEHIND:
            m = None
        if m is None or len(m) != MANIFEST_SIZE:
            self._manifest = m = self._map_manifest()
            self._generation = -1  # maybe another file: read its runs whatever its generation
            if m is None:
                self.runs = []
                return self.runs
        generation = manifest_generation(m)
        if generation != self._generation and not generation & 1:
            runs = self._load(m, generation)
            if runs is not None:
                self.runs, self._generation = runs, generation
            elif generation & 1 == 0:
                self._manifest = None  # torn or replaced: map it again next time
        return self.runs

    def _map_manifest(self) -> mmap.mmap | None:
        if not NATIVE_ORDER:
            return None
        try:
            m = self._map(self._path)
        except OSError:
            return None
        return m if m is not None and len(m) == MANIFEST_SIZE else None

    def _load(self, m: mmap.mmap, generation: int) -> list[_Run] | None:
        """The runs of generation ``generation`` (None: it changed while read, or is bad)."""
        count = min(int.from_bytes(m[32:40], "little"), MANIFEST_MAX_RUNS)
        copy = m[:MANIFEST_HEADER_SIZE + 16 * count]
        if manifest_generation(m) != generation:
            return None
        try:
            _, got, pairs = decode_manifest(copy, self._path)
        except BatpakError:
            return None
        if got != generation:
            return None
        have = {(r.lo, r.hi, r.ino): r for r in self.runs}
        runs = []
        for lo, hi in pairs:
            try:  # a run of the same name written anew (a later writer's) is another file
                ino = os.stat(os.path.join(self._dir, run_name(lo, hi))).st_ino
            except OSError:
                return None  # merged away since (the manifest moved on): keep what we had
            run = have.get((lo, hi, ino)) or self._map_run(lo, hi, ino)
            if run is None:
                return None
            runs.append(run)
        return runs

    def _map_run(self, lo: int, hi: int, ino: int) -> _Run | None:
        path = os.path.join(self._dir, run_name(lo, hi))
        try:
            m = self._map(path)
        except OSError:
            return None
        if m is None:
            return None
        try:
            _, got_lo, got_hi, postings = decode_run_header(m[:RUN_HEADER_SIZE], len(m), path)
        except BatpakError:
            return None
        if (got_lo, got_hi) != (lo, hi):
            return None
        return _Run(lo, hi, m, postings, ino)

    def candidates(self, region: Any, after: int, upto: int) -> tuple[Iterator[int], int] | None:
        """(the sequences in ``(after, upto]`` up to ``through`` that may hold an event
        ``region`` selects, ascending: the postings of its cheapest tag option in the runs;
        ``through``, the last sequence they cover — above it is the tail, for the caller).
        None: the region names nothing the index files, or no run covers the span."""
        options = region_tag_options(region)
        if options is None:
            return None
        runs = [r for r in self.current(upto) if r.hi > after and r.lo <= upto]
        through = min(max((r.hi for r in runs), default=0), upto)
        if not runs:
            return None
        best: list[list[tuple[_Run, int, int]]] | None = None
        best_count = -1
        for ranges in options:
            spans: list[list[tuple[_Run, int, int]]] = []
            count = 0
            for run in runs:
                per_run = []
                for first_tag, last_tag in ranges:
                    for i, j in run.spans(first_tag, last_tag, after, upto):
                        per_run.append((run, i, j))
                        count += j - i
                spans.append(per_run)
            if best is None or count < best_count:
                best, best_count = spans, count
        assert best is not None
        return chain.from_iterable(_merged(per_run) for per_run in best), through


def _merged(per_run: list[tuple[_Run, int, int]]) -> Iterable[int]:
    """The postings of one run's spans in ascending order (several tags: merged)."""
    if not per_run:
        return ()
    if len(per_run) == 1:
        run, i, j = per_run[0]
        return run.seqs[i:j]
    return heapq.merge(*(run.seqs[i:j] for run, i, j in per_run))
