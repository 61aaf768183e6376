"""batpak_mp.jetstream: the journal past one machine, through NATS JetStream.

Owns the public face of the adapter (docs/SCALING.md): ``connect(url, stream)`` (the
remote reader, ``RemoteStore``), ``restore_from_stream(url, stream, data_dir)``, the
bridge (``run_bridge``, ``BridgeConfig``, ``read_status``; the process is
``python -m batpak_mp.jetstream`` or ``batpak-mp bridge``) and the message mapping's
names. A role on top of the package: it reads journals through ``_read`` and the control
block, and writes one only through ``_storage`` at restore. Needs ``nats-py`` (the
``jetstream`` extra). Must not import the writer, the client, the service or the
supervisor.
"""

from __future__ import annotations

from .._errors import StreamMismatch, StreamTampered, StreamUnavailable
from ._bridge import STATUS_FILE, Bridge, BridgeConfig, read_status, run_bridge
from ._mapping import ChainCheck, default_prefix, entity_token, token_entity
from ._remote import RemoteStore, RemoteSubscription, connect
from ._restore import StreamRestoreReport, restore_from_stream

__all__ = [
    "STATUS_FILE",
    "Bridge",
    "BridgeConfig",
    "ChainCheck",
    "RemoteStore",
    "RemoteSubscription",
    "StreamMismatch",
    "StreamRestoreReport",
    "StreamTampered",
    "StreamUnavailable",
    "connect",
    "default_prefix",
    "entity_token",
    "read_status",
    "restore_from_stream",
    "run_bridge",
    "token_entity",
]
