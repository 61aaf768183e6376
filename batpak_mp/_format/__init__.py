"""Pure codecs of the on-disk format, one module per section of docs/FORMAT.md.

Owns: every byte layout of a data directory (frames, segment header/footer/trailer,
index records, lookup tables, checkpoint, store.meta, event ids) and the pure scan
that finds where a segment's committed log ends. Each layout is defined once here and
everything else (readers, recovery, verify, inspect, the engine) decodes through it.
Invariants: bytes in, values out; decoders are total (a value, "need more", or one
typed error). Must not import os, mmap, posix_ipc, anything with a clock, or any other
layer of the package (only ``_errors`` and ``_values``).
"""
