"""The read side: committed events read straight from mapped files, with no writer.

Owns: the reader (get, history, query_after, walk_ancestors bounded by a frontier),
``bp.verify`` and ``batpak-mp inspect``. Never writes, never takes the writer's lock.
Must not import the write side (``_storage``), the IPC layer or any process role.
"""
