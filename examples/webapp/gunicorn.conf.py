"""gunicorn settings for the example bank (``gunicorn -c examples/webapp/gunicorn.conf.py
examples.webapp.app:app``). Options given on the command line override these.

Sync workers (gunicorn's default): each worker process serves one request at a time, with
its own ``Store`` and its own projection cache. ``worker_exit`` detaches the worker's
``Store`` so its shared-memory area goes away at once, not when the writer notices the
process is gone.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("BANK_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "sync"
timeout = 30
graceful_timeout = 10


def worker_exit(server: Any, worker: Any) -> None:
    # gunicorn calls this in the worker as it exits (and in the master for a worker that
    # vanished, where ``wsgi`` is unset); ``wsgi`` is the BankApp
    close = getattr(getattr(worker, "wsgi", None), "close", None)
    if callable(close):
        close()
