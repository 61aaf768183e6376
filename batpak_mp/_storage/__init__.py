"""The write side: the journal engine, the single owner of a data directory.

Owns: the OS seam (``osio.Disk``), recovery at open, segment files, index files,
visibility fences and the commit path. Used by the writer process and, in-process, by
tests and tools. Must not import the IPC layer or any process role.
"""
