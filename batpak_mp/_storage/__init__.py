"""The write side: the journal engine, the single owner of a data directory.

Owns: the engine facade (``engine``), its commit path (``journal``), the pure commit
planning (``planning``), segment files (``segments``), index files (``indexfiles``),
recovery at open (``recovery``), fences.tbl (``fences``), the tunables (``config``) and
the OS seam (``osio.Disk``, the only module here that calls the OS: checked by
tests/rules/test_storage_seam.py). Used by the writer process and, in-process, by
tests and tools. Must not import the IPC layer or any process role.
"""
