"""The cross-process contract: what the writer, the clients and the supervisor agree on.

Owns: IPC object names derived from a data directory, exit codes, the wire codec of
requests and replies, the control block (layout and seqlock) and futex wake-ups. The
supervisor imports this layer too, so each name and code is written once.
Must not import the storage layer, the read layer or any process role.
"""
