"""``python -m batpak_mp.jetstream DATA_DIR --nats URL --stream NAME``: the bridge process.

Owns: the bridge's command line as the supervisor starts it (``_ipc.codes.bridge_argv``
builds it; ``batpak-mp bridge`` is the same for people) and its exit code.
Must not import the writer, the client, the service or the supervisor.
"""

from __future__ import annotations

import argparse
import sys

from .._errors import BatpakError
from .._ipc import codes as C
from ._bridge import EXIT_REFUSED, BridgeConfig, run_bridge


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batpak_mp.jetstream", description="Bridge a journal into JetStream.")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument(C.OPT_BRIDGE_NATS, dest="url", required=True, help="NATS URL (several: comma-separated)")
    p.add_argument(C.OPT_BRIDGE_STREAM_NAME, dest="stream", required=True, help="JetStream stream name")
    p.add_argument("--prefix", default=None, help="subject prefix (default batpak.<stream>)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of a stream the bridge creates")
    p.add_argument(C.OPT_SUPERVISOR_PID, dest="supervisor_pid", type=int, default=None)
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        return run_bridge(BridgeConfig(args.data_dir, args.url, args.stream, args.prefix, args.replicas,
                                       args.supervisor_pid), log=log)
    except BatpakError as exc:
        log(f"bridge: {exc}")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
