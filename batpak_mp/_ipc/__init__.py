"""The cross-process contract: what the writer, the clients and the supervisor agree on.

Owns, one module each: ``names`` (every IPC object name and lock file derived from a
data directory, and how ``/dev/shm`` shows them), ``codes`` (exit codes of the writer and
the supervisor, the supervisor's command line, readiness lines), ``wire`` (the codec of
queue messages, requests and replies), ``control`` (the control block's layout and
seqlock) and ``futex`` (cross-process wake-ups). The supervisor imports this layer too,
so each name and code is written once (docs/PROTOCOL.md).
Must not import the storage layer, the read layer or any process role.
"""
